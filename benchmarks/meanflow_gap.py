"""How far a model's K-jump samples land from the endpoint of its own ODE, from the same noise.

    python benchmarks/meanflow_gap.py benchmarks/runs/repo_seed0/flow_matching_final.pt \
        benchmarks/runs/repo_seed0_objective_meanflow_..._init_from_.../checkpoint_0000100.pt --device cpu
    python benchmarks/meanflow_gap.py RUN/flow_matching_final.pt --samplers euler midpoint ab2 --jumps 5 10 \
        --reference_steps 100

A MeanFlow model's average velocity is right when K jumps of it reach the point its own velocity
field (u at r = t) reaches by integrating finely; FID cannot say which of the two is off, this can.
For each checkpoint (EMA weights, its own config's CFG scale): the same --num_samples noises
(per-sample seeds from --seed, the labels cycling through the classes) are integrated by the
midpoint solver with --reference_steps steps (the reference), and by K = --jumps jumps: the
meanflow sampler on a MeanFlow checkpoint, K steps of each of --samplers (default Euler) on a
flow-matching one (its K-step answer, the baseline a MeanFlow fine-tune starts from; with other
solvers, each one's error at K steps, to compare them at equal NFE). Printed per checkpoint and
solver: the mean square difference to the reference for each K with its NFE, and the reference's
per-element variance (the scale: a gap of that size is no better than a random sample).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import flow_matching  # noqa: E402
from benchmarks.common import machine, write_json  # noqa: E402
from configs.cli import ArgumentParser  # noqa: E402
from evaluation import fid  # noqa: E402
from models.dit_2d import input_shape  # noqa: E402
from rebuild import load_flow_model  # noqa: E402
from utils.distributed import resolve_device  # noqa: E402
from utils.validation import check_seed  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="flow-matching or MeanFlow checkpoints (.pt)")
    p.add_argument("--num_samples", type=int, default=64, help="noises per checkpoint (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    p.add_argument("--jumps", type=int, nargs="+", default=[1, 2], help="K values (default: 1 2)")
    p.add_argument("--samplers", nargs="+", default=["euler"],
                   choices=[s for s in flow_matching.SAMPLERS if s != "meanflow"],
                   help="the solvers of a flow-matching checkpoint's K steps, a row each (default: euler); a "
                        "MeanFlow checkpoint always jumps with its meanflow sampler")
    p.add_argument("--reference_steps", type=int, default=17,
                   help="midpoint steps of the reference (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--json", default=None, help="append the rows as JSON lines to this file")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.reference_steps < 1 or min(args.jumps) < 1:
        p.error(f"--num_samples, --reference_steps and --jumps must be >= 1, got {args.num_samples}, "
                f"{args.reference_steps}, {args.jumps}")
    try:
        check_seed(args.seed)
    except ValueError as err:
        p.error(str(err))
    device = resolve_device(args.device)
    loaded = []
    for path in args.checkpoints:  # all of them before any work: a bad one fails at once
        try:
            loaded.append((path, *load_flow_model(path, "ema", device)))
        except (FileNotFoundError, ValueError) as err:
            p.error(str(err))
    for path, model, ckpt in loaded:
        config = ckpt["config"]
        num_classes = config["num_classes"]
        noise = flow_matching.per_sample_noise(args.seed, range(args.num_samples), input_shape(config), device)
        y = fid.class_labels(args.num_samples, num_classes).to(device) if num_classes else None
        meanflow = config["objective"] == "meanflow"

        def run(sampler: str, steps: int):
            with torch.no_grad():
                return flow_matching.sample(model, noise, y, flow_matching.SamplingSettings(
                    sampler=sampler, num_steps=steps, cfg_scale=config["cfg_scale"]), num_classes=num_classes)

        reference = run("midpoint", args.reference_steps)[0]
        reference_variance = float(f"{reference.var().item():.4g}")   # 4 significant digits: a gap can be 1e-4
        for sampler in ["meanflow"] if meanflow else args.samplers:
            gaps, nfes = {}, {}
            for k in args.jumps:
                x, nfes[k] = run(sampler, k)
                gaps[k] = (x - reference).pow(2).mean().item()
            row = {"checkpoint": path, "step": ckpt["step"], "objective": config["objective"], "sampler": sampler,
                   "cfg_scale": config["cfg_scale"], "num_samples": args.num_samples, "seed": args.seed,
                   "reference": f"midpoint {args.reference_steps}", "reference_variance": reference_variance,
                   **{f"gap_{k}": float(f"{g:.4g}") for k, g in gaps.items()},
                   **{f"nfe_{k}": n for k, n in nfes.items()}, "machine": machine(device)}
            print(f"{path}: step {row['step']}, {row['objective']}, cfg {row['cfg_scale']}, {sampler}: "
                  + ", ".join(f"{k} step(s) = {nfes[k]} NFE {g:.4g}" for k, g in gaps.items())
                  + f" (reference variance {row['reference_variance']:.4g})", flush=True)
            write_json(args.json, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
