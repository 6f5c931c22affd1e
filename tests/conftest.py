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

import flow_matching as fm  # noqa: E402
from models.dit_2d import DiT2D  # noqa: E402

# The tests' models are tiny: one thread is as fast as two, and it keeps the suite's time steady
# when other work shares the cores (a second thread then waits on every parallel region).
torch.set_num_threads(1)


class StandIn(torch.nn.Module):
    """For FID tests: a fixed random conv net in Inception's place: uint8 (N, 3, H, W) -> 8 features."""

    name = "stand-in"
    calls = 0

    def __init__(self, weights_path=None):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen))
            self.conv.bias.zero_()

    def forward(self, x):
        StandIn.calls += len(x)
        return torch.tanh(self.conv(x.float() / 127.5 - 1)).mean((2, 3))


def overfit_eight_images(optimizer_for, steps: int, repeat: int = 1):
    """(start, end) flow-matching loss of a tiny DiT trained for `steps` on eight images with eight
    distinct labels, whose conditional velocity is exactly learnable. Each step sees the eight
    images `repeat` times (more noise draws per step); the loss is the mean of 8 fixed draws."""
    torch.manual_seed(0)
    data = torch.rand(8, 1, 8, 8) * 2 - 1
    y = torch.arange(8)
    model = DiT2D(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4,
                  num_classes=8)
    opt = optimizer_for(model)

    def eval_loss():
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            return sum(fm.flow_matching_loss(model, data, y, num_classes=8, class_dropout_prob=0.0,
                                             generator=gen).item() for _ in range(8)) / 8

    start = eval_loss()
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        opt.zero_grad()
        fm.flow_matching_loss(model, data.repeat(repeat, 1, 1, 1), y.repeat(repeat), num_classes=8,
                              class_dropout_prob=0.0, generator=gen).backward()
        opt.step()
    return start, eval_loss()


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
              "--num_sampling_steps", "2", "--grid_samples_per_class", "2",
              "--data_loader", "workers"]  # no decoded-dataset cache: nothing written outside tmp


@pytest.fixture
def tiny_flags(image_folder, tmp_path):
    """Flags of a seconds-long CPU run on a 3-class folder, writing under tmp_path."""
    return TINY_FLAGS + ["--data_dir", image_folder, "--checkpoint_dir", str(tmp_path / "ckpt"),
                         "--sample_dir", str(tmp_path / "samples")]


@pytest.fixture(scope="session", autouse=True)
def _session_in_tmp(tmp_path_factory):
    """The module-scoped fixtures (trained checkpoints shared by a file's tests) are set up before
    any test's own folder: they run in a folder of the session's, never in the repo; a test that
    undoes its monkeypatches comes back here too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("cwd"))
        yield


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    """Every test runs in its own folder, so defaults relative to the working directory
    (checkpoints/, data_cache/, fid_results.jsonl) never touch the repo."""
    monkeypatch.chdir(tmp_path)
