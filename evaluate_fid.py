"""FID of a flow-matching checkpoint, a samples.npz or an image folder, against a reference image set.

    python evaluate_fid.py --checkpoint checkpoints/flow_matching_final.pt     # 50,000 samples vs its training data
    python evaluate_fid.py --checkpoint ... --num_samples 10000 --cfg_scales 1 1.5 2 --num_steps_list 10 20 50
    python evaluate_fid.py --samples generated/samples.npz --ref_dataset imagefolder --ref_data_dir DIR
    python evaluate_fid.py --images ../shared/data/cifar10/test --ref_data_dir ../shared/data/cifar10/train
    python evaluate_fid.py --checkpoint checkpoints/flow_matching_final.pt --ema_sigma_rels 0.03 0.05 0.08 0.12 0.2
                                                                               # post-hoc EMA lengths of one run
    torchrun --nproc_per_node 8 evaluate_fid.py --checkpoint ...               # sampling split over ranks

Features are the 2048-d pool3 features of the TensorFlow FID Inception (2015-12-05), computed by
torch-fidelity (pip install -r requirements-eval.txt); offline, pass --inception_weights PATH.
Reference statistics are cached in --fid_cache_dir, so a second evaluation against the same set
skips them. A checkpoint is sampled with the reference's class mix (balanced, sample i of class
i mod K, when its classes are equally frequent, as in CIFAR-10) from noise seeded by (--seed, i),
once for every combination of --samplers, --num_steps_list, --cfg_scales and --time_shifts (each
defaults to the checkpoint's setting, as --guidance_interval does); the script prints a table of
FID against NFE, shift, scale and interval and appends every row to --output_jsonl. With
--ema_sigma_rels the sweep repeats for the EMA of each length, rebuilt from the post-hoc EMA
snapshots of the checkpoint's run (evaluation/posthoc_ema.py) at the checkpoint's step.
Image sets (--images, the reference) are read at the model's resolution exactly as training reads them.
"""

import argparse
import datetime
import itertools
import json
import os
import time
import zipfile

import numpy as np
from PIL import Image

from configs.cli import ArgumentParser, finite_float
from data.datasets import build_image_dataset
from evaluation import fid, posthoc_ema
from evaluation.sampling import (add_sampling_flags, check_sampling_flags, guided_evaluations, load_sampling_run,
                                 settings_from_flags)
from utils.launch import launch, run_main
from utils.distributed import wait_for_all_ranks
from utils.validation import check_fid_sample_count, check_sigma_rel

DEFAULT_NUM_SAMPLES = 50_000


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, allow_abbrev=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="flow-matching checkpoint (.pt) to sample from")
    source.add_argument("--samples", help="a samples.npz (images uint8 (N, H, W, C)) from generate_flow_matching.py")
    source.add_argument("--images", help="an ImageFolder to score as it is (e.g. a held-out split)")
    p.add_argument("--num_samples", type=int, default=None,
                   help=f"images to score (default: {DEFAULT_NUM_SAMPLES} samples of a checkpoint; every "
                        "image of --samples (its first N otherwise) or of --images (a fixed random subset otherwise))")
    add_sampling_flags(p, sweep=True)
    p.add_argument("--ema_sigma_rels", type=finite_float, nargs="+", default=None, metavar="S",
                   help="score the EMA of each of these lengths (sigma_rel), rebuilt from the post-hoc EMA snapshots "
                        "of the checkpoint's run (trained with --ema_snapshot_every) at the checkpoint's step, "
                        "instead of the checkpoint's own EMA")
    p.add_argument("--ref_dataset", default=None, choices=("cifar10", "imagefolder"),
                   help="reference set kind (default: the checkpoint's dataset when --ref_data_dir is not "
                        "given; imagefolder otherwise)")
    p.add_argument("--ref_data_dir", default=None,
                   help="reference images: an ImageFolder root or the CIFAR-10 download folder "
                        "(default: the checkpoint's data_dir)")
    p.add_argument("--ref_split", default=None, choices=("train", "test"),
                   help="CIFAR-10 split of the reference (default: train; an ImageFolder is its own split)")
    p.add_argument("--ref_num_images", type=int, default=0,
                   help="reference images: a fixed random subset of this many; 0 = all")
    p.add_argument("--fid_cache_dir", default=os.path.join("data_cache", "fid"),
                   help="where reference statistics are cached (default: %(default)s)")
    p.add_argument("--inception_weights", default=None,
                   help="local FID Inception weights (default: torch-fidelity downloads them)")
    p.add_argument("--feature_batch_size", type=int, default=200, help="images per Inception forward pass (default: %(default)s)")
    p.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader workers reading image sets (default: 4, or the CPU count when smaller: %(default)s)")
    p.add_argument("--output_jsonl", default="fid_results.jsonl", help="every result row is appended here (default: %(default)s)")
    return p


