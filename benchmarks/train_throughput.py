"""Training throughput of the real step (Trainer.train_step): images/s, achieved FLOP/s, MFU, memory.

    python benchmarks/train_throughput.py --preset tiny --device cpu
    python benchmarks/train_throughput.py --preset cifar10 --device cuda --compile true

Every FlowMatchingConfig flag works (--preset, --batch_size, --mixed_precision, --compile,
--gradient_checkpointing, ...). Batches come from the on-device uint8 loader over random images,
so the number is the model and step, not JPEG decoding. After --warmup steps (compilation happens
there), --windows windows of --steps steps are timed, each ended by one device synchronization
(as in training, nothing syncs inside a window); the median window is reported.
--sdpa_backend restricts attention to one SDPA kernel for the whole run (PyTorch picks cuDNN on
Hopper), so the step is timed with each; the profile's table names the kernels that ran.
With --ema_snapshot_every N the step includes the two post-hoc EMA updates, and one snapshot write
(into a temporary folder) is timed apart and reported amortized over N steps.
MFU = images/s x counted training FLOPs per image / (peak x 1e12), where the peak is --peak_tflops or,
under bf16 / fp16 on a card benchmarks.common.PEAK_HALF_TFLOPS lists (H100, H200, A100, ...), that
card's dense half-precision peak.
"""

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
from statistics import median

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from benchmarks.common import (SDPA_BACKENDS, benchmark_parser, check_no_sync,  # noqa: E402
                               add_peak_flag, count_flops_per_image, machine, mfu_text, parse_benchmark, peak_for,
                               profile, reset_peak_memory, synchronize, time_call, write_json)
from data.device_loader import DeviceLoader  # noqa: E402
from models.dit_2d import dit_from_config  # noqa: E402
from utils.distributed import DistInfo  # noqa: E402
from training.objectives import FlowMatchingObjective  # noqa: E402
from training.trainer import AUTOCAST_DTYPES, Trainer, micro_batch_size, peak_memory_gb  # noqa: E402

# The fused kernels, and the unfused reference (also the one restriction a CPU can tell from its default).
BACKENDS = {**SDPA_BACKENDS, "math": SDPBackend.MATH}


def bench_parser() -> argparse.ArgumentParser:
    p = benchmark_parser()
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per timed window")
    p.add_argument("--windows", type=int, default=3, help="timed windows; the median is reported")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    add_peak_flag(p)
    p.add_argument("--profile", default=None, metavar="TABLE",
                   help="also profile one window: kernel time vs wall (the gaps) and launches per step; the "
                        "kernels' table goes to this file")
    p.add_argument("--sync_debug", default="false", choices=("true", "false"),
                   help="CUDA: run 2 more steps under torch.cuda.set_sync_debug_mode('error') and report "
                        "whether any host sync happened (the step is meant to have none)")
    p.add_argument("--sdpa_backend", default="auto", choices=("auto",) + tuple(BACKENDS),
                   help="attention's kernel for the whole run: auto lets PyTorch pick; a name restricts SDPA "
                        "to that backend (a shape or device it cannot run is an error)")
    return p


