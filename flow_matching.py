"""Flow matching: the probability path, the training loss, time sampling, ODE samplers and CFG.

The one convention of this repo, used everywhere:

    t = 0 is noise, t = 1 is data;   x_t = (1 - t) * noise + t * data;   v = dx_t/dt = data - noise.

The model learns v(x_t, t, y) by regressing data - noise (MSE); sampling integrates dx/dt = v from
t = 0 (Gaussian noise) to t = 1 (data). Training, generation, evaluation and benchmarks all import
this module; nothing else carries a sampling loop.
"""

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from utils.validation import check_guidance_interval

TIME_SAMPLINGS = ("uniform", "logit_normal")
SAMPLERS = ("euler", "heun", "midpoint", "ab2", "meanflow")

# v(x, t), or with r the average velocity u(x, t, r) of a MeanFlow model (r = None: instantaneous).
VelocityFn = Callable[..., torch.Tensor]


# ----------------------------------------------------------------------------- the path

def interpolate(noise: torch.Tensor, data: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) * noise + t * data, with t (B,) broadcast over the other dimensions."""
    t = t.reshape(-1, *([1] * (data.dim() - 1))).to(data.dtype)
    return (1 - t) * noise + t * data


def target_velocity(noise: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """The conditional velocity of the straight path: data - noise."""
    return data - noise


@dataclass(frozen=True)
class TimeDistribution:
    """The training times t: "uniform", U(0, 1), or "logit_normal", the sigmoid of N(mean, std^2)
    (SD3), which alone reads mean and std (--logit_normal_mean / --logit_normal_std). SD3 writes t
    for the noise level (1 - t here): a mean taken from its paper flips sign. The losses take it
    whole, so a new scheme is its name in TIME_SAMPLINGS, its parameters as fields and its branch in
    sample (and the config fields the trainer builds it from)."""
    scheme: str = "uniform"
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self):
        if self.scheme not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time sampling {self.scheme!r}; choose from {', '.join(TIME_SAMPLINGS)}")

    def sample(self, batch: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """t (batch,) in [0, 1]."""
        if self.scheme == "logit_normal":
            return torch.sigmoid(self.mean + self.std * torch.randn(batch, device=device, generator=generator))
        return torch.rand(batch, device=device, generator=generator)


def flow_matching_loss(model: Callable, data: torch.Tensor, y: Optional[torch.Tensor], *,
                       num_classes: int, class_dropout_prob: float = 0.1,
                       times: TimeDistribution = TimeDistribution(), generator: Optional[torch.Generator] = None,
                       rows: Optional[torch.Tensor] = None, num_rows: Optional[int] = None,
                       noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MSE between model(x_t, t, y') and data - noise, averaged over every element.

    t is drawn from `times`; y' is y with labels dropped to the null label (`num_classes`) with
    probability `class_dropout_prob`; an unconditional model (num_classes = 0) gets y = None.

    Randomness (t, dropout, and the noise unless `noise` is given) comes from `generator`. With
    `rows`, the draws are made for a whole batch of `num_rows` samples and rows `rows` are kept:
    every split of one global batch over ranks and micro-batches then gives each sample the same
    t, noise and dropout (the trainer passes `noise` from its own generator, `Draws.normal`, drawn
    for the whole batch the same way, so that the noise does not depend on how many t and dropout
    draws a step makes).
    """
    B = data.shape[0]
    n = B if rows is None else num_rows

    def keep(drawn: torch.Tensor) -> torch.Tensor:
        return drawn if rows is None else drawn[rows]

    t = keep(times.sample(n, data.device, generator))
    if noise is None:
        noise = keep(torch.randn((n, *data.shape[1:]), device=data.device, dtype=data.dtype, generator=generator))
    if num_classes > 0 and class_dropout_prob > 0:
        drop = keep(torch.rand(n, device=data.device, generator=generator)) < class_dropout_prob
        y = torch.where(drop, torch.full_like(y, num_classes), y)
    elif num_classes == 0:
        y = None
    v = model(interpolate(noise, data, t), t, y)
    return F.mse_loss(v.float(), target_velocity(noise, data).float())


