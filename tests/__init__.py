"""The test suite: CPU only, deterministic, no network."""
