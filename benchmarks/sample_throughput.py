"""Sampling throughput through flow_matching.sample: images/s and NFE/s, with and without CFG.

    python benchmarks/sample_throughput.py --preset tiny --device cpu --num_samples 64 --batch_sizes 32
    python benchmarks/sample_throughput.py --device cuda --num_samples 5000 --batch_sizes 500 1000 --num_steps 35 \
        --compile_modes none default reduce-overhead

Every FlowMatchingConfig flag works (the architecture, --num_sampling_steps via --num_steps,
--sampler, --cfg_scale, --compile). Each generated sample costs what it costs in
generate_flow_matching.py: per-sample noise from (seed, index), the ODE solve under autocast
(--precision), conversion to uint8 on the host; PNG writing is left out. The weights are a fresh
model's: speed does not depend on their values. One untimed batch warms up (and compiles), then
--num_samples are timed; with --extrapolate_to N the time for N samples is extrapolated linearly
from that measurement (and printed as such).
Each row also gives the counted forward TFLOP/s (model rows/s x counted forward FLOPs a row), the MFU
against the card's peak (as train_throughput.py: looked up for bf16, or --peak_tflops), and the
samples/s that peak would give at these settings: the arithmetic ceiling a sampler speed goal meets.
"""

import argparse
import dataclasses
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import flow_matching  # noqa: E402
from benchmarks.common import (add_peak_flag, benchmark_parser, count_flops_per_image, machine,  # noqa: E402
                               mfu_text, parse_benchmark, peak_for, profile, reset_peak_memory, synchronize,
                               write_json)
from evaluation.sampling import generate_images  # noqa: E402
from models.dit_2d import dit_from_config, input_shape  # noqa: E402
from training.trainer import peak_memory_gb  # noqa: E402

COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs")


def bench_parser() -> argparse.ArgumentParser:
    p = benchmark_parser()
    p.add_argument("--num_samples", type=int, default=256, help="samples timed")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[256],
                   help="samples per sampling batch, each measured (CFG forwards twice as many rows)")
    p.add_argument("--num_steps", type=int, default=None, help="ODE steps (default: the config's num_sampling_steps)")
    p.add_argument("--cfg_modes", default="guided,unguided", help="guided (the config's --cfg_scale), unguided (scale 1), or both")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="forward precision")
    p.add_argument("--compile_modes", nargs="+", default=None, choices=COMPILE_MODES,
                   help="each measured: none = eager, else torch.compile(model, mode=..., dynamic=False) "
                        "(reduce-overhead replays CUDA graphs) (default: default where the config compiles: "
                        "--compile true, or the default none on CUDA; else none)")
    p.add_argument("--extrapolate_to", type=int, default=0, help="also print the time for this many samples (linear)")
    p.add_argument("--profile", default=None, metavar="TABLE",
                   help="also profile one batch of the last setting: kernel time vs wall (the gaps); kernels' table to this file")
    add_peak_flag(p)
    return p


