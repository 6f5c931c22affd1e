"""Sample images from a flow-matching checkpoint (EMA weights by default).

    python generate_flow_matching.py --checkpoint checkpoints/flow_matching_final.pt --num_samples 16
    python generate_flow_matching.py --checkpoint ... --num_samples 16 --class_label 5
    python generate_flow_matching.py --checkpoint ... --class_grid --samples_per_class 8
    python generate_flow_matching.py --checkpoint ... --num_samples 16 --num_steps 100 --cfg_scale 4.0
    python generate_flow_matching.py --checkpoint ... --num_samples 16 --time_shift 3 --guidance_interval 0.2 0.9
    torchrun --nproc_per_node 8 generate_flow_matching.py --checkpoint ... --num_samples 50000 --save_npz

A latent checkpoint (trained with --vqvae_checkpoint) is decoded to pixels through the VQ-VAE it
records (or --vqvae_checkpoint PATH when that file moved); its weights must be the ones it was
trained with.

Writes to --output_dir:
    grid.png                 the samples in index order (a row per class with --class_grid; at
                             most the first 256 samples otherwise)
    images/NNNNNN.png        every sample, NNNNNN its index (also _classK for conditional models)
    samples.npz              with --save_npz: images uint8 (N, H, W, C), labels int64 (N,)
A run replaces what an earlier run wrote there (its images/NNNNNN*.png, grid.png and samples.npz go first), so
the folder never mixes two runs' samples; other files are left alone.

Sample i starts from noise seeded by (--seed, i), and batches are dealt to ranks whole, so the
same seed gives the same noise, labels and images whatever --batch_size or the number of ranks; the
images only up to the float summation order of kernels that depend on the batch's shape (a uint8
level or two, more often in bf16).
"""

import argparse
import math
import os
import re
import time

import numpy as np
import torch

from configs.cli import ArgumentParser
from evaluation.sampling import (add_sampling_flags, check_sampling_flags, guided_evaluations, load_sampling_run,
                                 settings_from_flags)
from utils.checkpoint import write_atomically
from utils.distributed import wait_for_all_ranks
from utils.launch import launch, run_main
from utils.images import make_grid, save_image
from utils.validation import check_writable

MAX_GRID_IMAGES = 256
NUM_SAMPLES, SAMPLES_PER_CLASS = 16, 8   # defaults of --num_samples and of --class_grid's --samples_per_class
SAMPLE_NAME = re.compile(r"\d{6,}(_class\d+)?\.png")  # write_images' names (index zero-padded to 6 digits, more past 999,999)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, allow_abbrev=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="flow-matching checkpoint (.pt) written by training")
    p.add_argument("--num_samples", type=int, default=None,
                   help=f"samples to draw (default: {NUM_SAMPLES}; --class_grid draws classes x --samples_per_class)")
    p.add_argument("--class_label", type=int, default=None, help="draw every sample from class K (default: random classes)")
    p.add_argument("--class_grid", action="store_true", help="a row per class, --samples_per_class columns")
    p.add_argument("--samples_per_class", type=int, default=None,
                   help=f"columns of --class_grid (default: {SAMPLES_PER_CLASS})")
    p.add_argument("--output_dir", default="generated", help="where images (and samples.npz) go (default: %(default)s)")
    p.add_argument("--save_npz", action="store_true", help="also write samples.npz (the input of FID tools)")
    add_sampling_flags(p, sweep=False)
    return p


def plan_labels(args, num_classes: int) -> torch.Tensor:
    """The label of every sample, in index order (empty labels -1 for unconditional models)."""
    if num_classes == 0:
        if args.class_label is not None or args.class_grid:
            raise ValueError("--class_label / --class_grid need a class-conditional model; this "
                             "checkpoint is unconditional (num_classes=0)")
        return torch.full((args.num_samples,), -1, dtype=torch.long)
    if args.class_grid:
        if args.class_label is not None:
            raise ValueError(f"--class_grid draws every class; it cannot be combined with --class_label "
                             f"{args.class_label}: drop one of the two")
        return torch.arange(num_classes).repeat_interleave(args.samples_per_class)
    if args.class_label is not None:
        if not 0 <= args.class_label < num_classes:
            raise ValueError(f"--class_label {args.class_label} is out of range: this model has "
                             f"{num_classes} classes (0..{num_classes - 1})")
        return torch.full((args.num_samples,), args.class_label, dtype=torch.long)
    generator = torch.Generator().manual_seed(args.seed)
    return torch.randint(num_classes, (args.num_samples,), generator=generator)


