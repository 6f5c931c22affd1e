"""The optimizer builder and the learning-rate schedule the trainer uses for every model.

Each param group records its peak rate as `base_lr`; the schedule scales all groups by one factor,
so optimizers with several groups at different rates (Muon + AdamW) follow the same warmup/decay.
"""

import math
from typing import List, Union

import torch

from optimizers.muon import MuonAdamW, muon_param_groups

Optimizer = Union[torch.optim.Optimizer, MuonAdamW]

# Config fields that fix the layout of the optimizer state: a checkpoint resumes only under the
# same values. Its other settings (lr, weight decay, betas, ...) may change on resume:
# `load_optimizer_state` keeps the ones the current flags built.
OPTIMIZER_FIELDS = ("optimizer",)
# The config fields those other settings come from: a resume reports their changes through the
# param groups (`load_optimizer_state`), group by group.
OPTIMIZER_SETTINGS = ("lr", "weight_decay", "adam_beta1", "adam_beta2", "muon_lr", "muon_momentum",
                      "muon_weight_decay", "muon_adjust_lr", "muon_split_fused")


def adamw_param_groups(params, weight_decay: float, lr: float):
    """Matrices (dim >= 2) decay; biases and other vectors don't (nanoGPT's rule)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"name": "adamw_decay", "params": decay, "weight_decay": weight_decay, "lr": lr, "base_lr": lr},
              {"name": "adamw_no_decay", "params": no_decay, "weight_decay": 0.0, "lr": lr, "base_lr": lr}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, config, device: torch.device) -> Optimizer:
    """AdamW for `optimizer=adamw`; for `optimizer=muon`, Muon on the hidden matrices of the
    transformer blocks and that same AdamW on the rest (optimizers/muon.py). AdamW is the fused
    kernel (CUDA and CPU): one pass over all tensors that also keeps the step count off the host
    (the for-each version reads it back every step)."""
    betas, fused = (config.adam_beta1, config.adam_beta2), device.type in ("cuda", "cpu")
    if config.optimizer == "adamw":
        return torch.optim.AdamW(adamw_param_groups(model.parameters(), config.weight_decay, config.lr),
                                 lr=config.lr, betas=betas, fused=fused)
    if config.optimizer == "muon":
        muon_groups, rest = muon_param_groups(model, config.muon_lr, config.muon_split_fused)
        return MuonAdamW(muon_groups, adamw_param_groups(rest, config.weight_decay, config.lr),
                         momentum=config.muon_momentum, weight_decay=config.muon_weight_decay,
                         adjust_lr_fn=config.muon_adjust_lr, betas=betas, fused=fused)
    raise ValueError(f"--optimizer {config.optimizer!r} is not available; use --optimizer adamw or muon")


def describe_param_groups(optimizer: Optimizer) -> str:
    """One line per param group: name, tensors, parameters, peak LR (and Muon's chunks)."""
    lines = [f"optimizer {type(optimizer).__name__}:"]
    for i, group in enumerate(optimizer.param_groups):
        count = sum(p.numel() for p in group["params"])
        chunks = f"  orthogonalized in {group['chunks']} block(s)" if "chunks" in group else ""
        lines.append(f"  {group.get('name', f'group {i}'):<15} {len(group['params']):4d} tensors "
                     f"{count / 1e6:9.4f}M params  lr {group['base_lr']:.3g}{chunks}")
    return "\n".join(lines)


LR_SCHEDULES = ("constant", "cosine")
# The config fields lr_factor reads besides the step (train_steps: the cosine's end).
SCHEDULE_FIELDS = ("lr_schedule", "warmup_steps", "min_lr_ratio", "train_steps")


def lr_factor(step: int, config) -> float:
    """Multiplier on the peak LR for optimizer step `step` (0-based): linear warmup, then
    constant or cosine down to min_lr_ratio at train_steps."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    assert config.lr_schedule == "cosine", f"lr_factor has no schedule {config.lr_schedule!r}"
    span = max(1, config.train_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def load_optimizer_state(optimizer: Optimizer, state: dict) -> List[str]:
    """Load the moments and step counts of `state` but keep the hyperparameters of `optimizer`.

    torch's load_state_dict also restores every saved param-group setting, which would silently
    ignore a --lr or --weight_decay changed on resume. Returns the settings that differ from the
    checkpoint's, as 'group.key: saved -> now' (`lr` itself is left out: the schedule sets it
    from `base_lr` before every step).
    """
    wanted = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    changes = []
    for index, (group, hyper) in enumerate(zip(optimizer.param_groups, wanted)):
        for key, value in hyper.items():
            saved = group.get(key)
            if key != "lr" and not _same(saved, value):
                changes.append(f"{hyper.get('name', index)}.{key}: {saved!r} -> {value!r}")
        group.update(hyper)
    return changes


def _same(a, b) -> bool:
    """Equality of param-group settings, where a saved tuple may come back as a list."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return tuple(a) == tuple(b)
    return a == b


def schedule_changes(saved: dict, current: dict) -> List[str]:
    """The LR schedule's fields that a resume changes, as 'key: saved -> now': the schedule may
    change (a longer run, another warmup), but the learning rates from the resumed step on are then
    not the checkpoint's run's. train_steps and min_lr_ratio count only where a cosine reads them."""
    cosine = "cosine" in (saved["lr_schedule"], current["lr_schedule"])
    return [f"{k}: {saved[k]!r} -> {current[k]!r}" for k in SCHEDULE_FIELDS
            if saved[k] != current[k] and (k not in ("train_steps", "min_lr_ratio") or cosine)]


def set_lr(optimizer: Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
