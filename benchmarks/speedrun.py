"""Quality per GPU-minute: train for a fixed wall budget on one device, then FID of what it reached.

    python benchmarks/speedrun.py --budget_s 240 --data_dir datasets/cifar10_train \\
        --inception_weights .fid/fid_inception.pth --results benchmarks/results/speedrun.jsonl
    python benchmarks/speedrun.py --budget_s 240 --pipeline peer --data_dir ... --inception_weights ...
    python benchmarks/speedrun.py --budget_s 240 --preset cifar10_qk_swiglu --lr 3e-4 --data_dir ...
                                                  # another preset, any train_flow_matching.py flag on top
                                                  # (python train_flow_matching.py --help lists them)

The budget counts from this script's process start: interpreter and torch start-up, data decoding
and compilation are part of the cost. The repo's run is train_flow_matching.py --preset
cifar10_speedrun (or --preset) plus the config flags given, in a subprocess on --data_dir (an
ImageFolder), without sample grids or periodic checkpoints, its checkpoints in a fresh folder under
--runs_dir. When the budget is spent it gets SIGTERM: it ends the step it is in, saves a
checkpoint and exits (128 + 15); a run that reaches its --train_steps first ends normally with
flow_matching_final.pt. With --cold_start true (the default) the caches start empty in every run,
so that a second run pays the same decoding and compilation as the first: the decoded dataset and
torch.compile's caches (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR) go to the run's folder and are
deleted after training; --cold_start false uses the usual ones (--data_cache_dir, torch's).

The checkpoint is then scored, outside the budget: --num_samples samples of its EMA with its own
sampler, steps, CFG scale, time shift and guidance interval (the config stored in it; --samplers
and --num_steps_list score each solver and step count given instead, a row each), noise seeded by
(its --seed, i), FID against every image of --ref_data_dir (default: --data_dir) at the model's
resolution, with reference statistics cached in --fid_cache_dir, on the config's --device.
It is evaluate_fid.py --checkpoint's scoring, in this process from the same pieces
(evaluation/sampling.py's SamplingRun, evaluation/fid.py): an entry point imports no other.

--pipeline peer trains benchmarks/quality.py's peer (diffusers' DiT + torchcfm's matcher, no EMA,
fp32; quality.train_peer) in this process for the same budget, from the same preset's width, depth,
heads, batch, LR schedule and steps (the fields it does not use, such as qk_norm, mlp, compile or
mixed_precision, are listed in the row as peer_ignores), and scores its raw weights with the same
sampler settings and code (bf16 forwards on CUDA, fp32 on the CPU, as evaluate_fid.py).
`pip install -r benchmarks/requirements.txt` installs it.

One row is printed and appended to --results: pipeline, preset, the flags given, steps, images
seen (steps x batch), train_wall_s (process start to the checkpoint's write), finished (reached
--train_steps), weights, sampler, steps, NFE, CFG scale, FID, N, the reference and its N, scoring
seconds (on CUDA they include compiling the sampler, as evaluate_fid.py does by default, and the
reference statistics when --fid_cache_dir does not hold them yet), GPU, torch, commit, date. Bad
input exits 2 with one line; a budget spent before the trainer's first step ends exits 1.
"""

import os
import time


