"""Value rules that several layers check (the configs, the scripts' flags, the sampler, the
benchmarks), each written once: a ValueError that names the flag and the values it got."""


def check_guidance_interval(start: float, end: float, flag: str = "--guidance_interval A B") -> None:
    """CFG applies while start <= t <= end, an interval inside the flow's time [0, 1]."""
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"{flag} must satisfy 0 <= A <= B <= 1, got {start:g} {end:g}")


def check_fid_sample_count(count: int, flag: str) -> None:
    """FID needs a covariance of the features: at least two images."""
    if count < 2:
        raise ValueError(f"{flag} must be >= 2 (FID needs a covariance), got {count}")
