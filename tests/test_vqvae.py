"""The VQ-VAE: quantizer invariants, straight-through gradients, EMA codebook and dead-code restart,
training through the shared trainer (falling error, exact resume), checkpoint loading, CLI errors."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train_vqvae
from configs.cli import make_config
from configs.vqvae_config import VQVAEConfig
from evaluation.reconstruction import psnr
from models.vqvae import VQVAE, VectorQuantizer
from rebuild import load_vqvae
from tests.conftest import write_image_folder
from utils.checkpoint import load_checkpoint, save_checkpoint


def tiny_vqvae(**overrides) -> VQVAE:
    torch.manual_seed(0)
    args = dict(in_channels=3, hidden_channels=8, num_res_blocks=1, downsample_factor=2, latent_channels=3,
                codebook_size=16)
    args.update(overrides)
    return VQVAE(**args)


def write_smooth_folder(root, classes=2, per_class=4, size=8, seed=0) -> str:
    """Low-frequency RGB images (a 2x2 colour pattern, bilinearly upsampled) that a VQ-VAE with
    downsample_factor 2 can learn to reconstruct."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = os.path.join(root, f"class_{c}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            corners = rng.integers(0, 256, (2, 2, 3), dtype=np.uint8)
            Image.fromarray(corners).resize((size, size), Image.BILINEAR).save(os.path.join(folder, f"{i}.png"))
    return str(root)


VQ_FLAGS = ["--preset", "tiny", "--dataset", "imagefolder", "--image_size", "8", "--hidden_channels", "16",
            "--num_res_blocks", "1", "--downsample_factor", "2", "--latent_channels", "3",
            "--codebook_size", "16", "--batch_size", "4", "--num_workers", "0", "--device", "cpu",
            "--warmup_steps", "2", "--log_every", "2", "--sample_every", "0", "--eval_images", "6"]


def vq_flags(data_dir, out):
    return VQ_FLAGS + ["--data_dir", str(data_dir), "--checkpoint_dir", str(out / "ckpt"),
                       "--sample_dir", str(out / "samples")]


def read_metrics(folder):
    with open(os.path.join(folder, "vqvae_metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- the model

def test_codes_lie_in_range_and_encode_decode_match_forward():
    model = tiny_vqvae().eval()
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    codes = model.codes(x)
    assert codes.shape == (4, 4, 4) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 16
    z = model.encode(x)
    assert z.shape == (4, 3, 4, 4) == (4, *model.latent_shape(8))
    assert torch.equal(z, model.quantizer.embedding[codes].permute(0, 3, 1, 2))
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    recon, _ = model(x)
    torch.testing.assert_close(model.decode(z), recon)
    # A latent a little off its codes snaps back to them before decoding.
    torch.testing.assert_close(model.decode(z + 1e-4 * torch.randn_like(z)), recon)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items()), "eval changed the codebook"


def test_straight_through_gradient_reaches_the_encoder():
    model = tiny_vqvae().train()
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    recon, _ = model(x, generator=torch.Generator().manual_seed(0))
    F.mse_loss(recon, x).backward()  # the reconstruction loss alone: no commitment term
    for name, p in model.encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert "quantizer.embedding" not in dict(model.named_parameters())


def test_perplexity_and_usage_on_exact_codes():
    q = VectorQuantizer(8, 2).eval()
    z = q.embedding[torch.randperm(8)].t().reshape(1, 2, 2, 4)
    z_q, codes, stats = q(z)
    torch.testing.assert_close(z_q, z)
    assert sorted(codes.flatten().tolist()) == list(range(8))
    assert stats["commitment"] == 0
    torch.testing.assert_close(stats["perplexity"], torch.tensor(8.0))
    assert stats["code_usage"] == 1.0
    _, _, stats = q(q.embedding[:1].t().reshape(1, 2, 1, 1).expand(1, 2, 2, 4))
    torch.testing.assert_close(stats["perplexity"], torch.tensor(1.0))
    assert stats["code_usage"] == 1 / 8


def test_ema_update_moves_codes_to_the_mean_of_their_vectors():
    q = VectorQuantizer(2, 1, decay=0.0).train()
    q.embedding.copy_(torch.tensor([[-1.0], [1.0]]))
    q.cluster_size.fill_(10.0)
    z = torch.tensor([-2.0, -1.5, 0.5, 3.0]).reshape(1, 1, 2, 2)
    z_q, codes, _ = q(z)
    assert codes.flatten().tolist() == [0, 0, 1, 1]
    # the output holds the updated vectors (see VectorQuantizer.forward for why)
    torch.testing.assert_close(z_q.flatten(), torch.tensor([-1.75, -1.75, 1.75, 1.75]), atol=1e-4, rtol=0)
    torch.testing.assert_close(q.embedding, torch.tensor([[-1.75], [1.75]]), atol=1e-4, rtol=0)
    torch.testing.assert_close(q.cluster_size, torch.tensor([2.0, 2.0]))


def test_dead_codes_restart_on_encoder_outputs_deterministically():
    def restarted(seed):
        q = VectorQuantizer(4, 2, decay=0.5, dead_code_threshold=1.0).train()
        q.embedding.copy_(torch.tensor([[0.0, 0.0], [100.0, 100.0], [-100.0, 100.0], [100.0, -100.0]]))
        q.cluster_size.copy_(torch.tensor([10.0, 0.5, 10.0, 0.5]))
        q.embed_sum.copy_(q.embedding * q.cluster_size.unsqueeze(1))
        z = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1)) * 0.1  # all go to code 0
        q(z, torch.Generator().manual_seed(seed))
        return q, z.permute(0, 2, 3, 1).reshape(-1, 2)

    q, flat = restarted(0)
    for k in (1, 3):  # dead: restarted on a vector of the batch, counted at the threshold
        assert (flat == q.embedding[k]).all(1).any(), k
        assert q.cluster_size[k] == 1.0
        # and its EMA sum restarts with it, or the next update pulls it back towards the old sum / count
        assert torch.equal(q.embed_sum[k], q.embedding[k] * 1.0)
    assert q.cluster_size[2] == 5.0
    torch.testing.assert_close(q.embedding[2], torch.tensor([-100.0, 100.0]))
    assert torch.equal(restarted(0)[0].embedding, q.embedding)


