"""Sample quality at a fixed training budget: train a proxy run on real CIFAR-10, then FID.

    python benchmarks/quality.py --seed 0                      # the repo: EMA and raw weights of one run
    python benchmarks/quality.py --seed 0 --pipeline peer      # torchcfm + diffusers' DiT, same budget
    python benchmarks/quality.py --seed 1 --ema_warmup false   # any train_flow_matching.py flag: a variant
    python benchmarks/quality.py --seed 0 --preset proxy16_qk_swiglu --weights ema
                                                               # the winning recipe (its proxy-size preset)
    python benchmarks/quality.py --checkpoint benchmarks/runs/repo_seed0/flow_matching_final.pt --time_shifts 1 3
                                                               # score a finished run again, train nothing

The repo's run is `train_flow_matching.py --preset proxy16` (DiT width 192 / depth 6 on CIFAR-10 at
16x16, 1,000 steps of batch 64, ~10 min on 2 CPU cores) plus the flags given here (a --preset among
them replaces proxy16; rows still show their config's difference from proxy16), trained by the
script itself in a subprocess. 16x16 images (64 tokens) are the choice that lets a 2-core CPU train
a 6-block DiT for ~1.5 epochs in a run, enough to separate recipes; FID on them is a proxy, not a
CIFAR-10 FID. The checkpoint is then sampled (labels in the reference's class mix, balanced here;
noise seeded by (--seed, i)) with each combination of --weights, --samplers, --num_steps_list,
--cfg_scales, --time_shifts and --guidance_intervals and scored with the repo's FID pipeline
(TensorFlow Inception features) against a fixed random subset of the training images at the same
resolution, whose statistics are cached.

--checkpoint PATH trains nothing: it scores the final checkpoint of a repo run (one this script
trained, or train_flow_matching.py's) with the same flags, its own config and seed, in rows of the
same form as a trained run's, so --summarize groups them with the trained rows of the same
settings; their train_seconds is null, as the trainer logs no elapsed time in metrics.jsonl.

The peer (`--pipeline peer`) is what a researcher assembles in an afternoon from maintained
libraries: diffusers' DiTTransformer2DModel of the same width, depth, heads and patch, torchcfm's
ConditionalFlowMatcher (sigma 0: the same straight path), AdamW with the same LR, warmup and
clipping, labels dropped to the null label once per sample at --class_dropout_prob (diffusers'
per-block label embedders would each drop on their own), trained on the same batches, no EMA (its
raw weights are scored). It is sampled and scored by the same code as the repo. It takes only the
flags it uses (PEER_FLAGS); `pip install -r benchmarks/requirements.txt` installs it.

One row per scored setting is printed and appended to --results (config diff, steps, wall time,
weights, sampler, NFE, cfg, time shift, guidance interval, N, reference, FID). --summarize --results
FILE prints a file's rows as one table; --summarize alone prints every table benchmarks/README.md
builds from benchmarks/results/ (TABLES: the generic table of a file, and the options, headline,
sampling, MeanFlow and gap tables with their effect columns), each between its README markers, and
--readme benchmarks/README.md rewrites them there.

The sweep flags (--samplers, --num_steps_list, --cfg_scales, --time_shifts) are
evaluation/sampling.py's; left out, each takes the run's own setting.
"""

import argparse
import collections
import dataclasses
import datetime
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import flow_matching  # noqa: E402
from benchmarks.common import clone_path, machine, run_script, save_chart  # noqa: E402
from benchmarks.posthoc_ema import summarize as posthoc_summary  # noqa: E402
from configs.cli import ArgumentParser, finite_float  # noqa: E402
from configs.flow_matching_config import FlowMatchingConfig, parse_flow_matching_config  # noqa: E402
from data.flow_matching_dataset import get_flow_matching_dataloader  # noqa: E402
from utils.images import make_grid, save_image  # noqa: E402
from evaluation import fid, sampling  # noqa: E402
from models.dit_2d import input_shape  # noqa: E402
from rebuild import load_flow_model  # noqa: E402
from utils.distributed import resolve_device  # noqa: E402
from utils.launch import USER_ERRORS, user_message  # noqa: E402
from training.optim import lr_factor  # noqa: E402
from utils.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from utils.validation import check_guidance_interval  # noqa: E402

PRESET = "proxy16"
SHARED_CIFAR10 = os.path.join(ROOT, "..", "shared", "data", "cifar10", "train")
# The config fields the peer pipeline reads (the others belong to the repo's trainer).
PEER_FLAGS = ("seed", "dataset", "data_dir", "data_cache_dir", "data_loader", "num_workers", "hflip", "device",
              "image_size", "hidden_size", "depth", "num_heads", "patch_size", "batch_size", "train_steps",
              "lr", "weight_decay", "adam_beta1", "adam_beta2", "warmup_steps", "lr_schedule", "min_lr_ratio",
              "grad_clip", "class_dropout_prob", "log_every")