def _process_start() -> float:
    """time.perf_counter() at this process's start: its start time in /proc on Linux (so the
    interpreter's start-up counts too), else now."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = float(f.read().rsplit(")", 1)[1].split()[19])   # field 22: starttime
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - started_ticks / os.sysconf("SC_CLK_TCK")
        return time.perf_counter() - max(0.0, age)
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter()


# The budget's origin, taken before the other imports (torch's alone takes seconds).
PROCESS_START = _process_start()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from typing import List, Optional, Tuple  # noqa: E402

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import quality  # noqa: E402
from benchmarks.common import run_script  # noqa: E402
from configs.cli import ArgumentParser  # noqa: E402
import flow_matching  # noqa: E402
from configs.flow_matching_config import PRESETS, FlowMatchingConfig, parse_flow_matching_config  # noqa: E402
from evaluation import fid  # noqa: E402
from evaluation.sampling import (SamplingRun, add_sampling_flags, load_sampling_run, samplers_for,  # noqa: E402
                                 sampling_sweep)
from utils.checkpoint import find_latest, load_checkpoint  # noqa: E402
from utils.distributed import resolve_device  # noqa: E402

PRESET = "cifar10_speedrun"
# Config flags this script sets itself: the data source, where the run writes, and no grids or
# periodic checkpoints inside the budget (the SIGTERM checkpoint is the one scored).
OWNED = ("dataset", "data_dir", "checkpoint_dir", "sample_dir", "sample_every", "save_every", "resume")
# torch.compile's caches (kernels, graphs) and the run folder each goes to under --cold_start true.
COMPILE_CACHES = {"TORCHINDUCTOR_CACHE_DIR": "inductor_cache", "TRITON_CACHE_DIR": "triton_cache"}
NEVER = 10 ** 9   # --save_every: no periodic checkpoint within any budget
FEATURE_BATCH = 200   # images per Inception forward (evaluate_fid.py's default)
# The sampling fields the peer's scoring reads (its training reads quality.PEER_FLAGS).
PEER_SCORING = ("sampler", "num_sampling_steps", "cfg_scale", "time_shift", "guidance_interval_start",
                "guidance_interval_end")
# Fields that only say where a run writes or how it logs: never listed among the peer's ignored ones.
NOT_TRAINING = ("checkpoint_dir", "sample_dir", "sample_every", "save_every", "keep_checkpoints", "tensorboard",
                "resume", "grid_samples_per_class", "num_classes")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, allow_abbrev=False, add_help=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget_s", type=float, default=240.0,
                   help="training wall budget in seconds, from this script's process start (default: %(default)s)")
    p.add_argument("--pipeline", default="repo", choices=("repo", "peer"),
                   help="repo = train_flow_matching.py; peer = quality.py's diffusers + torchcfm (default: %(default)s)")
    p.add_argument("--preset", default=PRESET, choices=sorted(PRESETS),
                   help="the config preset the flags apply over (default: %(default)s)")
    p.add_argument("--data_dir", default=None,
                   help="training images: an ImageFolder root, a subfolder per class (required)")
    p.add_argument("--ref_data_dir", default=None,
                   help="FID reference: every image of this ImageFolder (default: --data_dir)")
    p.add_argument("--num_samples", type=int, default=10_000, help="samples per FID (default: %(default)s)")
    p.add_argument("--inception_weights", default=quality.DEFAULT_WEIGHTS,
                   help="FID Inception weights (bash evaluation/fid_weights.sh builds them) (default: %(default)s)")
    p.add_argument("--fid_cache_dir", default=os.path.join("data_cache", "fid"),
                   help="where reference statistics are cached (default: %(default)s)")
    p.add_argument("--sample_batch_size", type=int, default=1000,
                   help="samples per forward pass when scoring (default: %(default)s)")
    p.add_argument("--num_steps_list", type=int, nargs="+", default=None, metavar="K",
                   help="score the checkpoint at each of these step counts, a row each: FID against samples/s "
                        "from one training budget (default: the checkpoint's own steps)")
    p.add_argument("--samplers", nargs="+", default=None, choices=flow_matching.SAMPLERS,
                   help="score with each of these ODE solvers, a row for each solver and step count "
                        "(default: the checkpoint's own sampler)")
    p.add_argument("--cold_start", default="true", choices=("true", "false"),
                   help="true = empty data and compile caches in the run's folder, so decoding and compiling count "
                        "in every run; false = the usual caches, warm from earlier runs (default: %(default)s)")
    p.add_argument("--runs_dir", default=os.path.join("benchmarks", "runs", "speedrun"),
                   help="each run's checkpoints go to a new subfolder (default: %(default)s)")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "speedrun.jsonl"),
                   help="the row is appended here (default: %(default)s)")
    return p


def missing_peer_packages() -> List[str]:
    """The peer's packages that are not installed."""
    return [name for name in ("diffusers", "torchcfm") if importlib.util.find_spec(name) is None]


