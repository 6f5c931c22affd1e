"""MeanFlow: the average-velocity identity, its target, the JVP, the 1-step jump, the reduction to
flow matching at r = t, learning, the checkpoint plumbing (--init_from, --sampler meanflow) and
resume. Gaussian data has an affine flow map in closed form, so the exact average velocity is
known and the math is checked against it, not against itself."""

import os

import pytest
import torch

import flow_matching as fm
import generate_flow_matching
import train_flow_matching
from models.dit_2d import DiT2D, dit_from_config
from rebuild import initial_weights
from configs.flow_matching_config import ARCHITECTURE_FIELDS, FlowMatchingConfig
from utils.checkpoint import load_checkpoint, save_checkpoint

MU, S = 0.7, 0.4   # data ~ N(MU, S^2) per element; noise ~ N(0, 1)


def moments(t):
    """Mean and std of x_t = (1 - t) noise + t data, and their time derivatives."""
    m, sigma = t * MU, torch.sqrt((1 - t) ** 2 + (t * S) ** 2)
    return m, sigma, torch.full_like(t, MU), (-(1 - t) + t * S ** 2) / sigma


def expand(t, x):
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def flow_map(x, t, r):
    """The probability-flow map from time t to r: affine for Gaussian marginals."""
    (m_t, s_t, _, _), (m_r, s_r, _, _) = moments(expand(t, x)), moments(expand(r, x))
    return m_r + s_r / s_t * (x - m_t)


def exact_u(x, t, y=None, r=None):
    """The exact average velocity (x_r - x_t) / (r - t); the velocity v at r = t."""
    r = t if r is None else r
    te, re = expand(t, x), expand(r, x)
    m, s, dm, ds = moments(te)
    velocity = dm + ds / s * (x - m)
    gap = re - te
    safe = torch.where(gap == 0, torch.ones_like(gap), gap)
    return torch.where(gap == 0, velocity, (flow_map(x, t, r) - x) / safe)


def exact_v(x, t):
    return exact_u(x, t)


def gaussian_batch(n=6):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 2, 2, generator=gen, dtype=torch.float64)
    t = torch.rand(n, generator=gen, dtype=torch.float64) * 0.6
    r = t + torch.rand(n, generator=gen, dtype=torch.float64) * (1 - t)
    return x, t, r


