"""VQ-VAE: a convolutional encoder/decoder with residual blocks around an EMA vector quantizer.

    model = rebuild.load_vqvae("checkpoints/vqvae.pt")    # eval mode, CPU (rebuild.py)
    z = model.encode(x)        # x (B, C, H, W) in [-1, 1] -> quantized latents (B, D, H/f, W/f)
    codes = model.codes(x)     # (B, H/f, W/f) int64 in [0, codebook_size)
    x_hat = model.decode(z)    # snaps z to the nearest codes, then decodes to (B, C, H, W)

The codebook is not trained by gradients: each code is an exponential moving average of the
encoder outputs assigned to it (van den Oord et al. 2017, appendix), the encoder is pulled towards
its codes by the commitment loss, and codes whose usage falls below a threshold are restarted on
random encoder outputs of the current batch (Jukebox). The first training step finds every code
unused, so the codebook starts as a sample of real encoder outputs.

Which latents the flow model sees: the *quantized* ones, z_q = codebook[codes]. The decoder was
only ever trained on codebook vectors, so z_q is exactly its input distribution, and
`decode` snaps a generated latent to its nearest codes before decoding, which removes the small
off-codebook errors of an ODE sample the way rounding to uint8 does for pixels. Pre-quantization
latents would ask the decoder to map inputs it never saw during training.

Which weights: the trained ones ('model'), not the trainer's weight EMA (see rebuild.load_vqvae).
"""

import math
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from utils.checkpoint import state_fingerprint