def validate(args) -> None:
    if args.num_samples is not None:
        check_fid_sample_count(args.num_samples, "--num_samples")
    check_sampling_flags(args, sweep=True)
    if args.feature_batch_size < 1:
        raise ValueError(f"--feature_batch_size must be >= 1, got {args.feature_batch_size}")
    if args.num_workers < 0:
        raise ValueError(f"--num_workers must be >= 0, got {args.num_workers}")
    if args.ref_num_images < 0 or args.ref_num_images == 1:
        raise ValueError(f"--ref_num_images must be 0 (all) or >= 2, got {args.ref_num_images}")
    for sigma_rel in args.ema_sigma_rels or []:
        check_sigma_rel(sigma_rel, "--ema_sigma_rels entries")
    if args.ema_sigma_rels and args.weights != "ema":
        raise ValueError(f"--ema_sigma_rels rebuilds EMA weights; drop --weights {args.weights}")
    if args.ema_sigma_rels and args.checkpoint and os.path.isfile(args.checkpoint):   # else: loading names it
        posthoc_ema.find_snapshot_dir(os.path.dirname(os.path.abspath(args.checkpoint)))
    if args.checkpoint is None:
        sweep = [f"--{name}" for name in ("cfg_scales", "num_steps_list", "samplers", "time_shifts",
                                          "guidance_interval", "ema_sigma_rels") if getattr(args, name) is not None]
        if sweep:
            raise ValueError(f"{', '.join(sweep)} only apply to --checkpoint; drop them to score "
                             f"{args.samples or args.images} as it is")
        if args.ref_data_dir is None:
            raise ValueError("--ref_data_dir is required with --samples / --images (e.g. "
                             "--ref_data_dir ../shared/data/cifar10/train)")
    if args.inception_weights is not None and not os.path.isfile(args.inception_weights):
        raise ValueError(f"--inception_weights {args.inception_weights} is not a file; {fid.WEIGHTS_HINT}")
    folder = os.path.dirname(os.path.abspath(args.output_jsonl))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ValueError(f"--output_jsonl {args.output_jsonl}: {folder} is not a writable folder")
    if os.path.isdir(args.output_jsonl) or (os.path.exists(args.output_jsonl) and not os.access(args.output_jsonl, os.W_OK)):
        raise ValueError(f"--output_jsonl {args.output_jsonl} is a folder or a read-only file: name a file to append "
                         f"the rows to")