# ----------------------------------------------------------------------------- MeanFlow

def sample_time_pair(batch: int, device, ratio: float, times: TimeDistribution = TimeDistribution(),
                     generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """MeanFlow's (t, r), each (batch,), t <= r: two draws of `times`, t the smaller (nearer
    noise); then r = t (an instantaneous velocity) for all but a share `ratio` of the samples."""
    a = times.sample(batch, device, generator)
    b = times.sample(batch, device, generator)
    t, r = torch.minimum(a, b), torch.maximum(a, b)
    keep = torch.rand(batch, device=device, generator=generator) < ratio
    return t, torch.where(keep, r, t)


def meanflow_loss(model: Callable, data: torch.Tensor, y: Optional[torch.Tensor], *, num_classes: int,
                  class_dropout_prob: float = 0.1, ratio: float = 0.25, times: TimeDistribution = TimeDistribution(),
                  guidance_scale: float = 1.0, guidance_mix: float = 0.0, adaptive_p: float = 1.0,
                  adaptive_c: float = 1e-3, tangent: str = "conditional", jvp_model: Optional[Callable] = None,
                  generator: Optional[torch.Generator] = None, rows: Optional[torch.Tensor] = None,
                  num_rows: Optional[int] = None, noise: Optional[torch.Tensor] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """MeanFlow (Geng et al. 2025): regress the average velocity u(x_t, t, r) onto its identity.

    In this repo's convention (t = 0 noise, t = 1 data) the flow moves forward in t, and the
    average velocity from t to r >= t along the trajectory x_s of the (marginal) velocity v is

        u(x_t, t, r) = 1 / (r - t) * integral_t^r v(x_s, s) ds,   so   x_r = x_t + (r - t) u(x_t, t, r).

    Differentiating (r - t) u = integral_t^r v ds in t, with r fixed and x_t moving along the flow:

        -u + (r - t) du/dt = -v(x_t, t)   =>   u = v + (r - t) du/dt,
        du/dt = v . d_x u + d_t u         (the total derivative: a JVP with tangent (v, 1, 0) on (x, t, r)).

    This is the paper's u = v - (t - r) du/dt, with its t (noise side) and r written in our
    orientation. The target replaces v by the conditional velocity data - noise (whose mean given x_t
    is v, as in flow matching) and du/dt by the model's own JVP, under a stop-gradient:

        target = v_g + (r - t) * sg(du_theta/dt),      loss = sg(w) * ||u_theta - target||^2,

    per sample, with the adaptive weight w = 1 / (||.||^2 + c)^p (the mean square over elements;
    p = 0 is plain MSE). Returns (loss, mse): the weighted loss to minimize and the unweighted mean
    square error, detached (at p = 1 the loss is mean(e / (e + c)), ~1 for any error e >> c; the mse's
    target moves with the model's du/dt, so it can grow while the model improves: docs/meanflow.md). At r = t the target is v_g: the flow-matching loss. du/dt is taken by
    forward-mode AD (torch.func.jvp) only on the samples with r != t, without a graph (it is a
    target); `jvp_model` is the model to differentiate (the unwrapped module under DDP or compile:
    the gradient still comes from `model`'s own forward, which DDP all-reduces).

    Guidance (the paper's guided target, so that one evaluation gives a guided sample): for samples
    whose label was kept, v_g = w_s * v + k * u(x_t, t, t | y) + (1 - w_s - k) * u(x_t, t, t | null),
    both u under a stop-gradient; its fixed point is CFG at scale w_s / (1 - k) on the average
    velocity. Dropped labels (the null class) keep v_g = v. w_s = 1, k = 0 turns it off.

    The JVP's tangent along x: `tangent="conditional"` is the paper's v_g, a single noisy draw of the
    velocity; `"predicted"` is the model's own instantaneous velocity u_theta(x_t, t, t | y) (with
    guidance, the guided velocity it learns), under a stop-gradient: the change of Improved MeanFlow
    (Geng et al. 2025b) that makes du/dt follow the trajectory the sampler follows, at the price of a
    forward on the jumping samples when guidance does not already provide it. Both have the exact u
    as a fixed point; the regression target keeps v_g either way.
    Randomness follows flow_matching_loss (`generator`, `rows`, `noise`).
    """
    B = data.shape[0]
    n = B if rows is None else num_rows

    def keep(drawn: torch.Tensor) -> torch.Tensor:
        return drawn if rows is None else drawn[rows]

    t, r = sample_time_pair(n, data.device, ratio, times, generator)
    t, r = keep(t), keep(r)
    if noise is None:
        noise = keep(torch.randn((n, *data.shape[1:]), device=data.device, dtype=data.dtype, generator=generator))
    if num_classes > 0:
        drop = keep(torch.rand(n, device=data.device, generator=generator)) < class_dropout_prob
        y = torch.where(drop, torch.full_like(y, num_classes), y)
    else:
        y = None
    x_t = interpolate(noise, data, t)
    target = meanflow_target(jvp_model or model, x_t, t, r, y, target_velocity(noise, data).float(),
                             num_classes=num_classes, guidance_scale=guidance_scale, guidance_mix=guidance_mix,
                             tangent=tangent)
    u = model(x_t, t, y, r).float()
    squared = (u - target).pow(2).flatten(1).mean(1)                     # (B,)
    weight = 1.0 / (squared.detach() + adaptive_c) ** adaptive_p if adaptive_p else 1.0
    return (weight * squared).mean(), squared.detach().mean()


@torch.no_grad()
def meanflow_target(model: Callable, x_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                    y: Optional[torch.Tensor], v: torch.Tensor, *, num_classes: int = 0,
                    guidance_scale: float = 1.0, guidance_mix: float = 0.0,
                    tangent: str = "conditional") -> torch.Tensor:
    """MeanFlow's regression target v_g + (r - t) du/dt for the velocity v, in v's dtype, without a graph.

    `model(x, t, y, r)` is the average velocity; y holds the null label `num_classes` where it was
    dropped (no guidance there). du/dt is the JVP with tangent (d, 1, 0) on (x, t, r), d = v_g
    (`tangent="conditional"`) or the model's u(x, t, t | y) (`"predicted"`), taken only on the
    samples with r != t (at r = t the target is v_g). See meanflow_loss for the math.
    """
    assert tangent in ("conditional", "predicted"), tangent
    shape = (-1, *([1] * (v.dim() - 1)))
    u_c = None
    if y is not None and (guidance_scale != 1.0 or guidance_mix != 0.0):
        u_c, u_u = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, num_classes)]),
                         torch.cat([t, t])).to(v.dtype).chunk(2)
        guided = guidance_scale * v + guidance_mix * u_c + (1 - guidance_scale - guidance_mix) * u_u
        v = torch.where((y != num_classes).reshape(shape), guided, v)
    target = v.clone()
    jump = (r != t).nonzero().squeeze(1)
    if jump.numel():
        ys = None if y is None else y[jump]
        if tangent == "conditional":
            direction = v[jump]
        else:   # u_c is u(x_t, t, t | y) on every row already (y holds the null label where dropped)
            direction = u_c[jump] if u_c is not None else model(x_t[jump], t[jump], ys, t[jump])
        _, dudt = torch.func.jvp(lambda x_, t_, r_: model(x_, t_, ys, r_), (x_t[jump], t[jump], r[jump]),
                                 (direction.to(x_t.dtype), torch.ones_like(t[jump]), torch.zeros_like(r[jump])))
        target[jump] += (r - t)[jump].reshape(shape).to(v.dtype) * dudt.to(v.dtype)
    return target


