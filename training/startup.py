"""The start-up report of a training run: the resolved config, the model's size and batch split,
and the run's config.json."""

import json
import os

import torch

from configs.cli import format_config
from utils.checkpoint import run_file
from utils.distributed import DistInfo


def announce_run(config, model: torch.nn.Module, kind: str, dist: DistInfo, micro: int) -> None:
    """Print the resolved config and the model's size and batch split (`micro` images per forward
    on a rank); save the config as the run's config.json (rank 0 only)."""
    if not dist.is_main:
        return
    print(f"config:\n{format_config(config)}")
    print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
          f"{dist.world_size} rank(s){f' (torchrun, {dist.backend})' if dist.distributed else ''} on {dist.device}; "
          f"micro-batch {micro}, "
          f"{config.batch_size // (micro * dist.world_size)} accumulation step(s)")
    os.makedirs(config.checkpoint_dir, exist_ok=True)
    with open(run_file(config.checkpoint_dir, kind, "config.json"), "w") as f:
        json.dump(vars(config), f, indent=2)