def parse(argv) -> Tuple[argparse.Namespace, FlowMatchingConfig, List[str], str]:
    """(the benchmark's args, the run's config, the config flags given, the run's folder); exits 2
    with one line on bad input, before any work."""
    bench = build_parser()
    args, flags = bench.parse_known_args(argv)
    if "-h" in flags or "--help" in flags:
        bench.print_help()
        sys.exit(0)
    args.cold_start = args.cold_start == "true"
    if not (math.isfinite(args.budget_s) and args.budget_s > 0):
        bench.error(f"--budget_s must be a positive number of seconds, got {args.budget_s:g}")
    if args.data_dir is None:
        bench.error("--data_dir is required: an ImageFolder root with a subfolder per class "
                    "(e.g. ../shared/data/cifar10/train)")
    args.ref_data_dir = args.ref_data_dir or args.data_dir
    for name in ("data_dir", "ref_data_dir"):
        folder = getattr(args, name)
        if not os.path.isdir(folder):
            bench.error(f"--{name} {folder} is not a folder")
        if not any(entry.is_dir() for entry in os.scandir(folder)):
            bench.error(f"--{name} {folder} has no class subfolders: it must be an ImageFolder root, one "
                        f"subfolder of images per class (e.g. ../shared/data/cifar10/train)")
    if args.num_samples < 2:
        bench.error(f"--num_samples must be >= 2 (FID needs a covariance), got {args.num_samples}")
    if args.sample_batch_size < 1:
        bench.error(f"--sample_batch_size must be >= 1, got {args.sample_batch_size}")
    if args.num_steps_list and min(args.num_steps_list) < 1:
        bench.error(f"--num_steps_list entries must be >= 1, got {args.num_steps_list}")
    if not os.path.isfile(args.inception_weights):
        bench.error(f"--inception_weights {args.inception_weights} is not a file; build it with "
                    f"bash evaluation/fid_weights.sh")
    try:   # a wrong file would otherwise surface only after the whole training budget
        fid.check_inception_weights(args.inception_weights)
    except ValueError as err:
        bench.error(str(err))
    if importlib.util.find_spec("torch_fidelity") is None:
        bench.error("FID needs torch-fidelity: pip install -r requirements-eval.txt")
    given = {f[2:].split("=")[0] for f in flags if f.startswith("--")}
    owned = sorted(given & set(OWNED))
    if owned:
        bench.error(f"{' '.join('--' + k for k in owned)}: speedrun.py sets these itself (--data_dir is its "
                    f"own flag)")
    if args.cold_start and "data_cache_dir" in given:
        bench.error("--data_cache_dir: --cold_start true decodes the data into the run's folder; pass "
                    "--cold_start false to use a cache of your own")
    if args.pipeline == "peer":
        missing = missing_peer_packages()
        if missing:
            bench.error(f"--pipeline peer needs {' and '.join(missing)}: pip install -r benchmarks/requirements.txt")
        unused = sorted(given - set(quality.PEER_FLAGS) - set(PEER_SCORING))
        if unused:
            bench.error(f"{' '.join('--' + k for k in unused)}: the peer pipeline does not use these; it takes "
                        f"{' '.join('--' + k for k in quality.PEER_FLAGS + PEER_SCORING)}")

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = os.path.join(args.runs_dir, f"{args.pipeline}_{args.preset}_{stamp}_{os.getpid()}")
    cache = ["--data_cache_dir", os.path.join(run_dir, "data_cache")] if args.cold_start else []
    args.trainer_flags = [
        "--preset", args.preset, *flags, "--dataset", "imagefolder", "--data_dir", args.data_dir, *cache,
        "--checkpoint_dir", os.path.join(run_dir, "checkpoints"), "--sample_dir", os.path.join(run_dir, "samples"),
        "--sample_every", "0", "--save_every", str(NEVER)]
    config = parse_flow_matching_config(args.trainer_flags, description=__doc__)
    try:
        samplers_for(dataclasses.asdict(config), args.samplers, "--samplers")
        resolve_device(config.device)
    except ValueError as err:
        bench.error(str(err))
    return args, config, flags, run_dir


# ----------------------------------------------------------------------------- training

