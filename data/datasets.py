"""Image datasets and the resumable, distributed-ready loader every training loader builds on.

Sources: torchvision's CIFAR10 (downloaded into data_dir when missing) or an ImageFolder (a class
per subfolder), read at the model's size as float (C, H, W) in [-1, 1] (or uint8 for the decode-once
loader). `ResumableSampler` shuffles per epoch from (seed, epoch), cuts the epoch to whole global
batches, deals it round-robin to ranks, decides horizontal flips from the same seed, and can start
mid-epoch, so a resumed run sees exactly the batches the uninterrupted run would have seen, and
every optimizer step sees the same images whatever the rank and micro-batch split. Any Dataset that
returns (image tensor in [-1, 1] shaped (C, H, W), int label) plugs in through `make_loader`.
"""

import atexit
import hashlib
import multiprocessing
import os
import signal
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import datasets, transforms

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# What an image file decodes to (load_image): part of listing_fingerprint, so the caches of decoded
# images, latents and FID statistics are made again when it changes. 2: 16-bit images scaled.
IMAGE_DECODER = 2


def load_image(path: str) -> Image.Image:
    """ImageFolder's loader, but 16-bit images (PIL modes I;16*, and I, which older Pillows give a
    16-bit PNG) are scaled to 8 bits first: PIL's convert("RGB") clips them, which turns a 16-bit
    photo almost white. 32-bit integer and floating-point images have no such scale: refused."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()
    except OSError as err:   # PIL's messages ("Truncated File Read") need not name the file
        if err.errno is not None:   # the system's (too many open files, a network share): the file may be fine
            raise
        raise OSError(f"{path} cannot be read as an image ({err}): replace or delete it") from None
    if image.mode.startswith("I") or image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode == "F" or pixels.min() < 0 or pixels.max() > 65535:
            raise ValueError(f"{path} is a {'floating-point' if image.mode == 'F' else '32-bit integer'} image "
                             f"(values {pixels.min():g} to {pixels.max():g}), which has no 8-bit scale to read it "
                             f"at: convert it to an 8- or 16-bit image")
        image = Image.fromarray((pixels / 257).round().clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


def to_rgb(image):
    """PIL image -> RGB. A module-level function, not a lambda: DataLoader workers started with
    spawn or forkserver (macOS, and Linux from Python 3.14) must pickle the transform."""
    return image.convert("RGB")


def image_transform(image_size: int, in_channels: int, as_uint8: bool = False) -> transforms.Compose:
    """PIL image -> float tensor (C, H, W) in [-1, 1], resized and center-cropped.

    With as_uint8, stop before the float conversion: uint8 (C, H, W), which `uint8_to_model`
    turns into exactly the float tensor the full transform gives.
    """
    if in_channels not in (1, 3):
        raise ValueError(f"image datasets have 1 (grayscale) or 3 (RGB) channels, got in_channels={in_channels}")
    steps = [transforms.Grayscale(1)] if in_channels == 1 else [transforms.Lambda(to_rgb)]
    steps += [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    if as_uint8:
        return transforms.Compose(steps + [transforms.PILToTensor()])
    steps += [transforms.ToTensor(), transforms.Normalize([0.5] * in_channels, [0.5] * in_channels)]
    return transforms.Compose(steps)


def uint8_to_model(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (..., C, H, W) -> float in [-1, 1], the same operations (so the same bits) as
    ToTensor + Normalize(0.5, 0.5)."""
    return x.float().div(255).sub(0.5).div(0.5)


def _cifar10(data_dir: str, train: bool, transform) -> Dataset:
    present = os.path.isdir(os.path.join(data_dir, "cifar-10-batches-py"))
    try:
        return datasets.CIFAR10(data_dir, train=train, transform=transform, download=not present)
    except Exception as err:  # torchvision raises URLError, OSError or RuntimeError offline
        raise FileNotFoundError(
            f"CIFAR-10 is not in {os.path.abspath(data_dir)} and could not be downloaded ({err}). "
            f"Put the extracted 'cifar-10-batches-py' folder there, or train on images on disk with "
            f"--dataset imagefolder --data_dir PATH (a subfolder per class)") from None


