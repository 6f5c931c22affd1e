"""A training loader that cannot starve a GPU: the dataset decoded once into a uint8 tensor that
lives on the training device, batches gathered and flipped there.

    images, labels, num_classes = load_uint8_dataset(config, listing)   # decoded once, then cached
    loader = DeviceLoader(images.to(device), labels.to(device), batch_size, global_batch=..., seed=..., hflip=...)
    for x, y in loader: ...                                        # x float (B, C, H, W) in [-1, 1]

It yields exactly the batches of the DataLoader path (data/flow_matching_dataset.py): the same
ResumableSampler decides each epoch's order, flips, rank share and resume position, and the
uint8 -> float conversion is the same arithmetic as ToTensor + Normalize. The trainer uses either
through the same `loader.sampler.set_position(epoch, start)` and `loader.batch_size`.

The cache is a plain tensor dict written atomically to `--data_cache_dir` (never into the data
folder, which may be read-only); its name encodes the source and the preprocessing, and deleting
it forces a new decode.
"""

import hashlib
import os
from typing import Iterator, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from data.datasets import ResumableSampler, build_image_dataset, uint8_to_model
from utils.checkpoint import save_checkpoint
from utils.distributed import rank_zero_first
from utils.validation import check_writable


class _Length:
    """A stand-in dataset for the sampler, which only needs len()."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


class DeviceLoader:
    """Batches (x, y) gathered from uint8 images already on the device; drop_last like the
    DataLoader path. Iterating reads the sampler's position once, at the start of each epoch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, global_batch: int,
                 seed: int, hflip: bool, rank: int = 0, world_size: int = 1):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.dataset = _Length(len(images))  # as DataLoader.dataset: callers may read its attributes
        self.sampler = ResumableSampler(self.dataset, global_batch, num_replicas=world_size, rank=rank,
                                        seed=seed, hflip=hflip)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        indices, flips = self.sampler.epoch_order()
        device = self.images.device
        # One host-to-device copy per epoch; every batch after it is device work only.
        indices, flips = indices.to(device, non_blocking=True), flips.to(device, non_blocking=True)
        for first in range(0, len(indices) - self.batch_size + 1, self.batch_size):
            rows, flip = indices[first:first + self.batch_size], flips[first:first + self.batch_size]
            x = uint8_to_model(self.images.index_select(0, rows))
            yield torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x), self.labels.index_select(0, rows)


def uint8_dataset(config) -> Tuple[Dataset, int]:
    """The training images as uint8 tensors, and the number of classes."""
    return build_image_dataset(config.dataset, config.data_dir, config.image_size, config.in_channels,
                               train=True, as_uint8=True)


def cache_path(config, listing: str) -> str:
    """Where the decoded dataset lives: named by source and preprocessing, keyed also on its file
    listing (`listing_fingerprint`), so a folder with files added or removed is decoded again."""
    source = os.path.abspath(config.data_dir)
    key = hashlib.sha1(f"{config.dataset}|{source}|{config.image_size}|{config.in_channels}|{listing}"
                       .encode()).hexdigest()[:12]
    name = f"{config.dataset}_{os.path.basename(source.rstrip(os.sep))}_{config.image_size}px_" \
           f"{config.in_channels}ch_{key}.pt"
    return os.path.join(config.data_cache_dir, name)


def decode_dataset(dataset: Dataset, num_workers: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decode every image once: (uint8 (N, C, H, W), int64 labels (N,))."""
    loader = DataLoader(dataset, batch_size=500, num_workers=num_workers, shuffle=False)
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels).long()


def load_uint8_dataset(config, listing: str, verbose: bool = True) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """The decoded dataset from the cache, decoding and caching it first when missing."""
    path = cache_path(config, listing)
    if os.path.isfile(path):
        cached = torch.load(path, map_location="cpu", weights_only=True)
        return cached["images"], cached["labels"], cached["num_classes"]
    check_writable(config.data_cache_dir, f"--data_cache_dir {config.data_cache_dir}")   # before the decoding
    if verbose:
        print(f"decoding {config.data_dir} once into {path} (uint8; later runs load it)")
    dataset, found = uint8_dataset(config)
    images, labels = decode_dataset(dataset, config.num_workers)
    save_checkpoint({"images": images, "labels": labels, "num_classes": found,
                     "source": os.path.abspath(config.data_dir)}, path)
    return images, labels, found


def device_loader(config, listing: str, batch_size: int, device: torch.device, rank: int = 0,
                  world_size: int = 1) -> DeviceLoader:
    """The DeviceLoader a config describes (`listing`: the dataset's listing_fingerprint).

    Rank 0 decodes and writes the cache while the others wait, then read it (or, on a node that
    does not share the folder, decode their own copy).
    """
    images, labels, _ = rank_zero_first(rank, lambda: load_uint8_dataset(config, listing, verbose=rank == 0))
    return DeviceLoader(images.to(device), labels.to(device), batch_size, global_batch=config.batch_size,
                        seed=config.seed, hflip=config.hflip, rank=rank, world_size=world_size)
