"""The DiT2D options beyond the brief's DiT: qk-norm, SwiGLU, 2D rotary positions, an fp32 residual
stream. Each test pins the option's math, so that a one-line slip in it fails here."""

import dataclasses
import math

import pytest
import torch

from configs.flow_matching_config import ARCHITECTURE_FIELDS, FlowMatchingConfig
from models.dit_2d import DiT2D, dit_from_config
from models.layers import Attention, Mlp, RMSNorm, SwiGLU, apply_rope, rope_2d_angles
from optimizers.muon import muon_param_groups


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)   # every draw below is the same on every run


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn at random: a fresh DiT outputs zeros, which would hide any option."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


# ----------------------------------------------------------------------------- qk-norm

def test_rms_norm_gives_unit_rms_times_the_gain_whatever_the_input_scale():
    norm = RMSNorm(16)
    x = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(0))
    for scale in (1.0, 1e3):
        out = norm(scale * x)
        assert torch.allclose(out.pow(2).mean(-1).sqrt(), torch.ones(3, 4), atol=1e-4)
    with torch.no_grad():
        norm.weight.fill_(2.5)
    assert torch.allclose(norm(x).pow(2).mean(-1).sqrt(), torch.full((3, 4), 2.5), atol=1e-4)
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_qk_norm_bounds_the_logits_so_scaling_q_and_k_changes_nothing():
    """With qk-norm, q and k reach the softmax with RMS 1 per head: multiplying their weights by
    100 leaves the attention output unchanged (without it the softmax saturates)."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, 32)
    for qk_norm, same in ((True, True), (False, False)):
        attn = randomized(Attention(32, num_heads=2, qk_norm=qk_norm))
        before = attn(x)
        with torch.no_grad():
            attn.qkv.weight[:64] *= 100.0   # the q and k rows
            attn.qkv.bias[:64] *= 100.0
        assert torch.allclose(attn(x), before, atol=1e-5) is same
    assert isinstance(Attention(32, 2, qk_norm=True).q_norm, RMSNorm)
    assert Attention(32, 2, qk_norm=True).q_norm.weight.shape == (16,)   # a gain per head channel


# ----------------------------------------------------------------------------- SwiGLU

def test_swiglu_shapes_parameters_and_formula():
    mlp, gelu = SwiGLU(96, 4.0), Mlp(96, 4.0)
    inner = 256                                        # 2/3 of the GELU MLP's 384
    assert mlp.fc1.weight.shape == (2 * inner, 96) and mlp.fc2.weight.shape == (96, inner)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert abs(count(mlp) - count(gelu)) / count(gelu) < 0.01
    x = torch.randn(2, 5, 96)
    gate, value = mlp.fc1(x)[..., :inner], mlp.fc1(x)[..., inner:]
    expected = mlp.fc2(gate * torch.sigmoid(gate) * value)
    out = mlp(x)
    assert out.shape == (2, 5, 96) and torch.allclose(out, expected, atol=1e-6)


def test_muon_orthogonalizes_swiglu_gate_and_value_as_two_blocks():
    model = DiT2D(8, 2, 3, 32, 2, 2, 4.0, 3, mlp="swiglu")
    groups, _ = muon_param_groups(model, lr=0.01, split_fused=True)
    swiglu = [g for g in groups if g["name"] == "muon_swiglu"]
    assert len(swiglu) == 1 and swiglu[0]["chunks"] == 2
    assert {id(p) for p in swiglu[0]["params"]} == {id(b.mlp.fc1.weight) for b in model.blocks}


# ----------------------------------------------------------------------------- rotary positions

def test_rope_angles_rotate_rows_in_the_first_half_and_columns_in_the_second():
    head_dim, grid = 16, 5
    angles = rope_2d_angles(head_dim, grid)                             # (25, 8)
    freqs = [10000.0 ** (-j / 4) for j in range(4)]
    row, col = 3, 1
    token = row * grid + col
    assert angles.shape == (grid * grid, head_dim // 2)
    for j in range(4):
        assert angles[token, j].item() == pytest.approx(row * freqs[j])
        assert angles[token, 4 + j].item() == pytest.approx(col * freqs[j])
    # Pair (i, i + Dh/2) of a unit vector turns by exactly its angle.
    i = 5
    x = torch.zeros(1, 1, grid * grid, head_dim)
    x[..., i] = 1.0
    out = apply_rope(x, angles.cos(), angles.sin())[0, 0, token]
    assert out[i].item() == pytest.approx(math.cos(col * freqs[1]), abs=1e-6)
    assert out[i + head_dim // 2].item() == pytest.approx(math.sin(col * freqs[1]), abs=1e-6)
    assert out.norm().item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_2d_angles(18, 4)


def test_rope_makes_attention_scores_depend_on_the_offset_only():
    """q at (r, c) and k at (r', c') score the same as at (r + a, c + b) and (r' + a, c' + b)."""
    head_dim, grid = 16, 6
    angles = rope_2d_angles(head_dim, grid)
    cos, sin = angles.cos(), angles.sin()
    q = torch.randn(head_dim).expand(1, 1, grid * grid, head_dim)
    k = torch.randn(head_dim).expand(1, 1, grid * grid, head_dim)
    scores = apply_rope(q, cos, sin)[0, 0] @ apply_rope(k, cos, sin)[0, 0].T   # (N, N)
    at = lambda r, c: r * grid + c
    for (r, c), (r2, c2), (a, b) in [((0, 0), (2, 1), (3, 4)), ((1, 4), (0, 0), (2, 1)), ((5, 5), (5, 5), (-3, -5))]:
        assert scores[at(r, c), at(r2, c2)].item() == pytest.approx(
            scores[at(r + a, c + b), at(r2 + a, c2 + b)].item(), abs=1e-4)
    # ... and on the offset: other offsets score differently.
    assert scores[at(0, 0), at(2, 1)].item() != pytest.approx(scores[at(0, 0), at(1, 2)].item(), abs=1e-3)


def test_attention_with_rope_scores_tokens_by_their_offset(monkeypatch):
    """Tokens that all carry the same content: the attention logits the module computes depend on
    the two tokens' 2D offset only (both q and k rotated)."""
    import models.layers as layers
    grid, seen = 4, {}

    def capture(q, k, v):
        seen["scores"] = (q @ k.transpose(-1, -2))[0, 0]                 # (N, N), head 0
        return v

    monkeypatch.setattr(layers, "attention", capture)
    attn = randomized(Attention(32, num_heads=2, qk_norm=True))
    angles = rope_2d_angles(16, grid)
    attn(torch.randn(1, 1, 32).expand(1, grid * grid, 32), (angles.cos(), angles.sin()))
    scores, at = seen["scores"], lambda r, c: r * grid + c
    assert scores[at(0, 1), at(2, 3)].item() == pytest.approx(scores[at(1, 0), at(3, 2)].item(), abs=1e-4)
    assert scores[at(3, 3), at(1, 2)].item() == pytest.approx(scores[at(2, 1), at(0, 0)].item(), abs=1e-4)


