"""Fields shared by every trainable model (flow model, VQ-VAE): optimization, precision, I/O.

`training/trainer.py` reads only these fields, so any config that subclasses `TrainConfig` can be
trained by the one trainer (its resume check also compares `dataset` and `hflip` where a config
has them).
"""

import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from utils.validation import check_seed, parse_sigma_rels


@dataclass
class TrainConfig:
    # Optimization
    batch_size: int = field(default=128, metadata={"help": "global batch per optimizer step (all ranks, all micro-batches)"})
    micro_batch_size: int = field(default=0, metadata={"help": "images per forward pass on one rank (gradient accumulation); 0 = the whole per-rank batch"})
    optimizer: Literal["adamw", "muon"] = field(default="adamw", metadata={"help": "adamw, or muon: Muon for the hidden matrices of the transformer blocks, AdamW (--lr, --weight_decay, betas) for the rest"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (AdamW; the AdamW side of Muon)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (decoupled)"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    muon_lr: float = field(default=6e-4, metadata={"help": "peak learning rate of Muon's matrices (on AdamW's scale with match_rms_adamw); 6x --lr was best on the tiny preset"})
    muon_momentum: float = field(default=0.95, metadata={"help": "Muon momentum (Nesterov)"})
    muon_weight_decay: float = field(default=0.0, metadata={"help": "Muon decoupled weight decay: each step multiplies its matrices by 1 - lr * this (0, like --weight_decay: DiT trains without decay)"})
    muon_adjust_lr: Literal["match_rms_adamw", "original"] = field(default="match_rms_adamw", metadata={"help": "Muon step size per matrix shape: match_rms_adamw = 0.2*sqrt(max(rows, cols)) (AdamW-sized updates), original = sqrt(max(1, rows/cols)) (Keller Jordan's; the same steps need a --muon_lr 0.2*sqrt(width) times larger)"})
    muon_split_fused: bool = field(default=True, metadata={"help": "Muon orthogonalizes q, k, v, the six adaLN chunks and SwiGLU's gate and value of the fused weights as separate matrices (false = each fused weight as one matrix, as torch.optim.Muon)"})
    warmup_steps: int = field(default=1000, metadata={"help": "linear LR warmup steps"})
    lr_schedule: Literal["constant", "cosine"] = field(default="constant", metadata={"help": "LR after warmup"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine schedule ends at lr * min_lr_ratio"})
    train_steps: int = field(default=100_000, metadata={"help": "optimizer steps in the whole run"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global gradient norm; 0 disables clipping"})
    ema_decay: float = field(default=0.9999, metadata={"help": "final EMA decay per optimizer step (sampling uses the EMA); with --ema_warmup the decay of step k is min(ema_decay, (1 + k) / (ema_gamma + 2 + k))"})
    ema_gamma: float = field(default=8.0, metadata={"help": "shape of the --ema_warmup ramp: the decay of step k is min(ema_decay, (1 + k) / (gamma + 2 + k)), which weighs step j by ~j^gamma (EDM2's power-function EMA; sigma_rel 0.09 for 8, 0.05 for 17, 0.16 for 3): larger = a shorter average"})
    ema_warmup: bool = field(default=True, metadata={"help": "ramp the EMA decay with the step k: min(ema_decay, (1 + k) / (ema_gamma + 2 + k)). At the default --ema_gamma 8, until ema_decay takes over (step 891 for 0.99, 8,991 for 0.999, ~90k for 0.9999; before that ema_decay has no effect) the EMA weighs step j by ~j^8, EDM2's power-function EMA (sigma_rel 0.09): an average centred 10%% of the run back, 87%% of its weight in the last 20%%. false = ema_decay from the first step, which keeps the initial weights (zero output under adaLN-Zero) in the EMA for ~1 / (1 - ema_decay) steps"})
    ema_snapshot_every: int = field(default=0, metadata={"help": "post-hoc EMA (EDM2; evaluation/posthoc_ema.py): keep one more power-function EMA per --ema_snapshot_sigma_rels entry (two by default) and write them all every this many steps and at the last step to CHECKPOINT_DIR/ema_snapshots, so that an EMA of any length can be rebuilt after training; the --save_every interval is a good value. 0 = off (no extra EMAs, no cost)"})
    ema_snapshot_sigma_rels: str = field(default="0.05,0.10", metadata={"help": "the relative widths (sigma_rel) of the post-hoc EMAs, comma-separated; every width between and around them can be rebuilt (EDM2's pair)"})
    ema_snapshot_dtype: Literal["fp32", "fp16", "bf16"] = field(default="fp16", metadata={"help": "dtype of the snapshot files (the EMAs themselves stay fp32): fp16 halves the disk; on a toy run its rebuilt weights differed from fp32's by ~2e-4 relative (1e-3 at sigma_rel 0.03), bf16's by ~2e-3; proxy FID moved by <= 0.01 (fp16) and <= 0.06 (bf16) at a seed spread of 2.0 (benchmarks/README.md, Post-hoc EMA)"})
    # Precision and speed
    mixed_precision: Literal["bf16", "fp16", "no"] = field(default="bf16", metadata={"help": "autocast dtype; fp16 adds a GradScaler; no = fp32"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (see --compile_mode)"})
    compile_mode: Literal["default", "max-autotune-no-cudagraphs", "blocks"] = field(default="default", metadata={"help": "with --compile: torch.compile's mode for the whole model, or blocks = each transformer block compiled in place (regional: one block's compile serves all of them, so compiling takes seconds instead of a minute)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute block activations in backward to save memory"})
    num_workers: int = field(default=4, metadata={"help": "DataLoader worker processes"})
    seed: int = field(default=0, metadata={"help": "seed for data order, noise, time and label dropout"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "auto = cuda when available"})
    # Logging and checkpoints
    log_every: int = field(default=100, metadata={"help": "steps between log lines (stdout and metrics.jsonl)"})
    save_every: int = field(default=5000, metadata={"help": "steps between checkpoints"})
    sample_every: int = field(default=1000, metadata={"help": "steps between sample grids from the EMA model; 0 disables"})
    keep_checkpoints: int = field(default=3, metadata={"help": "periodic checkpoints kept (the final one is always kept)"})
    tensorboard: bool = field(default=False, metadata={"help": "also write every log record and sample grid to TensorBoard event files in --checkpoint_dir/tensorboard (pip install tensorboard)"})
    checkpoint_dir: str = field(default="checkpoints", metadata={"help": "where checkpoints, config.json and metrics.jsonl go"})
    sample_dir: str = field(default="samples", metadata={"help": "where sample grids go"})
    resume: Optional[str] = field(default=None, metadata={"help": "checkpoint path to resume from, or 'latest' (newest in checkpoint_dir)"})

    def validate(self) -> None:
        """Raise ValueError naming the flag for values that cannot work."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{f.name} must be a finite number, got {value}")
        positive = ["batch_size", "train_steps", "log_every", "save_every", "keep_checkpoints"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        non_negative = ["micro_batch_size", "warmup_steps", "grad_clip", "weight_decay",
                        "num_workers", "sample_every", "lr", "muon_lr", "muon_weight_decay"]
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        check_seed(self.seed)
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ValueError(f"--muon_momentum must be in [0, 1), got {self.muon_momentum}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.resume not in (None, "latest") and not os.path.isfile(self.resume):
            raise ValueError(f"--resume {self.resume} does not exist; pass a checkpoint file or "
                             f"--resume latest (the newest in --checkpoint_dir)")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("--tensorboard true needs the tensorboard package: pip install tensorboard "
                             "(or pass --tensorboard false)")
        if self.ema_gamma <= 0:
            raise ValueError(f"--ema_gamma must be > 0, got {self.ema_gamma}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.ema_snapshot_every < 0:
            raise ValueError(f"--ema_snapshot_every must be >= 0 (0 = off), got {self.ema_snapshot_every}")
        parse_sigma_rels(self.ema_snapshot_sigma_rels, "--ema_snapshot_sigma_rels")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"--min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ValueError(f"--batch_size {self.batch_size} is not divisible by "
                             f"--micro_batch_size {self.micro_batch_size}; pick a --micro_batch_size that divides it")