# ----------------------------------------------------------------------------- guidance

def resolve_cfg_scale(cfg_scale: Optional[float], num_classes: int, default: float,
                      flag: str = "cfg_scale", class_dropout_prob: float = 0.1) -> float:
    """The guidance scale to sample at: `cfg_scale`, or `default` when None; an unconditional
    model (num_classes = 0) samples at 1 and refuses any other scale, and so does a model trained
    with class_dropout_prob 0, whose null label never learned a velocity (ValueError naming `flag`)."""
    if num_classes == 0:
        if cfg_scale not in (None, 1.0):
            raise ValueError(f"{flag} {cfg_scale} needs a class-conditional model; this one is "
                             f"unconditional (num_classes=0): use {flag} 1")
        return 1.0
    scale = default if cfg_scale is None else cfg_scale
    if scale != 1.0 and class_dropout_prob == 0:
        raise ValueError(f"{flag} {scale} guides with the null label, which this model never trained "
                         f"(class_dropout_prob=0): use {flag} 1, or train with --class_dropout_prob > 0")
    return scale


def guidance_interval_or_none(start: float, end: float) -> Optional[Tuple[float, float]]:
    """A config's guidance interval as sample() takes it: None for (0, 1), guidance on every step."""
    return None if (start, end) == (0.0, 1.0) else (start, end)