def test_nearest_code_is_exact_for_latents_far_from_the_origin():
    """Two codes 1e-3 apart at |e| ~ 300: |x|^2 - 2 x.e + |e|^2 cancels ~1e5 in fp32 and loses the
    ~1e-4 that separates them (as a TF32 matmul on CUDA loses it at |e| ~ 1); differences do not."""
    gen = torch.Generator().manual_seed(0)
    q = VectorQuantizer(2, 2)
    q.embedding.copy_(torch.tensor([[200.0, 200.0], [200.0, 200.001]]))
    flat = torch.tensor([200.0, 200.0]) + torch.rand(400, 2, generator=gen) * torch.tensor([0.0, 0.001])
    exact = torch.cdist(flat.double(), q.embedding.double()).argmin(1)
    assert {0, 1} <= set(exact.tolist())
    assert torch.equal(q.nearest(flat), exact)


def test_with_no_restarts_a_code_that_received_nothing_keeps_its_vector():
    q = VectorQuantizer(4, 2, decay=0.9, dead_code_threshold=0.0).train()
    before = q.embedding.clone()
    z = q.embedding[0].reshape(1, 2, 1, 1).expand(1, 2, 2, 2).clone()   # every vector goes to code 0
    q(z)
    assert torch.equal(q.embedding[1:], before[1:]) and q.embedding[1:].abs().sum() > 0


def test_first_training_step_seeds_the_whole_codebook_from_data():
    q = VectorQuantizer(8, 2).train()
    z = torch.randn(2, 2, 4, 4)
    q(z, torch.Generator().manual_seed(0))
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    assert all((flat == code).all(1).any() for code in q.embedding)


def test_psnr_of_images_in_minus_one_to_one():
    assert psnr(torch.tensor(4.0)) == 0.0
    torch.testing.assert_close(psnr(torch.tensor(4e-2)), torch.tensor(20.0))


# ----------------------------------------------------------------------------- training

def test_training_lowers_reconstruction_error_and_writes_everything(tmp_path, capsys):
    data = write_smooth_folder(tmp_path / "images")
    flags = vq_flags(data, tmp_path) + ["--train_steps", "20", "--lr", "5e-3", "--sample_every", "20",
                                         "--grid_images", "3"]
    assert train_vqvae.main(flags) == 0
    # No --eval_data_dir: the report is on the training images, and says so.
    assert "(the training images: pass --eval_data_dir for held-out ones)" in capsys.readouterr().out
    records = read_metrics(tmp_path / "ckpt")
    train = [r for r in records if "mse" in r]
    for key in ("psnr", "perplexity", "code_usage", "commitment"):
        assert key in train[-1]
    final = records[-1]  # the final report, on all 6 images
    assert final["step"] == 20 and final["eval_images"] == 6
    assert final["eval_mse"] < 0.5 * train[0]["mse"], (train[0]["mse"], final["eval_mse"])
    assert final["eval_psnr"] > train[0]["psnr"] + 3
    assert 0 < final["eval_code_usage"] <= 1
    ckpt = load_checkpoint(str(tmp_path / "ckpt" / "vqvae.pt"), kind="vqvae")
    assert ckpt["step"] == 20
    grid = Image.open(tmp_path / "samples" / "vqvae_step_0000020.png")
    assert grid.size == (3 * 10 + 2, 2 * 10 + 2)       # 3 originals above their reconstructions


