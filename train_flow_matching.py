"""Train a class-conditional DiT2D with flow matching.

    python train_flow_matching.py                       # the seed's CIFAR-10 run (DiT-B/2)
    python train_flow_matching.py --preset tiny --dataset imagefolder --data_dir PATH --device cpu
    torchrun --nproc_per_node 8 train_flow_matching.py  # batch_size stays the global batch
    python train_flow_matching.py --vqvae_checkpoint checkpoints/vqvae.pt   # on VQ-VAE latents
    python train_flow_matching.py --objective meanflow --init_from checkpoints/flow_matching_final.pt \
        --checkpoint_dir checkpoints/meanflow_init      # 1-2 step sampling from a flow-matching run

Every config field is a flag (`--help` lists them). Writes checkpoints, config.json and
metrics.jsonl to --checkpoint_dir and EMA sample grids to --sample_dir.
"""

import dataclasses
import os

import torch

from configs.flow_matching_config import ARCHITECTURE_FIELDS, parse_flow_matching_config
from data.flow_matching_dataset import get_flow_matching_dataloader
from models.dit_2d import dit_from_config
from rebuild import initial_weights, load_vqvae
from training.startup import announce_run, check_run_folders, save_run_config
from utils.launch import launch, run_main
from evaluation.periodic import PeriodicFID
from training.objectives import FlowMatchingObjective
from training.trainer import AUTOCAST_DTYPES, Trainer, micro_batch_size


def train(config, dist) -> None:
    check_run_folders(config, "flow_matching", dist.is_main)
    micro = micro_batch_size(config, dist.world_size)
    vqvae = (load_vqvae(config.vqvae_checkpoint, device=dist.device)
             if config.vqvae_checkpoint else None)
    loader, info = get_flow_matching_dataloader(config, vqvae_encoder=vqvae, batch_size=micro,
                                                rank=dist.rank, world_size=dist.world_size, device=dist.device)
    # What the data decided (classes; a latent run's latent shape and VQ-VAE), written into the
    # config here and nowhere else: the config saved with the run then rebuilds the model.
    config = dataclasses.replace(config, **info.config_fields(config))
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = dit_from_config(config)
    model.gradient_checkpointing = config.gradient_checkpointing
    if config.init_from is not None:
        # Every field of the network but the objective: a flow-matching run may start a MeanFlow one.
        fields = [f for f in ARCHITECTURE_FIELDS if f != "objective"]
        model.load_state_dict(initial_weights(config.init_from, model, config, fields, info.latent_space), strict=True)
    announce_run(config, model, dist, micro, info.first_image_size)
    autocast_dtype = AUTOCAST_DTYPES[config.mixed_precision]
    objective = FlowMatchingObjective(config, dist.device, autocast_dtype, latent_space=info.latent_space)
    evaluator = (PeriodicFID(config, dist.device, autocast_dtype, dist.rank, dist.world_size,
                             decode=info.latent_space.decode if info.latent_space is not None else None)
                 if config.fid_every else None)
    trainer = Trainer(config, model, objective, loader, dist, ARCHITECTURE_FIELDS, evaluator=evaluator)
    save_run_config(config, "flow_matching", dist)
    path = trainer.fit()
    if dist.is_main:
        print(f"done: {path}")


def main(argv=None) -> int:
    config = parse_flow_matching_config(argv)
    return launch(os.path.basename(__file__), config.device, lambda dist: train(config, dist))


if __name__ == "__main__":
    run_main(main)
