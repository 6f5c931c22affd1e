"""The flow-matching module against analytic fields: path, loss, solvers' order, CFG, noise."""

import dataclasses
import math

import pytest
import torch

import flow_matching as fm
from evaluation import sampling
from models.dit_2d import DiT2D
from tests.conftest import overfit_eight_images


def test_path_endpoints_and_target():
    noise, data = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    assert torch.equal(fm.interpolate(noise, data, torch.zeros(3)), noise)
    assert torch.equal(fm.interpolate(noise, data, torch.ones(3)), data)
    assert torch.equal(fm.target_velocity(noise, data), data - noise)


def test_path_inside_is_linear_per_sample():
    """Each row at its own t (3 rows of 3 channels: a t broadcast along channels would also fit the
    shapes), checked element by element against (1 - t) noise + t data."""
    noise, data, t = torch.randn(3, 3, 2, 2), torch.randn(3, 3, 2, 2), torch.tensor([0.1, 0.5, 0.9])
    x_t = fm.interpolate(noise, data, t)
    for i in range(3):
        torch.testing.assert_close(x_t[i], (1 - t[i]) * noise[i] + t[i] * data[i], rtol=0, atol=1e-6)


def test_loss_target_is_data_minus_noise():
    """The model sees x_t = (1 - t) noise + t data at the drawn t, and a model that returns exactly
    data - noise has zero loss."""
    data = torch.randn(6, 1, 4, 4)
    seen = {}

    def oracle(x_t, t, y):
        seen["x_t"], seen["t"], seen["y"] = x_t, t, y
        return torch.zeros_like(x_t)

    gen = torch.Generator().manual_seed(0)
    loss0 = fm.flow_matching_loss(oracle, data, torch.zeros(6, dtype=torch.long), num_classes=3,
                                  class_dropout_prob=0.0, generator=gen)
    # Replay the same draws: the loss with v = 0 is E|data - noise|^2.
    gen.manual_seed(0)
    t = torch.rand(6, generator=gen)
    noise = torch.randn(data.shape, generator=gen)
    assert torch.equal(seen["t"], t)
    torch.testing.assert_close(seen["x_t"], (1 - t.view(6, 1, 1, 1)) * noise + t.view(6, 1, 1, 1) * data)
    torch.testing.assert_close(loss0, (data - noise).square().mean())

    def perfect(x_t, t, y):
        return data - noise

    gen.manual_seed(0)
    assert fm.flow_matching_loss(perfect, data, None, num_classes=0, generator=gen) == 0


class Recorder:
    """A stand-in model that records its inputs and predicts v = 0."""

    def __call__(self, x_t, t, y):
        self.x_t, self.t, self.y = x_t, t, y
        return torch.zeros_like(x_t)


def test_label_dropout_rate():
    y = torch.randint(0, 10, (100_000,), generator=torch.Generator().manual_seed(0))
    model = Recorder()
    fm.flow_matching_loss(model, torch.zeros(100_000, 1, 1, 1), y, num_classes=10, class_dropout_prob=0.1,
                          generator=torch.Generator().manual_seed(1))
    dropped = model.y == 10
    assert abs(dropped.float().mean().item() - 0.1) < 0.005
    assert torch.equal(model.y[~dropped], y[~dropped])
    fm.flow_matching_loss(model, torch.zeros(1000, 1, 1, 1), y[:1000], num_classes=10, class_dropout_prob=0.0)
    assert torch.equal(model.y, y[:1000])


def test_any_split_of_a_batch_gets_the_same_draws():
    """Rows of a global batch, drawn in two interleaved halves, see the same t, noise and dropout
    as in one piece, so the loss of the whole equals the mean of the halves."""
    data, y = torch.randn(8, 2, 2, 2), torch.arange(8) % 3
    seed = 5
    full = Recorder()
    whole = fm.flow_matching_loss(full, data, y, num_classes=3, class_dropout_prob=0.5,
                                  generator=torch.Generator().manual_seed(seed))
    halves = []
    for start in (0, 1):
        rows = torch.arange(start, 8, 2)
        part = Recorder()
        halves.append(fm.flow_matching_loss(part, data[rows], y[rows], num_classes=3, class_dropout_prob=0.5,
                                            generator=torch.Generator().manual_seed(seed), rows=rows, num_rows=8))
        assert torch.equal(part.t, full.t[rows]) and torch.equal(part.x_t, full.x_t[rows])
        assert torch.equal(part.y, full.y[rows])
    torch.testing.assert_close(whole, (halves[0] + halves[1]) / 2)


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (0.5, 0.7), (-1.0, 1.6)])
def test_logit_normal_time_has_the_asked_mean_and_std(mean, std):
    t = fm.TimeDistribution("logit_normal", mean, std).sample(200_000, "cpu", generator=torch.Generator().manual_seed(0))
    z = torch.logit(t.double())
    assert abs(z.mean().item() - mean) < 0.01 and abs(z.std().item() / std - 1) < 0.01


