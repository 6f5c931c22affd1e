"""`get_flow_matching_dataloader(config)`: the training loader of a flow-matching run.

It yields batches (x, y): x float (B, C, H, W) in [-1, 1], y int64 (B,), from the images of
data/datasets.py, through the worker DataLoader or the decode-once loader (data/device_loader.py),
which give the same batches. With a VQ-VAE (`vqvae_encoder`, or config.vqvae_checkpoint) the items
are instead the dataset's normalized VQ-VAE latents, encoded once and cached on disk
(data/latent_cache.py).
"""

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from data.datasets import build_image_dataset, first_image_size, listing_fingerprint, make_loader
from data.device_loader import device_loader
from data.latent_cache import latent_dataset
from models.vqvae import LatentSpace
from utils.distributed import all_ranks, rank_zero_first


@dataclass
class DataInfo:
    """What the data decided, for the training script to write into its config in one place.

    num_classes: the classes of the dataset; input_shape: (C, H, W) of what the model sees (the
    images, or a latent run's latents); latent_space and vqvae_checkpoint: a latent run's
    normalization and decoder, and the VQ-VAE file it came from (None in pixel space);
    first_image_size: (width, height) of an ImageFolder's first file, for the run's report.
    """
    num_classes: int
    input_shape: Tuple[int, int, int]
    latent_space: Optional[LatentSpace] = None
    vqvae_checkpoint: Optional[str] = None
    first_image_size: Optional[Tuple[int, int]] = None

    def config_fields(self, config) -> Dict[str, Any]:
        """The config values this data fixes: num_classes when it was left unset; a latent run's
        latent_size, latent_channels and vqvae_checkpoint."""
        fields = {"num_classes": self.num_classes if config.num_classes is None else config.num_classes}
        if self.latent_space is not None:
            channels, size, _ = self.input_shape
            fields.update(latent_size=size, latent_channels=channels, vqvae_checkpoint=self.vqvae_checkpoint)
        return fields


def check_num_classes(config, found: int) -> None:
    """--num_classes must be unset, 0 (unconditional) or the dataset's count."""
    if config.num_classes not in (None, 0, found):
        raise ValueError(f"--num_classes {config.num_classes} does not match the {found} classes "
                         f"found in the dataset; pass --num_classes {found} (or 0 for unconditional)")


def free_memory(device: torch.device) -> float:
    """Bytes free on the training device: GPU memory on CUDA, available RAM on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): assume it fits
        return math.inf


def use_device_loader(config, num_images: int, device: torch.device) -> bool:
    """Whether --data_loader picks the on-device uint8 path (data/device_loader.py).

    auto: whenever the uint8 dataset takes at most a quarter of the free device memory (CIFAR-10
    takes 150 MB): the GPU never waits on decoding, and a CPU run stops decoding JPEGs every epoch
    in the cores it trains on (measured, 1,797 images, 1,500 steps of batch 128: 241 s -> 202 s).
    """
    if config.data_loader == "workers":
        return False
    size = num_images * config.in_channels * config.image_size ** 2
    free = free_memory(device)
    fits = all_ranks(size <= free / 4)  # one choice for all ranks: the loaders' waits must pair up
    if config.data_loader == "device" and not fits:
        raise ValueError(f"--data_loader device: the decoded dataset ({size / 2 ** 30:.1f} GiB of uint8) "
                         f"does not fit in a quarter of the free {device.type} memory ({free / 2 ** 30:.1f} GiB); "
                         f"use --data_loader workers")
    return fits


def get_flow_matching_dataloader(config, vqvae_encoder=None, *, batch_size: Optional[int] = None,
                                 rank: int = 0, world_size: int = 1,
                                 device: Optional[torch.device] = None) -> Tuple[Any, DataInfo]:
    """(the training loader a FlowMatchingConfig describes, DataInfo); the config is only read.

    batch_size is the per-forward batch on this rank; by default the config's whole global batch.
    With `vqvae_encoder` (a models.vqvae.VQVAE, or its `.encoder` as rebuild.load_vqvae
    returns it), or else config.vqvae_checkpoint, it yields normalized latents instead of images.
    `device` is where training runs (default CPU); for images, --data_loader picks a worker
    DataLoader or the on-device uint8 loader, which yield the same batches.
    """
    dataset, found = rank_zero_first(rank, lambda: build_image_dataset(
        config.dataset, config.data_dir, config.image_size, config.in_channels, train=True))
    check_num_classes(config, found)
    first_size = first_image_size(dataset)
    batch_size = batch_size or config.batch_size
    device = torch.device(device or "cpu")
    if vqvae_encoder is not None or config.vqvae_checkpoint is not None:
        latents = latent_dataset(config, dataset, vqvae_encoder, rank)
        info = DataInfo(found, latents.latent_shape, latents.latent_space, latents.vqvae_checkpoint, first_size)
        dataset = latents
    else:
        info = DataInfo(found, (config.in_channels, config.image_size, config.image_size), first_image_size=first_size)
        if use_device_loader(config, len(dataset), device):
            return device_loader(config, listing_fingerprint(dataset, config.data_dir), batch_size, device,
                                 rank, world_size), info
    return make_loader(dataset, batch_size, global_batch=config.batch_size, seed=config.seed, hflip=config.hflip,
                       num_workers=config.num_workers, rank=rank, world_size=world_size,
                       pin_memory=device.type == "cuda"), info
