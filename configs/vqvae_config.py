"""`VQVAEConfig`: a VQ-VAE run (train_vqvae.py), trained by the same trainer as the flow model.

Presets are applied before command-line flags: `cifar10` (the defaults: 32x32 -> 8x8x4 latents,
512 codes) and `tiny` (a CPU-sized run that finishes in a few minutes on 2 cores).
"""

from dataclasses import dataclass, field
from typing import Literal, Optional

from configs.cli import parse_config
from configs.train_config import TrainConfig


@dataclass
class VQVAEConfig(TrainConfig):
    """Train a VQ-VAE (EMA codebook, commitment loss, dead-code restart) whose latents a flow model can learn."""
    # Data
    dataset: Literal["cifar10", "imagefolder"] = field(default="cifar10", metadata={"help": "cifar10 (torchvision, downloaded when missing) or imagefolder (a class per subfolder)"})
    data_dir: str = field(default="datasets/cifar10", metadata={"help": "CIFAR-10 download folder, or the ImageFolder root"})
    image_size: int = field(default=32, metadata={"help": "images are resized and center-cropped to this size"})
    in_channels: int = field(default=3, metadata={"help": "3 = RGB, 1 = grayscale"})
    hflip: bool = field(default=True, metadata={"help": "random horizontal flips"})
    # Model
    hidden_channels: int = field(default=128, metadata={"help": "width of every encoder/decoder conv"})
    num_res_blocks: int = field(default=2, metadata={"help": "residual blocks in the encoder and in the decoder, at the latent resolution"})
    downsample_factor: int = field(default=4, metadata={"help": "image side / latent side, a power of 2 (4: 32x32 -> 8x8)"})
    latent_channels: int = field(default=4, metadata={"help": "channels of the latent (the codebook vectors' size)"})
    codebook_size: int = field(default=512, metadata={"help": "number of codes K"})
    codebook_decay: float = field(default=0.99, metadata={"help": "EMA decay of the codebook statistics per forward pass (per micro-batch with --micro_batch_size: docs/vqvae.md)"})
    commitment_weight: float = field(default=0.25, metadata={"help": "weight of the commitment loss |z - sg(z_q)|^2"})
    dead_code_threshold: float = field(default=1.0, metadata={"help": "a code whose EMA count of vectors per forward pass falls below this is restarted on a random encoder output"})
    # Reconstruction grid and final report
    grid_images: int = field(default=8, metadata={"help": "images in the reconstruction grid (originals above, reconstructions below)"})
    eval_data_dir: Optional[str] = field(default=None, metadata={"help": "images for the final reconstruction report: an ImageFolder root (e.g. a test folder) or, for cifar10, a download folder whose test split is used; none = --data_dir (its test split for cifar10)"})
    eval_images: int = field(default=1000, metadata={"help": "images (evenly spaced) in the final reconstruction report; 0 skips it"})
    # TrainConfig's choices narrowed: a VQ-VAE is convolutions, with no transformer blocks for Muon
    # or for a per-block compile, so those are refused with the flags rather than after the data loads.
    optimizer: Literal["adamw"] = field(default="adamw", metadata={"help": "adamw (Muon is for a DiT2D's transformer blocks; a VQ-VAE has none)"})
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = field(default="default", metadata={"help": "with --compile: torch.compile's mode for the whole model (a VQ-VAE has no transformer blocks to compile one by one)"})

    def validate(self) -> None:
        super().validate()
        for name in ("image_size", "hidden_channels", "downsample_factor", "latent_channels", "grid_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"--in_channels must be 3 (RGB) or 1 (grayscale), got {self.in_channels}")
        for name in ("num_res_blocks", "eval_images", "commitment_weight", "dead_code_threshold"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.codebook_size < 2:
            raise ValueError(f"--codebook_size must be >= 2, got {self.codebook_size}")
        if self.downsample_factor & (self.downsample_factor - 1):
            raise ValueError(f"--downsample_factor must be a power of 2 (1, 2, 4, 8, ...), got {self.downsample_factor}")
        if self.image_size % self.downsample_factor:
            raise ValueError(f"--image_size {self.image_size} is not divisible by --downsample_factor "
                             f"{self.downsample_factor}; pick a smaller --downsample_factor")
        if not 0.0 <= self.codebook_decay < 1.0:
            raise ValueError(f"--codebook_decay must be in [0, 1), got {self.codebook_decay}")


PRESETS = {
    "cifar10": {},
    "tiny": dict(hidden_channels=64, num_res_blocks=2, codebook_size=128, batch_size=32, lr=1e-3,
                 warmup_steps=20, train_steps=300, ema_decay=0.99, mixed_precision="no", num_workers=2,
                 log_every=25, save_every=100, sample_every=100, eval_images=500),
}


def parse_vqvae_config(argv=None) -> VQVAEConfig:
    return parse_config(VQVAEConfig, PRESETS, argv, default_preset="cifar10")