# Fields of a VQVAEConfig that fix the network's shape.
VQVAE_ARCHITECTURE_FIELDS = ("in_channels", "hidden_channels", "num_res_blocks", "downsample_factor",
                             "latent_channels", "codebook_size")


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups that divide the width, so any width works."""
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """x + conv(act(norm(conv(act(norm(x)))))), width preserved."""

    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                   _norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Encoder(nn.Module):
    """(B, C, H, W) -> (B, D, H/f, W/f): log2(f) stride-2 4x4 convs, then residual blocks at the
    latent resolution (the VQ-VAE paper's layout: the costly blocks never run at full size)."""

    def __init__(self, in_channels: int, hidden: int, num_res_blocks: int, levels: int, latent_channels: int):
        super().__init__()
        layers = []
        for level in range(levels):
            layers += [nn.Conv2d(in_channels if level == 0 else hidden, hidden, 4, stride=2, padding=1), nn.SiLU()]
        layers.append(nn.Conv2d(in_channels if levels == 0 else hidden, hidden, 3, padding=1))
        layers += [ResBlock(hidden) for _ in range(num_res_blocks)]
        layers += [_norm(hidden), nn.SiLU(), nn.Conv2d(hidden, latent_channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """(B, D, h, w) -> (B, C, h*f, w*f): the encoder's mirror, with stride-2 transposed convs."""

    def __init__(self, out_channels: int, hidden: int, num_res_blocks: int, levels: int, latent_channels: int):
        super().__init__()
        layers = [nn.Conv2d(latent_channels, hidden, 3, padding=1)]
        layers += [ResBlock(hidden) for _ in range(num_res_blocks)]
        layers += [_norm(hidden), nn.SiLU()]
        for _ in range(levels):
            layers += [nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1), nn.SiLU()]
        layers.append(nn.Conv2d(hidden, out_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class VectorQuantizer(nn.Module):
    """Nearest-code quantization of (B, D, h, w) latents with an EMA codebook and dead-code restart.

    Buffers (saved in checkpoints, restored on resume): `embedding` (K, D) the codes,
    `cluster_size` (K,) the EMA of how many vectors each code receives per update, `embed_sum`
    (K, D) the EMA of their sum. Distances and updates run in float32 whatever the autocast.
    """

    def __init__(self, codebook_size: int, dim: int, decay: float = 0.99,
                 dead_code_threshold: float = 1.0, eps: float = 1e-5):
        super().__init__()
        self.codebook_size, self.dim = codebook_size, dim
        self.decay, self.dead_code_threshold, self.eps = decay, dead_code_threshold, eps
        self.register_buffer("embedding", torch.randn(codebook_size, dim))
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed_sum", torch.zeros(codebook_size, dim))

    @staticmethod
    def _flatten(z: torch.Tensor) -> torch.Tensor:
        return z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])        # (B*h*w, D)

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, D) float32 -> (N,) index of the nearest code (Euclidean distance).

        Differences, not |x|^2 - 2 x.e + |e|^2: that matmul would run in TF32 on CUDA where the
        trainer allows it (set_float32_matmul_precision("high")) and pick a farther code in 0.3-0.6%
        of near-ties, so training and generation would assign codes by different rules.
        """
        return torch.cdist(flat, self.embedding, compute_mode="donot_use_mm_for_euclid_dist").argmin(1)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, h, w) int64 codes."""
        with torch.autocast(z.device.type, enabled=False):
            B, _, h, w = z.shape
            return self.nearest(self._flatten(z)).reshape(B, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codes -> (B, D, h, w) codebook vectors."""
        return self.embedding[codes].permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor, generator: Optional[torch.Generator] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        """Quantize; in training mode also update the codebook.

        Returns (z_q with a straight-through gradient to z, codes (B, h, w), stats) where stats
        holds the commitment loss mean|z - sg(z_q)|^2, the perplexity of the code histogram and
        `code_usage`, the share of the K codes used in the batch (over all ranks when training).
        """
        with torch.autocast(z.device.type, enabled=False):
            B, _, h, w = z.shape
            flat = self._flatten(z)                                        # (B*h*w, D)
            codes = self.nearest(flat)                                     # (B*h*w,)
            # scatter_add, not bincount: bincount reads the largest code back to the host (a
            # CUDA sync in every training step).
            counts = torch.zeros(self.codebook_size, device=codes.device).scatter_add_(   # (K,)
                0, codes, torch.ones_like(codes, dtype=torch.float))
            if self.training:
                counts = self._update(flat, codes, counts, generator)
            # Looked up after the update: each code has moved toward the mean of this batch's
            # vectors, so the decoder trains on vectors closer to the encoder's. Measured against
            # the lookup before it (Sonnet's order), tiny preset, 3 seeds: test PSNR 21.69 / 21.62 /
            # 21.75 dB vs 20.78 / 21.47 / 21.51. A code restarted in this step hands its positions a
            # vector of the batch, which is what a restart is for.
            z_q = self.lookup(codes.reshape(B, h, w))                      # (B, D, h, w)
            z = z.float()
            commitment = F.mse_loss(z, z_q.detach())
            probs = counts / counts.sum()
            perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
            usage = (counts > 0).float().mean()
        z_st = z + (z_q - z).detach()                                      # (B, D, h, w)
        return z_st, codes.reshape(B, h, w), {"commitment": commitment, "perplexity": perplexity,
                                               "code_usage": usage}

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor,
                generator: Optional[torch.Generator]) -> torch.Tensor:
        """EMA step on the codebook, then restart of dead codes; returns the global counts.

        Under torch.distributed the counts and sums are summed over ranks and the restart
        vectors come from rank 0, so every rank holds the same codebook.
        """
        sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, flat)
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.lerp_(counts, 1 - self.decay)
        self.embed_sum.lerp_(sums, 1 - self.decay)
        n = self.cluster_size.sum()
        # Laplace smoothing keeps a code that received nothing from dividing by zero.
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        # A code that never received a vector keeps its own (embed_sum is 0 there): with
        # --dead_code_threshold 0 nothing restarts it, and K zero vectors would be duplicates.
        received = (self.cluster_size > 0).unsqueeze(1)
        self.embedding.copy_(torch.where(received, self.embed_sum / smoothed.unsqueeze(1), self.embedding))

        # Candidates are drawn for every code and kept only where it is dead: fixed shapes, no
        # host sync to count the dead codes.
        dead = (self.cluster_size < self.dead_code_threshold).unsqueeze(1)
        pick = torch.randint(flat.shape[0], (self.codebook_size,), device=flat.device, generator=generator)
        candidates = flat[pick]
        if distributed:
            dist.broadcast(candidates, src=0)
        self.embedding.copy_(torch.where(dead, candidates, self.embedding))
        self.embed_sum.copy_(torch.where(dead, candidates * self.dead_code_threshold, self.embed_sum))
        self.cluster_size.copy_(torch.where(dead.squeeze(1), torch.full_like(self.cluster_size,
                                                                             self.dead_code_threshold),
                                            self.cluster_size))
        return counts


class VQVAE(nn.Module):
    def __init__(self, in_channels: int = 3, hidden_channels: int = 128, num_res_blocks: int = 2,
                 downsample_factor: int = 4, latent_channels: int = 4, codebook_size: int = 512,
                 codebook_decay: float = 0.99, dead_code_threshold: float = 1.0,
                 image_size: Optional[int] = None):
        super().__init__()
        if downsample_factor < 1 or downsample_factor & (downsample_factor - 1):
            raise ValueError(f"downsample_factor must be a power of 2, got {downsample_factor}")
        levels = downsample_factor.bit_length() - 1
        self.in_channels, self.latent_channels = in_channels, latent_channels
        self.downsample_factor, self.codebook_size = downsample_factor, codebook_size
        # The size it was trained on; the layers accept any multiple of downsample_factor.
        self.image_size = image_size
        self.encoder = Encoder(in_channels, hidden_channels, num_res_blocks, levels, latent_channels)
        self.quantizer = VectorQuantizer(codebook_size, latent_channels, codebook_decay, dead_code_threshold)
        self.decoder = Decoder(in_channels, hidden_channels, num_res_blocks, levels, latent_channels)

    def latent_shape(self, image_size: int) -> Tuple[int, int, int]:
        """(D, h, w) of the latents of a square image of side image_size."""
        if image_size % self.downsample_factor:
            raise ValueError(f"image_size {image_size} is not divisible by the VQ-VAE's "
                             f"downsample_factor {self.downsample_factor}")
        side = image_size // self.downsample_factor
        return self.latent_channels, side, side

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, h, w) int64 codes in [0, codebook_size)."""
        return self.quantizer.codes(self.encoder(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> quantized latents (B, D, h, w); never updates the codebook."""
        return self.quantizer.lookup(self.codes(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) latents -> (B, C, H, W) images, snapped to the nearest codes first."""
        return self.decoder(self.quantizer.lookup(self.quantizer.codes(z)))

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Reconstruction and quantizer stats; in training mode the codebook is updated."""
        z_q, _, stats = self.quantizer(self.encoder(x), generator)
        return self.decoder(z_q), stats

    def fingerprint(self) -> str:
        """SHA-256 of every weight and codebook buffer: the identity of these latents."""
        return state_fingerprint(self.state_dict())


def vqvae_from_config(config) -> VQVAE:
    """Build the VQ-VAE a VQVAEConfig (or its checkpointed dict) describes."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k)
    return VQVAE(in_channels=get("in_channels"), hidden_channels=get("hidden_channels"),
                 num_res_blocks=get("num_res_blocks"), downsample_factor=get("downsample_factor"),
                 latent_channels=get("latent_channels"), codebook_size=get("codebook_size"),
                 codebook_decay=get("codebook_decay"), dead_code_threshold=get("dead_code_threshold"),
                 image_size=get("image_size"))


class LatentSpace:
    """The space a latent flow model lives in: VQ-VAE latents normalized per channel.

    normalize(z) = (z - mean) / std for training data; decode(z) un-normalizes a generated latent
    and decodes it through the VQ-VAE to pixels. `state()` is what the flow checkpoint stores
    under "latent"; `rebuild.load_latent_space` rebuilds it at generation and checks that the
    VQ-VAE found is the one the flow model was trained with.
    """

    def __init__(self, vqvae: VQVAE, mean: torch.Tensor, std: torch.Tensor, fingerprint: Optional[str] = None):
        self.vqvae = vqvae
        device = next(vqvae.parameters()).device
        self.mean = mean.float().reshape(1, -1, 1, 1).to(device)
        self.std = std.float().reshape(1, -1, 1, 1).to(device)
        self.fingerprint = fingerprint or vqvae.fingerprint()

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean.to(z.device)) / self.std.to(z.device)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalized latents (B, D, h, w) -> images (B, C, H, W), in float32."""
        device = self.mean.device
        return self.vqvae.decode(z.float().to(device) * self.std + self.mean).float().to(z.device)

    def state(self) -> Dict[str, object]:
        return {"mean": self.mean.flatten().cpu(), "std": self.std.flatten().cpu(),
                "vqvae_fingerprint": self.fingerprint}

    def check_trained_on(self, ckpt: Dict, path: str) -> None:
        """A flow checkpoint continues (--resume) or starts (--init_from) a run only on the latents
        of the VQ-VAE it was trained with; ValueError naming `path` otherwise."""
        if ckpt.get("latent", {}).get("vqvae_fingerprint") != self.fingerprint:
            raise ValueError(f"{path} was trained on the latents of another VQ-VAE than "
                             f"--vqvae_checkpoint; pass the VQ-VAE it was trained with")

    def check_resumes(self, ckpt: Dict, path: str) -> None:
        """check_trained_on, and the same normalization: the per-channel statistics come from the
        training data, so a resume on other data would shift the space the model has learned."""
        self.check_trained_on(ckpt, path)
        now = self.state()
        for key in ("mean", "std"):
            before = ckpt["latent"][key].float()
            if not torch.allclose(now[key], before, rtol=1e-4, atol=1e-6):
                raise ValueError(f"{path} normalized its latents with a per-channel {key} of "
                                 f"{[round(v, 4) for v in before.tolist()]}; the data found now gives "
                                 f"{[round(v, 4) for v in now[key].tolist()]}: resume on the data the run "
                                 f"started on (--data_dir)")
