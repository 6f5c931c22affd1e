"""The dataset of a latent flow run: the training images encoded once by a VQ-VAE, cached on disk.

The cache holds the VQ-VAE's codes (int16/int32, (N, V, h, w)) and labels. With hflip, V = 2: the
codes of each image and, separately, of its mirror image. Mirroring a latent is not the latent of
the mirrored image (the encoder's convolutions are not flip-equivariant), and the codes of both
cost only 2 x 64 integers per CIFAR image, so the flow model trains on true latents of both.

The cache file is named by a SHA-256 of everything its content depends on: the VQ-VAE's
fingerprint (every weight and codebook vector), the dataset kind, its absolute path, the list of
its files with size and modification time (ImageFolder), image_size, in_channels and hflip. Another
VQ-VAE, another or edited dataset, or other sizes give another file; a stale cache is never read.

Items are the codebook vectors of the codes, normalized per channel with the mean and std of all
cached latents (exact, from the code histogram); the statistics travel in the flow checkpoint
through `LatentSpace.state()`.
"""

import hashlib
import json
import os
from typing import Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data.datasets import FlipByIndex, listing_fingerprint
from models.vqvae import VQVAE, LatentSpace
from rebuild import load_vqvae
from utils.checkpoint import save_checkpoint
from utils.distributed import rank_zero_first
from utils.validation import check_writable

CACHE_FORMAT = 1


class LatentDataset(FlipByIndex):
    """Cached codes as normalized latents; key (i, flip) returns the latent of image i or of its
    mirror image, as encoded (never a flipped latent)."""

    def __init__(self, codes: torch.Tensor, labels: torch.Tensor, latent_space: LatentSpace):
        self.codes, self.labels, self.latent_space = codes, labels, latent_space
        codebook = latent_space.vqvae.quantizer.embedding.detach().float().cpu()              # (K, D)
        # Each code vector normalized as a 1x1 latent: the table of every normalized latent value.
        self.table = latent_space.normalize(codebook[:, :, None, None].to(latent_space.mean.device)
                                            ).reshape(codebook.shape).cpu()                  # (K, D)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        index, flip = key
        return self.table[self.codes[index, int(flip)].long()].permute(2, 0, 1), int(self.labels[index])


def cache_key(vqvae: VQVAE, dataset: Dataset, config) -> str:
    """SHA-256 of everything the cached codes depend on."""
    source = {"format": CACHE_FORMAT, "vqvae": vqvae.fingerprint(), "dataset": config.dataset,
              "data_dir": os.path.abspath(config.data_dir), "items": len(dataset),
              "files": listing_fingerprint(dataset, config.data_dir),
              "image_size": config.image_size, "in_channels": config.in_channels, "hflip": config.hflip}
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()