# The config flags --checkpoint takes: --seed (the run's own; any other is refused) and --device
# (where to score). Every other flag would describe a training that is not the one scored.
CHECKPOINT_FLAGS = ("seed", "device")
# Config fields that change where a run writes, what it logs or how its grids are sampled, never what
# it learns: left out of a row's config diff, so that (e.g.) a run saving every 250 steps, or a preset
# that samples with another solver, shares the table row of the training it repeats (a row names its
# own sampler, NFE, scale, shift and interval).
NOT_RECIPE = ("checkpoint_dir", "sample_dir", "num_classes", "seed", "dataset", "data_dir", "data_cache_dir",
              "save_every", "keep_checkpoints", "log_every", "sample_every", "tensorboard", "resume",
              "sampler", "num_sampling_steps", "cfg_scale", "guidance_interval_start", "guidance_interval_end",
              "time_shift", "grid_samples_per_class", "fid_every", "fid_num_samples", "fid_cfg_scale",
              "fid_batch_size", "compile", "compile_mode", "device", "num_workers", "data_loader")
DEFAULT_RESULTS = os.path.join(ROOT, "benchmarks", "results", "quality.jsonl")
DEFAULT_WEIGHTS = os.path.expanduser(os.path.join("~", ".cache", "fid_weights", "fid_inception.pth"))


