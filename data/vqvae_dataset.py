"""Data of a VQ-VAE run: the training loader, the fixed reconstruction-grid images and the
evaluation loader, all built by data/datasets.py's builders (the flow run's sources and
resumable sampler). Labels come along in the batches and are ignored by the VQ-VAE.
"""

from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from data.datasets import build_image_dataset, make_loader
from utils.distributed import rank_zero_first


def get_vqvae_dataloader(config, *, batch_size: Optional[int] = None, rank: int = 0,
                         world_size: int = 1) -> DataLoader:
    """The training loader a VQVAEConfig describes; batch_size is per forward on this rank."""
    dataset, _ = rank_zero_first(rank, lambda: build_image_dataset(
        config.dataset, config.data_dir, config.image_size, config.in_channels, train=True))
    return make_loader(dataset, batch_size or config.batch_size, global_batch=config.batch_size, seed=config.seed,
                       hflip=config.hflip, num_workers=config.num_workers, rank=rank, world_size=world_size,
                       pin_memory=torch.cuda.is_available())


def evenly_spaced(dataset: Dataset, count: int) -> Subset:
    """`count` items spread over the whole dataset (an ImageFolder is sorted by class)."""
    count = min(count, len(dataset))
    return Subset(dataset, torch.linspace(0, len(dataset) - 1, count).round().long().tolist())


def grid_images(loader: DataLoader, count: int) -> torch.Tensor:
    """The images of the reconstruction grid: (count, C, H, W), unflipped, fixed for the run."""
    base = loader.dataset.base
    return torch.stack([x for x, _ in evenly_spaced(base, count)])


def get_vqvae_eval_loader(config) -> DataLoader:
    """`eval_images` evenly spaced images of --eval_data_dir (the test split for cifar10)."""
    dataset, _ = build_image_dataset(config.dataset, config.eval_data_dir or config.data_dir,
                                     config.image_size, config.in_channels, train=False)
    return DataLoader(evenly_spaced(dataset, config.eval_images), batch_size=config.batch_size,
                      num_workers=config.num_workers)