@pytest.mark.parametrize("positions, table, rotary", [("sincos", True, False), ("rope", False, True),
                                                      ("sincos_rope", True, True)])
def test_position_modes_build_their_tables_as_non_persistent_buffers(positions, table, rotary):
    model = DiT2D(8, 2, 3, 32, 2, 2, 4.0, 3, positions=positions)
    assert (model.pos_embed is not None) is table and (model.rope_cos is not None) is rotary
    assert not any(k.startswith(("pos_embed", "rope_")) for k in model.state_dict())
    # The rotation reaches the attention: dropping it changes a randomized model's output.
    randomized(model)
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 2])
    out = model(x, t, y)
    if rotary:
        model.rope_cos, model.rope_sin = torch.ones_like(model.rope_cos), torch.zeros_like(model.rope_sin)
        assert not torch.allclose(model(x, t, y), out, atol=1e-4)


# ----------------------------------------------------------------------------- fp32 residual stream

def test_fp32_residual_keeps_the_stream_fp32_under_bf16_autocast():
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 2])
    outputs = {}
    for fp32 in (False, True):
        model = randomized(DiT2D(8, 2, 3, 32, 3, 2, 4.0, 3, fp32_residual=fp32))
        stream = []
        for block in model.blocks:
            block.register_forward_hook(lambda m, args, out: stream.append(out.dtype))
        reference = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[fp32] = (model(x, t, y).float() - reference).abs().max().item()
        assert stream[-3:] == [torch.float32 if fp32 else torch.bfloat16] * 3
    # The bf16 stream rounds every residual add; the fp32 one only the branches.
    assert outputs[True] < outputs[False]