def validate(args) -> None:
    """ValueError for flags that cannot sample or that this run would ignore; fills in the defaults of
    --num_samples and --samples_per_class (which depend on --class_grid)."""
    if args.class_grid:
        if args.num_samples is not None:
            raise ValueError(f"--num_samples {args.num_samples} with --class_grid: the grid draws (classes x "
                             f"--samples_per_class) samples; drop --num_samples, or --class_grid")
        args.samples_per_class = SAMPLES_PER_CLASS if args.samples_per_class is None else args.samples_per_class
        if args.samples_per_class < 1:
            raise ValueError(f"--samples_per_class must be >= 1, got {args.samples_per_class}")
    else:
        if args.samples_per_class is not None:
            raise ValueError(f"--samples_per_class {args.samples_per_class} sets the columns of --class_grid: "
                             f"add --class_grid, or use --num_samples for random classes")
        args.num_samples = NUM_SAMPLES if args.num_samples is None else args.num_samples
        if args.num_samples < 1:
            raise ValueError(f"--num_samples must be >= 1, got {args.num_samples}")
    check_sampling_flags(args, sweep=False)
    check_writable(args.output_dir, f"--output_dir {args.output_dir}")


def generate(args, dist) -> None:
    validate(args)
    run = load_sampling_run(args, dist.device)
    num_classes = run.num_classes
    [settings] = settings_from_flags(run.config, args, sweep=False)
    guided = guided_evaluations(settings, dist.is_main)
    labels = plan_labels(args, num_classes)
    n = len(labels)
    if dist.is_main:
        remove_earlier_samples(args.output_dir)
    wait_for_all_ranks()

    writing = 0.0   # seconds in PNG writes, kept out of the sampling rate

    def write(first: int, batch: np.ndarray) -> None:
        nonlocal writing
        begin = time.perf_counter()
        write_images(args.output_dir, batch, labels[first:first + len(batch)], first, num_classes)
        writing += time.perf_counter() - begin

    start = time.perf_counter()
    images, nfe = run.generate(labels, settings, seed=args.seed, batch_size=args.batch_size, rank=dist.rank,
                               world_size=dist.world_size, progress=dist.is_main, on_batch=write)
    sampling = time.perf_counter() - start - writing
    if not dist.is_main:
        return
    assert images.shape[0] == n
    begin = time.perf_counter()
    nrow = args.samples_per_class if args.class_grid else math.ceil(math.sqrt(min(n, MAX_GRID_IMAGES)))
    shown = images if args.class_grid else images[:MAX_GRID_IMAGES]
    save_image(make_grid(shown, nrow), os.path.join(args.output_dir, "grid.png"))
    if args.save_npz:
        # Atomic: a run killed mid-write leaves no truncated samples.npz for a FID tool to read.
        write_atomically(os.path.join(args.output_dir, "samples.npz"),
                         lambda f: np.savez(f, images=images, labels=labels.numpy()))
    writing += time.perf_counter() - begin
    print(f"{n} samples, {nfe} NFE per sample, {guided} of them guided ({settings}): sampling {sampling:.1f}s "
          f"({n / sampling:.1f} images/s, {n * nfe / sampling:.0f} NFE/s on {dist.world_size} rank(s)"
          f"{', the first batch compiling' if run.compiled else ''}), writing {writing:.1f}s; wrote "
          f"{os.path.join(args.output_dir, 'grid.png')}, {os.path.join(args.output_dir, 'images')}/"
          + (f", {os.path.join(args.output_dir, 'samples.npz')}" if args.save_npz else ""))


def remove_earlier_samples(output_dir: str) -> None:
    """Delete the images/NNNNNN*.png, grid.png and samples.npz an earlier run wrote to `output_dir`,
    before this run writes any: a run that fails or is stopped midway leaves only its own files."""
    folder = os.path.join(output_dir, "images")
    old = [f for f in os.listdir(folder) if SAMPLE_NAME.fullmatch(f)] if os.path.isdir(folder) else []
    files = [name for name in ("grid.png", "samples.npz") if os.path.isfile(os.path.join(output_dir, name))]
    if old or files:
        print(f"{output_dir}: replacing an earlier run's {' and '.join([f'{len(old)} images'] + files)}")
    for name in old:
        os.remove(os.path.join(folder, name))
    for name in files:
        os.remove(os.path.join(output_dir, name))


def write_images(output_dir: str, images: np.ndarray, labels: torch.Tensor, first: int, num_classes: int) -> None:
    for offset, (image, label) in enumerate(zip(images, labels.tolist())):
        suffix = f"_class{label}" if num_classes else ""
        save_image(image, os.path.join(output_dir, "images", f"{first + offset:06d}{suffix}.png"))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return launch(parser.prog, args.device, lambda dist: generate(args, dist))


if __name__ == "__main__":
    run_main(main)
