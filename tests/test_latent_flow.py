"""Flow matching on VQ-VAE latents: the seed's snippet, the on-disk latent cache (reuse and
invalidation), mirrored latents, per-channel normalization, and a tiny latent run that trains and
generates images at pixel size."""

import glob
import os
import shutil

import pytest
import torch
from PIL import Image

import generate_flow_matching
import train_flow_matching
import train_vqvae
from configs.cli import make_config
from configs.flow_matching_config import PRESETS, FlowMatchingConfig
from data.datasets import build_image_dataset
from data.flow_matching_dataset import get_flow_matching_dataloader
from data.latent_cache import load_latent_dataset
from rebuild import load_latent_space, load_vqvae
from utils.checkpoint import find_latest, load_checkpoint, save_checkpoint

from tests.conftest import TINY_FLAGS, StandIn, write_image_folder
from tests.test_vqvae import VQ_FLAGS


@pytest.fixture(scope="module")
def vqvae_run(tmp_path_factory):
    """A tiny VQ-VAE (8x8 images -> 3x4x4 latents, 16 codes) trained for a few steps."""
    root = tmp_path_factory.mktemp("vqvae")
    images = write_image_folder(root / "images")
    flags = VQ_FLAGS + ["--data_dir", images, "--train_steps", "4", "--save_every", "2", "--eval_images", "0",
                        "--checkpoint_dir", str(root / "ckpt")]
    assert train_vqvae.main(flags) == 0
    return str(root / "ckpt" / "vqvae.pt"), images


def flow_config(data_dir, cache_dir, **overrides):
    values = dict(PRESETS["tiny"], dataset="imagefolder", data_dir=data_dir, image_size=8, batch_size=4,
                  num_workers=0, device="cpu", data_cache_dir=str(cache_dir))
    values.update(overrides)
    return make_config(FlowMatchingConfig, values)


def cache_files(cache_dir):
    return sorted(glob.glob(os.path.join(cache_dir, "vq_latents_*.pt")))


class CountingEncoder:
    """Counts the images a VQ-VAE encodes, by wrapping its `codes`."""

    def __init__(self, vqvae):
        self.images, inner = 0, vqvae.codes

        def codes(x):
            self.images += x.shape[0]
            return inner(x)

        vqvae.codes = codes


def test_seed_snippet_encodes_once_then_reuses_the_cache(vqvae_run, tmp_path):
    path, images = vqvae_run
    config = flow_config(images, tmp_path / "cache")
    encoder = load_vqvae(path)
    counter = CountingEncoder(encoder)
    loader, info = get_flow_matching_dataloader(config, vqvae_encoder=encoder)
    assert counter.images == 2 * 18                     # every image and its mirror, once
    assert info.input_shape == (3, 4, 4) and info.vqvae_checkpoint == path and info.num_classes == 3
    assert info.config_fields(config) == {"num_classes": 3, "latent_size": 4, "latent_channels": 3,
                                          "vqvae_checkpoint": path}
    assert config == flow_config(images, tmp_path / "cache")  # the config is only read
    x, y = next(iter(loader))
    assert x.shape == (config.batch_size, 3, 4, 4) and y.dtype == torch.int64
    assert len(cache_files(tmp_path / "cache")) == 1

    again = flow_config(images, tmp_path / "cache")
    get_flow_matching_dataloader(again, vqvae_encoder=encoder)
    assert counter.images == 2 * 18 and len(cache_files(tmp_path / "cache")) == 1


def test_an_unwritable_cache_folder_is_refused_before_encoding(vqvae_run, tmp_path):
    path, images = vqvae_run
    (tmp_path / "a_file").write_text("not a folder")
    encoder = load_vqvae(path)
    counter = CountingEncoder(encoder)
    with pytest.raises(ValueError, match="--data_cache_dir .*a_file/cache cannot be written"):
        get_flow_matching_dataloader(flow_config(images, tmp_path / "a_file" / "cache"), vqvae_encoder=encoder)
    assert counter.images == 0


def test_a_rank_that_does_not_see_rank_zeros_cache_encodes_its_own(vqvae_run, tmp_path, capsys):
    """Nodes without a shared --data_cache_dir: rank 1's folder is empty after rank 0 wrote its
    file (it used to stop with 'cannot be read; delete it and run again', and again at every run)."""
    path, images = vqvae_run
    dataset, _ = build_image_dataset("imagefolder", images, 8, 3)
    encoder = load_vqvae(path)
    counter = CountingEncoder(encoder)
    rank0 = load_latent_dataset(flow_config(images, tmp_path / "node0"), encoder, dataset, 4, rank=0)
    rank1 = load_latent_dataset(flow_config(images, tmp_path / "node1"), encoder, dataset, 4, rank=1)
    assert counter.images == 2 * 2 * 18 and "latent cache miss on rank 1" in capsys.readouterr().out
    assert torch.equal(rank0.codes, rank1.codes) and len(cache_files(tmp_path / "node1")) == 1
    load_latent_dataset(flow_config(images, tmp_path / "node1"), encoder, dataset, 4, rank=1)
    assert counter.images == 2 * 2 * 18                 # and reads it afterwards