# ----------------------------------------------------------------------------- time embedding scale

@pytest.mark.parametrize("two_times", [False, True])
def test_time_embed_scale_multiplies_every_time_the_embedders_see(two_times):
    """Both embedders (t, and MeanFlow's r - t) see S times their time: a model at S = 1 given t and r
    is the model at DiT's S = 1000 given t / 1000 and r / 1000 (the same weights)."""
    dit, smooth = (DiT2D(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=3, two_times=two_times,
                         time_embed_scale=s) for s in (1000.0, 1.0))
    randomized(dit)
    smooth.load_state_dict(dit.state_dict())
    x, y = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2])
    t, r = torch.tensor([0.0, 0.3, 0.9]), torch.tensor([0.5, 0.3, 1.0])
    extra = ((r,), (r / 1000,)) if two_times else ((), ())
    with torch.no_grad():
        out, scaled = smooth(x, t, y, *extra[0]), dit(x, t / 1000, y, *extra[1])
        assert torch.allclose(out, scaled, atol=1e-5)
        assert not torch.allclose(out, dit(x, t, y, *extra[0]), atol=1e-3)   # the scale matters


# ----------------------------------------------------------------------------- configs

def test_a_checkpoint_config_from_before_the_options_builds_the_briefs_dit():
    old = dict(image_size=8, in_channels=3, latent_size=None, latent_channels=None, patch_size=2,
               hidden_size=32, depth=1, num_heads=2, mlp_ratio=4.0, num_classes=3)
    model = dit_from_config(old)
    assert isinstance(model.blocks[0].mlp, Mlp) and model.rope_cos is None and model.pos_embed is not None
    assert not model.fp32_residual and isinstance(model.blocks[0].attn.q_norm, torch.nn.Identity)
    new = dit_from_config(dict(old, qk_norm=True, mlp="swiglu", positions="rope", fp32_residual=True))
    assert isinstance(new.blocks[0].mlp, SwiGLU) and new.pos_embed is None and new.fp32_residual


# ----------------------------------------------------------------------------- every field reaches the model

# A changed value for each config field dit_from_config builds from (ARCHITECTURE_FIELDS, whose
# latent_* only count with a VQ-VAE, and fp32_residual, which changes no weight): a field added there
# without its row here fails with a KeyError instead of going unchecked.
CHANGED = {"image_size": 16, "in_channels": 1, "num_classes": 4, "patch_size": 4, "hidden_size": 64, "depth": 3,
           "num_heads": 4, "mlp_ratio": 2.0, "qk_norm": True, "mlp": "swiglu", "positions": "rope",
           "time_embed_scale": 1.0, "objective": "meanflow", "fp32_residual": True}


def model_fingerprint(config: dict):
    """(names and shapes of the weights and tables, a forward of the randomized model under bf16
    autocast): what a config field must change to have reached the model."""
    model = randomized(dit_from_config(config))
    shapes = [(k, tuple(v.shape)) for k, v in [*model.named_parameters(), *model.named_buffers()]]
    channels, size = config["in_channels"], config["image_size"]
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, torch.tensor([0.3, 0.7]), torch.tensor([0, 1]))
    return shapes, out.float()


@pytest.mark.parametrize("field", [f for f in ARCHITECTURE_FIELDS if not f.startswith("latent_")] + ["fp32_residual"])
def test_every_architecture_field_reaches_the_built_model(field):
    """A field that parses, is saved and is compared on resume, but that dit_from_config never
    passes to DiT2D, would train the default network under another name."""
    base = {**{f.name: f.default for f in dataclasses.fields(FlowMatchingConfig)},
            "image_size": 8, "hidden_size": 32, "depth": 2, "num_heads": 2, "num_classes": 3}
    assert base[field] != CHANGED[field]
    (shapes, out), (changed_shapes, changed_out) = model_fingerprint(base), model_fingerprint({**base, field: CHANGED[field]})
    assert shapes != changed_shapes or not torch.equal(out, changed_out)
