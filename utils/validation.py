"""Value rules that several layers check (the configs, the scripts' flags, the sampler, the
benchmarks), each written once: a ValueError that names the flag and the values it got."""

import os


def check_guidance_interval(start: float, end: float, flag: str = "--guidance_interval A B") -> None:
    """CFG applies while start <= t <= end, an interval inside the flow's time [0, 1]."""
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"{flag} must satisfy 0 <= A <= B <= 1, got {start:g} {end:g}")


def mlp_inner_width(hidden_size: int, mlp_ratio: float, mlp: str) -> int:
    """The feed-forward branch's inner width (models/layers.py builds it, the config checks it at parse
    time): mlp_ratio * hidden_size for the GELU MLP, 2/3 of that for SwiGLU, whose three matrices then
    hold as many parameters as the GELU MLP's two."""
    inner = int(2 * hidden_size * mlp_ratio / 3) if mlp == "swiglu" else int(hidden_size * mlp_ratio)
    if inner < 1:
        raise ValueError(f"--mlp_ratio {mlp_ratio} leaves the {mlp} MLP no hidden unit at --hidden_size {hidden_size}")
    return inner


def check_writable(folder: str, flag: str) -> None:
    """ValueError unless `folder` exists writable or could be created (nothing is created), checked
    before the work whose result goes there."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise ValueError(f"{flag} cannot be written ({probe} is not a writable folder); pass a folder you can write to")


def check_seed(seed: int, flag: str = "--seed") -> None:
    """Seeds are 32-bit: data orders use seed * 1_000_003 + epoch (int64) and sample i's noise
    (seed << 31) | i (flow_matching.sample_seed); a wider seed would alias a smaller one."""
    if not 0 <= seed < 2 ** 32:
        raise ValueError(f"{flag} must be in [0, 2^32), got {seed}")


def check_fid_sample_count(count: int, flag: str) -> None:
    """FID needs a covariance of the features: at least two images."""
    if count < 2:
        raise ValueError(f"{flag} must be >= 2 (FID needs a covariance), got {count}")


# A power-function EMA (EDM2) has gamma > 0, a weight growing with the step: sigma_rel < sqrt(1 / 12)
# (gamma = 0 is a uniform average).
MAX_SIGMA_REL = (1.0 / 12.0) ** 0.5


def check_sigma_rel(sigma_rel: float, flag: str) -> None:
    """The relative width of a power-function EMA profile (evaluation/posthoc_ema.py)."""
    if not 0.0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"{flag} must be in (0, {MAX_SIGMA_REL:.4f}) (a power-function EMA with gamma > 0; "
                         f"EDM2 sweeps 0.01-0.25, the default EMA is 0.09), got {sigma_rel}")


def parse_sigma_rels(text: str, flag: str) -> list:
    """'0.05,0.10' -> [0.05, 0.1]: distinct sigma_rels, each checked."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers such as 0.05,0.10, got {text!r}") from None
    for value in values:
        check_sigma_rel(value, f"{flag} entries")
    if len(set(values)) != len(values):
        raise ValueError(f"{flag} must list distinct values, got {text!r}")
    return values