def test_resume_is_exact(tmp_path, image_folder):
    straight, resumed = tmp_path / "a", tmp_path / "b"
    flags = VQ_FLAGS + ["--data_dir", image_folder, "--train_steps", "6", "--save_every", "3", "--eval_images", "0"]
    assert train_vqvae.main(flags + ["--checkpoint_dir", str(straight / "ckpt")]) == 0
    assert train_vqvae.main(flags + ["--checkpoint_dir", str(resumed / "ckpt"),
                                     "--resume", str(straight / "ckpt" / "vqvae_checkpoint_0000003.pt")]) == 0
    a = load_checkpoint(str(straight / "ckpt" / "vqvae.pt"))
    b = load_checkpoint(str(resumed / "ckpt" / "vqvae.pt"))
    for part in ("model", "ema"):
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), (part, name)
    assert a["data"] == b["data"]


def test_resume_at_another_image_size_is_a_clear_error(tmp_path, image_folder, capsys):
    """The convolutions would fit, but the latents (and the flow runs on them) would change shape."""
    flags = VQ_FLAGS + ["--data_dir", image_folder, "--train_steps", "2", "--eval_images", "0",
                        "--checkpoint_dir", str(tmp_path / "ckpt")]
    assert train_vqvae.main(flags) == 0
    flags[flags.index("--train_steps") + 1] = "4"
    assert train_vqvae.main(flags + ["--image_size", "16", "--resume", "latest"]) == 2
    assert "image_size: checkpoint 8 vs now 16" in capsys.readouterr().err


def test_load_vqvae(tmp_path, image_folder):
    flags = VQ_FLAGS + ["--data_dir", image_folder, "--train_steps", "2", "--eval_images", "0",
                        "--checkpoint_dir", str(tmp_path / "ckpt")]
    assert train_vqvae.main(flags) == 0
    path = str(tmp_path / "ckpt" / "vqvae.pt")
    model = load_vqvae(path)
    ckpt = load_checkpoint(path)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())
    assert model.checkpoint_path == path and model.image_size == 8
    ema = load_vqvae(path, weights="ema")
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in ema.state_dict().items())
    save_checkpoint({"kind": "flow_matching", "model": {}, "config": {}}, str(tmp_path / "flow.pt"))
    with pytest.raises(ValueError, match="'flow_matching' checkpoint, not a 'vqvae'"):
        load_vqvae(str(tmp_path / "flow.pt"))


@pytest.mark.parametrize("flags, message", [
    (["--downsample_factor", "3"], "--downsample_factor must be a power of 2"),
    (["--image_size", "30"], "--image_size 30 is not divisible by --downsample_factor 4"),
    (["--codebook_decay", "1"], "--codebook_decay must be in [0, 1)"),
    # a VQ-VAE has no transformer blocks: refused with the flags, not after the data loads
    (["--optimizer", "muon"], "--optimizer: invalid choice 'muon' (choose from adamw)"),
    (["--compile", "true", "--compile_mode", "blocks"], "--compile_mode: invalid choice 'blocks'"),
])
def test_bad_flags_exit_2_with_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_vqvae.main(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_missing_data_folder_exits_2(tmp_path, capsys):
    flags = VQ_FLAGS + ["--data_dir", str(tmp_path / "nowhere"), "--checkpoint_dir", str(tmp_path / "ckpt")]
    assert train_vqvae.main(flags) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_the_report_reads_eval_data_dir_or_cifar10s_test_split(tmp_path, monkeypatch):
    """The held-out report reads --eval_data_dir when given (not the training folder), and for
    CIFAR-10 its test split, as its printed line says."""
    from data import vqvae_dataset
    train_dir = write_image_folder(tmp_path / "train", classes=2, per_class=3)
    held_out = write_image_folder(tmp_path / "held_out", classes=2, per_class=2)
    config = make_config(VQVAEConfig, {"dataset": "imagefolder", "data_dir": train_dir, "eval_data_dir": held_out,
                                       "image_size": 8, "eval_images": 100, "num_workers": 0})
    assert len(vqvae_dataset.get_vqvae_eval_loader(config).dataset) == 4
    seen = []
    monkeypatch.setattr(vqvae_dataset, "build_image_dataset",
                        lambda dataset, root, size, channels, train=True: seen.append(train) or (list(range(5)), 2))
    vqvae_dataset.get_vqvae_eval_loader(make_config(VQVAEConfig, {"dataset": "cifar10", "eval_images": 3,
                                                                  "num_workers": 0}))
    assert seen == [False]