# Subfolders that name a dataset's splits, not its classes.
SPLIT_NAMES = {"train", "test", "val", "valid", "validation"}


def _image_folder(data_dir: str, transform, flag: str = "--data_dir") -> Dataset:
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{flag} {data_dir} is not a folder; an ImageFolder needs "
                                f"one subfolder of images per class")
    try:
        folder = datasets.ImageFolder(data_dir, transform=transform, loader=load_image)
    except (FileNotFoundError, OSError) as err:
        raise FileNotFoundError(f"{flag} {data_dir} is not a readable ImageFolder ({err}); it "
                                f"needs one subfolder per class holding {'/'.join(IMAGE_EXTENSIONS)} files") from None
    # One level too high: splits read as classes ("test" and "train"; or "train" alone, its class
    # folders flattened into one class). A split folder that holds its images directly is a
    # one-class set (an unconditional dataset, or images to score).
    def nested() -> bool:   # only asked of a folder of split names: a big dataset's listing is not walked
        return any(os.path.dirname(path) != os.path.join(folder.root, folder.classes[label])
                   for path, label in folder.samples)
    if set(folder.classes) <= SPLIT_NAMES and (len(folder.classes) > 1 or nested()):
        raise ValueError(f"{flag} {data_dir} holds the split{'s' * (len(folder.classes) > 1)} "
                         f"{', '.join(folder.classes)}, not classes: pass one split's folder, e.g. "
                         f"{os.path.join(data_dir, folder.classes[-1])} (a class folder may not be named "
                         f"{', '.join(sorted(SPLIT_NAMES))})")
    return folder


def first_image_size(dataset: Dataset) -> Optional[Tuple[int, int]]:
    """(width, height) of an ImageFolder's first file (its header only), None for other datasets:
    what a run reports when --image_size resizes its images."""
    samples = getattr(dataset, "samples", None)
    if not samples:
        return None
    with Image.open(samples[0][0]) as image:
        return image.size


