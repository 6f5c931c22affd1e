"""Post-hoc EMA on the quality proxy: FID against the EMA length (sigma_rel) from one run per seed,
beside the EMAs tracked directly during training.

    # a proxy run per seed S (0 and 1) that keeps post-hoc EMA snapshots (fp32, to compare dtypes here)
    python train_flow_matching.py --preset proxy16_qk_swiglu --seed S --dataset imagefolder \\
        --data_dir ../shared/data/cifar10/train --ema_snapshot_every 50 --ema_snapshot_dtype fp32 \\
        --checkpoint_dir benchmarks/runs/posthoc_seedS --sample_dir benchmarks/runs/posthoc_seedS/samples
    python benchmarks/posthoc_ema.py benchmarks/runs/posthoc_seed0 benchmarks/runs/posthoc_seed1   # score
    python benchmarks/posthoc_ema.py --summarize          # the table (as quality.py --summarize) and the plot

Each run is scored with evaluate_fid.py at the proxy's FID settings (1,000 samples with the run's
sampler, seeded by the run's seed, against 2,000 training images at 16px): its sampling EMA (tracked;
gamma 8 = sigma_rel 0.09045), and the EMA of every --sigma_rels rebuilt from the snapshots (0.05 is
a tracked post-hoc EMA itself: its coefficient is 1). The snapshots are then cast
to fp16 and bf16 (in a copy of the run) and the lengths of --dtype_sigma_rels rebuilt from those, to
see whether the snapshot dtype shows in FID. Rows go to --results; --summarize prints the table
(mean over seeds, spread = max - min) and draws FID against sigma_rel.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections import defaultdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.common import clone_path, run_script, save_chart  # noqa: E402
from evaluation.posthoc_ema import SNAPSHOT_DIR, SNAPSHOT_DTYPES, gamma_to_sigma_rel, power_ema_decay  # noqa: E402
from utils.checkpoint import FINAL_NAMES, load_checkpoint  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "posthoc_ema.jsonl")
PLOT = os.path.join(ROOT, "benchmarks", "results", "posthoc_ema.png")
WEIGHTS = os.path.expanduser(os.path.join("~", ".cache", "fid_weights", "fid_inception.pth"))


def score(run: str, args, sigma_rels, tag: dict) -> None:
    """evaluate_fid.py on the run's final checkpoint (its EMA, or the rebuilt `sigma_rels`); rows to --results."""
    checkpoint = os.path.join(run, FINAL_NAMES["flow_matching"])
    ckpt = load_checkpoint(checkpoint)
    config = ckpt["config"]
    # The tracked EMA is the power function of ema_gamma (its sigma_rel) only while --ema_decay's cap
    # never bound (the decay grows with the step, so the last update's is the largest) and the ramp was on.
    power = config.get("ema_warmup", True) and power_ema_decay(ckpt["step"] - 1, config["ema_gamma"]) <= config["ema_decay"]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.jsonl")
        argv = ["--checkpoint", checkpoint, "--num_samples", str(args.num_samples), "--ref_num_images",
                str(args.ref_num_images), "--seed", str(config["seed"]), "--batch_size", "250",
                "--inception_weights", args.inception_weights, "--output_jsonl", out, "--device", args.device]
        argv += ["--ema_sigma_rels", *map(str, sigma_rels)] if sigma_rels else []
        run_script([sys.executable, os.path.join(ROOT, "evaluate_fid.py"), *argv], check=True)
        rows = [json.loads(line) for line in open(out)]
    with open(args.results, "a") as f:
        for row in rows:
            tracked = "ema_sigma_rel" not in row
            kind = ("tracked" if power else "tracked (capped)") if tracked else "posthoc"   # capped: no verdict
            row.update(tag, run_seed=config["seed"], ema=kind,
                       sigma_rel=round(gamma_to_sigma_rel(config["ema_gamma"]), 5) if tracked else row["ema_sigma_rel"])
            f.write(json.dumps(row) + "\n")


def cast_copy(run: str, dtype: str, folder: str) -> str:
    """A copy of the run whose snapshots are cast to `dtype` (as --ema_snapshot_dtype would write them)."""
    os.makedirs(os.path.join(folder, SNAPSHOT_DIR))
    os.symlink(os.path.abspath(os.path.join(run, FINAL_NAMES["flow_matching"])),
               os.path.join(folder, FINAL_NAMES["flow_matching"]))
    for name in os.listdir(os.path.join(run, SNAPSHOT_DIR)):
        snap = torch.load(os.path.join(run, SNAPSHOT_DIR, name), weights_only=True)
        snap["emas"] = [{k: v.to(SNAPSHOT_DTYPES[dtype]) if v.is_floating_point() else v for k, v in s.items()}
                        for s in snap["emas"]]
        torch.save(snap, os.path.join(folder, SNAPSHOT_DIR, name))
    return folder


def read_groups(path: str):
    """FID by (EMA kind, sigma_rel, snapshot dtype) and run seed, and the seeds."""
    groups = defaultdict(dict)
    for line in open(path):
        r = json.loads(line)
        groups[(r["ema"], r["sigma_rel"], r.get("snapshot_dtype") or "fp32")][r["run_seed"]] = r["fid"]
    return groups, sorted({s for g in groups.values() for s in g})