def test_uniform_time_is_uniform():
    t = fm.TimeDistribution("uniform").sample(200_000, "cpu", generator=torch.Generator().manual_seed(0)).double()
    assert abs(t.mean().item() - 0.5) < 0.003 and abs(t.var().item() - 1 / 12) < 0.001
    assert abs((t < 0.1).double().mean().item() - 0.1) < 0.003


@pytest.mark.parametrize("scheme", fm.TIME_SAMPLINGS)
def test_every_time_sampling_draws_t_in_the_unit_interval(scheme):
    """t is a time of the path: a scheme that drew outside [0, 1] would train on extrapolated
    x_t with nothing downstream to notice (the loss reads no t back, so no check in the step)."""
    t = fm.TimeDistribution(scheme).sample(100_000, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.shape == (100_000,) and t.dtype == torch.float32
    assert 0 <= t.min() and t.max() <= 1


def test_logit_normal_time_lies_in_unit_interval_and_centres():
    t = fm.TimeDistribution("logit_normal").sample(50_000, "cpu", generator=torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    assert abs(t.median().item() - 0.5) < 0.01
    with pytest.raises(ValueError, match="unknown time sampling"):
        fm.TimeDistribution("no_such_scheme")


# ----------------------------------------------------------------------------- solvers

# What each ODE solver of fm.SAMPLERS promises, keyed by name: the solver tests below run over
# FLOW_SAMPLERS, so a solver added there without its rows here fails them (KeyError) instead of
# going untested. meanflow is not an ODE solver of v (tests/test_meanflow.py).
FLOW_SAMPLERS = [s for s in fm.SAMPLERS if s != "meanflow"]
ORDER = {"euler": 1, "heun": 2, "midpoint": 2, "ab2": 2}
NFE = {"euler": lambda n: n, "heun": lambda n: 2 * n - 1,    # heun's last step is an Euler step (never t = 1)
       "midpoint": lambda n: 2 * n, "ab2": lambda n: n}      # ab2 reuses the previous step's velocity
# The times the model is asked at over 4 steps, on the uniform grid and at time_shift 3 (0, 0.1, 0.25, 0.5, 1).
TIMES_4_STEPS = {"euler": [0.0, 0.25, 0.5, 0.75],
                 "heun": [0.0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75],   # never t = 1
                 "midpoint": [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875],
                 "ab2": [0.0, 0.25, 0.5, 0.75]}
TIMES_4_STEPS_SHIFT_3 = {"euler": [0.0, 0.1, 0.25, 0.5],
                         "heun": [0.0, 0.1, 0.1, 0.25, 0.25, 0.5, 0.5],
                         "midpoint": [0.0, 0.05, 0.1, 0.175, 0.25, 0.375, 0.5, 0.75],
                         "ab2": [0.0, 0.1, 0.25, 0.5]}


def point_field(mu):
    """The exact velocity when all data is the single point mu: v = (mu - x) / (1 - t)."""
    return lambda x, t: (mu - x) / (1 - t)


@pytest.mark.parametrize("sampler", FLOW_SAMPLERS)
@pytest.mark.parametrize("shift", [1.0, 3.0, 1 / 3])
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 50])
def test_every_solver_lands_exactly_on_a_single_point(steps, shift, sampler):
    """Whatever the grid: Euler's last step starts at t0 and has dt = 1 - t0, which cancels
    1 / (1 - t0). On the exact straight path the velocity is the constant mu - noise, so every
    consistent solver lands exactly: midpoint's and Heun's stages stay on the line, ab2's
    extrapolation through the previous velocity changes nothing. A solver that evaluated the
    field at t = 1 would divide by zero here."""
    mu = torch.tensor([[1.5, -2.0, 0.25]], dtype=torch.float64)
    x0 = torch.randn(5, 3, dtype=torch.float64)
    x1, nfe = fm.integrate(point_field(mu), x0, steps, sampler, time_shift=shift)
    torch.testing.assert_close(x1, mu.expand(5, 3), rtol=0, atol=1e-12)
    assert nfe == NFE[sampler](steps)


