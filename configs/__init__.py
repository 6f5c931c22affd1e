"""Config dataclasses (defaults = the CIFAR-10 run) and the CLI that turns their fields into flags."""
