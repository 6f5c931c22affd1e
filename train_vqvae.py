"""Train a VQ-VAE whose latents a flow model can then learn (train_flow_matching.py --vqvae_checkpoint).

    python train_vqvae.py                                  # CIFAR-10, 32x32 -> 8x8x4 latents, 512 codes
    python train_vqvae.py --preset tiny --dataset imagefolder --data_dir PATH --device cpu
    torchrun --nproc_per_node 8 train_vqvae.py             # batch_size stays the global batch

The same trainer as the flow model (AMP, accumulation, atomic checkpoints, exact resume with
--resume latest, SIGTERM, metrics). Logs reconstruction MSE and PSNR, commitment, perplexity and
the share of codes used; writes reconstruction grids (originals above, reconstructions below) to
--sample_dir and the final checkpoint to --checkpoint_dir/vqvae.pt. At the end it reports PSNR and
code usage on --eval_images images of --eval_data_dir (CIFAR-10: its test split; an ImageFolder run
without it: its training images, which the line says) and appends them to the metrics.
Every file of the run is prefixed vqvae_ (vqvae_checkpoint_*.pt, vqvae_metrics.jsonl,
vqvae_config.json, vqvae_step_*.png), so the flow run can share checkpoints/ and samples/.
"""

import json
import os

import torch

from configs.vqvae_config import parse_vqvae_config
from data.datasets import first_image_size
from data.vqvae_dataset import get_vqvae_dataloader, get_vqvae_eval_loader, grid_images
from evaluation.reconstruction import evaluate_reconstruction
from models.vqvae import VQVAE_ARCHITECTURE_FIELDS, vqvae_from_config
from utils.checkpoint import run_file
from training.startup import announce_run, check_run_folders, save_run_config
from utils.launch import launch, run_main
from training.objectives import VQVAEObjective
from training.trainer import Trainer, micro_batch_size


def report(config, model, eval_loader, device, step: int) -> None:
    """Reconstruction quality of the trained weights on the evaluation images: printed and logged."""
    metrics = evaluate_reconstruction(model, eval_loader, device)
    source = config.eval_data_dir or config.data_dir
    which = (" (test split)" if config.dataset == "cifar10" else
             " (the training images: pass --eval_data_dir for held-out ones)" if config.eval_data_dir is None else "")
    print(f"reconstruction on {metrics['images']} images of {source}{which}: PSNR {metrics['psnr']:.2f} dB, "
          f"MSE {metrics['mse']:.5f}, perplexity {metrics['perplexity']:.1f} of {config.codebook_size} codes, "
          f"code usage {100 * metrics['code_usage']:.1f}%")
    with open(run_file(config.checkpoint_dir, "vqvae", "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}}) + "\n")


def train(config, dist) -> None:
    check_run_folders(config, "vqvae", dist.is_main)
    micro = micro_batch_size(config, dist.world_size)
    loader = get_vqvae_dataloader(config, batch_size=micro, rank=dist.rank, world_size=dist.world_size)
    # Built before training so that a bad --eval_data_dir fails at once, not after the run.
    eval_loader = get_vqvae_eval_loader(config) if config.eval_images and dist.is_main else None
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = vqvae_from_config(config)
    announce_run(config, model, dist, micro, first_image_size(loader.dataset.base))
    if dist.is_main:
        print(f"latents {'x'.join(map(str, model.latent_shape(config.image_size)))}, "
              f"{config.codebook_size} codes")
    objective = VQVAEObjective(config, model, grid_images(loader, config.grid_images))
    # A resume keeps the image size too: the latents' shape, and with it every flow run on them, follows it.
    trainer = Trainer(config, model, objective, loader, dist, (*VQVAE_ARCHITECTURE_FIELDS, "image_size"))
    save_run_config(config, "vqvae", dist)
    path = trainer.fit()
    if dist.is_main:
        if eval_loader is not None:
            report(config, trainer.raw_model, eval_loader, dist.device, trainer.step)
        print(f"done: {path}")


def main(argv=None) -> int:
    config = parse_vqvae_config(argv)
    return launch(os.path.basename(__file__), config.device, lambda dist: train(config, dist))


if __name__ == "__main__":
    run_main(main)