def listing_fingerprint(dataset: Dataset, root: str) -> str:
    """SHA-256 of an ImageFolder's files (relative path, label, size, mtime) and IMAGE_DECODER, which
    caches of the folder are keyed on: a file added, removed, relabelled or rewritten, or decoded
    differently, makes a new cache. Datasets without a file list (CIFAR-10's fixed pickles) hash
    their length only."""
    files = hashlib.sha256(f"{len(dataset)}\n".encode())
    if hasattr(dataset, "samples"):
        files.update(f"decoder {IMAGE_DECODER}\n".encode())
    for path, label in getattr(dataset, "samples", []):
        stat = os.stat(path)
        files.update(f"{os.path.relpath(path, root)}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return files.hexdigest()


def build_image_dataset(dataset: str, data_dir: str, image_size: int, in_channels: int,
                        train: bool = True, as_uint8: bool = False, flag: str = "--data_dir") -> Tuple[Dataset, int]:
    """The dataset and its number of classes (items as uint8 tensors with as_uint8); errors about
    the folder name `flag`."""
    transform = image_transform(image_size, in_channels, as_uint8)
    if dataset == "cifar10":
        return _cifar10(data_dir, train, transform), 10
    if dataset == "imagefolder":
        folder = _image_folder(data_dir, transform, flag)
        return folder, len(folder.classes)
    raise ValueError(f"unknown dataset {dataset!r}; choose cifar10 or imagefolder")


class FlipByIndex(Dataset):
    """Wraps a dataset; an index (i, flip) returns item i, mirrored left-right when flip is set.

    A subclass that mirrors items its own way (cached latents, whose mirror images were encoded
    separately) overrides __getitem__, and make_loader uses it as it is.
    """

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        index, flip = key
        x, y = self.base[index]
        return (x.flip(-1) if flip else x), y


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose epoch order, flips and start position are all reproducible.

    Epoch e's permutation and flip bits come from a generator seeded with (seed, e). An epoch is
    the permutation's first whole multiple of `global_batch` (the images of one optimizer step on
    all ranks; the rest wait for a later epoch's order), dealt round-robin: each rank takes every
    world_size-th index. Step j of an epoch is then the permutation's entries [j B, (j + 1) B)
    however the batch is split into ranks and micro-batches (padding a rank's tail, as
    DistributedSampler does, or dropping a micro-batch's would make that depend on the split).
    The first `start` entries of this rank's share are skipped once, to resume mid-epoch.
    """

    def __init__(self, dataset: Dataset, global_batch: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, hflip: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        if len(dataset) < global_batch:
            raise ValueError(f"the dataset has {len(dataset)} items, fewer than one batch of {global_batch} "
                             f"(--batch_size, over all ranks); lower --batch_size")
        assert global_batch % num_replicas == 0, (global_batch, num_replicas)
        self.total_size = len(dataset) // global_batch * global_batch
        self.num_samples = self.total_size // num_replicas
        self.hflip = hflip
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.set_epoch(epoch)
        self.start = start

    def epoch_order(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """This rank's remaining (indices, flip bits) of the epoch, as int64 and bool tensors.

        Consumes the start position, as iterating does.
        """
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = len(self.dataset)
        order = torch.randperm(n, generator=gen)
        flips = torch.rand(n, generator=gen) < 0.5 if self.hflip else torch.zeros(n, dtype=torch.bool)
        mine = order[self.rank:self.total_size:self.num_replicas][self.start:]
        self.start = 0
        return mine, flips[mine]

    def __iter__(self) -> Iterator[Tuple[int, bool]]:
        indices, flips = self.epoch_order()
        return iter(zip(indices.tolist(), flips.tolist()))

    def __len__(self) -> int:
        return self.num_samples - self.start


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM and SIGINT. SLURM, `kill -- -PGID` and Ctrl-C signal the
    whole process group; a worker killed by it would crash the main process mid-step, before the
    trainer's handler saves a checkpoint. The main process stops them when it exits."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def kill_workers_at_exit() -> None:
    """At interpreter exit, SIGKILL the daemonic worker processes still running. Python's own exit
    handler stops them with SIGTERM, which ignore_stop_signals' workers ignore, and then joins them:
    after an uncaught exception (a bug, CUDA out of memory), whose traceback keeps the loader's
    iterator and so its workers alive, that join waited forever and the job hung instead of exiting.
    atexit runs the last registered first, so this runs before that handler. SIGCHLD goes back to
    its default first: torch's handler would report each killed worker as an error."""
    if hasattr(signal, "SIGCHLD"):   # not on Windows
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def make_loader(dataset: Dataset, batch_size: int, *, global_batch: int, seed: int, hflip: bool,
                num_workers: int, rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """The training loader over any (image, label) dataset: this rank's micro-batches of `batch_size`
    (ResumableSampler: epochs of whole `global_batch`es)."""
    sampler = ResumableSampler(dataset, global_batch, num_replicas=world_size, rank=rank, seed=seed, hflip=hflip)
    if num_workers > 0:
        atexit.unregister(kill_workers_at_exit)   # registered once, after multiprocessing's handler
        atexit.register(kill_workers_at_exit)
    keyed = dataset if isinstance(dataset, FlipByIndex) else FlipByIndex(dataset)
    return DataLoader(keyed, batch_size=batch_size, sampler=sampler,
                      num_workers=num_workers, pin_memory=pin_memory, drop_last=True,
                      persistent_workers=num_workers > 0, worker_init_fn=ignore_stop_signals,
                      # Its own generator: building iterators never touches the global RNG.
                      generator=torch.Generator().manual_seed(seed))