def load_npz(path: str, num_samples) -> np.ndarray:
    if not os.path.isfile(path):
        raise ValueError(f"--samples {path} does not exist; write one with generate_flow_matching.py --save_npz")
    try:
        with np.load(path) as data:   # a .npy renamed .npz loads as an array: not a context manager (TypeError)
            images = data["images"]
    except (KeyError, ValueError, OSError, TypeError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"--samples {path} is not a samples.npz with an 'images' array "
                         f"({type(err).__name__}: {err}); write one with generate_flow_matching.py --save_npz") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[1] != images.shape[2]:
        raise ValueError(f"--samples {path}: 'images' must be uint8 (N, H, H, C) with C = 1 or 3, got "
                         f"{images.dtype} {images.shape}")
    if num_samples is not None:
        if num_samples > len(images):
            raise ValueError(f"--num_samples {num_samples} exceeds the {len(images)} images in {path}; "
                             f"pass {len(images)} or fewer")
        images = images[:num_samples]
    if len(images) < 2:
        raise ValueError(f"--samples {path} holds {len(images)} image(s); FID needs at least 2")
    return images


def folder_image_size(folder: str) -> int:
    """The side of the first image of an ImageFolder (the set is read at that size)."""
    dataset, _ = build_image_dataset("imagefolder", folder, 1, 3, flag="--images")
    with Image.open(dataset.samples[0][0]) as image:
        return min(image.size)


def reference_set(args, config, image_size: int, in_channels: int) -> fid.ImageSet:
    """The reference images, by default the checkpoint's training data, read at the model's size."""
    dataset = args.ref_dataset or ("imagefolder" if args.ref_data_dir or config is None else config["dataset"])
    if args.ref_split is not None and dataset != "cifar10":
        raise ValueError(f"--ref_split {args.ref_split} picks a split of --ref_dataset cifar10; this reference is "
                         f"an ImageFolder, its own split: pass that split's folder as --ref_data_dir")
    return fid.ImageSet(dataset, args.ref_data_dir or config["data_dir"], image_size, in_channels,
                        split=args.ref_split or "train", num_images=args.ref_num_images,
                        flag="--ref_data_dir" if args.ref_data_dir else "the checkpoint's data_dir")


