"""FID with the standard TensorFlow Inception (2015-12-05) pool3 features, and cached reference statistics.

The network (with its TensorFlow-compatible resize to 299x299), the statistics and the Fréchet
distance are torch-fidelity's (the TTUR formulae), so the numbers compare with published
CIFAR-10 FIDs. This module feeds it the repo's images: uint8 (N, H, W, C) arrays (fresh samples,
samples.npz) and image datasets (ImageFolder, CIFAR-10) loaded at the model's resolution exactly
as training loads them, and caches a reference set's statistics on disk under a name that records
everything they depend on.

A feature extractor is any module that maps uint8 images (N, 3, H, W) to features (N, D) and has a
`name` (part of the cache key); the tests plug in a tiny stand-in, so nothing is downloaded.
torch-fidelity (requirements-eval.txt) is imported only when FID is actually computed.

The weights also come in a compact form that fits a GPU job's 64 MiB of inputs: fp16 tensors
(but the small ones) without the final fc layer, which pool3 features never reach (45 MB instead
of 96 MB). Write one
with `python -m evaluation.fid --compact fid_inception.pth -o fid_inception_fp16.pth`
(`write_compact_weights`); `InceptionFeatures` reads either form and computes in fp32.
"""

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from data.datasets import build_image_dataset, listing_fingerprint
from utils.checkpoint import state_fingerprint, write_atomically
from utils.images import to_uint8

Statistics = Dict[str, np.ndarray]  # {"mu": (D,), "sigma": (D, D)}, float64

WEIGHTS_HINT = ("pass --inception_weights PATH, a local copy of the FID Inception weights "
                "(`bash evaluation/fid_weights.sh` builds one offline and prints its path; or torch-fidelity's "
                "weights-inception-2015-12-05-6726825d.pth, or a compact copy)")
FP32_HINT = "pass the fp32 weights file that `bash evaluation/fid_weights.sh` prints"


def _metric_fid():
    try:
        from torch_fidelity import metric_fid
    except ImportError:
        raise ImportError("FID needs torch-fidelity: pip install -r requirements-eval.txt") from None
    return metric_fid


# The key that marks a compact weights file (its value says what the file is, for a reader
# without this module); its large tensors are fp16 and fc.* is absent.
COMPACT_MARKER = "fid_compact_fp16"
COMPACT_NOTE = ("FID Inception (2015-12-05) weights, tensors of 65536+ elements in fp16, "
                "without fc; evaluation/fid.py InceptionFeatures reads them as fp32")
# Tensors smaller than this stay fp32 in the compact file: the BatchNorm vectors and the 21 small
# convolutions of the first layers (stem to Mixed_6a), 2.3% of the bytes. Rounding a BatchNorm
# shift to fp16 moves a whole channel at once, and an early layer's error passes through every
# later one: on CIFAR-10 images, keeping them fp32 cuts the pool3 features' error from 3.1e-3 to
# 8.3e-4 (relative, per image) for 1.0 MB.
FP32_BELOW_NUMEL = 2 ** 16
# torch-fidelity's final layer, 2048 pool3 features -> 1008 logits: the compact file drops it
# (FID stops at pool3), but torch-fidelity loads its state dict strictly, so it gets a stand-in.
FC_SHAPES = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}


