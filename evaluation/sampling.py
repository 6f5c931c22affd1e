"""Sampling many images: the batch loop over ranks (generate_images), the flags generate_flow_matching.py
and evaluate_fid.py share, and a checkpoint turned into the model, its latent decoder and the
sampling settings. The math of one batch (noise, CFG, the ODE solvers) is flow_matching.py's.

    add_sampling_flags(parser, sweep=False)   # --sampler/--num_steps/--cfg_scale/--time_shift (sweep: lists)
    run = load_sampling_run(args, device)     # model rebuilt from the checkpoint's own config
    for settings in settings_from_flags(run.config, args, sweep=False):   # flow_matching.SamplingSettings
        images, nfe = run.generate(labels, settings, seed=..., batch_size=...)

Settings left unset come from the checkpoint (its sampler, steps, CFG scale, guidance interval and
time shift; a checkpoint older than the last two fields guides every step of a uniform grid); an
unconditional model samples at CFG 1 (flow_matching.resolve_cfg_scale). Forward passes run in bf16
on CUDA and fp32 on the CPU unless --precision says otherwise, compiled on CUDA unless --compile
false; the ODE state is always fp32.
"""

import argparse
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as tdist
from tqdm import tqdm

import flow_matching
from configs.cli import finite_float
from models.dit_2d import input_shape
from models.vqvae import LatentSpace
from rebuild import load_flow_model, load_latent_space
from utils.images import to_uint8
from utils.validation import check_guidance_interval, check_seed


class SamplingStopped(Exception):
    """generate_images' `stop` asked it to end before its last batch."""


def generate_images(model: Callable, labels: torch.Tensor, settings: flow_matching.SamplingSettings, *,
                    shape: Sequence[int], num_classes: int, seed: int, batch_size: int = 64, autocast_dtype: Optional[torch.dtype] = None, device="cpu",
                    rank: int = 0, world_size: int = 1,
                    decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                    on_batch: Optional[Callable[[int, np.ndarray], None]] = None,
                    progress: bool = False, pad_last_batch: bool = False,
                    stop: Optional[Callable[[], bool]] = None) -> Tuple[Optional[np.ndarray], int]:
    """Sample one image per entry of `labels` (ignored when num_classes = 0) as uint8 (N, H, W, C),
    with `settings` (flow_matching.sample's).

    Sample i starts from flow_matching.per_sample_noise(seed, i), and batches of consecutive indices are dealt
    to ranks whole, so a seed gives the same images whatever the number of ranks. `decode` maps
    the model's outputs to images in [-1, 1] (the VQ-VAE decoder of a latent model). Every rank
    must call this; `on_batch(first index, uint8 batch)` sees each of this rank's batches as it is
    made. Returns (all N images in index order on rank 0, None on the other ranks; NFE per sample);
    rank 0 always makes the first batch, so its NFE is the run's.

    pad_last_batch (for a model compiled once per batch shape): when there is more than one batch,
    the smaller last one runs at the full size and its extra rows are dropped, which costs less than
    compiling a second shape; every batch then has one shape whatever the number of ranks.

    stop (the trainer's periodic FID, so that a stop signal need not wait out the sampling): asked
    on every rank before each round of batches (one a rank), so a collective inside it agrees; when
    it returns True, SamplingStopped is raised on every rank.
    """
    n = len(labels)
    nfe, mine = 0, {}
    starts = range(0, n, batch_size)
    for round_ in tqdm(range(0, len(starts), world_size), disable=not progress, desc="sampling"):
        if stop is not None and stop():
            raise SamplingStopped
        if round_ + rank >= len(starts):   # the last round can have fewer batches than ranks
            continue
        first = starts[round_ + rank]
        end = min(first + batch_size, n)
        index = range(first, first + batch_size if pad_last_batch and n > batch_size else end)
        noise = flow_matching.per_sample_noise(seed, index, shape, device)
        y = labels[first:end].to(device) if num_classes else None
        if y is not None and len(y) < len(index):   # the padding rows' class: any valid one
            y = torch.cat([y, y.new_zeros(len(index) - len(y))])
        x, nfe = flow_matching.sample(model, noise, y, settings, num_classes=num_classes, autocast_dtype=autocast_dtype)
        x = x[:end - first]
        mine[first] = to_uint8(decode(x) if decode is not None else x)
        if on_batch is not None:
            on_batch(first, mine[first])
    if world_size > 1:
        parts = [None] * world_size if rank == 0 else None
        tdist.gather_object(mine, parts, dst=0)
        if rank != 0:
            return None, nfe
        mine = {k: v for part in parts for k, v in part.items()}
    return np.concatenate([mine[k] for k in sorted(mine)]), nfe


