"""The optimizer builder and the learning-rate schedule the trainer uses for every model.

Each param group records its peak rate as `base_lr`; the schedule scales all groups by one factor,
so optimizers with several groups at different rates (Muon + AdamW) follow the same warmup/decay.
"""

import math

import torch


def adamw_param_groups(params, weight_decay: float, lr: float):
    """Matrices (dim >= 2) decay; biases and other vectors don't (nanoGPT's rule)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr, "base_lr": lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": lr, "base_lr": lr}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW for `optimizer=adamw`: the fused kernel (CUDA and CPU), one pass over all tensors that
    also keeps the step count off the host (the for-each version reads it back every step)."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(adamw_param_groups(model.parameters(), config.weight_decay, config.lr),
                                 lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                 fused=device.type in ("cuda", "cpu"))
    raise ValueError(f"--optimizer {config.optimizer!r} is not available; use --optimizer adamw")


def lr_factor(step: int, config) -> float:
    """Multiplier on the peak LR for optimizer step `step` (0-based): linear warmup, then
    constant or cosine down to min_lr_ratio at train_steps."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    span = max(1, config.train_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