def main(argv=None) -> int:
    bench = bench_parser()
    args, config, device = parse_benchmark(bench, argv, __doc__)
    modes = [m for m in args.cfg_modes.split(",") if m]
    if not modes or set(modes) - {"guided", "unguided"}:
        bench.error(f"--cfg_modes {args.cfg_modes!r}: use guided, unguided or guided,unguided")
    if args.num_samples < 1 or min(args.batch_sizes) < 1 or args.extrapolate_to < 0:
        bench.error("--num_samples and --batch_sizes must be >= 1 and --extrapolate_to >= 0")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    num_steps = args.num_steps or config.num_sampling_steps
    model = dit_from_config(config).to(device).eval().requires_grad_(False)
    compile_modes = args.compile_modes or (["default"] if config.compile else ["none"])
    labels = torch.arange(args.num_samples) % max(config.num_classes, 1)
    autocast = torch.bfloat16 if args.precision == "bf16" else None
    row_flops = count_flops_per_image(config, backward=False)   # one model row's forward
    peak, card = peak_for(args, device, half_precision=args.precision == "bf16")
    print(f"machine: {machine(device)}")
    print(f"sample: hidden {config.hidden_size}, depth {config.depth}, patch {config.patch_size}, "
          f"{config.image_size}px, {config.sampler} x {num_steps} steps, {args.precision}, {device.type}")

    for compile_mode in compile_modes:
        torch._dynamo.reset()
        net = model if compile_mode == "none" else torch.compile(model, mode=compile_mode, dynamic=False)
        for batch_size, mode in itertools.product(args.batch_sizes, modes):
            settings = flow_matching.SamplingSettings.from_config(
                dataclasses.asdict(config), num_steps=num_steps, cfg_scale=None if mode == "guided" else 1.0)

            rows = [0]

            def counted(x, *args):   # the rows the forwards ran: CFG's two halves inside the interval, one outside
                rows[0] += len(x)
                return net(x, *args)

            def generate(count):
                """The images of generate_flow_matching.py (its noise, labels, solver, interval, shift, and a
                compiled model's padded last batch); NFE."""
                return generate_images(
                    counted, labels[:count], settings, shape=input_shape(config), num_classes=config.num_classes,
                    seed=config.seed, batch_size=batch_size, autocast_dtype=autocast, device=device,
                    pad_last_batch=compile_mode != "none")[1]

            warm_start = time.perf_counter()
            generate(min(batch_size, args.num_samples))  # warm-up and compilation
            synchronize(device)
            warm = time.perf_counter() - warm_start
            reset_peak_memory(device)
            rows[0] = 0
            start = time.perf_counter()
            nfe = generate(args.num_samples)
            synchronize(device)
            seconds = time.perf_counter() - start
            rate = args.num_samples / seconds
            rows_per_sample = rows[0] / args.num_samples   # a padded last batch's extra rows count: they ran
            mem = peak_memory_gb(device)
            achieved = rate * rows_per_sample * row_flops / 1e12
            mfu, ceiling = (achieved / peak, peak * 1e12 / (rows_per_sample * row_flops)) if peak else (None, None)
            print(f"  compile {compile_mode}, batch {batch_size}, cfg_scale {settings.cfg_scale:g}: {args.num_samples} samples in "
                  f"{seconds:.2f}s = {rate:.2f} images/s, {rate * nfe:.1f} NFE/s ({nfe} NFE per sample, {rows_per_sample:g} model "
                  f"rows per sample), first batch (compile) {warm:.1f}s, peak memory {mem:.2f} GiB")
            print(f"    counted forward {achieved:.2f} TFLOP/s ({row_flops / 1e9:.2f} GFLOP a row)"
                  + mfu_text(mfu, peak, card) + (f": at 100% of it {ceiling:.0f} images/s" if ceiling else ""))
            record = {"bench": "sample", "machine": machine(device), "config": vars(config), "cfg_scale": settings.cfg_scale,
                      "compile_mode": compile_mode, "num_steps": num_steps, "nfe": nfe, "batch_size": batch_size,
                      "num_samples": args.num_samples, "seconds": seconds, "images_per_s": rate,
                      "nfe_per_s": rate * nfe, "rows_per_sample": rows_per_sample, "flops_per_row": row_flops,
                      "tflops": achieved, "peak_tflops": peak, "mfu": mfu, "images_per_s_at_peak": ceiling,
                      "first_batch_seconds": warm, "peak_memory_gib": mem}
            if args.extrapolate_to:
                estimate = args.extrapolate_to / rate
                print(f"    extrapolated: {args.extrapolate_to} samples in {estimate:.1f}s ({estimate / 60:.2f} min), "
                      f"linear from the {args.num_samples} timed")
                record["extrapolated_seconds"] = {str(args.extrapolate_to): estimate}
            write_json(args.json, record)
    if args.profile:
        prof = profile(lambda: generate(min(batch_size, args.num_samples)), device, args.profile)
        print(f"  profile of one batch ({compile_mode}, batch {batch_size}, {mode}): wall {prof['wall_s']:.2f}s, "
              f"kernels {prof['kernel_s']:.2f}s (device busy {100 * prof['busy']:.0f}%), "
              f"{prof['launches'] / nfe:.0f} launches per NFE; table in {args.profile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