def guides_at(t: float, guidance_interval: Optional[Sequence[float]]) -> bool:
    """Whether CFG applies at time t: at every t without an interval, else at a <= t <= b."""
    return guidance_interval is None or guidance_interval[0] <= t <= guidance_interval[1]


def guided_velocity(model: Callable, y: Optional[torch.Tensor], *, num_classes: int,
                    cfg_scale: float = 1.0,
                    guidance_interval: Optional[Sequence[float]] = None) -> VelocityFn:
    """The velocity field v(x, t) the ODE solvers integrate, with classifier-free guidance.

    v = v_u + s * (v_c - v_u), cond and uncond in one batched forward. s == 1 (or an
    unconditional model) runs the conditional pass alone. With `guidance_interval` (a, b),
    guidance applies only while a <= t <= b; outside it the conditional velocity is used.
    The returned function takes x (B, ...), t as a Python float and, for a MeanFlow model's
    average velocity from t to r, r as a Python float (guidance then mixes average velocities).
    """
    resolve_cfg_scale(cfg_scale, num_classes, cfg_scale)
    if guidance_interval is not None:
        check_guidance_interval(*guidance_interval, "guidance interval (A, B)")
    y_both = None if cfg_scale == 1.0 else torch.cat([y, torch.full_like(y, num_classes)])

    def velocity(x: torch.Tensor, t: float, r: Optional[float] = None) -> torch.Tensor:
        B = x.shape[0]
        guided = y_both is not None and guides_at(t, guidance_interval)
        rows = 2 * B if guided else B
        times = [torch.full((rows,), t, device=x.device)]
        if r is not None:
            times.append(torch.full((rows,), r, device=x.device))
        if not guided:
            return model(x, times[0], y, *times[1:])
        v_c, v_u = model(torch.cat([x, x]), times[0], y_both, *times[1:]).chunk(2)   # each (B, C, H, W)
        return v_u + cfg_scale * (v_c - v_u)

    return velocity


# ----------------------------------------------------------------------------- ODE solvers