def test_the_briefs_snippet_with_the_encoder_alone(vqvae_run, tmp_path):
    """vqvae = load_vqvae(path); get_flow_matching_dataloader(vqvae_encoder=vqvae.encoder):
    the encoder remembers its checkpoint, whose VQ-VAE quantizes and decodes; the batches are
    those of the whole VQ-VAE. An encoder of other weights is refused."""
    path, images = vqvae_run
    vqvae = load_vqvae(path)
    loader, info = get_flow_matching_dataloader(flow_config(images, tmp_path / "a"), vqvae_encoder=vqvae.encoder)
    whole, _ = get_flow_matching_dataloader(flow_config(images, tmp_path / "b"), vqvae_encoder=vqvae)
    assert info.vqvae_checkpoint == path and info.input_shape == (3, 4, 4)
    for (x, y), (x2, y2) in zip(loader, whole):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    with torch.no_grad():
        next(vqvae.encoder.parameters()).add_(1)
    with pytest.raises(ValueError, match="is not the encoder of"):
        get_flow_matching_dataloader(flow_config(images, tmp_path / "c"), vqvae_encoder=vqvae.encoder)


def test_cache_is_keyed_by_vqvae_weights_and_data(vqvae_run, tmp_path):
    path, images = vqvae_run
    cache = tmp_path / "cache"
    encoder = load_vqvae(path)
    get_flow_matching_dataloader(flow_config(images, cache), vqvae_encoder=encoder)
    ckpt = load_checkpoint(path)                     # any other weights: another VQ-VAE
    ckpt["model"]["decoder.net.0.bias"] = ckpt["model"]["decoder.net.0.bias"] + 0.01
    save_checkpoint(ckpt, str(tmp_path / "other.pt"))
    encoder = load_vqvae(str(tmp_path / "other.pt"))
    get_flow_matching_dataloader(flow_config(images, cache), vqvae_encoder=encoder)
    assert len(cache_files(cache)) == 2
    edited = load_vqvae(path)                        # a copy edited in memory: not the file it records
    with torch.no_grad():
        edited.decoder.net[0].bias.add_(0.01)
    with pytest.raises(ValueError, match="does not hold the trained .'model'. weights of"):
        get_flow_matching_dataloader(flow_config(images, cache), vqvae_encoder=edited)
    with pytest.raises(ValueError, match="does not hold the trained .'model'. weights of"):
        get_flow_matching_dataloader(flow_config(images, cache), vqvae_encoder=load_vqvae(path, weights="ema"))

    copy = str(tmp_path / "copy")
    shutil.copytree(images, copy)
    get_flow_matching_dataloader(flow_config(copy, cache), vqvae_encoder=encoder)
    assert len(cache_files(cache)) == 3
    first = sorted(glob.glob(os.path.join(copy, "class_0", "*.png")))[0]
    Image.open(first).transpose(Image.FLIP_TOP_BOTTOM).save(first)   # an edited image
    os.utime(first, ns=(0, 1))
    counter = CountingEncoder(encoder)
    get_flow_matching_dataloader(flow_config(copy, cache), vqvae_encoder=encoder)
    assert len(cache_files(cache)) == 4 and counter.images == 2 * 18
    get_flow_matching_dataloader(flow_config(copy, cache, hflip=False), vqvae_encoder=encoder)
    assert len(cache_files(cache)) == 5 and counter.images == 3 * 18