def test_exact_average_velocity_satisfies_the_identity():
    """u = v + (r - t) du/dt, du/dt the total derivative along the flow (central differences)."""
    x, t, r = gaussian_batch()
    h = 1e-5
    v = exact_v(x, t)
    dudt = (exact_u(x + h * v, t + h, r=r) - exact_u(x - h * v, t - h, r=r)) / (2 * h)
    torch.testing.assert_close(exact_u(x, t, r=r), v + expand(r - t, x) * dudt, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("tangent", ["conditional", "predicted"])
def test_exact_average_velocity_is_a_fixed_point_of_the_target(tangent):
    """Given the marginal velocity, the target built from the JVP of the exact u is the exact u."""
    x, t, r = gaussian_batch()
    target = fm.meanflow_target(exact_u, x, t, r, None, exact_v(x, t), tangent=tangent)
    torch.testing.assert_close(target, exact_u(x, t, r=r), rtol=1e-10, atol=1e-10)
    # A u off by a constant is not a fixed point.
    shifted = fm.meanflow_target(lambda x_, t_, y_, r_: exact_u(x_, t_, r=r_) + expand(t_ ** 2, x_), x, t, r, None,
                                 exact_v(x, t), tangent=tangent)
    assert (shifted - exact_u(x, t, r=r)).abs().max() > 1e-2


def test_the_predicted_tangent_is_the_models_own_velocity():
    """Improved MeanFlow's tangent: du/dt along u(x, t, t), whatever the sampled velocity; the
    regression target still starts at the sampled velocity. The paper's tangent follows the sample."""
    x, t, r = gaussian_batch()
    v = exact_v(x, t) + torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    jump = fm.meanflow_target(exact_u, x, t, r, None, exact_v(x, t)) - exact_v(x, t)   # (r - t) du/dt along v
    predicted = fm.meanflow_target(exact_u, x, t, r, None, v, tangent="predicted")
    torch.testing.assert_close(predicted, v + jump, rtol=1e-10, atol=1e-10)
    conditional = fm.meanflow_target(exact_u, x, t, r, None, v)
    assert (conditional - predicted).abs().max() > 1e-2


def test_the_predicted_tangent_under_guidance_is_the_labels_own_velocity():
    """With the guided target the tangent is u(x, t, t | y) for the row's label (the null label where
    it was dropped), the guided velocity the model learns, not the unconditional one."""
    x, t, r = gaussian_batch(4)
    y = torch.tensor([0, 1, 2, 1])                     # 2 = the null label of a 2-class model

    def model(x_, t_, y_, r_):
        return exact_u(x_, t_, r=r_) * expand(1.0 + 0.5 * (y_ == 0).to(x_.dtype) - 0.3 * (y_ == 1).to(x_.dtype), x_)

    v = exact_v(x, t)
    target = fm.meanflow_target(model, x, t, r, y, v, num_classes=2, guidance_scale=1.0, guidance_mix=0.5,
                                tangent="predicted")
    u_c, u_u = model(x, t, y, t), model(x, t, torch.full_like(y, 2), t)
    v_g = torch.where(expand(y != 2, x), v + 0.5 * u_c - 0.5 * u_u, v)
    _, dudt = torch.func.jvp(lambda a, b, c: model(a, b, y, c), (x, t, r), (u_c, torch.ones_like(t), torch.zeros_like(r)))
    torch.testing.assert_close(target, v_g + expand(r - t, x) * dudt, rtol=1e-10, atol=1e-10)


def test_the_jvp_of_the_dit_equals_a_central_difference():
    """Forward-mode AD through the DiT (attention written out) with tangent (v, 1, 0) on (x, t, r)."""
    torch.manual_seed(0)
    model = DiT2D(8, 2, 3, 32, 2, 2, 4.0, 3, qk_norm=True, positions="sincos_rope", two_times=True).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 2])
    t = torch.tensor([0.2, 0.5], dtype=torch.float64)
    r, v = t + 0.3, torch.randn_like(x)
    with torch.no_grad():
        _, dudt = torch.func.jvp(lambda a, b, c: model(a, b, y, c), (x, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
        h = 1e-6
        central = (model(x + h * v, t + h, y, r) - model(x - h * v, t - h, y, r)) / (2 * h)
    assert (dudt - central).abs().max() < 1e-4 * dudt.abs().max()


def test_the_target_through_blocks_compiled_in_place_equals_the_eager_ones():
    """--objective meanflow --compile true --compile_mode blocks compiles the raw model's blocks in
    place, so the JVP (taken on the unwrapped model) calls them on functorch-wrapped tensors, where
    attention's forward-mode check is skipped under compile: the target must still be the eager
    model's (dynamo runs such calls eagerly)."""
    torch.manual_seed(0)
    eager = DiT2D(8, 2, 3, 32, 2, 2, 4.0, 3, two_times=True)
    with torch.no_grad():
        for p in eager.parameters():
            p.copy_(0.1 * torch.randn_like(p))   # not the zero-output initialization
    compiled = DiT2D(8, 2, 3, 32, 2, 2, 4.0, 3, two_times=True)
    compiled.load_state_dict(eager.state_dict())
    for block in compiled.blocks:
        block.compile()
    x, v = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.rand(4)
    r, y = t * torch.rand(4), torch.tensor([0, 1, 2, 3])   # one dropped label: guidance on three rows
    targets = [fm.meanflow_target(m, x, t, r, y, v, num_classes=3, guidance_scale=1.0, guidance_mix=0.5)
               for m in (eager, compiled)]
    torch.testing.assert_close(targets[1], targets[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_steps", [1, 2, 3])
def test_jumps_with_the_exact_u_land_on_the_flow_map_image(num_steps):
    x0 = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x1, nfe = fm.integrate(lambda x, t, r: exact_u(x, torch.full((len(x),), t, dtype=x.dtype), r=torch.full(
        (len(x),), r, dtype=x.dtype)), x0, num_steps, "meanflow")
    torch.testing.assert_close(x1, MU + S * x0, rtol=1e-10, atol=1e-10)
    assert nfe == num_steps


def test_at_r_equal_t_the_loss_is_flow_matchings():
    """ratio 0 (r = t everywhere), no guidance, no adaptive weight: the MSE of flow matching at the
    same t and noise."""
    torch.manual_seed(0)
    model = DiT2D(8, 2, 1, 32, 1, 2, 4.0, 0, two_times=True)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    data, noise = torch.rand(4, 1, 8, 8) * 2 - 1, torch.randn(4, 1, 8, 8)
    loss, _ = fm.meanflow_loss(model, data, None, num_classes=0, ratio=0.0, adaptive_p=0.0, guidance_mix=0.0,
                               generator=torch.Generator().manual_seed(3), noise=noise)
    t, r = fm.sample_time_pair(4, "cpu", 0.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(t, r)
    v = model(fm.interpolate(noise, data, t), t, None)
    expected = torch.nn.functional.mse_loss(v, data - noise)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)


def test_time_pairs_are_ordered_and_a_ratio_of_them_jump():
    t, r = fm.sample_time_pair(20_000, "cpu", 0.25, generator=torch.Generator().manual_seed(0))
    assert (t <= r).all() and 0.23 < (r > t).float().mean().item() < 0.27


def test_guided_target_learns_cfg_at_scale_w_over_one_minus_k():
    """At r = t, with u(.|y) and u(.|null) the model's own: target = w v + k u_c + (1 - w - k) u_u
    for kept labels, v for the null label."""
    calls = {}

    def model(x, t, y, r):
        calls.setdefault("y", y)
        return torch.where(expand(y == 3, x), torch.full_like(x, 5.0), torch.full_like(x, 2.0))   # u_u = 5

    x, t = torch.zeros(2, 1, 2, 2), torch.tensor([0.3, 0.3])
    y = torch.tensor([1, 3])          # the second label is the null label of a 3-class model
    v = torch.ones_like(x)
    target = fm.meanflow_target(model, x, t, t, y, v, num_classes=3, guidance_scale=2.0, guidance_mix=0.5)
    assert target[0].unique().item() == pytest.approx(2.0 * 1 + 0.5 * 2 + (1 - 2.0 - 0.5) * 5)
    assert target[1].unique().item() == 1.0


def test_tiny_dit_learns_one_step_generation_of_eight_images():
    """Eight images, eight labels: after training, one MeanFlow jump from noise lands near each
    label's image (the fresh model's jump is the noise itself)."""
    torch.manual_seed(0)
    data, y = torch.rand(8, 1, 8, 8) * 2 - 1, torch.arange(8)
    model = DiT2D(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4,
                  num_classes=8, two_times=True)
    # The lr decays linearly to 0: at a constant 3e-3 the error after 300 steps wanders (0.12 to 0.39
    # of the start across seeds, and with the CPU's kernels), the decay lets it settle.
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    steps = 500
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    noise = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(5))

    def one_step_error():
        images, nfe = fm.sample(model.eval(), noise, y, fm.SamplingSettings("meanflow", 1), num_classes=8)
        model.train()
        assert nfe == 1
        return (images - data).pow(2).mean().item()

    start, gen = one_step_error(), torch.Generator().manual_seed(2)
    for _ in range(steps):
        opt.zero_grad()
        fm.meanflow_loss(model, data, y, num_classes=8, class_dropout_prob=0.0, ratio=0.5, guidance_mix=0.0,
                         generator=gen)[0].backward()
        opt.step()
        decay.step()
    # Measured: 0.065 from 1.239 (0.053 of the start) on AVX-512, AVX2 and scalar kernels alike;
    # 0.03 to 0.16 of the start for torch seeds 0-3.
    assert one_step_error() < 0.2 * start


# ----------------------------------------------------------------------------- the scripts

def test_init_from_a_flow_matching_run_starts_meanflow_at_its_velocity(tiny_flags, tmp_path):
    fm_dir, mf_dir = str(tmp_path / "fm"), str(tmp_path / "mf")
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "3", "--checkpoint_dir", fm_dir]) == 0
    fm_ckpt = os.path.join(fm_dir, "flow_matching_final.pt")
    saved = load_checkpoint(fm_ckpt)
    config = FlowMatchingConfig(**{**saved["config"], "objective": "meanflow"})
    model = dit_from_config(config)
    model.load_state_dict(initial_weights(fm_ckpt, model, config, [f for f in ARCHITECTURE_FIELDS if f != "objective"]),
                          strict=True)
    flow = dit_from_config(saved["config"])
    flow.load_state_dict(saved["model"], strict=True)
    x, t, y = torch.randn(3, 3, 8, 8), torch.rand(3), torch.tensor([0, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y, torch.ones(3)), flow(x, t, y), rtol=0, atol=0)
    # The script: a MeanFlow run from it, whose grid and generation default to 1-2 jumps.
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "2", "--objective", "meanflow",
                                                  "--init_from", fm_ckpt, "--checkpoint_dir", mf_dir]) == 0
    mf = load_checkpoint(os.path.join(mf_dir, "flow_matching_final.pt"))
    assert mf["config"]["sampler"] == "meanflow" and mf["config"]["cfg_scale"] == 1.0
    out = str(tmp_path / "out")
    assert generate_flow_matching.main(["--checkpoint", os.path.join(mf_dir, "flow_matching_final.pt"),
                                        "--class_grid", "--num_steps", "1", "--output_dir", out]) == 0
    assert os.path.isfile(os.path.join(out, "grid.png"))