def add_sweep_flags(p: argparse.ArgumentParser) -> None:
    """The solver, steps, scale and shift as lists (evaluate_fid.py, benchmarks/quality.py)."""
    p.add_argument("--samplers", nargs="+", default=None, choices=flow_matching.SAMPLERS,
                   help="ODE solvers to sweep (default: the checkpoint's sampler)")
    p.add_argument("--num_steps_list", type=int, nargs="+", default=None, metavar="N",
                   help="ODE step counts to sweep (default: the checkpoint's num_sampling_steps)")
    p.add_argument("--cfg_scales", type=finite_float, nargs="+", default=None, metavar="S",
                   help="guidance scales to sweep (default: the checkpoint's cfg_scale; 1 = none)")
    p.add_argument("--time_shifts", type=finite_float, nargs="+", default=None, metavar="S",
                   help="time-grid shifts to sweep (default: the checkpoint's time_shift; t(u) = u / (S - (S - 1) u), "
                        "u uniform: 1 = uniform, > 1 more steps near noise)")


def add_sampling_flags(p: argparse.ArgumentParser, sweep: bool) -> None:
    """The sampling flags of both scripts; with `sweep`, the solver, steps, scale and shift take lists."""
    if sweep:
        add_sweep_flags(p)
    else:
        p.add_argument("--sampler", default=None, choices=flow_matching.SAMPLERS,
                       help="ODE solver (default: the checkpoint's)")
        p.add_argument("--num_steps", type=int, default=None,
                       help="ODE steps (default: the checkpoint's num_sampling_steps)")
        p.add_argument("--cfg_scale", type=finite_float, default=None,
                       help="guidance scale (default: the checkpoint's); 1 = none")
        p.add_argument("--time_shift", type=finite_float, default=None, metavar="S",
                       help="time grid t(u) = u / (S - (S - 1) u), u uniform: 1 = uniform, > 1 more steps near "
                            "noise (t=0), < 1 near data (SD3's shift) (default: the checkpoint's time_shift)")
    p.add_argument("--guidance_interval", type=finite_float, nargs=2, default=None, metavar=("A", "B"),
                   help="apply CFG only while A <= t <= B (t=0 noise, t=1 data); 0 1 = every step "
                        "(default: the checkpoint's guidance_interval_start / _end)")
    p.add_argument("--seed", type=int, default=0, help="sample i starts from noise seeded by (seed, i) (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=64, help="samples per forward pass (per rank) (default: %(default)s)")
    p.add_argument("--weights", default="ema", choices=("ema", "model"), help="EMA or raw training weights (default: %(default)s)")
    p.add_argument("--vqvae_checkpoint", default=None,
                   help="latent checkpoints: the VQ-VAE to decode with (default: the path it records)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="model forward precision; auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = cuda when available")
    p.add_argument("--compile", default="auto", choices=("auto", "true", "false"),
                   help="torch.compile the model's forward, once per batch shape (the first batch pays for it, "
                        "~20 s for DiT-B/2 on an H200; a smaller last batch runs padded to the full size instead of "
                        "compiling again); auto = on CUDA, where it is faster (docs/speed.md)")


def check_sampling_flags(args, sweep: bool) -> None:
    """ValueError naming the flag for values that cannot sample."""
    def given(single: str, plural: str):
        """(the flag's name, its values) for a flag that takes a list in sweep mode."""
        if sweep:
            return f"--{plural} entries", getattr(args, plural) or []
        value = getattr(args, single)
        return f"--{single}", [] if value is None else [value]

    flag, steps = given("num_steps", "num_steps_list")
    if steps and min(steps) < 1:
        raise ValueError(f"{flag} must be >= 1, got {steps if sweep else steps[0]}")
    flag, shifts = given("time_shift", "time_shifts")
    if shifts and min(shifts) <= 0:
        raise ValueError(f"{flag} must be > 0 (1 = a uniform grid), got {shifts if sweep else shifts[0]}")
    if args.guidance_interval is not None:
        check_guidance_interval(*args.guidance_interval)
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    check_seed(args.seed)


def samplers_for(config: Dict[str, Any], given: Optional[Sequence[str]], flag: str) -> List[str]:
    """The solvers to sample a run of `config` (a checkpoint's config dict) with: `given` (the values
    of `flag`), or its own. ValueError for `meanflow` on a flow-matching run, which has no average
    velocity (a benchmark asks before training, not after)."""
    samplers = list(given or [config["sampler"]])
    if "meanflow" in samplers and config.get("objective", "flow_matching") != "meanflow":
        raise ValueError(f"{flag} meanflow needs a MeanFlow checkpoint (trained with --objective meanflow); "
                         f"{config.get('objective', 'flow_matching')} checkpoints sample with "
                         f"{', '.join(s for s in flow_matching.SAMPLERS if s != 'meanflow')}")
    return samplers


@dataclass
class SamplingRun:
    """A checkpoint ready to sample: the model, its checkpoint, decoder and forward precision."""
    model: torch.nn.Module
    ckpt: Dict[str, Any]
    latent_space: Optional[LatentSpace]
    precision: str                      # "bf16" | "fp32"
    device: torch.device
    compiled: bool = False              # sample through torch.compile(model)

    def __post_init__(self):
        # Static shapes: a batch size and its CFG double are two graphs, each tuned to its shape.
        self.forward_model = torch.compile(self.model, dynamic=False) if self.compiled else self.model

    @property
    def config(self) -> Dict[str, Any]:
        return self.ckpt["config"]

    @property
    def num_classes(self) -> int:
        return self.config["num_classes"]

    def generate(self, labels: torch.Tensor, settings: flow_matching.SamplingSettings, **options):
        """generate_images for this checkpoint (its shape, classes, precision and decoder);
        `options` are generate_images' other keywords (seed, batch size, ranks, ...)."""
        return generate_images(
            self.forward_model, labels, settings, shape=input_shape(self.config), num_classes=self.num_classes,
            autocast_dtype=torch.bfloat16 if self.precision == "bf16" else None, device=self.device,
            decode=self.latent_space.decode if self.latent_space is not None else None,
            pad_last_batch=self.compiled, **options)


def sampling_sweep(config: Dict[str, Any], *, samplers: Optional[Sequence[str]] = None,
                   num_steps: Optional[Sequence[int]] = None, cfg_scales: Optional[Sequence[float]] = None,
                   time_shifts: Optional[Sequence[float]] = None,
                   guidance_intervals: Optional[Sequence[Sequence[float]]] = None,
                   flags: Tuple[str, str] = ("--samplers", "--cfg_scales")) -> List[flow_matching.SamplingSettings]:
    """Every combination of samplers x step counts x CFG scales x time shifts x guidance intervals,
    in that order, for a run of `config` (a checkpoint's config dict); a list left None holds the
    run's own setting (flow_matching.SamplingSettings.from_config). All are checked before any is
    sampled: the solvers by samplers_for, the scales by resolve_cfg_scale (ValueErrors naming the
    `flags` of the solvers and the scales)."""
    sampler_flag, cfg_flag = flags
    return [flow_matching.SamplingSettings.from_config(config, sampler=sampler, num_steps=steps, cfg_scale=scale,
                                                       guidance_interval=interval, time_shift=shift, cfg_flag=cfg_flag)
            for sampler, steps, scale, shift, interval in itertools.product(
                samplers_for(config, samplers, sampler_flag), num_steps or [None], cfg_scales or [None],
                time_shifts or [None], guidance_intervals or [None])]


def settings_from_flags(config: Dict[str, Any], args, sweep: bool) -> List[flow_matching.SamplingSettings]:
    """The settings add_sampling_flags' flags ask of a run of `config`: with `sweep`, every combination
    of the lists (sampling_sweep); without, the one setting."""
    if sweep:
        lists = (args.samplers, args.num_steps_list, args.cfg_scales, args.time_shifts)
        flags = ("--samplers", "--cfg_scales")
    else:
        lists = tuple(None if v is None else [v] for v in (args.sampler, args.num_steps, args.cfg_scale, args.time_shift))
        flags = ("--sampler", "--cfg_scale")
    samplers, num_steps, cfg_scales, time_shifts = lists
    return sampling_sweep(config, samplers=samplers, num_steps=num_steps, cfg_scales=cfg_scales, time_shifts=time_shifts,
                          guidance_intervals=None if args.guidance_interval is None else [args.guidance_interval],
                          flags=flags)


def guided_evaluations(settings: flow_matching.SamplingSettings, main: bool) -> int:
    """settings.guided_nfe(); on the main rank, a note when CFG was asked for but the guidance
    interval holds none of the solver's evaluation times (the samples are then those of cfg_scale 1)."""
    guided = settings.guided_nfe()
    if settings.cfg_scale != 1.0 and not guided and main:
        print(f"note: {settings.sampler} at {settings.num_steps} steps evaluates the model at no t in the guidance "
              f"interval {settings.guidance_interval[0]:g}..{settings.guidance_interval[1]:g}: these samples are "
              f"unguided (as at cfg_scale 1); widen the interval or take more steps")
    return guided


def compiles(choice: str, device: torch.device) -> bool:
    """--compile true / false, or auto: on CUDA, where the compiled forward is faster (docs/speed.md)."""
    return choice == "true" or (choice == "auto" and device.type == "cuda")


def load_sampling_run(args, device: torch.device) -> SamplingRun:
    """The checkpoint of `args.checkpoint` with `args.weights`, its VQ-VAE decoder if it is a latent
    model, and the forward precision of `args.precision`."""
    model, ckpt = load_flow_model(args.checkpoint, args.weights, device)
    latent_space = load_latent_space(ckpt, args.vqvae_checkpoint, device)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return SamplingRun(model, ckpt, latent_space, precision, device, compiles(args.compile, device))

