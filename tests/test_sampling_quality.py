"""What a user sees: a tiny model overfit through train_flow_matching.py on three images, one per
class, then sampled through generate_flow_matching.py and evaluate_fid.py, must land on the image
of the label it was asked for, move toward it under CFG, and obey every sampling flag.

These tests catch bugs that leave shapes and losses plausible: EMA weights that never move, labels
or flags that never reach the sampler, a time convention reversed between training and sampling,
a model blind to t.
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate_fid
import flow_matching
import generate_flow_matching
import train_flow_matching
from evaluation import fid, sampling
from models.dit_2d import input_shape
from tests.conftest import StandIn
from rebuild import load_flow_model
from utils.checkpoint import load_checkpoint, save_checkpoint

NUM_STEPS = 10


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """(checkpoint, the three class images uint8 (3, 8, 8, 3)): 300 steps, ~4 s on one core."""
    root = tmp_path_factory.mktemp("overfit")
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    for c, image in enumerate(images):
        os.makedirs(root / "images" / f"class_{c}")
        for i in range(4):  # four copies: a batch of 12 holds each image four times
            Image.fromarray(image).save(root / "images" / f"class_{c}" / f"{i}.png")
    flags = ["--preset", "tiny", "--dataset", "imagefolder", "--data_dir", str(root / "images"),
             "--image_size", "8", "--hidden_size", "64", "--depth", "2", "--num_heads", "2",
             "--batch_size", "12", "--micro_batch_size", "6", "--num_workers", "0", "--device", "cpu",
             "--warmup_steps", "20", "--lr", "3e-3", "--train_steps", "300", "--hflip", "false",
             "--log_every", "100", "--sample_every", "0", "--save_every", "1000",
             "--checkpoint_dir", str(root / "ckpt"), "--data_cache_dir", str(root / "cache")]
    assert train_flow_matching.main(flags) == 0
    return str(root / "ckpt" / "flow_matching_final.pt"), images


def generate(checkpoint, out, *flags):
    assert generate_flow_matching.main(["--checkpoint", checkpoint, "--output_dir", str(out), "--device", "cpu",
                                        "--num_steps", str(NUM_STEPS), "--save_npz", *flags]) == 0
    data = np.load(os.path.join(out, "samples.npz"))
    return data["images"], data["labels"]


def distances(samples, images):
    """RMS distance (0..255 levels) of every sample to every class image: (N, 3)."""
    diff = samples[:, None].astype(np.float64) - images[None].astype(np.float64)
    return np.sqrt((diff ** 2).mean(axis=(2, 3, 4)))


def test_each_label_lands_on_its_own_image(overfit, tmp_path):
    """With --class_label k every sample is near image k (RMS ~20 of 255) and far from the others
    (~100); the EMA weights (the default) and the raw weights agree."""
    checkpoint, images = overfit
    for weights in ("ema", "model"):
        for k in range(3):
            samples, labels = generate(checkpoint, tmp_path / f"{weights}{k}", "--class_label", str(k),
                                       "--num_samples", "4", "--cfg_scale", "1", "--weights", weights)
            d = distances(samples, images)
            assert labels.tolist() == [k] * 4
            assert (d.argmin(1) == k).all(), (weights, k, d)
            assert d[:, k].max() < 45 and np.delete(d, k, axis=1).min() > 70, (weights, k, d)


def margins(samples, labels, images):
    """Distance to the nearest other class image minus distance to the own one, per sample."""
    d = distances(samples, images)
    own = d[np.arange(len(labels)), labels]
    return np.where(np.arange(3)[None] == labels[:, None], np.inf, d).min(1) - own


def test_cfg_moves_samples_toward_their_class(overfit, tmp_path):
    """From the same noise, CFG 4 moves every sample away from the classes' mean along its own
    class's direction (v_c - v_u points there), and keeps it farther from the other classes."""
    checkpoint, images = overfit
    plain = generate(checkpoint, tmp_path / "cfg1", "--class_grid", "--samples_per_class", "4", "--cfg_scale", "1")
    guided = generate(checkpoint, tmp_path / "cfg4", "--class_grid", "--samples_per_class", "4", "--cfg_scale", "4")
    assert np.array_equal(plain[1], guided[1])
    labels = plain[1]
    direction = (images.astype(np.float64) - images.mean(0))[labels].reshape(len(labels), -1)  # class - mean
    moved = (guided[0].astype(np.float64) - plain[0].astype(np.float64)).reshape(len(labels), -1)
    along = (moved * direction).sum(1) / (direction ** 2).sum(1)   # in units of |class - mean|
    assert (along > 0.02).all(), along
    m1, m4 = margins(*plain, images), margins(*guided, images)
    assert (m1 > 40).all() and m4.mean() > m1.mean(), (m1.mean(), m4.mean())