def train_repo(flags: List[str], config: FlowMatchingConfig, run_dir: str, deadline: float,
               cold_start: bool) -> Tuple[Optional[str], int]:
    """train_flow_matching.py FLAGS in a subprocess, SIGTERM at `deadline` (a time.perf_counter()
    value), with empty compile caches in `run_dir` if `cold_start`: (its newest checkpoint, or None;
    its exit code)."""
    env = dict(os.environ)
    if cold_start:
        env.update({name: os.path.join(run_dir, folder) for name, folder in COMPILE_CACHES.items()})
    command = [sys.executable, os.path.join(ROOT, "train_flow_matching.py"), *flags]
    print("$ " + " ".join(command), flush=True)
    code = run_script(command, stop_after=max(0.0, deadline - time.perf_counter()), env=env)
    if code in (0, 128 + signal.SIGTERM, -signal.SIGTERM):
        return find_latest(config.checkpoint_dir, "flow_matching"), code
    return None, code


def train_peer(config: FlowMatchingConfig, run_dir: str, deadline: float) -> str:
    """quality.py's peer in this process until `deadline`; its checkpoint's path."""
    quality.train_peer(config, run_dir, resolve_device(config.device), deadline=deadline)
    return os.path.join(run_dir, "peer_final.pt")


# ----------------------------------------------------------------------------- scoring

def load_run(pipeline: str, checkpoint: str, device: torch.device) -> SamplingRun:
    """The checkpoint ready to sample as evaluate_fid.py samples one: the repo's EMA as
    evaluate_fid.py --checkpoint loads it with its sampling flags at their defaults (rebuilt from its
    own config, its VQ-VAE decoder if latent, bf16 forwards on CUDA); the peer's raw weights, with
    bf16 forwards on CUDA and fp32 on the CPU as well."""
    if pipeline == "repo":
        flags = argparse.ArgumentParser(add_help=False)
        add_sampling_flags(flags, sweep=True)
        args = flags.parse_args(["--weights", "ema", "--device", device.type])
        args.checkpoint = checkpoint
        return load_sampling_run(args, device)
    ckpt = load_checkpoint(checkpoint)
    model = quality.PeerVelocity(FlowMatchingConfig(**ckpt["config"]))   # with the classes the data decided
    model.load_state_dict(ckpt["model"])
    return SamplingRun(model.to(device).eval().requires_grad_(False), ckpt, None,
                       "bf16" if device.type == "cuda" else "fp32", device)


def score(run: SamplingRun, args) -> List[dict]:
    """FID of --num_samples samples of `run` with its checkpoint's own CFG scale, time shift and
    guidance interval (labels in the reference's class mix, balanced for CIFAR-10; noise seeded by
    (its seed, i)) against every image of --ref_data_dir, with its own sampler or each of --samplers,
    at its own steps or each of --num_steps_list: evaluate_fid.py --checkpoint's sampling and
    statistics. A setting's sample_s is its sampling alone (the first one's includes compiling the
    sampler on CUDA)."""
    config = run.config
    extractor = fid.InceptionFeatures(args.inception_weights).to(run.device).eval()
    ref = fid.ImageSet("imagefolder", args.ref_data_dir, config["image_size"], config["in_channels"])
    ref_stats, ref_n, path, cached = fid.reference_statistics(
        ref, extractor, args.fid_cache_dir, run.device, FEATURE_BATCH, config["num_workers"], progress=True)
    print(f"reference: {ref.describe(ref_n)}; statistics {'read from' if cached else 'written to'} {path}")
    labels, _ = fid.reference_labels(args.num_samples, run.num_classes, ref)
    rows = []
    for settings in sampling_sweep(config, samplers=args.samplers, num_steps=args.num_steps_list):
        start = time.perf_counter()
        images, nfe = run.generate(labels, settings, seed=config["seed"], batch_size=args.sample_batch_size,
                                   progress=True)
        sample_s = time.perf_counter() - start   # generate returns host arrays: the device is done
        stats = fid.image_statistics(images, extractor, run.device, FEATURE_BATCH, progress=True)
        rows.append(dict(**settings.fields(), nfe=nfe, fid=fid.frechet_distance(stats, ref_stats),
                         num_samples=len(images),
                         reference=ref.describe(ref_n), reference_num_images=ref_n, sample_s=round(sample_s, 3),
                         samples_per_s=round(len(images) / sample_s, 1)))
    return rows