def test_time_grid_runs_from_exactly_0_to_exactly_1_and_increases():
    for shift in (1.0, 3.0, 1 / 3, 0.1, 7.3, 1e-3, 1e3):
        for steps in (1, 2, 3, 7, 50, 1000):
            ts = fm.time_grid(steps, shift)
            assert len(ts) == steps + 1 and ts[0] == 0.0 and ts[-1] == 1.0, (shift, steps)
            assert all(a < b for a, b in zip(ts, ts[1:])), (shift, steps)


def test_time_grid_shift_moves_the_steps_toward_noise_or_data():
    for steps in (1, 3, 10, 50):
        assert fm.time_grid(steps, 1.0) == torch.linspace(0, 1, steps + 1, dtype=torch.float64).tolist()
    for steps in (2, 5, 20):
        toward_noise, toward_data = fm.time_grid(steps, 3.0), fm.time_grid(steps, 1 / 3)
        assert toward_noise[1] - toward_noise[0] < toward_noise[-1] - toward_noise[-2]  # small steps near t = 0
        assert toward_data[1] - toward_data[0] > toward_data[-1] - toward_data[-2]
    # u = 1/4, s = 3: t = u / (s - (s - 1) u) = 0.25 / 2.5; SD3's sigma' = s sigma / (1 + (s - 1) sigma) at
    # sigma = 1 - u = 0.75 is 2.25 / 2.5 = 0.9 = 1 - t.
    assert fm.time_grid(4, 3.0)[1] == pytest.approx(0.1, rel=1e-15)
    assert fm.time_grid(4, 3.0) == pytest.approx([0.0, 0.1, 0.25, 0.5, 1.0], rel=1e-15)
    assert fm.time_grid(4, 1 / 3) == pytest.approx([0.0, 0.5, 0.75, 0.9, 1.0], rel=1e-15)


@pytest.mark.parametrize("shift", [0.0, -1.0, math.inf, math.nan])
def test_time_grid_refuses_a_shift_that_is_not_positive_and_finite(shift):
    with pytest.raises(ValueError, match=f"time shift must be .* got {shift}"):
        fm.time_grid(4, shift)


def gaussian_field(m, s):
    """Exact velocity for data N(m, s^2) per coordinate and noise N(0, 1):
    v(x, t) = m + (t s^2 - (1 - t)) / ((1 - t)^2 + t^2 s^2) * (x - t m); the flow maps z to m + s z."""
    def v(x, t):
        a, b = 1 - t, t
        return m + (b * s * s - a) / (a * a + b * b * s * s) * (x - b * m)
    return v


def observed_orders(field, x0, exact, sampler, steps=(16, 32, 64, 128), shift=1.0):
    errors = []
    for n in steps:
        x1, _ = fm.integrate(field, x0.clone(), n, sampler, time_shift=shift)
        errors.append((x1 - exact).abs().max().item())
    return [math.log2(a / b) for a, b in zip(errors, errors[1:])]


@pytest.mark.parametrize("sampler", FLOW_SAMPLERS)
def test_solver_order_on_a_gaussian(sampler):
    """Error at t = 1 against the exact map z -> m + s z. On this linear field the midpoint rule
    happens to be superconvergent (order 3), so it is held to 'at least 2' here and to exactly 2
    on the nonlinear field below."""
    m, s = 0.7, 0.3
    z = torch.linspace(-2, 2, 41, dtype=torch.float64)
    observed, order = observed_orders(gaussian_field(m, s), z, m + s * z, sampler), ORDER[sampler]
    if sampler == "midpoint":
        assert all(o > order - 0.15 for o in observed), observed
    else:
        assert all(abs(o - order) < 0.15 for o in observed), observed


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("sampler", FLOW_SAMPLERS)
def test_solver_order_on_a_nonlinear_field(sampler, shift):
    """dx/dt = x^2 + sin(t), against a 4096-step Heun reference, on the uniform and a shifted grid."""
    def field(x, t):
        return x * x + math.sin(t)
    x0 = torch.tensor([0.5, -0.3], dtype=torch.float64)
    reference, _ = fm.integrate(field, x0.clone(), 4096, "heun")
    steps = (32, 64, 128) if shift == 1.0 else (128, 256, 512)  # the shifted grid's orders settle later
    observed = observed_orders(field, x0, reference, sampler, steps=steps, shift=shift)
    assert all(abs(o - ORDER[sampler]) < 0.15 for o in observed), observed