def guidance_interval_arg(text: str) -> Optional[Tuple[float, float]]:
    """argparse type of --guidance_intervals: "A,B" (0 <= A <= B <= 1) -> (A, B); "none" -> None, as
    is "0,1" (both guide every step, so their rows group together)."""
    if text.lower() == "none":
        return None
    try:
        start, end = (finite_float(value) for value in text.split(","))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f'expected "A,B" or "none", got {text!r}') from None
    try:
        check_guidance_interval(start, end, repr(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return flow_matching.guidance_interval_or_none(start, end)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, allow_abbrev=False, add_help=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default="repo", choices=("repo", "peer"),
                   help="repo = train_flow_matching.py; peer = torchcfm + diffusers (default: %(default)s)")
    p.add_argument("--weights", nargs="+", default=None, choices=("ema", "raw"),
                   help="weights to score (default: ema raw for the repo; raw for the peer, which has no EMA)")
    sampling.add_sweep_flags(p)   # default: the run's own setting
    p.add_argument("--guidance_intervals", type=guidance_interval_arg, nargs="+", default=[None], metavar="A,B",
                   help='intervals of t where CFG applies, each "A,B" (0 <= A <= B <= 1) or "none" (every step) '
                        "(default: none)")
    p.add_argument("--checkpoint", default=None,
                   help="train nothing: score this final checkpoint of a repo run (its config and seed); its grids "
                        "go to --runs_dir/scored_<its folder>")
    p.add_argument("--num_samples", type=int, default=1000, help="samples per FID (default: %(default)s)")
    p.add_argument("--ref_num_images", type=int, default=2000,
                   help="reference: a fixed random subset of this many training images (default: %(default)s)")
    p.add_argument("--inception_weights", default=DEFAULT_WEIGHTS,
                   help="FID Inception weights, built offline by ../shared/tools/make_fid_inception_weights.py "
                        "(default: %(default)s)")
    p.add_argument("--runs_dir", default=os.path.join("benchmarks", "runs"),
                   help="checkpoints and grids of each run go to a subfolder (default: %(default)s)")
    p.add_argument("--results", default=None,
                   help=f"every row is appended here (default: {DEFAULT_RESULTS})")
    p.add_argument("--sample_batch_size", type=int, default=250, help="samples per forward (default: %(default)s)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="with --summarize: also draw FID against training steps for the settings scored at "
                        ">= 2 step counts (e.g. a run's --save_every checkpoints scored with --checkpoint)")
    p.add_argument("--summarize", action="store_true",
                   help="train nothing: print --results as a markdown table, seeds of one setting on one row "
                        "(mean, spread = max - min); without --results, every table of benchmarks/README.md that "
                        "the files of benchmarks/results/ hold, each between its README markers")
    p.add_argument("--readme", default=None, metavar="MD",
                   help="with --summarize and no --results: also rewrite those tables in MD (benchmarks/README.md) "
                        "between their markers")
    return p


def parse(argv):
    """(benchmark args, the run's FlowMatchingConfig, the config flags given) from one command line."""
    bench = build_parser()
    args, rest = bench.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        bench.print_help()
    data = [] if "--data_dir" in rest or "--dataset" in rest or not os.path.isdir(SHARED_CIFAR10) else \
        ["--dataset", "imagefolder", "--data_dir", os.path.normpath(SHARED_CIFAR10)]
    config = parse_flow_matching_config(["--preset", PRESET, *data, *rest], description=__doc__)
    if args.num_samples < 2 or args.ref_num_images < 2:
        bench.error(f"--num_samples and --ref_num_images must be >= 2, got {args.num_samples}, {args.ref_num_images}")
    if args.sample_batch_size < 1:
        bench.error(f"--sample_batch_size must be >= 1, got {args.sample_batch_size}")
    try:   # the sweep flags' rules (quality.py has no --guidance_interval; --sample_batch_size is its batch)
        sampling.check_sampling_flags(argparse.Namespace(**vars(args), guidance_interval=None,
                                                         batch_size=args.sample_batch_size, seed=config.seed),
                                      sweep=True)
    except ValueError as err:
        bench.error(str(err))
    args.results = args.results or DEFAULT_RESULTS
    if not os.path.isfile(args.inception_weights):
        bench.error(f"--inception_weights {args.inception_weights} is not a file; build it with "
                    f"bash evaluation/fid_weights.sh")
    args.weights = args.weights or (["ema", "raw"] if args.pipeline == "repo" else ["raw"])
    if args.pipeline == "peer":
        if "ema" in args.weights:
            bench.error("--weights ema: the peer pipeline keeps no EMA; use --weights raw")
        preset = parse_flow_matching_config(["--preset", PRESET, *data])
        unused = [f"--{k}" for k, v in dataclasses.asdict(config).items()   # compile follows --device
                  if v != getattr(preset, k) and k not in PEER_FLAGS + ("compile", "compile_mode")]
        if unused:
            bench.error(f"{' '.join(unused)}: the peer pipeline does not use these; it takes "
                        f"{' '.join('--' + k for k in PEER_FLAGS)}")
    if args.checkpoint:
        config = checkpoint_config(bench, args, config, rest)
    if "meanflow" in (args.samplers or []) and config.objective != "meanflow":
        bench.error("--samplers meanflow needs a MeanFlow run (--objective meanflow): a flow-matching model "
                    "has no average velocity")
    return args, config, data, rest


def checkpoint_config(bench, args, flags_config, flags) -> FlowMatchingConfig:
    """The config of the run --checkpoint holds (on the --device of the flags); exits with code 2 for
    a missing, foreign or latent-space checkpoint, the peer pipeline, a training flag or another seed
    than the run's."""
    given = {f[2:].split("=")[0] for f in flags if f.startswith("--")}
    training = sorted(given - set(CHECKPOINT_FLAGS))
    if args.pipeline != "repo":
        bench.error("--checkpoint scores a run of the repo pipeline (a flow_matching_final.pt); drop --pipeline peer")
    if training:
        bench.error(f"{' '.join('--' + k for k in training)}: training flags do not apply to --checkpoint, which "
                    f"scores a finished run with its own config")
    try:
        config = FlowMatchingConfig(**load_checkpoint(args.checkpoint, kind="flow_matching")["config"])
    except (FileNotFoundError, ValueError) as err:
        bench.error(f"--checkpoint: {err}")
    if config.latent_size is not None:
        bench.error(f"--checkpoint {args.checkpoint} is a latent (VQ-VAE) model; quality.py scores pixel-space "
                    f"runs of the proxy (evaluate_fid.py --checkpoint scores any checkpoint)")
    if "seed" in given and flags_config.seed != config.seed:
        bench.error(f"--seed {flags_config.seed}: {args.checkpoint} was trained with seed {config.seed}, the seed "
                    f"its rows carry; drop --seed")
    return dataclasses.replace(config, device=flags_config.device)


def run_name(args, config, flags) -> str:
    """The run's folder: pipeline, seed and the flags given (a variant of the proxy recipe)."""
    pairs = [f for i, f in enumerate(flags) if f != "--seed" and (i == 0 or flags[i - 1] != "--seed")]
    extra = "_".join(f.lstrip("-").replace("/", "-") for f in pairs)
    return f"{args.pipeline}_seed{config.seed}" + (f"_{extra}" if extra else "")


# ----------------------------------------------------------------------------- the two pipelines

def train_repo(flags, run_dir: str) -> str:
    """train_flow_matching.py --preset proxy16 FLAGS in a subprocess; returns the final checkpoint."""
    command = [sys.executable, os.path.join(ROOT, "train_flow_matching.py"), "--preset", PRESET, *flags,
               "--checkpoint_dir", run_dir, "--sample_dir", os.path.join(run_dir, "samples")]
    print("$ " + " ".join(command), flush=True)
    run_script(command, check=True)
    return os.path.join(run_dir, "flow_matching_final.pt")


class PeerVelocity(torch.nn.Module):
    """diffusers' DiT as a velocity field v(x, t, y) with t in [0, 1] (DiT's timesteps are 0..1000)."""

    def __init__(self, config):
        super().__init__()
        try:
            from diffusers import DiTTransformer2DModel
        except ImportError:
            raise ValueError("the peer pipeline needs diffusers and torchcfm: "
                             "pip install -r benchmarks/requirements.txt") from None
        self.dit = DiTTransformer2DModel(
            num_attention_heads=config.num_heads, attention_head_dim=config.hidden_size // config.num_heads,
            in_channels=config.in_channels, out_channels=config.in_channels, num_layers=config.depth,
            sample_size=config.image_size, patch_size=config.patch_size,
            num_embeds_ada_norm=config.num_classes, norm_eps=1e-6)

        # diffusers gives every block its own timestep + label embedder, and each drops labels
        # on its own in training mode: a sample would almost never see the null label in all
        # blocks at once. Labels are dropped once per sample in train_peer instead, as DiT does.
        for module in self.dit.modules():
            if hasattr(module, "dropout_prob") and hasattr(module, "token_drop"):
                module.dropout_prob = 0.0

    def forward(self, x, t, y):
        # Label num_classes is diffusers' null label (its tables have num_classes + 1 rows).
        return self.dit(x, timestep=t * 1000, class_labels=y).sample


def train_peer(config, run_dir: str, device: torch.device, deadline: Optional[float] = None):
    """The afternoon pipeline; returns (its model in eval mode, the config with what the data taught
    it: the number of classes). With a `deadline` (a
    time.perf_counter() value: benchmarks/speedrun.py's wall budget) it stops after the first step
    that ends past it, and its checkpoint's `step` says how far it got."""
    try:
        from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
    except ImportError:
        raise ValueError("the peer pipeline needs torchcfm: pip install -r benchmarks/requirements.txt") from None
    loader, info = get_flow_matching_dataloader(config, batch_size=config.batch_size, device=device)
    config = dataclasses.replace(config, **info.config_fields(config))
    torch.manual_seed(config.seed)
    model = PeerVelocity(config).to(device)
    matcher = ConditionalFlowMatcher(sigma=0.0)  # x_t = (1 - t) x0 + t x1, u = x1 - x0: our convention
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(config.adam_beta1, config.adam_beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    step, epoch, start, out_of_time = 0, 0, time.perf_counter(), False
    while step < config.train_steps and not out_of_time:
        loader.sampler.set_position(epoch, 0)
        for x1, y in loader:
            x1, y = x1.to(device), y.to(device)
            t, xt, ut = matcher.sample_location_and_conditional_flow(torch.randn_like(x1), x1)
            drop = torch.rand(len(y), device=device) < config.class_dropout_prob
            y = torch.where(drop, torch.full_like(y, config.num_classes), y)
            loss = torch.nn.functional.mse_loss(model(xt, t, y), ut)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            if step % config.log_every == 0:
                print(f"peer step {step} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
            out_of_time = deadline is not None and time.perf_counter() >= deadline
            if step == config.train_steps or out_of_time:
                break
        epoch += 1
    os.makedirs(run_dir, exist_ok=True)
    save_checkpoint({"model": model.state_dict(), "config": dataclasses.asdict(config), "step": step},
                    os.path.join(run_dir, "peer_final.pt"))   # atomic: its existence means a finished run
    return model.eval().requires_grad_(False), config


# ----------------------------------------------------------------------------- scoring

def score(model, config, args, device, extractor, ref_stats, labels, grid_path: str):
    """FID of each sampler x steps x cfg x shift x interval setting of `labels` (fid.reference_labels):
    [(fields, fid, seconds)]; saves a grid of the first."""
    out = []
    # quality.py's interval "none" is every step, not the run's own interval: (0, 1)
    for settings in sampling.sampling_sweep(
            dataclasses.asdict(config), samplers=args.samplers, num_steps=args.num_steps_list,
            cfg_scales=args.cfg_scales, time_shifts=args.time_shifts,
            guidance_intervals=[interval or (0.0, 1.0) for interval in args.guidance_intervals]):
        start = time.perf_counter()
        images, nfe = sampling.generate_images(
            model, labels, settings, shape=input_shape(config), num_classes=config.num_classes, seed=config.seed,
            batch_size=args.sample_batch_size, device=device, progress=True)
        if not out:  # 10 samples of each class, a row per class
            order = labels[:10 * config.num_classes].argsort(stable=True).numpy()
            save_image(make_grid(images[order], 10), grid_path)
        stats = fid.image_statistics(images, extractor, device, 100, progress=True)
        out.append((dict(settings.fields(), nfe=nfe), fid.frechet_distance(stats, ref_stats), time.perf_counter() - start))
    return out


def config_diff(config: FlowMatchingConfig) -> dict:
    """The fields of a run's config that differ from the proxy16 preset and change what it learns."""
    default = dataclasses.asdict(parse_flow_matching_config(["--preset", PRESET]))
    return {k: v for k, v in dataclasses.asdict(config).items() if default.get(k) != v and k not in NOT_RECIPE}


def git_commit() -> str:
    """The commit the code came from; "-dirty" when the working tree had uncommitted changes."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# One setting of a results file: the rows of its seeds share it (diff: the config diff as sorted JSON).
Setting = collections.namedtuple("Setting", "pipeline diff steps weights sampler nfe cfg shift interval n reference")


def read_rows(path: str) -> List[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def read_groups(path: str) -> Dict[Setting, List[dict]]:
    """Rows of --results grouped by setting (pipeline, config diff, steps, weights, sampler, NFE, cfg,
    time shift, guidance interval, N, reference), one row per seed: a seed scored again (a --checkpoint
    re-scoring a trained setting) replaces its earlier row rather than counting twice. Rows from
    before the shift and interval existed sampled with 1 and none."""
    groups: Dict[Setting, Dict[int, dict]] = {}
    for row in read_rows(path):
        interval = row.get("guidance_interval")
        key = Setting(row["pipeline"], json.dumps(row["config_diff"], sort_keys=True), row["steps"], row["weights"],
                      row["sampler"], row["nfe"], row["cfg_scale"], row.get("time_shift", 1.0),
                      "-" if interval is None else "{:g},{:g}".format(*interval), row["num_samples"], row["reference"])
        seeds = groups.setdefault(key, {})
        if row["seed"] in seeds and seeds[row["seed"]]["train_seconds"] is not None and row["train_seconds"] is None:
            row = dict(row, train_seconds=seeds[row["seed"]]["train_seconds"])   # the training time it re-scores
        seeds[row["seed"]] = row
    return {key: list(seeds.values()) for key, seeds in groups.items()}


def curves(path: str) -> Dict[tuple, List[tuple]]:
    """(steps, FID mean over seeds) of each setting (every key field but the steps) scored at >= 2
    step counts, keyed by (its name, N, reference); the name gives shift and interval only when not
    1 and none."""
    out: Dict[tuple, List[tuple]] = {}
    for key, rows in sorted(read_groups(path).items(), key=lambda item: item[0][2]):
        pipeline, diff, steps, weights, sampler, nfe, cfg, shift, interval, n, reference = key
        name = (f"{pipeline} {diff if diff != '{}' else 'baseline'} {weights} {sampler} NFE {nfe} cfg {cfg:g}"
                + (f" shift {shift:g}" if shift != 1 else "") + (f" interval {interval}" if interval != "-" else ""))
        out.setdefault((name, n, reference), []).append((steps, statistics.mean(r["fid"] for r in rows)))
    return {k: v for k, v in out.items() if len(v) >= 2}


def plot(path: str, out: str) -> str:
    """FID (mean over seeds) against training steps, a line per setting scored at >= 2 step counts."""
    lines = curves(path)
    if not lines:
        return f"no setting of {path} was scored at two or more step counts: nothing to plot"
    # The title names N and the reference when the lines share them; otherwise each label does.
    shared = len({(n, ref) for _, n, ref in lines}) == 1
    labels = [name if shared else f"{name} N {n} vs {ref}" for name, n, ref in lines]
    fids = [y for points in lines.values() for _, y in points]
    save_chart([(dict(zip(labels, lines.values())), "training steps")], labels,
               f"FID (N and reference of {path}) vs training steps", out, (min(fids) * 0.95, max(fids) * 1.05),
               "{:.1f}")
    return f"wrote {out}: " + "; ".join(f"{k}: " + ", ".join(f"{x} {y:.2f}" for x, y in v)
                                        for k, v in zip(labels, lines.values()))


def table(header: List[str], rows: List[list]) -> str:
    """A markdown table: the form of every table benchmarks/README.md shows."""
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(map(str, cells)) + " |" for cells in rows])


def summarize(path: str) -> str:
    """--results as a markdown table: one row per (pipeline, config diff, weights, sampler, NFE, cfg,
    time shift, guidance interval, N, reference), its FID over seeds as mean and spread (max - min),
    and the mean wall times (of the rows that know theirs: a scored --checkpoint has no train time).
    Rows written before the shift and interval existed sampled with 1 and none."""
    groups = read_groups(path)

    def mean_seconds(values) -> str:
        known = [v for v in values if v is not None]
        return f"{statistics.mean(known):.0f}" if known else "-"

    lines = []
    for key, rows in groups.items():
        rows = sorted(rows, key=lambda r: r["seed"])
        fids = [r["fid"] for r in rows]
        lines.append([key.pipeline, key.diff if key.diff != "{}" else "-", key.steps, key.weights, key.sampler, key.nfe,
                      f"{key.cfg:g}", f"{key.shift:g}", key.interval, key.n, ",".join(str(r["seed"]) for r in rows),
                      f"{statistics.mean(fids):.2f}", f"{max(fids) - min(fids):.2f}",
                      " / ".join(f"{v:.2f}" for v in fids), mean_seconds(r["train_seconds"] for r in rows),
                      mean_seconds(r["eval_seconds"] for r in rows)])
    header = ["pipeline", "config diff", "steps", "weights", "sampler", "NFE", "cfg", "shift", "interval", "N", "seeds",
              "FID mean", "spread", "FID per seed", "train s", "eval s"]
    references = sorted({clone_path(key.reference) for key in groups})
    return table(header, lines) + f"\n\nreference: {'; '.join(references)}"


# ----------------------------------------------------------------------------- the README's tables
# Each table of benchmarks/README.md built from a file of benchmarks/results/ stands between
# <!-- NAME --> and <!-- /NAME --> there; `--summarize` prints them all from the files (TABLES).

RESULTS = os.path.join(ROOT, "benchmarks", "results")
# The proxy's setting (`--preset proxy16`, EMA, Euler 20, CFG 1.5); a table's row names what it changes.
BASELINE = dict(pipeline="repo", diff={}, steps=1000, weights="ema", sampler="euler", nfe=20, cfg=1.5, shift=1.0,
                interval="-")
MID5 = dict(sampler="midpoint", nfe=10)
WINNER = {"mlp": "swiglu", "qk_norm": True}                                 # proxy16_qk_swiglu
THREE = {"mlp": "swiglu", "positions": "sincos_rope", "qk_norm": True}      # the first winner, with RoPE
LONGER = dict(diff={"train_steps": 1140}, steps=1140)                       # the baseline at the winner's wall time
MODELS = {"{}": "baseline", json.dumps(THREE, sort_keys=True): "three-option winner"}


def matches(key: Setting, **fields) -> bool:
    """Whether `key` is the baseline setting with `fields` changed (any N and reference)."""
    want = dict(BASELINE, **fields)
    return all(getattr(key, k) == (json.dumps(v, sort_keys=True) if k == "diff" else v) for k, v in want.items())


def pick(groups, **fields) -> Optional[List[dict]]:
    """The rows (sorted by seed) of the setting `fields` describes; None when it was not scored.
    A setting scored at two N or against two references is ambiguous here: FID depends on both."""
    found = [(key, rows) for key, rows in groups.items() if matches(key, **fields)]
    assert len({(key.n, key.reference) for key, _ in found}) <= 1, f"{fields} was scored at several N / references"
    return sorted(found[0][1], key=lambda r: r["seed"]) if found else None


def fid_mean(rows) -> float:
    return statistics.mean(r["fid"] for r in rows)


def spread(rows) -> float:
    return max(r["fid"] for r in rows) - min(r["fid"] for r in rows)


def per_seed(rows) -> str:
    """"mean (seed 0 / seed 1)"."""
    seeds = " / ".join(f"{r['fid']:.2f}" for r in rows)
    return f"{fid_mean(rows):.2f} ({seeds})"


def effect(rows, against) -> List[str]:
    """[difference of the means, twice the larger spread, the effect it allows to claim]."""
    difference, twice = fid_mean(rows) - fid_mean(against), 2 * max(spread(rows), spread(against))
    claim = ("one seed: no claim" if min(len(rows), len(against)) < 2 else
             "none beyond the spread" if abs(difference) <= twice else
             "lower (better)" if difference < 0 else "higher (worse)")
    return [f"{difference:+.2f}", f"{twice:.2f}", claim]


def solver(rows, cfg: bool = False) -> str:
    row = rows[0]
    return f"{row['sampler']} {row['num_steps']}" + (f", CFG {row['cfg_scale']:g}" if cfg else "")


def flags(diff: dict) -> str:
    return " ".join(f"--{k} {str(v).lower() if isinstance(v, bool) else v}" for k, v in sorted(diff.items()))


def options_table(groups) -> str:
    """Each training option (a config diff at the baseline's sampler) against the baseline."""
    base, lines = pick(groups), []
    for key, rows in groups.items():
        diff = json.loads(key.diff)
        if matches(key, diff=diff):
            rows = sorted(rows, key=lambda r: r["seed"])
            lines.append([f"`{flags(diff)}`" if diff else "baseline", ",".join(str(r["seed"]) for r in rows),
                          per_seed(rows), f"{spread(rows):.2f}", *(effect(rows, base) if diff else ["-"] * 3)])
    return table(["option (flags on top of `--preset proxy16`)", "seeds", "FID mean (seed 0 / seed 1)", "spread",
                  "minus baseline", "2 x larger spread", "effect"], lines)


# (the baseline's solver, the winner's) at each NFE budget
HEADLINE = [(dict(nfe=10), MID5), (MID5, MID5), ({}, {}), (dict(nfe=35), dict(sampler="midpoint", nfe=34)),
            (dict(sampler="midpoint", nfe=34), dict(sampler="midpoint", nfe=34))]


def headline_table(groups) -> str:
    """The winner against the baseline at 1,000 steps and at the winner's wall time (1,140 steps)."""
    lines = []
    for base_solver, winner_solver in HEADLINE:
        winner = pick(groups, diff=WINNER, **winner_solver)
        bases = [pick(groups, **base_solver), pick(groups, **dict(base_solver, **LONGER))]
        margins = []
        for rows in bases:
            if rows is None:
                margins.append("-")
                continue
            lower, twice = fid_mean(rows) - fid_mean(winner), 2 * max(spread(rows), spread(winner))
            margins.append(f"{lower:.2f} > {twice:.2f}" if lower > twice else f"**{lower:.2f} < {twice:.2f}**")
        lines.append([winner[0]["nfe"], solver(bases[0]), solver(winner),
                      *(per_seed(rows) if rows else "not scored" for rows in bases), per_seed(winner),
                      " / ".join(margins)])
    return table(["NFE", "baseline solver", "winner solver", "baseline, 1,000 steps", "baseline, 1,140 steps",
                  "winner, 1,000 steps", "winner lower than 1,000 / 1,140 steps by (> 2 x larger spread?)"], lines)


# (variant, the model's config diff, its setting, the setting it changes)
SAMPLING = [("time shift 0.5 (more steps near data)", {}, dict(nfe=10, shift=0.5), dict(nfe=10)),
            ("time shift 2 (more steps near noise)", {}, dict(nfe=10, shift=2.0), dict(nfe=10)),
            ("Heun 5 steps (9 NFE)", {}, dict(sampler="heun", nfe=9), MID5),
            ("Heun 6 steps (11 NFE)", {}, dict(sampler="heun", nfe=11), MID5),
            ("CFG 1 (none)", {}, dict(cfg=1.0), {}),
            ("CFG 2.5", {}, dict(cfg=2.5), {}),
            ("CFG 2.5 on every step", THREE, dict(MID5, cfg=2.5), MID5),
            ("CFG 2.5 only for t in [0.3, 1]", THREE, dict(MID5, cfg=2.5, interval="0.3,1"), dict(MID5, cfg=2.5)),
            ("CFG 1.5 only for t in [0.3, 1]", THREE, dict(MID5, interval="0.3,1"), MID5)]


def sampling_table(groups) -> str:
    """Sampling variants of trained runs, each against the setting it changes."""
    lines = []
    for variant, diff, setting, base in SAMPLING:
        rows, against = pick(groups, diff=diff, **setting), pick(groups, diff=diff, **base)
        lines.append([variant, MODELS[json.dumps(diff, sort_keys=True)], per_seed(rows), solver(against, cfg=True),
                      per_seed(against), *effect(rows, against)])
    return table(["variant", "model", "FID (seed 0 / seed 1)", "against", "its FID", "difference",
                  "2 x larger spread", "effect"], lines)


def seed_columns(values: Dict[int, float], digits: int) -> List[str]:
    """The values of seeds 0 and 1 ("-" for one not measured)."""
    return [f"{values[s]:.{digits}f}" if s in values else "-" for s in (0, 1)]


def meanflow_table(meanflow: str, recipe: str) -> str:
    """MeanFlow against flow matching at 1-35 NFE: the rows of `meanflow` and the baseline's rows of
    `recipe` at 10 and 34-35 NFE (the same runs); flow matching first by NFE, then MeanFlow from
    scratch (DiT's time embedding, then t as is), fine-tuned (by steps), with the predicted tangent, raw
    weights."""
    groups = read_groups(recipe)
    rows = read_rows(meanflow) + [r for s in (dict(nfe=10), MID5, dict(sampler="midpoint", nfe=34), dict(nfe=35))
                                  for r in pick(groups, **s)]
    models: Dict[tuple, Dict[int, float]] = {}
    for r in rows:
        diff = r["config_diff"]
        t_as_is = diff.get("time_embed_scale") == 1.0
        order = (diff.get("objective") == "meanflow", "init_from" in diff, r["weights"] == "raw",
                 diff.get("meanflow_tangent", ""), t_as_is, r["steps"], r["nfe"], r["sampler"])
        label = (f"flow matching, {r['steps']:,} steps" if not order[0] else
                 f"MeanFlow from scratch, {r['steps']:,} steps" + (", t as is" if t_as_is else "") if not order[1] else
                 f"MeanFlow from the FM run, +{r['steps']} steps" + (" (predicted tangent)" if order[3] else "")
                 + (" (raw weights)" if order[2] else ""))
        models.setdefault((order, label, r["sampler"], r["num_steps"], r["nfe"], f"{r['cfg_scale']:.1f}"),
                          {})[r["seed"]] = r["fid"]
    lines = []
    for (_, *setting), fids in sorted(models.items()):
        one = len(fids) == 1
        lines.append([*setting, *seed_columns(fids, 2), f"{statistics.mean(fids.values()):.2f}",
                      "-" if one else f"{max(fids.values()) - min(fids.values()):.2f}"])
    return table(["model (training)", "sampler", "steps", "NFE", "CFG", "FID seed 0", "FID seed 1", "mean", "spread"],
                 lines)


def gap_table(path: str) -> str:
    """benchmarks/meanflow_gap.py's rows: each model's 1- and 2-jump gap, seeds side by side (the run's
    seed, from its folder)."""
    models: Dict[str, Dict[str, Dict[int, float]]] = {}
    for r in read_rows(path):
        where, step = r["checkpoint"], r["step"]
        label = (f"flow-matching run (K Euler steps, CFG {r['cfg_scale']:g})" if r["objective"] != "meanflow" else
                 f"MeanFlow from it{' (predicted tangent)' if 'tangent_predicted' in where else ''}, +{step} steps"
                 if "init_from" in where else f"MeanFlow from scratch, {step} steps"
                 + (", t as is" if "time_embed_scale_1_" in where else ""))
        seed = int(re.search(r"repo_seed(\d+)", where).group(1))
        for jumps in ("gap_1", "gap_2"):
            models.setdefault(label, {}).setdefault(jumps, {})[seed] = r[jumps]
    return table(["model", "1 jump, seed 0", "1 jump, seed 1", "2 jumps, seed 0", "2 jumps, seed 1"],
                 [[label, *seed_columns(gaps["gap_1"], 3), *seed_columns(gaps["gap_2"], 3)]
                  for label, gaps in models.items()])


def results(name: str) -> str:
    return os.path.join(RESULTS, name)


# README marker -> the table of benchmarks/results/ it holds
TABLES = {
    "quality table": lambda: summarize(results("quality.jsonl")),
    "recipe table": lambda: summarize(results("recipe.jsonl")),
    "options": lambda: options_table(read_groups(results("recipe.jsonl"))),
    "headline": lambda: headline_table(read_groups(results("recipe.jsonl"))),
    "sampling": lambda: sampling_table(read_groups(results("recipe.jsonl"))),
    "solvers": lambda: summarize(results("solvers.jsonl")),
    "guidance interval": lambda: summarize(results("guidance_interval.jsonl")),
    "meanflow": lambda: meanflow_table(results("meanflow.jsonl"), results("recipe.jsonl")),
    "meanflow gap": lambda: gap_table(results("meanflow_gap.jsonl")),
    "meanflow time scale": lambda: summarize(results("meanflow_time_scale.jsonl")),
    "posthoc ema": lambda: posthoc_summary(results("posthoc_ema.jsonl")),
}


def marked(name: str, text: str) -> str:
    return f"<!-- {name} -->\n{text}\n<!-- /{name} -->"


def write_readme(path: str) -> List[str]:
    """Replace each table of TABLES between its markers in `path` (benchmarks/README.md) with the one
    the results give; returns the names of the tables that changed. ValueError for a missing marker."""
    with open(path) as f:
        text = old = f.read()
    changed = []
    for name, make in TABLES.items():
        pattern = re.compile(re.escape(f"<!-- {name} -->") + ".*?" + re.escape(f"<!-- /{name} -->"), re.S)
        if not pattern.search(text):
            raise ValueError(f"{path} has no <!-- {name} --> ... <!-- /{name} --> block")
        new = marked(name, make())
        changed += [name] if pattern.search(text).group(0) != new else []
        text = pattern.sub(lambda _: new, text)
    if text != old:
        with open(path, "w") as f:
            f.write(text)
    return changed


def main(argv=None) -> int:
    """run(argv), with bad input (a path, a weights file, a count) as one line and exit 2."""
    try:
        return run(argv)
    except USER_ERRORS as err:
        message = user_message(err)
        if message is None:
            raise
        print(f"quality.py: error: {message}", file=sys.stderr)
        return 2


def run(argv=None) -> int:
    if "--summarize" in (sys.argv[1:] if argv is None else argv):
        args, _ = build_parser().parse_known_args(argv)
        if args.results is None:
            for name, make in TABLES.items():
                print(marked(name, make()) + "\n")
            if args.readme:
                changed = write_readme(args.readme)
                print(f"{args.readme}: rewrote {', '.join(changed) or 'nothing (it holds these tables)'}")
            args.results = DEFAULT_RESULTS
        elif not os.path.isfile(args.results):
            print(f"error: --results {args.results} does not exist; run a benchmark first", file=sys.stderr)
            return 2
        else:
            print(summarize(args.results))
        if args.plot:
            print(plot(args.results, args.plot))
        return 0
    args, config, data_flags, flags = parse(argv)
    commit = git_commit()  # the code that trains, even if the tree changes while the run goes on
    device = resolve_device(config.device)
    if args.checkpoint:  # its grids go beside the runs' own, never into the checkpoint's folder
        scored = os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint)))
        run_dir = os.path.join(args.runs_dir, f"scored_{scored}")
    else:
        run_dir = os.path.join(args.runs_dir, run_name(args, config, flags))
        if any(os.path.exists(os.path.join(run_dir, name)) for name in ("flow_matching_final.pt", "peer_final.pt")):
            print(f"error: {run_dir} holds a finished run; delete it or pass another --runs_dir", file=sys.stderr)
            return 2
    # Reference statistics first: a missing weights file or data folder fails before the training.
    extractor = fid.InceptionFeatures(args.inception_weights).to(device).eval()
    ref = fid.ImageSet(config.dataset, config.data_dir, config.image_size, config.in_channels,
                       num_images=args.ref_num_images)
    ref_stats, ref_n, ref_path, _ = fid.reference_statistics(
        ref, extractor, config.fid_cache_dir, device, 100, config.num_workers, progress=True)
    reference = ref.describe(ref_n)

    start = time.perf_counter()
    if args.pipeline == "repo":
        path = args.checkpoint or train_repo(data_flags + flags, run_dir)
        # A scored checkpoint's training time is unknown: its metrics.jsonl logs images/s, no elapsed time.
        train_seconds = None if args.checkpoint else round(time.perf_counter() - start, 1)
        models = {}
        for weights in args.weights:
            models[weights], ckpt = load_flow_model(path, "ema" if weights == "ema" else "model", device)
        config = FlowMatchingConfig(**ckpt["config"])
        steps = ckpt["step"]
    else:
        model, config = train_peer(config, run_dir, device)
        train_seconds, steps, models = round(time.perf_counter() - start, 1), config.train_steps, {"raw": model}

    diff = config_diff(config)
    labels, _ = fid.reference_labels(args.num_samples, config.num_classes, ref)
    rows = []
    for weights, model in models.items():
        for fields, value, seconds in score(model, config, args, device, extractor, ref_stats, labels,
                                            os.path.join(run_dir, f"grid_{weights}.png")):
            row = {"pipeline": args.pipeline, "config_diff": diff, "data": config.data_dir,
                   "seed": config.seed, "steps": steps,
                   "batch_size": config.batch_size, "train_seconds": train_seconds,
                   "weights": weights, **fields, "num_samples": args.num_samples,
                   "reference": reference, "fid": round(value, 3), "eval_seconds": round(seconds, 1),
                   "machine": machine(device), "commit": commit,
                   "time": datetime.datetime.now().isoformat(timespec="seconds")}
            rows.append(row)
            print(json.dumps(row), flush=True)
            os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
            with open(args.results, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(f"\n{'pipeline':>8} {'seed':>4} {'steps':>5} {'weights':>7} {'sampler':>7} {'NFE':>4} {'cfg':>4} "
          f"{'shift':>5} {'interval':>10} {'N':>5} {'FID':>8}   diff")
    for r in rows:
        print(f"{r['pipeline']:>8} {r['seed']:>4} {r['steps']:>5} {r['weights']:>7} {r['sampler']:>7} "
              f"{r['nfe']:>4} {r['cfg_scale']:>4} {r['time_shift']:>5} {str(r['guidance_interval'] or '-'):>10} "
              f"{r['num_samples']:>5} {r['fid']:>8.2f}   {r['config_diff'] or '-'}")
    print(f"reference: {reference} ({ref_path}); train {'-' if train_seconds is None else f'{train_seconds:.0f}'} s; "
          f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
