"""AdamW against Muon on the same DiT2D, data and seed: training loss against steps and seconds.

    python benchmarks/muon_vs_adamw.py --data_dir ../shared/data/cifar10/train --steps 200
    python benchmarks/muon_vs_adamw.py --data_dir ... --runs adamw muon muon:muon_lr=0.01 \\
        muon:muon_split_fused=false --set image_size=16 --threads 1

Every run is a full `train_flow_matching.py` run (the tiny preset, --steps optimizer steps, no
sample grids) that differs only in the run's `optimizer:flag=value,...` spec; `--set` flags apply
to all runs. Afterwards it prints, per run:
    fixed steps   training loss over the last --log_every steps, and a held-out loss of the final
                  weights on --eval_images test images with fixed noise and times (less noisy)
    fixed time    the training loss the run had reached when the fastest run finished
and writes <out>/runs.csv (run, step, seconds, loss) and <out>/loss.png (loss against steps and
against seconds). Seconds count training only (no start-up, evaluation or checkpoint writes).
Wall-clock numbers move with whatever else runs on the machine: compare runs of one invocation.
Because a busy machine can slow one run and not the other, it first times the pieces of one
step with the runs' model and batch, interleaved and repeated (median): forward + backward, an
AdamW step and a Muon step.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flow_matching  # noqa: E402
from benchmarks.common import run_script, save_chart  # noqa: E402
from configs.flow_matching_config import parse_flow_matching_config  # noqa: E402
from data.datasets import build_image_dataset  # noqa: E402
from models.dit_2d import dit_from_config  # noqa: E402
from rebuild import load_flow_model  # noqa: E402
from training.optim import build_optimizer  # noqa: E402



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_dir", default="../shared/data/cifar10/train", help="training ImageFolder")
    p.add_argument("--eval_dir", default=None, help="held-out ImageFolder; default: data_dir with train -> test")
    p.add_argument("--runs", nargs="+", default=["adamw", "muon"],
                   help="one spec per run: OPTIMIZER[:flag=value,flag=value]")
    p.add_argument("--set", nargs="*", default=[], metavar="FLAG=VALUE", help="config flags for every run")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    p.add_argument("--log_every", type=int, default=10, help="steps per logged loss window")
    p.add_argument("--eval_images", type=int, default=512, help="held-out images for the final loss")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    p.add_argument("--out", default="out/muon_vs_adamw", help="folder for runs.csv, loss.png, run logs and checkpoints")
    args = p.parse_args(argv)
    if args.steps < args.log_every or args.log_every < 1:
        p.error(f"--steps {args.steps} must be >= --log_every {args.log_every} >= 1")
    for spec in args.runs:
        if spec.count(":") > 1:
            p.error(f"run spec {spec!r} has more than one ':'; write OPTIMIZER:flag=value,flag=value")
    return args, p


def flags_of(pairs: List[str]) -> List[str]:
    flags = []
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"{pair!r} is not flag=value (e.g. muon_lr=0.01)")
        flags += [f"--{name}", value]
    return flags


def run_flags(spec: str, args, folder: str) -> List[str]:
    optimizer, _, rest = spec.partition(":")
    return (["--preset", "tiny", "--dataset", "imagefolder", "--data_dir", args.data_dir,
             "--device", args.device, "--train_steps", str(args.steps), "--log_every", str(args.log_every),
             "--save_every", str(args.steps), "--sample_every", "0", "--checkpoint_dir", folder,
             "--optimizer", optimizer]
            + flags_of(args.set) + flags_of([p for p in rest.split(",") if p]))


def read_curve(folder: str) -> List[Dict[str, float]]:
    """[{step, seconds, loss}] from metrics.jsonl; seconds add up each window's duration."""
    with open(os.path.join(folder, "config.json")) as f:
        batch_size = json.load(f)["batch_size"]
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    curve, seconds, previous = [], 0.0, 0
    for r in records:
        seconds += (r["step"] - previous) * batch_size / r["images_per_sec"]
        previous = r["step"]
        curve.append({"step": r["step"], "seconds": seconds, "loss": r["loss"]})
    return curve


@torch.no_grad()
def held_out_loss(checkpoint: str, eval_dir: str, count: int, device: str) -> float:
    """Flow-matching loss of the final (non-EMA) weights on `count` held-out images spread over
    the classes, with noise and times fixed by one seed, so runs are scored on the same draws."""
    model, ckpt = load_flow_model(checkpoint, weights="model", device=device)
    c = ckpt["config"]
    dataset, _ = build_image_dataset("imagefolder", eval_dir, c["image_size"], c["in_channels"], train=False)
    index = torch.linspace(0, len(dataset) - 1, min(count, len(dataset))).long().tolist()
    gen = torch.Generator(device=device).manual_seed(1234)
    total, seen = 0.0, 0
    for start in range(0, len(index), 128):
        items = [dataset[i] for i in index[start:start + 128]]
        x = torch.stack([im for im, _ in items]).to(device)
        y = torch.tensor([label for _, label in items], device=device)
        loss = flow_matching.flow_matching_loss(model, x, y, num_classes=c["num_classes"],
                                                class_dropout_prob=0.0, generator=gen)
        total += loss.item() * len(items)
        seen += len(items)
    return total / seen