def read_weights(path: str, flag: str = "--inception_weights",
                 hint: str = WEIGHTS_HINT) -> Dict[str, object]:
    """The state dict in an Inception weights file, loaded with weights_only (either form).

    FileNotFoundError / ValueError name the flag, the path and how to get a good file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path} is not a file; {hint}")
    try:
        # torch-fidelity unpickles the file in full; a weights_only load first refuses any
        # file that carries code rather than tensors.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{flag} {path} is not a state dict of tensors "
                         f"({type(err).__name__}); {hint}") from None
    if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for k, v in state.items() if k != COMPACT_MARKER):
        raise ValueError(f"{flag} {path} is not a state dict of tensors "
                         f"(a {type(state).__name__} of other values); {hint}")
    return state


def check_inception_weights(path: str, flag: str = "--inception_weights") -> None:
    """ValueError unless `path` holds the FID Inception's weights (either form), without building
    the network: for scripts that must refuse a wrong file before long work."""
    state = read_weights(path, flag)
    if not {"Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.conv.weight"} <= state.keys():
        raise ValueError(f"{flag} {path} is a state dict, but not of the FID Inception (no Conv2d_1a_3x3 "
                         f"or Mixed_7c layers); {WEIGHTS_HINT}")


def compact_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """fp32 Inception weights -> the compact form: float tensors of FP32_BELOW_NUMEL or more
    elements in fp16, no fc.*, the marker key.

    Smaller tensors and integer ones (BatchNorm's num_batches_tracked) are kept as they are.
    """
    compact = {k: v.half() if v.is_floating_point() and v.numel() >= FP32_BELOW_NUMEL else v
               for k, v in state.items() if k not in FC_SHAPES}
    compact[COMPACT_MARKER] = COMPACT_NOTE
    return compact


def expand_compact(compact: Dict[str, object]) -> Dict[str, torch.Tensor]:
    """The compact form -> a state dict torch-fidelity loads: floats in fp32 and a NaN fc.

    The fc is NaN rather than zeros so that anything reading logits from it gets NaN, not a
    plausible wrong number; pool3 features never touch it.
    """
    state = {k: v.float() if v.is_floating_point() else v
             for k, v in compact.items() if k != COMPACT_MARKER}
    state.update({k: torch.full(shape, float("nan")) for k, shape in FC_SHAPES.items()})
    return state


def write_compact_weights(src: str, dst: str) -> None:
    """Write the compact form of the fp32 weights file `src` to `dst`, atomically."""
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"-o {dst} is the input file; name another file for the compact copy")
    state = read_weights(src, "--compact", FP32_HINT)
    if COMPACT_MARKER in state:
        raise ValueError(f"--compact {src} is a compact file already; {FP32_HINT}")
    compact = compact_state_dict(state)
    write_atomically(dst, lambda f: torch.save(compact, f))


class InceptionFeatures(torch.nn.Module):
    """The 2048-d pool3 features of the TF FID Inception (torch-fidelity's 'inception-v3-compat').

    `weights_path` None lets torch-fidelity download the weights (or find them in the torch hub
    cache); offline, pass a local copy, fp32 or compact (`write_compact_weights`). A compact file
    is upcast to fp32 before torch-fidelity reads it, so the features are computed in fp32 either
    way.
    """

    name = "inception-2015-12-05-pool3"

    def __init__(self, weights_path: Optional[str] = None):
        super().__init__()
        _metric_fid()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        with contextlib.ExitStack() as cleanup:
            source = weights_path
            if weights_path is not None:
                state = read_weights(weights_path)
                # Cached reference statistics key on the weights themselves: another file that fits
                # the network (the compact form, a different checkpoint) gets statistics of its own.
                self.name = f"{InceptionFeatures.name}-{state_fingerprint(state)[:12]}"
                if COMPACT_MARKER in state:
                    # torch-fidelity builds its network and loads the weights from a path in one
                    # call, so the fp32 form goes through a file that lives as long as the call.
                    folder = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="fid_weights_"))
                    source = os.path.join(folder, "fid_inception_fp32.pth")
                    torch.save(expand_compact(state), source)
                del state  # torch-fidelity loads its own copy: do not hold two
            try:
                self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                       feature_extractor_weights_path=source)
            except RuntimeError as err:
                raise ValueError(f"--inception_weights {weights_path} does not fit the FID Inception "
                                 f"({str(err).splitlines()[0]}); {WEIGHTS_HINT}") from None
            except OSError as err:  # the download failed: offline, or no route to the weights' host
                raise ValueError(f"the FID Inception weights could not be downloaded ({err}); "
                                 f"{WEIGHTS_HINT}") from None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)[0]


@contextlib.contextmanager
def _full_fp32():
    """Features in true fp32 on CUDA, where the trainer turns TF32 matmuls and convolutions on."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def array_batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for first in range(0, len(images), batch_size):
        yield images[first:first + batch_size]


@torch.no_grad()
def extract_features(extractor: torch.nn.Module, batches: Iterable[np.ndarray], device="cpu",
                     total: Optional[int] = None, desc: str = "features",
                     progress: bool = False) -> np.ndarray:
    """Features (N, D) in float64 of uint8 image batches (B, H, W, C); C = 1 is repeated to RGB."""
    out = []
    with _full_fp32():
        for batch in tqdm(batches, total=total, desc=desc, disable=not progress):
            if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] not in (1, 3):
                raise ValueError(f"FID takes uint8 images (N, H, W, C) with C = 1 or 3, got "
                                 f"{batch.dtype} {tuple(batch.shape)}")
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2)
            out.append(extractor(x.expand(-1, 3, -1, -1)).double().cpu())
    return torch.cat(out).numpy()


