"""Training: the one loop, its objectives, checkpoints, optimizers and the LR schedule, torchrun."""