def time_grid(num_steps: int, shift: float = 1.0) -> List[float]:
    """The num_steps + 1 times a solver steps through, from exactly 0 (noise) to exactly 1 (data):
    t(u) = u / (shift - (shift - 1) * u) for u = linspace(0, 1, num_steps + 1), in float64.

    shift = 1 is the uniform grid; shift > 1 puts more (smaller) steps near noise (t = 0), shift < 1
    near data. This is SD3's timestep shift sigma' = s * sigma / (1 + (s - 1) * sigma) (Esser et al.
    2024, resolution-dependent shifting: more time at high noise for images of more pixels),
    written for the noise level sigma = 1 - t of this repo's path: 1 - t' = s * (1 - t) / (s - (s - 1) * t).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < shift < math.inf:
        raise ValueError(f"time shift must be a finite number > 0 (1 = a uniform grid), got {shift}")
    u = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    # The same t(u) as u / (u + shift * (1 - u)): at u = 1 the denominator is exactly 1 for any shift.
    return (u / (u + shift * (1 - u))).tolist()


def integrate(velocity: VelocityFn, x: torch.Tensor, num_steps: int, sampler: str = "euler",
              time_shift: float = 1.0) -> Tuple[torch.Tensor, int]:
    """Integrate dx/dt = velocity(x, t) from t = 0 to t = 1 over the num_steps steps of
    time_grid(num_steps, time_shift) (uniform for shift 1).

    Returns (x at t = 1, NFE): the number of velocity evaluations per sample (a CFG evaluation is
    one batched forward and counts once). Euler is first order with 1 NFE per step; Heun
    (trapezoidal predictor-corrector) and midpoint (at the middle of each step) are second order
    with 2 NFE per step, except Heun's last step, an Euler step (2K - 1 NFE in all): its corrector
    would evaluate the model at t = 1, where the learned velocity E[data - noise | x_1] = x_1 is a
    singular limit of the field just before it (the 1 / (1 - t) in v = (E[data | x_t] - x_t) / (1 - t)),
    not the slope of the trajectory; EDM's Heun skips its correction at sigma = 0 for the same
    reason. Measured on the quality proxy at 5 steps: FID 160 with the correction at t = 1.
    `ab2` (Adams-Bashforth, two steps) is second order at 1 NFE per step: each step evaluates the
    velocity once, at its start, and extrapolates it linearly in t through the previous step's
    velocity (x += dt * ((1 + r) v_n - r v_(n-1)), r = dt_n / (2 dt_(n-1)), for any grid); its first
    step, with no previous velocity, is an Euler step. Like Euler it never evaluates t = 1. At an end
    of a guidance interval the field jumps, and ab2's first step past it extrapolates through the
    other field's velocity (any solver whose step straddles the jump mixes the two as well).
    `meanflow` needs a MeanFlow model (velocity(x, t, r) is its average velocity): each step is one
    jump x_r = x_t + (r - t) u(x_t, t, r), exact for the exact u.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    ts = time_grid(num_steps, time_shift)
    nfe = 0
    previous = None  # ab2: (velocity, dt) of the step before
    for t0, t1 in zip(ts[:-1], ts[1:]):
        dt = t1 - t0
        if sampler == "euler":
            x = x + dt * velocity(x, t0)
            nfe += 1
        elif sampler == "ab2":
            v0 = velocity(x, t0)
            if previous is None:
                x = x + dt * v0
            else:
                r = dt / (2 * previous[1])
                x = x + dt * ((1 + r) * v0 - r * previous[0])
            previous = (v0, dt)
            nfe += 1
        elif sampler == "meanflow":
            x = x + dt * velocity(x, t0, t1)
            nfe += 1
        elif sampler == "heun" and t1 < 1.0:
            v0 = velocity(x, t0)
            v1 = velocity(x + dt * v0, t1)
            x = x + 0.5 * dt * (v0 + v1)
            nfe += 2
        elif sampler == "heun":  # the last step: Euler, as EDM's sampler (see the docstring)
            x = x + dt * velocity(x, t0)
            nfe += 1
        else:
            assert sampler == "midpoint", f"integrate has no step for the sampler {sampler!r}"
            v0 = velocity(x, t0)
            x = x + dt * velocity(x + 0.5 * dt * v0, t0 + 0.5 * dt)
            nfe += 2
    return x, nfe