def main(argv=None) -> int:
    bench = bench_parser()
    args, config, device = parse_benchmark(bench, argv, __doc__)
    if args.steps < 1 or args.windows < 1 or args.warmup < 0:
        bench.error(f"--steps and --windows must be >= 1 and --warmup >= 0, got {args.steps}, {args.windows}, {args.warmup}")
    if args.sdpa_backend in ("cudnn", "efficient") and device.type != "cuda":
        bench.error(f"--sdpa_backend {args.sdpa_backend} runs on CUDA only, not on {device.type}: use flash, math or auto")
    micro = micro_batch_size(config, 1)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (max(4 * config.batch_size, 256), config.in_channels, config.image_size,
                                    config.image_size), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, max(config.num_classes, 1), (len(images),), generator=gen)
    loader = DeviceLoader(images.to(device), labels.to(device), micro, global_batch=config.batch_size,
                          seed=config.seed, hflip=config.hflip)
    torch.manual_seed(config.seed)
    model = dit_from_config(config)
    model.gradient_checkpointing = config.gradient_checkpointing
    objective = FlowMatchingObjective(config, device, AUTOCAST_DTYPES[config.mixed_precision])
    scratch = tempfile.TemporaryDirectory()
    config = dataclasses.replace(config, checkpoint_dir=scratch.name)  # where a timed snapshot may go
    trainer = Trainer(config, model, objective, loader, DistInfo(0, 0, 1, device))
    batches = trainer.batches()

    def steps(n):
        for _ in range(n):
            trainer.train_step(next(batches) for _ in range(trainer.accum_steps))

    # Compilation happens in the warm-up, inside the restriction: the compiled graph calls that kernel.
    backend = (contextlib.nullcontext() if args.sdpa_backend == "auto"
               else sdpa_kernel(BACKENDS[args.sdpa_backend]))
    reset_peak_memory(device)
    try:
        with backend:
            warm = time_call(lambda: steps(args.warmup), device) if args.warmup else 0.0
            seconds = [time_call(lambda: steps(args.steps), device) for _ in range(args.windows)]
            synchronize(device)
            prof = profile(lambda: steps(args.steps), device, args.profile) if args.profile else None
            sync = check_no_sync(lambda: steps(2), device) if args.sync_debug == "true" else None
            snap = median(time_call(trainer._snapshot, device) for _ in range(3)) if trainer.posthoc_emas else None
    except RuntimeError as e:  # SDPA's own message is a page of per-backend warnings
        if args.sdpa_backend == "auto" or "No available kernel" not in str(e):
            raise
        bench.error(f"--sdpa_backend {args.sdpa_backend} cannot run this attention (head dim "
                    f"{config.hidden_size // config.num_heads}, {config.mixed_precision}, {device.type}): "
                    f"use auto or another backend")
    scratch.cleanup()
    rate = args.steps * config.batch_size / median(seconds)
    # The count is one forward and backward of the model: flow matching's step. MeanFlow's step adds
    # a JVP (and a guidance forward) the count leaves out: an MFU from it would be understated.
    flops = count_flops_per_image(config, backward=True) if config.objective == "flow_matching" else None
    achieved = rate * flops / 1e12 if flops else None
    peak, card = peak_for(args, device, half_precision=config.mixed_precision in ("bf16", "fp16"))
    mfu = achieved / peak if peak and achieved else None
    mem = peak_memory_gb(device)
    params = sum(p.numel() for p in model.parameters())
    print(f"machine: {machine(device)}")
    print(f"train: hidden {config.hidden_size}, depth {config.depth}, heads {config.num_heads}, patch "
          f"{config.patch_size}, {config.image_size}px, {params / 1e6:.1f}M params, batch {config.batch_size} "
          f"(micro {micro}), {config.mixed_precision}, compile {config.compile}, grad ckpt "
          f"{config.gradient_checkpointing}, {config.objective}, attention {args.sdpa_backend}, {device.type}")
    print(f"  {rate:.1f} images/s, {1000 * median(seconds) / args.steps:.1f} ms/step (median of {args.windows} "
          f"windows x {args.steps} steps; warm-up {args.warmup} steps took {warm:.1f}s)")
    if flops is None:
        print(f"  FLOPs and MFU not counted for --objective {config.objective} (its JVP is not in the count)")
    else:
        print(f"  counted FLOPs {flops / 1e9:.2f} G/image (fwd+bwd) -> {achieved:.2f} TFLOP/s"
              + mfu_text(mfu, peak, card))
    print(f"  peak memory {mem:.2f} GiB ({'allocated on the GPU' if device.type == 'cuda' else 'process RSS high-water'})")
    if prof is not None:
        print(f"  profile of {args.steps} steps: wall {1000 * prof['wall_s'] / args.steps:.1f} ms/step, kernels "
              f"{1000 * prof['kernel_s'] / args.steps:.1f} ms/step (device busy {100 * prof['busy']:.0f}%), "
              f"{prof['launches'] / args.steps:.0f} launches/step; table in {args.profile}")
    if sync is not None:
        print(f"  sync check: {sync}")
    if snap is not None:
        every = config.ema_snapshot_every
        print(f"  post-hoc EMA snapshot ({config.ema_snapshot_dtype}): {1000 * snap:.1f} ms a write, "
              f"{100 * snap / (every * median(seconds) / args.steps):.2f}% of the step time at every {every} steps")
    write_json(args.json, {"bench": "train", "machine": machine(device), "config": vars(config),
                           "sdpa_backend": args.sdpa_backend, "images_per_s": rate,
                           "step_seconds": [s / args.steps for s in seconds],
                           "steps_per_window": args.steps,
                           "flops_per_image": flops, "tflops": achieved, "mfu": mfu, "peak_tflops": peak,
                           "peak_memory_gib": mem, "warmup_seconds": warm, "profile": prof, "sync_check": sync,
                           "snapshot_seconds": snap})
    return 0


if __name__ == "__main__":
    sys.exit(main())