def statistics(features: np.ndarray) -> Statistics:
    """Mean and covariance (float64) of features (N, D); N >= 2."""
    if features.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 images, got {features.shape[0]}")
    return _metric_fid().fid_features_to_statistics(torch.from_numpy(features.astype(np.float64)))


def frechet_distance(stats1: Statistics, stats2: Statistics) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), torch-fidelity's computation."""
    metric_fid = _metric_fid()
    both = [{k: np.asarray(s[k], np.float64) for k in ("mu", "sigma")} for s in (stats1, stats2)]
    return float(metric_fid.fid_statistics_to_metric(*both, verbose=False)[metric_fid.KEY_METRIC_FID])


def image_statistics(images: np.ndarray, extractor: torch.nn.Module, device="cpu",
                     batch_size: int = 200, progress: bool = False) -> Statistics:
    """Statistics of a uint8 (N, H, W, C) array, e.g. generated samples."""
    total = -(-len(images) // batch_size)
    return statistics(extract_features(extractor, array_batches(images, batch_size), device,
                                       total, "sample features", progress))


def class_labels(n: int, num_classes: int, counts: Optional[List[int]] = None) -> torch.Tensor:
    """The labels of n samples to score: each class in its share of the reference set, whose images
    per class are `counts` (`class_counts`), so that a model drawing the data's own mix is not
    scored against another mix (sampled 50/50 against a 90/10 reference, a perfect model's FID
    is far from zero). Shares are rounded by largest remainder and the classes interleaved. With equal
    counts (CIFAR-10's splits) or none, sample i has class i mod K; so too when the reference's
    classes are not the model's (another number of class folders: no mix to follow). -1s if K = 0."""
    if num_classes == 0:
        return torch.full((n,), -1, dtype=torch.long)
    if not uneven_mix(num_classes, counts):
        return torch.arange(n) % num_classes
    quota = n * torch.tensor(counts, dtype=torch.float64) / sum(counts)
    share = quota.floor().long()
    share[torch.argsort(share - quota, stable=True)[:n - int(share.sum())]] += 1   # largest remainders
    # Class c's j-th sample sits (j + 1/2) / share_c of the way down the list: every prefix keeps the mix.
    position = torch.cat([(torch.arange(k, dtype=torch.float64) + 0.5) / k for k in share.tolist()])
    return torch.repeat_interleave(torch.arange(num_classes), share)[torch.argsort(position, stable=True)]


def uneven_mix(num_classes: int, counts: Optional[List[int]]) -> bool:
    """Whether `class_labels` follows `counts`: the model's classes, not all equally frequent."""
    return bool(num_classes) and counts is not None and len(counts) == num_classes and len(set(counts)) > 1


@dataclass
class ImageSet:
    """Images of a dataset at the model's resolution: a reference set, or a folder to score."""
    dataset: str                # "cifar10" | "imagefolder"
    data_dir: str
    image_size: int
    in_channels: int = 3
    split: str = "train"        # CIFAR-10 only; an ImageFolder is its own split
    num_images: int = 0         # a fixed random subset of this many; 0 = all
    flag: str = "--data_dir"    # the flag that named data_dir, for error messages (not in cache keys)

    def describe(self, used: int) -> str:
        split = f" ({self.split})" if self.dataset == "cifar10" else ""
        return f"{used} images of {self.data_dir}{split} at {self.image_size}px"


def _load(image_set: ImageSet):
    dataset, _ = build_image_dataset(image_set.dataset, image_set.data_dir, image_set.image_size,
                                     image_set.in_channels, train=image_set.split == "train", flag=image_set.flag)
    n = image_set.num_images or len(dataset)
    if n > len(dataset):
        raise ValueError(f"{n} images were asked of {image_set.data_dir}, which holds only "
                         f"{len(dataset)}; ask for {len(dataset)} or fewer (0 = all)")
    return dataset, n


def label_mix(num_classes: int, counts: Optional[List[int]]) -> str:
    """How `class_labels` picks the labels for these counts, in words, for the log and the results."""
    if num_classes == 0:
        return "none (unconditional)"
    if uneven_mix(num_classes, counts):
        return f"the reference's class mix ({max(counts)} to {min(counts)} images a class)"
    if counts is not None and len(counts) != num_classes:
        return f"each class equally often (the reference has {len(counts)} classes, the model {num_classes})"
    return "each class equally often"


def class_counts(image_set: ImageSet) -> List[int]:
    """Images per class of the whole set, the mix `class_labels` follows (reads the file list and
    labels only). A num_images subset's statistics stand for the whole set, and so do its labels:
    the subset's own mix is the whole set's plus sampling noise (CIFAR-10's stays balanced)."""
    dataset, _ = _load(image_set)
    return torch.bincount(torch.as_tensor(dataset.targets), minlength=len(dataset.classes)).tolist()


def reference_labels(n: int, num_classes: int, image_set: ImageSet) -> Tuple[torch.Tensor, str]:
    """The labels of n samples scored against `image_set` (`class_labels` in its class mix) and
    how they were picked, in words (`label_mix`)."""
    counts = class_counts(image_set) if num_classes else None
    return class_labels(n, num_classes, counts), label_mix(num_classes, counts)


def image_set_statistics(image_set: ImageSet, extractor: torch.nn.Module, device="cpu",
                         batch_size: int = 200, num_workers: int = 0,
                         progress: bool = False) -> Tuple[Statistics, int]:
    """Statistics of an image set and the number of images they come from.

    A subset is drawn at random with a fixed seed, so it is the same every time and is spread
    over the whole set (an ImageFolder's files are sorted by class: its first files would be one).
    """
    dataset, n = _load(image_set)
    if n < len(dataset):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
        dataset = Subset(dataset, sorted(order[:n].tolist()))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    features = extract_features(extractor, (to_uint8(x) for x, _ in loader), device, len(loader),
                                f"features of {image_set.data_dir}", progress)
    return statistics(features), n


def reference_statistics(image_set: ImageSet, extractor: torch.nn.Module, cache_dir: str,
                         device="cpu", batch_size: int = 200, num_workers: int = 0,
                         progress: bool = False) -> Tuple[Statistics, int, str, bool]:
    """Statistics of a reference set, read from `cache_dir` when they were computed before.

    Returns (statistics, number of images, cache file, whether it was read from the cache). The
    file name holds a hash of the set's description, its files (so a folder changed in place is
    scored again) and the extractor's name.
    """
    dataset, n = _load(image_set)
    key = dict(asdict(image_set), data_dir=os.path.abspath(image_set.data_dir), num_images=n,
               files=listing_fingerprint(dataset, image_set.data_dir), features=extractor.name)
    key.pop("flag")
    if image_set.dataset != "cifar10":
        key.pop("split")
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = os.path.basename(os.path.normpath(image_set.data_dir)) or "data"
    path = os.path.join(cache_dir, f"fid_ref_{name}_{image_set.image_size}px_{n}_{digest}.npz")
    if os.path.isfile(path):
        with np.load(path) as cached:
            return {"mu": cached["mu"], "sigma": cached["sigma"]}, int(cached["num_images"]), path, True
    stats, n = image_set_statistics(image_set, extractor, device, batch_size, num_workers, progress)
    write_atomically(path, lambda f: np.savez(f, mu=stats["mu"], sigma=stats["sigma"], num_images=n,
                                              key=json.dumps(key)))
    return stats, n, path, False


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m evaluation.fid --compact SRC [-o DST]`: write the compact weights file."""
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.fid",
        description="Write the compact form of the FID Inception weights (fp16 but for the "
                    "small tensors, no fc layer; about 45 MB instead of 96 MB), which "
                    "--inception_weights accepts as it accepts the fp32 file.")
    parser.add_argument("--compact", required=True, metavar="SRC",
                        help="the fp32 weights file, e.g. the one `bash evaluation/fid_weights.sh` "
                             "prints")
    parser.add_argument("-o", "--output", metavar="DST",
                        help="where to write the compact copy (default: SRC with _fp16 before its "
                             "extension, beside SRC); written atomically")
    args = parser.parse_args(argv)
    root, ext = os.path.splitext(args.compact)
    dst = args.output or f"{root}_fp16{ext or '.pth'}"
    try:
        write_compact_weights(args.compact, dst)
    except (FileNotFoundError, ValueError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {dst} ({os.path.getsize(dst) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