@pytest.mark.parametrize("shift", [1.0, 3.0, 1 / 3])
def test_ab2_is_exact_after_its_first_step_for_a_velocity_linear_in_t(shift):
    """Each ab2 step integrates the line through the last two velocities, so for v = a + b t only
    its first (Euler) step errs, by b t_1^2 / 2, on any grid: unequal steps need their own weights
    (the equal-step 3/2, -1/2 miss here on the shifted grids)."""
    a, b = torch.tensor([0.3, -1.2], dtype=torch.float64), 2.5
    x0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    t1 = fm.time_grid(6, shift)[1]
    x1, _ = fm.integrate(lambda x, t: a + b * t + 0 * x, x0, 6, "ab2", time_shift=shift)
    torch.testing.assert_close(x1, x0 + a + b / 2 - b * t1 ** 2 / 2, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sampler", FLOW_SAMPLERS)
def test_solver_counts_the_evaluations_it_makes(sampler):
    """integrate's NFE (which generate and evaluate_fid print) is the number of field calls."""
    calls = []

    def field(x, t):
        calls.append(t)
        return -x
    for steps in (1, 5):
        calls.clear()
        assert fm.integrate(field, torch.ones(2, dtype=torch.float64), steps, sampler)[1] == len(calls) == NFE[sampler](steps)


@pytest.mark.parametrize("sampler", FLOW_SAMPLERS)
@pytest.mark.parametrize("interval", [None, (0.25, 0.75), (0.3, 0.45), (0.9, 0.95)])
def test_guided_nfe_counts_the_forwards_that_run_both_rows(sampler, interval):
    """guided_nfe's dry run of the solver agrees with sample(): the forwards whose batch holds both
    CFG rows, at 4 steps with time shift 3 (grid 0, 0.1, 0.25, 0.5, 1); none at cfg_scale 1."""
    model = LabelModel()
    settings = fm.SamplingSettings(sampler, 4, cfg_scale=2.0, guidance_interval=interval, time_shift=3.0)
    fm.sample(model, torch.randn(3, 2), torch.tensor([0, 1, 2]), settings, num_classes=3)
    assert settings.guided_nfe() == sum(rows == 6 for rows in model.calls)
    assert dataclasses.replace(settings, cfg_scale=1.0).guided_nfe() == 0


def test_solver_bad_arguments():
    field = gaussian_field(0.0, 1.0)
    x = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_steps"):
        fm.integrate(field, x, 0)
    with pytest.raises(ValueError, match="unknown sampler 'no_such_sampler'"):
        fm.integrate(field, x, 2, "no_such_sampler")


# ----------------------------------------------------------------------------- guidance

class LabelModel(torch.nn.Module):
    """v = x * (1 + y): the conditional and null-label fields differ in a known way."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append(x.shape[0])
        return x * (1 + y.float()).reshape(-1, 1)


@pytest.mark.parametrize("sampler", FLOW_SAMPLERS)
def test_sample_gives_the_model_the_time_of_the_convention(sampler):
    """sample() integrates from t = 0 (noise) to t = 1 (data) and tells the model those times, as
    training does (t = 1 is data): every row of every forward gets the step's t."""
    seen = []

    def model(x, t, y):
        seen.append(t.clone())
        return torch.zeros_like(x)

    fm.sample(model, torch.randn(3, 1, 2, 2), torch.tensor([0, 1, 2]), fm.SamplingSettings(sampler, 4), num_classes=3)
    assert [t[0].item() for t in seen] == pytest.approx(TIMES_4_STEPS[sampler])
    assert all(torch.equal(t, t[:1].expand_as(t)) for t in seen)


@pytest.mark.parametrize("sampler", FLOW_SAMPLERS)
def test_generate_images_steps_through_the_shifted_grid(sampler):
    """time_shift reaches the solver through generate_images and sample: 4 steps at shift 3 are
    the grid 0, 0.1, 0.25, 0.5, 1 (midpoint: the middle of each step)."""
    seen = []

    def model(x, t, y):
        seen.append(t[0].item())
        return torch.zeros_like(x)

    sampling.generate_images(model, torch.tensor([0, 1]), fm.SamplingSettings(sampler, 4, time_shift=3.0),
                             shape=(1, 2, 2), num_classes=3, seed=0)
    assert seen == pytest.approx(TIMES_4_STEPS_SHIFT_3[sampler], rel=1e-6)  # the model gets t in float32


@pytest.mark.parametrize("sampler, interval, guided", [
    ("euler", (0.25, 0.75), [False, True, True, True]),                              # t = 0, .25, .5, .75
    ("heun", (0.25, 0.5), [False, True, True, True, True, False, False]),      # 0, .25, .25, .5, .5, .75, .75
    ("heun", (0.0, 0.0), [True] + [False] * 6),
    ("heun", (0.75, 1.0), [False] * 5 + [True, True]),
])
def test_guidance_interval_includes_both_of_its_ends(sampler, interval, guided):
    """The model sees the null label exactly at the grid times a <= t <= b (grids that hit a and b)."""
    seen = []

    def model(x, t, y):
        null = y == 3
        assert null.sum() in (0, len(y) // 2)                # all conditional, or a CFG batch: half null
        seen.append(bool(null.any()))
        return torch.zeros_like(x)

    fm.sample(model, torch.randn(2, 1, 2, 2), torch.tensor([0, 2]),
              fm.SamplingSettings(sampler, 4, cfg_scale=2.0, guidance_interval=interval), num_classes=3)
    assert seen == guided


def test_a_config_interval_of_0_1_is_no_interval():
    assert fm.guidance_interval_or_none(0.0, 1.0) is None
    assert fm.guidance_interval_or_none(0.0, 0.9) == (0.0, 0.9)
    assert fm.guidance_interval_or_none(0.1, 1.0) == (0.1, 1.0)


def test_cfg_scales_match_the_formula_in_one_batched_call():
    num_classes = 4
    x, y = torch.randn(3, 5), torch.tensor([0, 1, 2])
    cond = x * (1 + y.float()).reshape(-1, 1)
    uncond = x * (1 + num_classes)
    for scale, expected in [(0.0, uncond), (1.0, cond), (3.0, uncond + 3.0 * (cond - uncond))]:
        model = LabelModel()
        v = fm.guided_velocity(model, y, num_classes=num_classes, cfg_scale=scale)(x, 0.5)
        torch.testing.assert_close(v, expected)
        assert model.calls == ([3] if scale == 1.0 else [6])


def test_guidance_interval_is_respected():
    num_classes = 4
    x, y = torch.randn(2, 3), torch.tensor([1, 3])
    model = LabelModel()
    field = fm.guided_velocity(model, y, num_classes=num_classes, cfg_scale=2.0, guidance_interval=(0.3, 0.6))
    cond = x * (1 + y.float()).reshape(-1, 1)
    torch.testing.assert_close(field(x, 0.1), cond)
    torch.testing.assert_close(field(x, 0.9), cond)
    uncond = x * (1 + num_classes)
    torch.testing.assert_close(field(x, 0.45), uncond + 2.0 * (cond - uncond))
    assert model.calls == [2, 2, 4]
    with pytest.raises(ValueError, match="guidance interval"):
        fm.guided_velocity(model, y, num_classes=4, cfg_scale=2.0, guidance_interval=(0.7, 0.2))


def test_cfg_on_unconditional_model_is_an_error():
    with pytest.raises(ValueError, match="unconditional"):
        fm.guided_velocity(LabelModel(), None, num_classes=0, cfg_scale=2.0)


def test_sample_checks_labels():
    model = DiT2D(input_size=4, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=3)
    noise = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        fm.sample(model, noise, torch.tensor([0, 3]), fm.SamplingSettings(num_steps=1), num_classes=3)
    x, nfe = fm.sample(model, noise, torch.tensor([0, 2]), fm.SamplingSettings(num_steps=3, cfg_scale=2.0), num_classes=3)
    assert torch.equal(x, noise) and nfe == 3  # a fresh DiT predicts v = 0


# ----------------------------------------------------------------------------- noise

def test_per_sample_noise_depends_only_on_seed_and_index():
    full = fm.per_sample_noise(5, range(6), (2, 3))
    part = fm.per_sample_noise(5, [4, 1], (2, 3))
    assert torch.equal(part[0], full[4]) and torch.equal(part[1], full[1])
    assert not torch.equal(fm.per_sample_noise(6, [1], (2, 3))[0], full[1])
    assert fm.sample_seed(0, 2 ** 31 - 1) != fm.sample_seed(1, 0)
    # Neighbouring seeds share no sample's noise (seed + index would give seed 6 seed 5's, shifted).
    assert len({fm.sample_seed(seed, i) for seed in range(4) for i in range(100)}) == 400
    # Different samples get different noise (one seed for all would pass the lines above).
    assert len({tuple(row.flatten().tolist()) for row in full}) == 6


# ----------------------------------------------------------------------------- learning

def test_tiny_dit_overfits_eight_images():
    """Eight images with eight distinct labels: the conditional velocity is exactly learnable."""
    start, end = overfit_eight_images(lambda model: torch.optim.AdamW(model.parameters(), lr=3e-3), steps=300)
    assert end < 0.3 * start, (start, end)