def summarize(path: str) -> str:
    """The table of benchmarks/README.md (one row per EMA, sigma_rel and snapshot dtype; mean over
    seeds and spread = max - min) and the verdict lines of the issue's two goals."""
    rows = [json.loads(line) for line in open(path)]
    groups, seeds = read_groups(path)
    head = (f"| EMA | sigma_rel | snapshots | {' | '.join(f'seed {s}' for s in seeds)} | mean | spread |\n"
            f"|---|---|---|{'---|' * len(seeds)}---|---|")
    lines, stats = [head], {}
    for key in sorted(groups, key=lambda k: (k[2] != "fp32", k[1], k[0])):
        fids = groups[key]
        values = [fids[s] for s in seeds if s in fids]
        stats[key] = (statistics.mean(values), max(values) - min(values))
        cells = " | ".join(f"{fids[s]:.2f}" if s in fids else "-" for s in seeds)
        kind, sigma_rel, dtype = key
        lines.append(f"| {kind} | {sigma_rel:g} | {dtype if kind == 'posthoc' else '-'} | {cells} | "
                     f"{stats[key][0]:.2f} | {stats[key][1]:.2f} |")
    r0 = rows[0]
    lines.append(f"\nFID of {r0['num_samples']} samples ({r0['sampler']}, {r0['nfe']} NFE, CFG {r0['cfg_scale']}) vs "
                 f"{clone_path(r0['reference'])}, step {r0['step']}.")
    tracked = [k for k in stats if k[0] == "tracked"]
    posthoc = [k for k in stats if k[0] == "posthoc" and k[2] == "fp32"]
    if tracked and posthoc:
        default, best = tracked[0], min(posthoc, key=lambda k: stats[k][0])
        gain, spread = stats[default][0] - stats[best][0], max(stats[default][1], stats[best][1])
        lines.append(f"Best post-hoc sigma_rel {best[1]:g}: {stats[best][0]:.2f} vs the default EMA (sigma_rel "
                     f"{default[1]:g}) {stats[default][0]:.2f}: {gain:+.2f} better, "
                     f"{'more' if gain > 2 * spread else 'not more'} than twice the larger spread ({2 * spread:.2f}).")
        twin = min(posthoc, key=lambda k: abs(k[1] - default[1]))
        lines.append(f"Rebuilt at sigma_rel {twin[1]:g} vs the tracked EMA at {default[1]:g}: "
                     f"{stats[twin][0]:.2f} vs {stats[default][0]:.2f} (difference "
                     f"{stats[twin][0] - stats[default][0]:+.2f}; seed spreads {stats[twin][1]:.2f} / {stats[default][1]:.2f}).")
    return "\n".join(lines)


def draw(path: str, plot: str) -> None:
    """FID against sigma_rel (fp32 snapshots): a line per seed and their mean."""
    groups, seeds = read_groups(path)
    posthoc = [k for k in groups if k[0] == "posthoc" and k[2] == "fp32"]
    series = {f"seed {s}": sorted((k[1] * 100, groups[k][s]) for k in posthoc if s in groups[k]) for s in seeds}
    series["mean"] = sorted((k[1] * 100, statistics.mean(groups[k].values())) for k in posthoc)
    values = [y for points in series.values() for _, y in points]
    save_chart([(series, "sigma_rel x 100 (post-hoc EMA, fp32 snapshots)")], list(series),
               "Proxy FID against the EMA length, rebuilt after training", plot,
               (min(values) - 1, max(values) + 1), "{:.1f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", help="checkpoint dirs of proxy runs trained with --ema_snapshot_every")
    p.add_argument("--sigma_rels", type=float, nargs="+",
                   default=[0.03, 0.05, 0.07, 0.09045, 0.12, 0.15, 0.2])
    p.add_argument("--dtype_sigma_rels", type=float, nargs="*", default=[0.09045],
                   help="lengths rebuilt from fp16 and bf16 casts of the snapshots too")
    p.add_argument("--num_samples", type=int, default=1000)
    p.add_argument("--ref_num_images", type=int, default=2000)
    p.add_argument("--inception_weights", default=WEIGHTS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--plot", default=PLOT)
    p.add_argument("--summarize", action="store_true", help="print the table of --results and draw --plot")
    args = p.parse_args(argv)
    if args.summarize:
        print(summarize(args.results))
        draw(args.results, args.plot)
        print(f"plot: {os.path.relpath(args.plot)}")
        return 0
    if not args.runs:
        p.error("give the runs to score, or --summarize")
    for run in args.runs:
        score(run, args, None, {"snapshot_dtype": None})
        score(run, args, args.sigma_rels, {"snapshot_dtype": "fp32"})
        for dtype in ("fp16", "bf16") if args.dtype_sigma_rels else ():
            with tempfile.TemporaryDirectory() as tmp:
                score(cast_copy(run, dtype, os.path.join(tmp, "run")), args, args.dtype_sigma_rels,
                      {"snapshot_dtype": dtype})
    print(summarize(args.results))
    draw(args.results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