def peer_ignores(config: FlowMatchingConfig) -> List[str]:
    """The training fields the peer does not use whose values differ from the cifar10 defaults (what
    the preset asks of the repo's run that the peer's run does not do)."""
    default = FlowMatchingConfig()
    used = set(quality.PEER_FLAGS) | set(PEER_SCORING) | set(NOT_TRAINING)
    return sorted(k for k, v in dataclasses.asdict(config).items() if k not in used and getattr(default, k) != v)


# ----------------------------------------------------------------------------- the run

def gpu_name(device: torch.device) -> str:
    """The GPU's name, or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def describe(row: dict) -> str:
    """The row as one readable line."""
    return (f"speedrun {row['pipeline']} --preset {row['preset']}: {row['steps']} steps ({row['images_seen']:,} "
            f"images) in {row['train_wall_s']:.1f} s of a {row['budget_s']:g} s budget "
            f"({'finished' if row['finished'] else 'stopped by the budget'}); {row['weights']} weights, "
            f"{row['sampler']} {row['num_steps']} steps (NFE {row['nfe']}), cfg {row['cfg_scale']:g}: "
            f"FID {row['fid']:.2f} (N {row['num_samples']} vs {row['reference']}) at {row['samples_per_s']:,.1f} "
            f"samples/s; scoring took {row['score_s']:.0f} s; "
            f"{row['gpu']}, torch {row['torch']}, commit {row['commit']}")


def main(argv=None, start: Optional[float] = None) -> int:
    """Train for the budget, score, append the row. `start`: the budget's origin as a
    time.perf_counter() value (the process's start when run as a script; this call otherwise)."""
    start = time.perf_counter() if start is None else start
    start_wall = time.time() - (time.perf_counter() - start)   # the same instant on the file clock
    args, config, flags, run_dir = parse(sys.argv[1:] if argv is None else argv)
    commit = quality.git_commit()   # the code that trains, even if the tree changes while it runs
    deadline = start + args.budget_s
    os.makedirs(run_dir)
    if args.pipeline == "repo":
        checkpoint, code = train_repo(args.trainer_flags, config, run_dir, deadline, args.cold_start)
        if code == 2:
            return 2   # the trainer refused its input and said why in one line
        if checkpoint is None:
            reason = ("the budget ran out before its first step ended (start-up, data decoding): raise --budget_s"
                      if code in (0, 128 + signal.SIGTERM, -signal.SIGTERM)
                      else f"train_flow_matching.py failed with exit code {code}; its output is above")
            print(f"speedrun.py: error: no checkpoint in {config.checkpoint_dir}: {reason}", file=sys.stderr)
            return 1
    else:
        checkpoint = train_peer(config, run_dir, deadline)
    train_wall_s = os.path.getmtime(checkpoint) - start_wall
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    steps, trained = int(ckpt["step"]), FlowMatchingConfig(**ckpt["config"])
    if args.cold_start:   # the caches were only there to start empty
        for cache in ("data_cache", *COMPILE_CACHES.values()):
            shutil.rmtree(os.path.join(run_dir, cache), ignore_errors=True)

    scoring = time.perf_counter()
    device = resolve_device(config.device)
    settings = score(load_run(args.pipeline, checkpoint, device), args)
    score_s = time.perf_counter() - scoring
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    for scored in settings:
        row = {"pipeline": args.pipeline, "preset": args.preset, "flags": flags, "data": args.data_dir,
               "budget_s": args.budget_s,
               "steps": steps, "batch_size": trained.batch_size, "images_seen": steps * trained.batch_size,
               "train_wall_s": round(train_wall_s, 1), "finished": steps >= trained.train_steps,
               "train_steps": trained.train_steps, "weights": "ema" if args.pipeline == "repo" else "raw",
               **scored, "fid": round(scored["fid"], 3), "score_s": round(score_s, 3), "checkpoint": checkpoint,
               "cold_start": args.cold_start,
               "peer_ignores": peer_ignores(trained) if args.pipeline == "peer" else [],
               "gpu": gpu_name(device), "torch": torch.__version__, "commit": commit,
               "date": datetime.datetime.now().isoformat(timespec="seconds")}
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row))
        print(describe(row) + f"; appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main(start=PROCESS_START))