def test_meanflow_sampler_on_a_flow_matching_checkpoint_is_one_clear_error(tiny_flags, tmp_path, capsys):
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "1"]) == 0
    ckpt = os.path.join(tiny_flags[tiny_flags.index("--checkpoint_dir") + 1], "flow_matching_final.pt")
    assert generate_flow_matching.main(["--checkpoint", ckpt, "--class_grid", "--sampler", "meanflow",
                                        "--output_dir", str(tmp_path / "o")]) == 2
    assert "--sampler meanflow needs a MeanFlow checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        train_flow_matching.main(tiny_flags + ["--sampler", "meanflow"])
    assert exit_info.value.code == 2
    assert "--sampler meanflow needs a MeanFlow model" in capsys.readouterr().err


def test_init_from_a_checkpoint_of_another_shape_is_a_clear_error(tiny_flags, tmp_path, capsys):
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "1", "--checkpoint_dir", str(tmp_path / "a")]) == 0
    ckpt = str(tmp_path / "a" / "flow_matching_final.pt")
    assert train_flow_matching.main(tiny_flags + ["--objective", "meanflow", "--init_from", ckpt, "--depth", "3",
                                                  "--checkpoint_dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "depth: checkpoint 2 vs now 3" in err and "--init_from builds the model from this run's flags" in err
    # into the folder of the run it starts from: a folder of its own is the fix (resuming would be wrong)
    assert train_flow_matching.main(tiny_flags + ["--objective", "meanflow", "--init_from", ckpt,
                                                  "--checkpoint_dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "A run started with --init_from needs a --checkpoint_dir of its own" in err and "--resume" not in err


def test_init_from_weights_that_do_not_fit_says_why(tiny_flags, tmp_path, capsys):
    """A MeanFlow checkpoint cannot start a flow-matching run (its interval embedding has no place
    there); weights of other names (other code, or edited) are not blamed on MeanFlow. (At DiT's time
    scale, a flow-matching run's: MeanFlow's own default would be refused first, as another network.)"""
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "1", "--objective", "meanflow",
                                                  "--time_embed_scale", "1000", "--checkpoint_dir", str(tmp_path / "mf")]) == 0
    meanflow = str(tmp_path / "mf" / "flow_matching_final.pt")
    assert train_flow_matching.main(tiny_flags + ["--init_from", meanflow, "--checkpoint_dir", str(tmp_path / "a")]) == 2
    assert "a MeanFlow checkpoint only initializes a MeanFlow run" in capsys.readouterr().err
    edited = load_checkpoint(meanflow)
    edited["model"]["registers"] = torch.zeros(4, 32)
    save_checkpoint(edited, meanflow)
    assert train_flow_matching.main(tiny_flags + ["--objective", "meanflow", "--init_from", meanflow,
                                                  "--checkpoint_dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "unexpected ['registers']" in err and "written by other code or edited" in err and "MeanFlow" not in err


def test_adaptive_weight_is_a_stop_gradient_power_of_the_error():
    """loss = mean_i sg(w_i) * e_i with e_i the sample's mean square error and w_i = 1 / (e_i + c)^p:
    its value is mean_i e_i / (e_i + c)^p and its gradient that of the weighted MSE. The unweighted
    mean_i e_i comes with it, detached, for the log."""
    u = torch.nn.Parameter(torch.tensor([[0.5, -1.0], [2.0, 0.0]]).reshape(2, 1, 1, 2))
    data = torch.zeros(2, 1, 1, 2)
    noise = torch.zeros(2, 1, 1, 2)     # target v = data - noise = 0 (r = t: ratio 0)
    loss, mse = fm.meanflow_loss(lambda x, t, y, r: u, data, None, num_classes=0, ratio=0.0, adaptive_p=0.75,
                                 adaptive_c=0.1, guidance_mix=0.0, noise=noise)
    e = u.detach().pow(2).flatten(1).mean(1)
    w = 1.0 / (e + 0.1) ** 0.75
    torch.testing.assert_close(loss, (w * e).mean())
    torch.testing.assert_close(mse, e.mean())
    assert not mse.requires_grad
    loss.backward()
    torch.testing.assert_close(u.grad, (w.reshape(2, 1, 1, 1) * 2 * u.detach() / 2) / 2)


def test_the_objective_passes_the_configs_meanflow_fields_to_the_loss():
    """FlowMatchingObjective's MeanFlow loss is meanflow_loss with every --meanflow_* field of the
    config (ratio, tangent, adaptive weight, guidance) and its --time_sampling, on the same draws; its `mse` is the unweighted
    error of those draws (meanflow_loss without the adaptive weight), apart from the weighted loss."""
    from configs.cli import make_config
    from training.objectives import FlowMatchingObjective
    from training.trainer import Draws

    fields = dict(meanflow_ratio=0.6, meanflow_tangent="predicted", meanflow_adaptive_p=0.5, meanflow_adaptive_c=0.1,
                  meanflow_guidance_scale=0.8, meanflow_guidance_mix=0.3, time_sampling="logit_normal",
                  logit_normal_mean=0.4, logit_normal_std=0.7)
    times = dict(times=fm.TimeDistribution("logit_normal", 0.4, 0.7))
    config = make_config(FlowMatchingConfig, dict(objective="meanflow", num_classes=3, image_size=8, in_channels=1,
                                                  **fields))
    torch.manual_seed(0)
    model = DiT2D(8, 2, 1, 32, 1, 2, 4.0, 3, two_times=True)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    x, y = torch.rand(6, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0, 1, 2])

    def draws():
        return Draws(torch.Generator().manual_seed(4), torch.arange(6), 6, 0)

    loss, extras = FlowMatchingObjective(config, torch.device("cpu")).loss(model, (x, y), draws())
    d = draws()
    expected, _ = fm.meanflow_loss(model, x, y, num_classes=3, class_dropout_prob=0.1, ratio=0.6, tangent="predicted",
                                adaptive_p=0.5, adaptive_c=0.1, guidance_scale=0.8, guidance_mix=0.3, **times,
                                generator=d.generator, rows=d.rows, num_rows=6, noise=d.normal(x.shape[1:], x.dtype))
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    d = draws()
    unweighted, _ = fm.meanflow_loss(model, x, y, num_classes=3, class_dropout_prob=0.1, ratio=0.6, tangent="predicted",
                                     adaptive_p=0.0, guidance_scale=0.8, guidance_mix=0.3, **times, generator=d.generator,
                                     rows=d.rows, num_rows=6, noise=d.normal(x.shape[1:], x.dtype))
    torch.testing.assert_close(extras["mse"], unweighted, rtol=0, atol=0)
    assert (extras["mse"] - loss).abs() > 0.1
    d = draws()
    conditional, _ = fm.meanflow_loss(model, x, y, num_classes=3, class_dropout_prob=0.1, ratio=0.6, adaptive_p=0.5,
                                   adaptive_c=0.1, guidance_scale=0.8, guidance_mix=0.3, **times,
                                   generator=d.generator, rows=d.rows, num_rows=6, noise=d.normal(x.shape[1:], x.dtype))
    assert (loss - conditional).abs() > 1e-6   # the tangent matters on these draws


def test_meanflow_drops_labels_to_the_null_label():
    """class_dropout_prob of the labels the MeanFlow model is trained on are the null label (3 classes:
    label 3), as in flow_matching_loss: the guided target's u(x_t, t, t | null) and CFG at sampling
    need a trained null class."""
    seen = []

    def model(x_t, t, y, r):
        seen.append(y)
        return torch.zeros_like(x_t)

    n = 20_000
    y = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(1))
    fm.meanflow_loss(model, torch.zeros(n, 1, 1, 1), y, num_classes=3, class_dropout_prob=0.1, ratio=0.0,
                     generator=torch.Generator().manual_seed(0))
    labels = torch.cat(seen)
    assert len(labels) == n   # ratio 0, no guidance: the loss's own forward only
    dropped = (labels == 3).float().mean().item()
    assert 0.09 < dropped < 0.11, dropped   # binomial std 0.002 around 0.1
    assert torch.equal(labels[labels != 3], y[labels != 3])
