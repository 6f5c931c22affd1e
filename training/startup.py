"""A training run's start: the checks of its folders before any work, the report of the resolved
config, the model's size and batch split, and the run's config.json."""

import glob
import json
import os
from typing import Optional, Tuple

import torch

from configs.cli import format_config
from evaluation.posthoc_ema import check_no_earlier_snapshots
from utils.checkpoint import check_nothing_ahead, run_file, write_atomically
from utils.distributed import DistInfo
from utils.validation import check_writable


def check_run_folders(config, kind: str, is_main: bool = True) -> None:
    """ValueError before any work (decoding, encoding, compiling, the first grid step) when the run's
    folders are another run's or cannot be written; a note (rank 0) when a new run's grids would
    replace an earlier run's."""
    new_run = getattr(config, "init_from", None) and not config.resume   # a new run: resuming is not the fix
    check_nothing_ahead(config.checkpoint_dir, kind, config.resume,
                        fix="A run started with --init_from needs a --checkpoint_dir of its own (or move them "
                            "away)" if new_run else None)
    check_no_earlier_snapshots(config.checkpoint_dir, kind, config.resume)
    check_writable(config.checkpoint_dir, f"--checkpoint_dir {config.checkpoint_dir}")
    if config.sample_every:
        check_writable(config.sample_dir, f"--sample_dir {config.sample_dir}")
        grids = [] if config.resume else sorted(glob.glob(run_file(config.sample_dir, kind, "step_*.png")))
        if grids and is_main:
            print(f"note: --sample_dir {config.sample_dir} holds {len(grids)} grid(s) of an earlier run "
                  f"({os.path.basename(grids[0])}, ...): this run's grids of the same steps replace them; "
                  f"give it a --sample_dir of its own to keep them")


def announce_run(config, model: torch.nn.Module, dist: DistInfo, micro: int,
                 first_image_size: Optional[Tuple[int, int]] = None) -> None:
    """Print the resolved config and the model's size and batch split (`micro` images per forward
    on a rank; rank 0 only), and a note when the images (as the first of an ImageFolder shows,
    `first_image_size` = (width, height)) are not at --image_size."""
    if not dist.is_main:
        return
    print(f"config:\n{format_config(config)}")
    print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
          f"{dist.world_size} rank(s){f' (torchrun, {dist.backend})' if dist.distributed else ''} on {dist.device}; "
          f"micro-batch {micro}, "
          f"{config.batch_size // (micro * dist.world_size)} accumulation step(s)")
    if config.warmup_steps > config.train_steps:   # allowed (a short trial of a long recipe), but never silent
        print(f"note: --warmup_steps {config.warmup_steps} is longer than --train_steps {config.train_steps}: the run "
              f"ends mid-warmup, its learning rates at {config.train_steps / config.warmup_steps:.0%} of their peak")
    if first_image_size is not None and first_image_size != (config.image_size, config.image_size):
        # Allowed (CIFAR-10 at 16px is the quality proxy), but a folder at 48px trained at the default
        # 32px is more often a forgotten --image_size.
        width, height = first_image_size
        print(f"note: the images of --data_dir are {width}x{height} (its first file); training resizes them "
              f"(shorter side) and center-crops them to --image_size {config.image_size}")


def save_run_config(config, kind: str, dist: DistInfo) -> None:
    """The run's config.json (rank 0; atomic), written once the Trainer has accepted its resume
    checkpoint: a refused resume leaves the config of the run it refused to continue."""
    if dist.is_main:
        text = json.dumps(vars(config), indent=2).encode()
        write_atomically(run_file(config.checkpoint_dir, kind, "config.json"), lambda f: f.write(text))