@dataclass(frozen=True)
class SamplingSettings:
    """How a batch goes from noise to data: the solver, its steps and time grid, and the guidance.
    The one value sample(), evaluation.sampling, the trainer and the scripts pass along, so that a new
    setting is a field here and the lines that use it; a run's own settings: from_config."""
    sampler: str = "euler"
    num_steps: int = 50
    cfg_scale: float = 1.0
    guidance_interval: Optional[Tuple[float, float]] = None   # CFG only at a <= t <= b; None: every t
    time_shift: float = 1.0                                     # time_grid's shift; 1: uniform

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, sampler: Optional[str] = None,
                    num_steps: Optional[int] = None, cfg_scale: Optional[float] = None,
                    guidance_interval: Optional[Sequence[float]] = None, time_shift: Optional[float] = None,
                    cfg_flag: str = "cfg_scale") -> "SamplingSettings":
        """A run's settings (`config`: a checkpoint's config dict, or a training config's asdict),
        each given one in place of its own. A checkpoint older than the guidance-interval and
        time-shift fields guides every step of a uniform grid. The scale passes resolve_cfg_scale
        (1 for an unconditional model; ValueError naming `cfg_flag`)."""
        start, end = guidance_interval or (config.get("guidance_interval_start", 0.0),
                                           config.get("guidance_interval_end", 1.0))
        return cls(sampler=sampler or config["sampler"], num_steps=num_steps or config["num_sampling_steps"],
                   cfg_scale=resolve_cfg_scale(cfg_scale, config["num_classes"], config["cfg_scale"], cfg_flag,
                                               config.get("class_dropout_prob", 0.1)),
                   guidance_interval=guidance_interval_or_none(start, end),
                   time_shift=config.get("time_shift", 1.0) if time_shift is None else time_shift)

    def guided_nfe(self) -> int:
        """How many of a sample's NFE run guided, i.e. forward CFG's two rows (the cost of a sample
        is NFE + this many rows): those at the times a <= t <= b of the guidance interval, none at
        cfg_scale 1. Counted by running the solver on a field that records its times."""
        if self.cfg_scale == 1.0:
            return 0
        times = []

        def record(x: torch.Tensor, t: float, r: Optional[float] = None) -> torch.Tensor:
            times.append(t)
            return torch.zeros_like(x)
        integrate(record, torch.zeros(1), self.num_steps, self.sampler, self.time_shift)
        return sum(guides_at(t, self.guidance_interval) for t in times)

    def fields(self) -> Dict[str, Any]:
        """The settings as a results row holds them (JSON: the interval a list or None)."""
        return dict(sampler=self.sampler, num_steps=self.num_steps, cfg_scale=self.cfg_scale,
                    time_shift=self.time_shift,
                    guidance_interval=list(self.guidance_interval) if self.guidance_interval else None)

    def __str__(self) -> str:
        interval = "all t" if self.guidance_interval is None else "{:g}..{:g}".format(*self.guidance_interval)
        return (f"{self.sampler}, {self.num_steps} steps, time_shift {self.time_shift:g}, cfg_scale "
                f"{self.cfg_scale:g}, guidance_interval {interval}")


@torch.no_grad()
def sample(model: Callable, noise: torch.Tensor, y: Optional[torch.Tensor],
           settings: SamplingSettings = SamplingSettings(), *, num_classes: int,
           autocast_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, int]:
    """Generate from noise (t = 0) to data (t = 1) with `settings` (solver, steps on
    time_grid(num_steps, time_shift), CFG scale and interval). Returns (samples, NFE per sample).

    The state is integrated in float32; `autocast_dtype` (e.g. torch.bfloat16) applies to the
    model's forward passes only.
    """
    if num_classes > 0:
        if y is None or y.shape[0] != noise.shape[0]:
            raise ValueError(f"a class-conditional model needs one label per sample: {noise.shape[0]} samples, "
                             f"{'no labels' if y is None else f'{y.shape[0]} labels'}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"class labels must lie in [0, {num_classes - 1}], got min "
                             f"{int(y.min())}, max {int(y.max())}")
    else:
        y = None

    def forward(x, t, labels, *r):
        with torch.autocast(noise.device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            return model(x, t, labels, *r).float()

    field = guided_velocity(forward, y, num_classes=num_classes, cfg_scale=settings.cfg_scale,
                            guidance_interval=settings.guidance_interval)
    return integrate(field, noise.float(), settings.num_steps, settings.sampler, settings.time_shift)


# ----------------------------------------------------------------------------- noise

def sample_seed(seed: int, index: int) -> int:
    """A distinct 63-bit seed for each (seed, sample index) pair."""
    assert 0 <= seed < 2 ** 32 and 0 <= index < 2 ** 31   # seeds are checked where they enter (check_seed)
    return (seed << 31) | index


def per_sample_noise(seed: int, indices: Sequence[int], shape: Sequence[int],
                     device="cpu") -> torch.Tensor:
    """Starting noise (len(indices), *shape): sample i depends only on (seed, i).

    Drawn on the CPU, so a sample is the same whatever the batch, rank or device that makes it.
    """
    out = torch.empty(len(indices), *shape)
    gen = torch.Generator()
    for row, index in enumerate(indices):
        gen.manual_seed(sample_seed(seed, int(index)))
        out[row] = torch.randn(*shape, generator=gen)
    return out.to(device)