def direct(checkpoint, labels, weights="ema", **settings):
    """The samples flow_matching makes itself for the script's defaults (seed 0) and `settings`."""
    model, ckpt = load_flow_model(checkpoint, weights)
    config = ckpt["config"]
    autocast_dtype = settings.pop("autocast_dtype", None)
    images, _ = sampling.generate_images(
        model, torch.as_tensor(labels), flow_matching.SamplingSettings(num_steps=NUM_STEPS, **settings),
        shape=input_shape(config), num_classes=config["num_classes"], seed=0, batch_size=64,
        autocast_dtype=autocast_dtype)
    return images


@pytest.mark.parametrize("flags, settings", [
    (["--cfg_scale", "3"], dict(cfg_scale=3.0)),
    (["--cfg_scale", "3", "--guidance_interval", "0.5", "1"], dict(cfg_scale=3.0, guidance_interval=(0.5, 1.0))),
    (["--cfg_scale", "1", "--precision", "bf16"], dict(cfg_scale=1.0, autocast_dtype=torch.bfloat16)),
    (["--cfg_scale", "1", "--sampler", "heun"], dict(cfg_scale=1.0, sampler="heun")),
    (["--cfg_scale", "1", "--time_shift", "3"], dict(cfg_scale=1.0, time_shift=3.0)),
])
def test_generate_flags_reach_the_sampler(overfit, tmp_path, flags, settings):
    """The script's samples are flow_matching's for the flag's setting, and differ from the
    samples without it (so a flag the script ignored would fail one of the two)."""
    checkpoint, _ = overfit
    samples, labels = generate(checkpoint, tmp_path, "--class_grid", "--samples_per_class", "2", *flags)
    expected = direct(checkpoint, labels, **settings)
    assert np.abs(samples.astype(int) - expected.astype(int)).max() <= 1
    baseline = direct(checkpoint, labels, cfg_scale=1.0)   # bit-identical to an ignored flag's samples
    assert not np.array_equal(samples, baseline)


def evaluate(checkpoint, images, tmp_path, monkeypatch, *flags):
    """The rows of evaluate_fid.py on 12 samples of `checkpoint` (stand-in features) against three
    copies of each class image, and the FID of `settings`' samples (as direct() makes them)."""
    pytest.importorskip("torch_fidelity")
    monkeypatch.setattr(fid, "InceptionFeatures", StandIn)
    ref = tmp_path / "ref"
    for c, image in enumerate(images):
        os.makedirs(ref / f"class_{c}", exist_ok=True)
        for i in range(3):
            Image.fromarray(image).save(ref / f"class_{c}" / f"{i}.png")
    out = tmp_path / "fid.jsonl"
    if out.exists():
        out.unlink()
    assert evaluate_fid.main(["--checkpoint", checkpoint, "--num_samples", "12", "--num_steps_list", str(NUM_STEPS),
                              "--ref_data_dir", str(ref), "--fid_cache_dir", str(tmp_path / "cache"),
                              "--device", "cpu", "--num_workers", "0", "--output_jsonl", str(out), *flags]) == 0
    net = StandIn()
    ref_stats = fid.image_statistics(np.repeat(images, 3, axis=0), net)
    labels = fid.class_labels(12, 3).numpy()

    def fid_of(**settings):
        return fid.frechet_distance(fid.image_statistics(direct(checkpoint, labels, **settings), net), ref_stats)

    return [json.loads(line) for line in open(out)], fid_of


