"""Train a class-conditional DiT2D with flow matching.

    python train_flow_matching.py                       # the seed's CIFAR-10 run (DiT-B/2)
    python train_flow_matching.py --preset tiny --dataset imagefolder --data_dir PATH --device cpu
    torchrun --nproc_per_node 8 train_flow_matching.py  # batch_size stays the global batch

Every config field is a flag (`--help` lists them). Writes checkpoints, config.json and
metrics.jsonl to --checkpoint_dir and EMA sample grids to --sample_dir.
"""

import json
import os
import sys

import torch

from configs.cli import format_config
from configs.flow_matching_config import ARCHITECTURE_FIELDS, parse_flow_matching_config
from data.flow_matching_dataset import get_flow_matching_dataloader
from models.dit_2d import dit_from_config
from training.distributed import cleanup_distributed, setup_distributed
from training.objectives import FlowMatchingObjective
from training.trainer import AUTOCAST_DTYPES, NonFiniteLoss, Trainer, micro_batch_size


def main(argv=None) -> int:
    config = parse_flow_matching_config(argv)
    dist = setup_distributed(config.device)
    try:
        micro = micro_batch_size(config, dist.world_size)
        loader = get_flow_matching_dataloader(config, batch_size=micro, rank=dist.rank,
                                              world_size=dist.world_size)
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        model = dit_from_config(config)
        model.gradient_checkpointing = config.gradient_checkpointing
        if dist.is_main:
            print(f"config:\n{format_config(config)}")
            print(f"DiT2D: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
                  f"{dist.world_size} rank(s) on {dist.device}; micro-batch {micro}, "
                  f"{config.batch_size // (micro * dist.world_size)} accumulation step(s)")
            os.makedirs(config.checkpoint_dir, exist_ok=True)
            with open(os.path.join(config.checkpoint_dir, "config.json"), "w") as f:
                json.dump(vars(config), f, indent=2)
        objective = FlowMatchingObjective(config, dist.device, AUTOCAST_DTYPES[config.mixed_precision],
                                          dist.rank, dist.world_size)
        trainer = Trainer(config, model, objective, loader, dist, ARCHITECTURE_FIELDS)
        path = trainer.fit()
        if dist.is_main:
            print(f"done: {path}")
        return 0
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    sys.exit(main())
