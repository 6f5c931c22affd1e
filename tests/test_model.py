"""DiT2D: zero output at init, shapes, the position table, gradients, determinism, input checks."""

import pytest
import torch

import flow_matching
from models.dit_2d import DiT2D


def tiny(**kw):
    args = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    args.update(kw)
    return DiT2D(**args)


def test_fresh_model_outputs_exact_zeros():
    model = tiny()
    out = model(torch.randn(4, 3, 8, 8), torch.rand(4), torch.tensor([0, 3, 9, 10]))
    assert torch.equal(out, torch.zeros_like(out))


def test_fresh_blocks_are_the_identity():
    """adaLN-Zero: every block's gates start at zero, so each block passes its input through
    unchanged (not only the output layer at zero), whatever the tokens and the conditioning."""
    model = tiny()
    x, c = torch.randn(4, 16, 32), torch.randn(4, 32)
    for block in model.blocks:
        assert torch.equal(block(x, c), x)


@pytest.mark.parametrize("size,channels", [(32, 3), (8, 1), (16, 4)])
def test_output_shape_matches_input(size, channels):
    model = tiny(input_size=size, in_channels=channels)
    x = torch.randn(2, channels, size, size)
    assert model(x, torch.rand(2), torch.tensor([1, 2])).shape == x.shape


def test_unpatchify_inverts_patch_layout():
    model = tiny(input_size=8, in_channels=3)
    x = torch.randn(2, 3, 8, 8)
    p = model.patch_size
    tokens = x.reshape(2, 3, 4, p, 4, p).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, 3 * p * p)
    assert torch.equal(model.unpatchify(tokens), x)


def test_every_parameter_gets_a_gradient_once_the_zero_init_opens():
    """adaLN-Zero: step 1 moves the output layer off zero, step 2 the gates; from the third
    backward on every parameter receives a gradient."""
    torch.manual_seed(0)
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, t, y = torch.randn(4, 3, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, 10])
    for step in range(3):
        opt.zero_grad()
        (model(x, t, y) - x).square().mean().backward()
        if step < 2:
            opt.step()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_same_seed_same_model_and_output():
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = tiny()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        torch.manual_seed(7)
        outs.append(model(torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([4, 5])))
    assert torch.equal(outs[0], outs[1])


def test_output_depends_on_t_and_on_the_label():
    """Once the weights leave zero, changing t alone or the label alone (the null label too)
    changes the velocity by a sizeable share of its norm: the conditioning reaches the output."""
    torch.manual_seed(0)
    model = tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(3, 3, 8, 8)
    base = model(x, torch.full((3,), 0.2), torch.tensor([1, 2, 3]))
    for out in (model(x, torch.full((3,), 0.8), torch.tensor([1, 2, 3])),
                model(x, torch.full((3,), 0.2), torch.tensor([4, 5, 10]))):
        change = (out - base).flatten(1).norm(dim=1) / base.flatten(1).norm(dim=1)
        assert (change > 0.05).all(), change


def test_positions_are_a_non_persistent_buffer():
    model = tiny()
    assert "pos_embed" not in model.state_dict()
    assert model.pos_embed.shape == (1, 16, 32)


def test_positions_are_dit_and_maes_table():
    """The table DiT and MAE ship (get_2d_sincos_pos_embed), written out again here in numpy: the
    first half of the channels encodes the column, the second the row, each sin then cos over
    frequencies 10000^(-k / (D/4)). A checkpoint trained elsewhere with those positions, or ours
    read by their code, depends on this exact layout."""
    import numpy as np

    def one_axis(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    dim, size = 32, 4
    grid = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64))  # (column, row)
    reference = np.concatenate([one_axis(dim // 2, grid[0]), one_axis(dim // 2, grid[1])], axis=1)
    table = tiny().pos_embed[0]                                                              # (16, 32), row-major tokens
    assert torch.allclose(table, torch.from_numpy(reference).float(), atol=1e-6)
    # Spelled out: token 1 is row 0, column 1; token `size` is row 1, column 0.
    assert table[1, 0] == pytest.approx(torch.sin(torch.tensor(1.0)).item()) and table[1, dim // 2] == 0.0
    assert table[size, 0] == 0.0 and table[size, dim // 2] == pytest.approx(torch.sin(torch.tensor(1.0)).item())
    assert table[0, dim // 4] == 1.0 and table[0, 3 * dim // 4] == 1.0                        # cos(0) starts each second quarter


def test_unconditional_model_ignores_labels():
    model = tiny(num_classes=0)
    assert model.y_embedder is None
    assert model(torch.randn(2, 3, 8, 8), torch.rand(2), None).shape == (2, 3, 8, 8)


def test_gradient_checkpointing_gives_same_gradients(monkeypatch):
    """...while it really recomputes: every block goes through torch's checkpoint when the flag is
    on (in training), none when it is off or under no_grad."""
    import models.dit_2d as dit_2d
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)
    checkpoint = dit_2d.checkpoint
    monkeypatch.setattr(dit_2d, "checkpoint", counted)
    torch.manual_seed(0)
    model = tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 2])
    grads, used = [], []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        calls.clear()
        model(x, t, y).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        used.append(len(calls))
    assert used == [0, len(model.blocks)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    calls.clear()
    with torch.no_grad():
        model(x, t, y)
    assert not calls


def test_bad_sizes_name_both_numbers():
    with pytest.raises(ValueError, match="30.*4"):
        tiny(input_size=30, patch_size=4)
    with pytest.raises(ValueError, match="100.*3"):
        tiny(hidden_size=100, num_heads=3)


@pytest.mark.parametrize("label", [-1, 10, 11])
def test_labels_out_of_range_are_an_error_where_they_enter(label):
    """The model reads no value back to the host (a sync per step on CUDA, a graph break under
    compile): labels are checked where they enter, here the sampler; the scripts' flags and the
    data layer have their own tests."""
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        flow_matching.sample(tiny(), torch.randn(1, 3, 8, 8), torch.tensor([label]), flow_matching.SamplingSettings(num_steps=1),
                             num_classes=10)


def test_missing_labels_for_conditional_model():
    with pytest.raises(ValueError, match="label"):
        flow_matching.sample(tiny(), torch.randn(1, 3, 8, 8), None, flow_matching.SamplingSettings(num_steps=1),
                             num_classes=10)