def test_evaluate_fid_scores_each_cfg_scale_of_the_sweep(overfit, tmp_path, monkeypatch):
    """evaluate_fid.py --cfg_scales 1 4: each row is the FID of that scale's samples."""
    checkpoint, images = overfit
    rows, fid_of = evaluate(checkpoint, images, tmp_path, monkeypatch, "--cfg_scales", "1", "4")
    assert [r["cfg_scale"] for r in rows] == [1.0, 4.0]
    for row, scale in zip(rows, (1.0, 4.0)):
        assert row["fid"] == pytest.approx(fid_of(cfg_scale=scale), rel=1e-6)
    assert rows[0]["fid"] != pytest.approx(rows[1]["fid"], rel=1e-3)


def with_config(checkpoint, path, **fields):
    """A copy of `checkpoint` with these config fields set; None removes one (an older checkpoint)."""
    ckpt = load_checkpoint(checkpoint)
    for name, value in fields.items():
        if value is None:
            del ckpt["config"][name]
        else:
            ckpt["config"][name] = value
    save_checkpoint(ckpt, str(path))
    return str(path)


SHIFTED = dict(time_shift=3.0, guidance_interval_start=0.5, guidance_interval_end=1.0)
OLDER = dict(time_shift=None, guidance_interval_start=None, guidance_interval_end=None)


@pytest.mark.parametrize("fields, flags, settings", [
    (SHIFTED, [], dict(time_shift=3.0, guidance_interval=(0.5, 1.0))),           # the checkpoint's settings
    (SHIFTED, ["--time_shift", "1", "--guidance_interval", "0", "1"], {}),       # the flags win
    (SHIFTED, ["--guidance_interval", "0", "0.5"], dict(time_shift=3.0, guidance_interval=(0.0, 0.5))),
    (OLDER, [], {}),                                                             # older: uniform, CFG on every step
])
def test_generate_defaults_to_the_checkpoints_time_shift_and_guidance_interval(overfit, tmp_path, fields, flags,
                                                                              settings):
    checkpoint = with_config(overfit[0], tmp_path / "ckpt.pt", **fields)
    samples, labels = generate(checkpoint, tmp_path / "out", "--class_grid", "--samples_per_class", "2", *flags)
    expected = direct(checkpoint, labels, cfg_scale=3.0, **settings)  # 3: the checkpoint's scale
    assert np.abs(samples.astype(int) - expected.astype(int)).max() <= 1


def test_evaluate_fid_sweeps_time_shifts_and_records_shift_and_interval(overfit, tmp_path, monkeypatch):
    """Without flags a row is sampled and recorded at the checkpoint's shift and interval;
    --time_shifts sweeps the shift."""
    checkpoint = with_config(overfit[0], tmp_path / "ckpt.pt", **SHIFTED)
    rows, fid_of = evaluate(checkpoint, overfit[1], tmp_path, monkeypatch)
    assert [(r["time_shift"], r["guidance_interval"], r["cfg_scale"]) for r in rows] == [(3.0, [0.5, 1.0], 3.0)]
    assert rows[0]["fid"] == pytest.approx(fid_of(cfg_scale=3.0, time_shift=3.0, guidance_interval=(0.5, 1.0)),
                                           rel=1e-6)
    rows, _ = evaluate(checkpoint, overfit[1], tmp_path, monkeypatch, "--time_shifts", "1", "0.5")
    assert [(r["time_shift"], r["guidance_interval"]) for r in rows] == [(1.0, [0.5, 1.0]), (0.5, [0.5, 1.0])]
    for row in rows:
        assert row["fid"] == pytest.approx(fid_of(cfg_scale=3.0, time_shift=row["time_shift"],
                                                  guidance_interval=(0.5, 1.0)), rel=1e-6)
    assert rows[0]["fid"] != pytest.approx(rows[1]["fid"], rel=1e-3)