def evaluate(args, dist) -> None:
    validate(args)
    device, main = dist.device, dist.is_main
    run = config = None
    if args.checkpoint:
        run = load_sampling_run(args, device)
        config = run.config
        image_size, in_channels = config["image_size"], config["in_channels"]
        sweep = settings_from_flags(config, args, sweep=True)
        if args.cfg_scales is None and run.num_classes and main:
            print(f"cfg_scale {sweep[0].cfg_scale}: the checkpoint's sampling default, a visual setting; the "
                  f"lowest FID is often at a smaller scale: sweep with --cfg_scales 1 1.5 2 {sweep[0].cfg_scale:g}")
    elif args.samples:
        images = load_npz(args.samples, args.num_samples)
        image_size, in_channels = images.shape[1], images.shape[-1]
    else:
        image_size, in_channels = folder_image_size(args.images), 3
    ref = reference_set(args, config, image_size, in_channels)

    if main:
        extractor = fid.InceptionFeatures(args.inception_weights).to(device).eval()
        ref_stats, ref_n, path, cached = fid.reference_statistics(
            ref, extractor, args.fid_cache_dir, device, args.feature_batch_size, args.num_workers, progress=True)
        reference = ref.describe(ref_n)
        print(f"reference: {reference}; statistics {'read from' if cached else 'written to'} {path}")
    wait_for_all_ranks()  # the other ranks wait out rank 0's reference (NCCL's own timeout is 10 min)
    rows = []

    def report(stats, n, start, settings=None, **fields) -> None:
        """Score one image set (sampled with `settings`, a flow_matching.SamplingSettings, for a
        checkpoint), print it and append it to the JSONL at once (a long sweep may be cut short)."""
        row = {"fid": fid.frechet_distance(stats, ref_stats), "num_samples": n,
               "source": "checkpoint" if args.checkpoint else "samples" if args.samples else "images",
               "path": args.checkpoint or args.samples or args.images,
               **(settings.fields() if settings is not None else {}), **fields,
               "reference": reference, "reference_num_images": ref_n, "features": extractor.name,
               "seconds": round(time.perf_counter() - start, 1),
               "time": datetime.datetime.now().isoformat(timespec="seconds")}
        print(f"FID {row['fid']:.3f} from {n} images"
              + (f" ({settings}; NFE {row['nfe']})" if settings is not None else ""))
        with open(args.output_jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)

    if args.checkpoint:
        labels, mix = fid.reference_labels(args.num_samples or DEFAULT_NUM_SAMPLES, run.num_classes, ref)
        if main:
            print(f"labels: {mix}")
        loaded = None
        for sigma_rel, settings in itertools.product(args.ema_sigma_rels or [None], sweep):
            if sigma_rel != loaded:  # in place: a compiled forward keeps its graphs
                rebuilt = posthoc_ema.reconstruct(os.path.dirname(os.path.abspath(args.checkpoint)), sigma_rel,
                                                  run.ckpt["step"], verbose=main)
                run.model.load_state_dict(rebuilt["ema"], strict=True)
                loaded = sigma_rel
            guided = guided_evaluations(settings, main)
            start = time.perf_counter()
            images, nfe = run.generate(labels, settings, seed=args.seed, batch_size=args.batch_size,
                                       rank=dist.rank, world_size=dist.world_size, progress=main)
            sampling = time.perf_counter() - start
            if main:
                print(f"sampled {len(images)} in {sampling:.1f}s: {len(images) / sampling:.1f} samples/s, "
                      f"{len(images) * nfe / sampling:.0f} NFE/s on {dist.world_size} rank(s)")
                stats = fid.image_statistics(images, extractor, device, args.feature_batch_size, progress=True)
                report(stats, len(images), start, settings, nfe=nfe, guided_nfe=guided,
                       sampling_seconds=round(sampling, 1), samples_per_s=round(len(images) / sampling, 1),
                       labels=mix, step=run.ckpt["step"], weights=args.weights if sigma_rel is None else "posthoc_ema",
                       **({} if sigma_rel is None else {"ema_sigma_rel": sigma_rel}),
                       seed=args.seed, precision=run.precision)
            wait_for_all_ranks()  # and its Inception features, before the next setting's sampling
    elif main:
        start = time.perf_counter()
        if args.images:
            folder = fid.ImageSet("imagefolder", args.images, image_size, num_images=args.num_samples or 0,
                                  flag="--images")
            stats, n = fid.image_set_statistics(folder, extractor, device, args.feature_batch_size,
                                                args.num_workers, progress=True)
        else:
            stats, n = fid.image_statistics(images, extractor, device, args.feature_batch_size, progress=True), len(images)
        report(stats, n, start)
    if main:
        print(format_table(rows, reference))
        print(f"appended {len(rows)} row(s) to {args.output_jsonl}")


def format_table(rows, reference: str) -> str:
    first = rows[0]
    what = first["path"] + (f" (step {first['step']}, {first['weights']} weights)" if "step" in first else "")
    posthoc = any("ema_sigma_rel" in r for r in rows)   # a column only for a --ema_sigma_rels sweep
    lines = [f"FID of {what} vs {reference}",
             f"{'samples':>8} {'sampler':>8} {'steps':>6} {'NFE':>5} {'shift':>5} {'cfg_scale':>9} {'interval':>9} "
             + (f"{'sigma_rel':>9} " if posthoc else "") + f"{'FID':>9}"]
    for r in rows:
        interval = "-" if r.get("guidance_interval") is None else "{:g},{:g}".format(*r["guidance_interval"])
        lines.append(f"{r['num_samples']:>8} {r.get('sampler', '-'):>8} {r.get('num_steps', '-'):>6} "
                     f"{r.get('nfe', '-'):>5} {r.get('time_shift', '-'):>5} {r.get('cfg_scale', '-'):>9} "
                     f"{interval:>9} " + (f"{r['ema_sigma_rel']:>9} " if posthoc else "") + f"{r['fid']:>9.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return launch(parser.prog, args.device, lambda dist: evaluate(args, dist))


if __name__ == "__main__":
    run_main(main)