def step_costs(flags: List[str], repeats: int = 7) -> Dict[str, float]:
    """Median milliseconds of forward + backward, an AdamW step and a Muon step (the runs' model,
    batch and device; random images), measured in turns so load changes hit all three alike."""
    config = parse_flow_matching_config(flags + ["--num_classes", "10"])
    device = torch.device(config.device)
    model = dit_from_config(config).to(device)
    optimizers = {}
    for name in ("adamw", "muon"):
        config.optimizer = name
        optimizers[name] = build_optimizer(model, config, device)
    x = torch.randn(config.batch_size, config.in_channels, config.image_size, config.image_size, device=device)
    y = torch.randint(0, 10, (config.batch_size,), device=device)
    times: Dict[str, List[float]] = {"forward + backward": [], "adamw step": [], "muon step": []}

    def timed(key, fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times[key].append(1000 * (time.perf_counter() - start))

    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        timed("forward + backward", lambda: flow_matching.flow_matching_loss(model, x, y, num_classes=10).backward())
        # Steps on the same gradient: only their cost is measured, not where they lead.
        with torch.no_grad():
            saved = [p.detach().clone() for p in model.parameters()]
        for name, opt in optimizers.items():
            timed(f"{name} step", opt.step)
            with torch.no_grad():
                for p, s in zip(model.parameters(), saved):
                    p.copy_(s)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def loss_at_time(curve, seconds: float) -> float:
    """The loss of the last window that ended by `seconds`."""
    done = [point for point in curve if point["seconds"] <= seconds * (1 + 1e-9)]
    return done[-1]["loss"] if done else float("nan")


def step_at_time(curve, seconds: float) -> int:
    done = [point for point in curve if point["seconds"] <= seconds * (1 + 1e-9)]
    return done[-1]["step"] if done else 0


# ----------------------------------------------------------------------------- plot

def plot(curves: Dict[str, list], path: str) -> None:
    losses = sorted(p["loss"] for c in curves.values() for p in c)
    # Skip the first windows' high losses so the region where runs differ fills the panel.
    y_range = (losses[0] * 0.98, losses[int(0.9 * (len(losses) - 1))] * 1.02)
    panels = [({name: [(p[key], p["loss"]) for p in curve] for name, curve in curves.items()}, label)
              for key, label in (("step", "optimizer steps"), ("seconds", "training seconds"))]
    save_chart(panels, list(curves), "training loss (mean over each log window)", path, y_range)


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args, parser = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    eval_dir = args.eval_dir or os.path.join(os.path.dirname(os.path.normpath(args.data_dir)), "test")
    if not os.path.isdir(eval_dir):
        parser.error(f"--eval_dir {eval_dir} is not a folder; pass a held-out ImageFolder")
    os.makedirs(args.out, exist_ok=True)
    try:
        costs = step_costs(run_flags("adamw", args, os.path.join(args.out, "step_costs")))
    except ValueError as err:
        parser.error(str(err))
    print("median ms per step: " + ", ".join(f"{k} {v:.1f}" for k, v in costs.items()), flush=True)
    curves, held_out = {}, {}
    # A spec given twice (the same run again, e.g. for the spread of its timing) gets a row of its own.
    labels = [spec if args.runs.count(spec) == 1 else f"{spec} #{args.runs[:n + 1].count(spec)}"
              for n, spec in enumerate(args.runs)]
    for n, (spec, label) in enumerate(zip(args.runs, labels)):
        folder = os.path.join(args.out, f"run{n}")
        if os.path.exists(os.path.join(folder, "metrics.jsonl")):
            os.remove(os.path.join(folder, "metrics.jsonl"))
        try:
            flags = run_flags(spec, args, folder)
        except ValueError as err:
            parser.error(str(err))
        print(f"[{n + 1}/{len(args.runs)}] {spec}: train_flow_matching.py {' '.join(flags)}", flush=True)
        # The training script itself, in a subprocess with this run's thread count.
        env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
        with open(os.path.join(args.out, f"run{n}.log"), "w") as log:
            code = run_script([sys.executable, os.path.join(ROOT, "train_flow_matching.py"), *flags],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
        if code != 0:
            print(f"error: run {spec!r} exited with code {code}; see {args.out}/run{n}.log", file=sys.stderr)
            return 2 if code == 2 else 1
        curves[label] = read_curve(folder)
        held_out[label] = held_out_loss(os.path.join(folder, "flow_matching_final.pt"), eval_dir,
                                        args.eval_images, args.device)
        last = curves[label][-1]
        print(f"    {last['seconds']:.1f} s, last-window loss {last['loss']:.4f}, held-out {held_out[label]:.4f}", flush=True)

    budget = min(c[-1]["seconds"] for c in curves.values())
    print(f"\nthreads {torch.get_num_threads()}, steps {args.steps}, flags {' '.join(flags_of(args.set)) or '(tiny preset)'}")
    print(f"| run | loss @ {args.steps} steps | held-out loss @ {args.steps} steps | s / step "
          f"| step reached @ {budget:.0f} s | loss @ {budget:.0f} s |")
    print("|---|---|---|---|---|---|")
    for label, curve in curves.items():
        print(f"| {label} | {curve[-1]['loss']:.4f} | {held_out[label]:.4f} | {curve[-1]['seconds'] / args.steps:.2f} "
              f"| {step_at_time(curve, budget)} | {loss_at_time(curve, budget):.4f} |")

    with open(os.path.join(args.out, "runs.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "step", "seconds", "loss"])
        for label, curve in curves.items():
            writer.writerows([label, p["step"], f"{p['seconds']:.3f}", f"{p['loss']:.6f}"] for p in curve)
    plot(curves, os.path.join(args.out, "loss.png"))
    print(f"wrote {args.out}/runs.csv and {args.out}/loss.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
