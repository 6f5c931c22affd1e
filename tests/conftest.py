"""Shared fixtures: tiny image folders and tiny configs that train in seconds on a CPU."""

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The tests' models are tiny: one thread is as fast as two, and it keeps the suite's time steady
# when other work shares the cores (a second thread then waits on every parallel region).
torch.set_num_threads(1)


def write_image_folder(root, classes=3, per_class=6, size=(12, 10), mode="RGB", seed=0):
    """An ImageFolder of random PNGs: root/<class_k>/<i>.png."""
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    for c in range(classes):
        folder = os.path.join(root, f"class_{c}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
            Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(os.path.join(folder, f"{i}.png"))
    return str(root)


@pytest.fixture
def image_folder(tmp_path):
    return write_image_folder(tmp_path / "images")


TINY_FLAGS = ["--preset", "tiny", "--dataset", "imagefolder", "--image_size", "8", "--hidden_size", "32",
              "--depth", "2", "--num_heads", "2", "--batch_size", "4", "--num_workers", "0",
              "--device", "cpu", "--warmup_steps", "2", "--log_every", "2", "--sample_every", "0",
              "--num_sampling_steps", "2", "--grid_samples_per_class", "2"]


@pytest.fixture
def tiny_flags(image_folder, tmp_path):
    """Flags of a seconds-long CPU run on a 3-class folder, writing under tmp_path."""
    return TINY_FLAGS + ["--data_dir", image_folder, "--checkpoint_dir", str(tmp_path / "ckpt"),
                         "--sample_dir", str(tmp_path / "samples")]