@torch.no_grad()
def encode_dataset(vqvae: VQVAE, dataset: Dataset, hflip: bool, batch_size: int,
                   num_workers: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Codes (N, 1 or 2, h, w) of every image (and of its mirror when hflip) and labels (N,)."""
    device = next(vqvae.parameters()).device
    dtype = torch.int16 if vqvae.codebook_size <= torch.iinfo(torch.int16).max + 1 else torch.int32
    codes, labels = [], []
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    for x, y in tqdm(loader, desc="encoding the dataset with the VQ-VAE"):
        x = x.to(device)
        views = [x, x.flip(-1)] if hflip else [x]
        codes.append(torch.stack([vqvae.codes(v).to(dtype).cpu() for v in views], 1))
        labels.append(torch.as_tensor(y, dtype=torch.long))
    return torch.cat(codes), torch.cat(labels)


def channel_stats(codes: torch.Tensor, codebook: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact per-channel mean and std of codebook[codes] over all cached positions."""
    counts = torch.bincount(codes.flatten().long(), minlength=codebook.shape[0]).double()
    weights = counts / counts.sum()
    codebook = codebook.double().cpu()
    mean = weights @ codebook
    std = (weights @ (codebook - mean).square()).sqrt().clamp_min(1e-6)
    return mean.float(), std.float()


def load_latent_dataset(config, vqvae: VQVAE, dataset: Dataset, batch_size: int,
                        rank: int = 0) -> LatentDataset:
    """The cached latents of `dataset` under config.data_cache_dir, encoding them on a miss.

    Under torch.distributed rank 0 looks first (encoding and writing on a miss) while the other
    ranks wait; they then read its file, or encode their own where they do not see it (nodes that
    do not share --data_cache_dir), as the decoded-image cache does.
    """
    key = cache_key(vqvae, dataset, config)
    path = os.path.join(config.data_cache_dir, f"vq_latents_{key[:24]}.pt")
    cache = rank_zero_first(rank, lambda: read_or_encode(path, key, config, vqvae, dataset, batch_size, rank))
    mean, std = channel_stats(cache["codes"], vqvae.quantizer.embedding)
    return LatentDataset(cache["codes"], cache["labels"], LatentSpace(vqvae, mean, std))


def read_or_encode(path: str, key: str, config, vqvae: VQVAE, dataset: Dataset, batch_size: int,
                   rank: int) -> dict:
    """The cache file's contents, encoded and written first when the file is not there."""
    if not os.path.isfile(path):
        check_writable(config.data_cache_dir, f"--data_cache_dir {config.data_cache_dir}")   # before the encoding
        print(f"latent cache miss{f' on rank {rank}' if rank else ''}: encoding {len(dataset)} images"
              f"{' and their mirrors' if config.hflip else ''} into {path}")
        codes, labels = encode_dataset(vqvae, dataset, config.hflip, batch_size, config.num_workers)
        cache = {"format": CACHE_FORMAT, "key": key, "codes": codes, "labels": labels}
        save_checkpoint(cache, path)
        return cache
    if rank == 0:
        print(f"latent cache hit: {path}")
    try:
        cache = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign file
        raise ValueError(f"latent cache {path} cannot be read ({type(err).__name__}); delete it and "
                         f"run again to re-encode") from None
    if not isinstance(cache, dict) or cache.get("key") != key:
        raise ValueError(f"latent cache {path} does not hold the latents it is named for; delete it "
                         f"and run again to re-encode")
    return cache


def resolve_vqvae(config, vqvae_encoder) -> Tuple[VQVAE, Optional[str]]:
    """(the VQ-VAE, its checkpoint path) from a VQVAE, its `.encoder`, or config.vqvae_checkpoint.

    An encoder alone cannot quantize or decode: its VQ-VAE is loaded from the file it came from
    (rebuild.load_vqvae records it) and must hold the same encoder weights.
    """
    recorded = getattr(vqvae_encoder, "checkpoint_path", None)
    if recorded is not None and config.vqvae_checkpoint is not None \
            and os.path.abspath(recorded) != os.path.abspath(config.vqvae_checkpoint):
        raise ValueError(f"--vqvae_checkpoint {config.vqvae_checkpoint} is not the VQ-VAE passed as "
                         f"vqvae_encoder (loaded from {recorded}); use one VQ-VAE")
    path = recorded or config.vqvae_checkpoint
    if isinstance(vqvae_encoder, VQVAE):
        # Generation decodes with the trained weights of the recorded file: an EMA or edited copy
        # would train on latents those weights do not decode.
        if path is not None and vqvae_encoder.fingerprint() != load_vqvae(path).fingerprint():
            raise ValueError(f"the VQVAE passed as vqvae_encoder does not hold the trained ('model') weights "
                             f"of {path}, the file it records; pass rebuild.load_vqvae({path!r})")
        return vqvae_encoder, path
    if vqvae_encoder is None:
        return load_vqvae(path), path
    if path is None:
        raise ValueError("vqvae_encoder is an encoder without its VQ-VAE (needed to quantize and decode); "
                         "pass the VQVAE, an encoder from rebuild.load_vqvae, or --vqvae_checkpoint")
    vqvae = load_vqvae(path)
    mine, theirs = vqvae.encoder.state_dict(), vqvae_encoder.state_dict()
    if mine.keys() != theirs.keys() or any(not torch.equal(mine[k], theirs[k].cpu()) for k in mine):
        raise ValueError(f"vqvae_encoder is not the encoder of {path} (its weights differ); pass the VQVAE itself")
    return vqvae, path


def latent_dataset(config, dataset: Dataset, vqvae_encoder=None, rank: int = 0) -> LatentDataset:
    """The latents of `dataset` (from the cache, encoding them on a miss), after checking the
    VQ-VAE against the config. The result's `latent_space`, `latent_shape` (C, h, w) and
    `vqvae_checkpoint` are what the training script records in its config."""
    vqvae, path = resolve_vqvae(config, vqvae_encoder)
    if vqvae.in_channels != config.in_channels:
        raise ValueError(f"the VQ-VAE encodes {vqvae.in_channels}-channel images, but --in_channels is "
                         f"{config.in_channels}; pass --in_channels {vqvae.in_channels}")
    if vqvae.image_size is not None and vqvae.image_size != config.image_size:
        raise ValueError(f"the VQ-VAE was trained on {vqvae.image_size}x{vqvae.image_size} images, but "
                         f"--image_size is {config.image_size}; pass --image_size {vqvae.image_size}")
    channels, size, _ = vqvae.latent_shape(config.image_size)
    for name, value in (("latent_size", size), ("latent_channels", channels)):
        if getattr(config, name) not in (None, value):
            raise ValueError(f"--{name} {getattr(config, name)} does not match the VQ-VAE's latents ({value}); "
                             f"drop --{name}")
    if size % config.patch_size:
        raise ValueError(f"the VQ-VAE's {size}x{size} latents are not divisible by --patch_size "
                         f"{config.patch_size}; pick a --patch_size that divides {size}")
    if rank == 0:
        print(f"latent flow matching: {channels}x{size}x{size} latents of VQ-VAE {path or '(in memory, not saved)'}")
    latents = load_latent_dataset(config, vqvae, dataset, config.batch_size, rank)
    latents.latent_shape, latents.vqvae_checkpoint = (channels, size, size), path
    return latents