def test_mirrored_items_are_latents_of_mirrored_images_and_normalized(vqvae_run, tmp_path):
    path, images = vqvae_run
    config = flow_config(images, tmp_path / "cache")
    encoder = load_vqvae(path)
    dataset = get_flow_matching_dataloader(config, vqvae_encoder=encoder)[0].dataset
    pixels, _ = build_image_dataset("imagefolder", images, 8, 3)
    space = dataset.latent_space
    for i in (0, 7):
        x, y = pixels[i]
        assert dataset[(i, False)][1] == y
        torch.testing.assert_close(dataset[(i, False)][0], space.normalize(encoder.encode(x[None]))[0])
        torch.testing.assert_close(dataset[(i, True)][0], space.normalize(encoder.encode(x.flip(-1)[None]))[0])
    every = torch.stack([dataset[(i, f)][0] for i in range(len(dataset)) for f in (False, True)])
    per_channel = every.transpose(0, 1).flatten(1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.std(1, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)


def test_decoding_a_normalized_latent_is_the_vqvae_reconstruction(vqvae_run, tmp_path):
    """LatentSpace.decode un-normalizes before decoding: decode(normalize(encode(x))) is the
    VQ-VAE's own reconstruction of x (the statistics are far from mean 0 / std 1, so a decode
    that skipped them would not be)."""
    path, images = vqvae_run
    config = flow_config(images, tmp_path / "cache")
    encoder = load_vqvae(path)
    space = get_flow_matching_dataloader(config, vqvae_encoder=encoder)[1].latent_space
    pixels, _ = build_image_dataset("imagefolder", images, 8, 3)
    x = torch.stack([pixels[i][0] for i in range(4)])
    z = encoder.encode(x)
    with torch.no_grad():
        expected = encoder.decode(z)
    torch.testing.assert_close(space.decode(space.normalize(z)), expected, atol=1e-5, rtol=1e-5)
    assert (space.mean.abs().max() > 0.05) or ((space.std - 1).abs().max() > 0.05)


def test_tiny_latent_run_trains_and_generates_pixel_images(vqvae_run, tmp_path, capsys):
    path, images = vqvae_run
    folder = os.path.dirname(path)  # shared with the VQ-VAE run, as checkpoints/ is in the seed's layout
    flags = TINY_FLAGS + ["--data_dir", images, "--checkpoint_dir", folder,
                          "--sample_dir", str(tmp_path / "samples"), "--vqvae_checkpoint", path,
                          "--data_cache_dir", str(tmp_path / "cache"), "--train_steps", "4",
                          "--save_every", "2", "--sample_every", "4"]
    assert train_flow_matching.main(flags) == 0
    final = os.path.join(folder, "flow_matching_final.pt")
    assert os.path.isfile(os.path.join(folder, "checkpoint_0000002.pt"))
    # Resumed without the VQ-VAE flag: named as such, not as latent fields the user never passed.
    pixel = [f for f in flags if f not in ("--vqvae_checkpoint", path)]
    assert train_flow_matching.main(pixel + ["--train_steps", "6", "--resume", final]) == 2
    assert f"was trained on the latents of VQ-VAE {path}: resume it with --vqvae_checkpoint {path}" \
        in capsys.readouterr().err
    assert load_checkpoint(os.path.join(folder, "vqvae_checkpoint_0000002.pt"), kind="vqvae")["step"] == 2
    assert find_latest(folder, "flow_matching") == final and find_latest(folder, "vqvae") == path
    ckpt = load_checkpoint(final, kind="flow_matching")
    assert (ckpt["config"]["latent_size"], ckpt["config"]["latent_channels"]) == (4, 3)
    assert ckpt["latent"]["mean"].shape == ckpt["latent"]["std"].shape == (3,)
    assert ckpt["latent"]["vqvae_fingerprint"] == load_vqvae(path).fingerprint()
    space = load_latent_space(ckpt, None, torch.device("cpu"))   # as generation and evaluate_fid rebuild it
    assert torch.equal(space.mean.flatten(), ckpt["latent"]["mean"].float())
    assert torch.equal(space.std.flatten(), ckpt["latent"]["std"].float())
    # Other training images give other latent statistics: a resume on them would shift the space
    # the model learned, so it is refused; on the same images it goes on.
    other_images = write_image_folder(tmp_path / "other_images", seed=1)
    moved = [other_images if f == images else f for f in flags]
    assert train_flow_matching.main(moved + ["--train_steps", "6", "--resume", final]) == 2
    assert "normalized its latents with a per-channel mean of" in capsys.readouterr().err
    assert train_flow_matching.main(flags + ["--train_steps", "5", "--resume", final]) == 0
    assert load_checkpoint(final, kind="flow_matching")["step"] == 5
    # 3 classes x 2 samples of 8x8 pixels (2-pixel padding), decoded from 4x4 latents.
    assert Image.open(tmp_path / "samples" / "step_0000004.png").size == (22, 32)

    out = tmp_path / "generated"
    argv = ["--checkpoint", final, "--class_grid", "--samples_per_class", "2", "--output_dir", str(out),
            "--device", "cpu"]
    assert generate_flow_matching.main(argv) == 0
    assert Image.open(out / "grid.png").size == (22, 32)
    assert Image.open(out / "images" / "000000_class0.png").size == (8, 8)

    # The VQ-VAE file replaced by other weights: refused; the original passed explicitly: accepted.
    original = str(tmp_path / "original_vqvae.pt")
    shutil.copy(path, original)
    other = load_checkpoint(path)
    other["model"]["decoder.net.0.bias"] += 0.01
    save_checkpoint(other, path)
    try:
        assert generate_flow_matching.main(argv) == 2
        assert "is not the one this flow model was trained with" in capsys.readouterr().err
        assert generate_flow_matching.main(argv + ["--vqvae_checkpoint", original]) == 0
        assert train_flow_matching.main(flags + ["--train_steps", "6", "--resume", final]) == 2
        assert "trained on the latents of another VQ-VAE" in capsys.readouterr().err
        started = flags + ["--checkpoint_dir", str(tmp_path / "mf"), "--objective", "meanflow", "--init_from", final]
        assert train_flow_matching.main(started) == 2
        assert f"--init_from {final} was trained on the latents of another VQ-VAE" in capsys.readouterr().err
        os.remove(path)   # moved away: the message names the VQ-VAE and the flag
        assert generate_flow_matching.main(argv) == 2
        assert f"the VQ-VAE this latent flow model was trained with, {path}, does not exist (moved?); pass its " \
               f"current path with --vqvae_checkpoint PATH" in capsys.readouterr().err
        typo = str(tmp_path / "orignal_vqvae.pt")   # the user's own path wrong: named as theirs
        assert generate_flow_matching.main(argv + ["--vqvae_checkpoint", typo]) == 2
        assert f"--vqvae_checkpoint {typo} does not exist; pass the path of the VQ-VAE this latent flow model " \
               f"was trained with (it recorded {path})" in capsys.readouterr().err
        # --init_from a latent run without its VQ-VAE: "start from it", nothing is resumed
        pixel_start = [f for f in started if f not in ("--vqvae_checkpoint", path)]
        assert train_flow_matching.main(pixel_start) == 2
        assert f"was trained on the latents of VQ-VAE {path}: start from it with --vqvae_checkpoint {path}" \
            in capsys.readouterr().err
    finally:
        shutil.copy(original, path)


def test_bad_latent_flags(vqvae_run, tmp_path, capsys):
    path, images = vqvae_run
    base = TINY_FLAGS + ["--data_dir", images, "--checkpoint_dir", str(tmp_path / "ckpt"),
                         "--data_cache_dir", str(tmp_path / "cache")]
    with pytest.raises(SystemExit) as exit_info:
        train_flow_matching.main(base + ["--vqvae_checkpoint", str(tmp_path / "missing.pt")])
    assert exit_info.value.code == 2 and "train_vqvae.py" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_flow_matching.main(base + ["--latent_size", "4"])
    assert "filled from --vqvae_checkpoint" in capsys.readouterr().err
    assert train_flow_matching.main(base + ["--vqvae_checkpoint", path, "--patch_size", "3"]) == 2
    assert "latents are not divisible by --patch_size 3" in capsys.readouterr().err
    assert train_flow_matching.main(base + ["--vqvae_checkpoint", path, "--image_size", "16"]) == 2
    assert "pass --image_size 8" in capsys.readouterr().err


def test_fid_of_a_latent_checkpoint_whose_vqvae_moved(vqvae_run, tmp_path, capsys, monkeypatch):
    """evaluate_fid.py decodes through the VQ-VAE the checkpoint records, or --vqvae_checkpoint."""
    pytest.importorskip("torch_fidelity", reason="FID needs requirements-eval.txt")
    import evaluate_fid
    from evaluation import fid

    path, images = vqvae_run
    moved = str(tmp_path / "moved_vqvae.pt")
    shutil.copy(path, moved)
    ckpt_dir = str(tmp_path / "ckpt")
    assert train_flow_matching.main(TINY_FLAGS + [
        "--data_dir", images, "--checkpoint_dir", ckpt_dir, "--sample_dir", str(tmp_path / "samples"),
        "--vqvae_checkpoint", moved, "--data_cache_dir", str(tmp_path / "cache"), "--train_steps", "2"]) == 0
    os.remove(moved)
    monkeypatch.setattr(fid, "InceptionFeatures", StandIn)  # the plumbing; no Inception download
    argv = ["--checkpoint", os.path.join(ckpt_dir, "flow_matching_final.pt"), "--num_samples", "4",
            "--batch_size", "4", "--num_steps_list", "1", "--fid_cache_dir", str(tmp_path / "fid"),
            "--output_jsonl", str(tmp_path / "fid.jsonl"), "--device", "cpu", "--num_workers", "0"]
    capsys.readouterr()
    assert evaluate_fid.main(argv) == 2
    err = capsys.readouterr().err
    assert "moved_vqvae.pt" in err and len(err.strip().splitlines()) == 1
    assert evaluate_fid.main(argv + ["--vqvae_checkpoint", path]) == 0
