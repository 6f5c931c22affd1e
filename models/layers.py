"""Building blocks of DiT2D: norms, position tables (sin-cos and rotary), embedders, attention,
MLPs, the adaLN-Zero block and the final layer. Token tensors are (B, N, D): batch, tokens, width.

Options beyond DiT (each a config flag, measured in benchmarks/README.md): RMS-normalized queries
and keys (qk-norm), a SwiGLU feed-forward branch and 2D rotary positions.

Precision: under bf16 (or fp16) autocast the residual stream (unless DiT2D keeps it in fp32) and
every activation stay in the autocast dtype. LayerNorm computes its statistics in fp32 inside the kernel and returns the input
dtype, and the position table is cast to the stream's dtype, so nothing upcasts the stream to fp32
(which would double the memory traffic of every elementwise op). The sampler integrates and the
loss reduces in fp32 (flow_matching.py). `Linear` and `attention` come from models/precision.py: they are nn.Linear and SDPA, with a faster
route for bf16 autocast on CPUs without bf16 instructions.
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.precision import Linear, attention
from utils.validation import mlp_inner_width


# ----------------------------------------------------------------------------- norm

class LayerNorm(nn.LayerNorm):
    """LayerNorm without affine parameters whose output keeps the input's dtype.

    Autocast would run it in fp32 and hand fp32 to the rest of the block; the kernels already
    accumulate bf16/fp16 inputs in fp32, so only the needless fp32 output is avoided.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__(hidden_size, elementwise_affine=False, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Meta tensors (the FLOP counter) have no autocast to ask about.
        if x.device.type == "meta" or not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x)


class RMSNorm(nn.Module):
    """x / rms(x) * gain over the last dimension, computed in fp32, returned in x's dtype.

    qk-norm's norm: the gain (init 1) is learned per channel of a head.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


# ----------------------------------------------------------------------------- helpers

def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, D) scaled and shifted per sample by (B, D) vectors."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(len(positions), dim) table: sin in the first half, cos in the second (MAE / DiT layout)."""
    assert dim % 2 == 0
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.double().reshape(-1, 1) * omega.reshape(1, -1)     # (L, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """(grid_size**2, dim) fixed 2D sin-cos positions, row-major over the patch grid.

    Half of the channels encode the column, half the row, as in DiT and MAE.
    """
    if dim % 4:
        raise ValueError(f"hidden_size {dim} must be divisible by 4 for 2D sin-cos positions")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)
    return emb.float()


def rope_2d_angles(head_dim: int, grid_size: int, theta: float = 10000.0) -> torch.Tensor:
    """(grid_size**2, head_dim / 2) rotation angles of 2D rotary positions, row-major tokens.

    A head's channels form head_dim / 2 pairs (channel i with channel i + head_dim / 2); the first
    half of the pairs turn with the token's row, the second half with its column, each at the
    frequencies theta^(-j / (head_dim / 4)), j = 0 .. head_dim / 4 - 1.
    """
    if head_dim % 4:
        raise ValueError(f"head dimension {head_dim} (hidden_size / num_heads) must be divisible by 4 "
                         f"for 2D rotary positions")
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, dtype=torch.float64) / quarter)          # (Dh/4,)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    angles = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=1)  # (N, Dh/2)
    return angles.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (i, i + Dh/2) of x (B, H, N, Dh) by its angle (cos, sin: (N, Dh/2)).

    Rotating q and k by angles linear in position makes q . k depend on positions only through
    their difference: attention sees relative offsets. Computed in fp32, returned in x's dtype.
    """
    x1, x2 = x.float().chunk(2, dim=-1)                                # each (B, H, N, Dh/2)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


# ----------------------------------------------------------------------------- embedders

class PatchEmbed(nn.Module):
    """Cut (B, C, H, W) into p x p patches and project each to the width: (B, H*W/p^2, D).

    A reshape plus one Linear is the same map as a stride-p convolution, and a plain matmul on
    every backend.
    """

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = Linear(in_channels * patch_size * patch_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p = self.patch_size
        x = x.reshape(B, C, H // p, p, W // p, p)                         # (B, C, h, p, w, p)
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)  # (B, N, C*p*p)
        return self.proj(x)                                                # (B, N, D)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (B, D): sinusoidal features of scale*t, then a two-layer MLP.

    scale = 1000 (DiT's) puts flow time on the range of diffusion's integer steps, which the usual
    frequencies were made for: the fastest feature turns 1000 radians over t in [0, 1]. A model's
    output then wiggles fast in t, which flow matching never asks about but MeanFlow's target does
    (its du/dt differentiates the embedding); scale = 1 (SiT's t as is) is smooth in t.
    """

    def __init__(self, hidden_size: int, frequency_size: int = 256, max_period: float = 10000.0,
                 scale: float = 1000.0):
        super().__init__()
        self.scale = scale
        half = frequency_size // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(Linear(frequency_size, hidden_size), nn.SiLU(),
                                 Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = (self.scale * t.to(self.freqs.dtype)).unsqueeze(1) * self.freqs.unsqueeze(0)  # (B, F/2), fp32 or a float64 model
        features = torch.cat([args.cos(), args.sin()], dim=-1)             # (B, F)
        return self.mlp(features)                                          # (B, D)


class LabelEmbedder(nn.Module):
    """Class label -> (B, D). Row `num_classes` is the null label that CFG uses for 'no class'.

    Dropping labels for CFG training is the loss's job (flow_matching.py), not this module's.
    """

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding(y)                                           # (B, D)


# ----------------------------------------------------------------------------- block

class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv matmul and PyTorch's SDPA kernels.

    qk_norm RMS-normalizes each head's query and key (learned gain): the logits q . k / sqrt(Dh)
    are then bounded by sqrt(Dh) * gain, which keeps a high learning rate from saturating the
    softmax. `rope` = (cos, sin) tables rotate q and k by their tokens' 2D positions.
    """

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(hidden_size, 3 * hidden_size)
        self.proj = Linear(hidden_size, hidden_size)
        head_dim = hidden_size // num_heads
        self.q_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                     # each (B, H, N, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        x = attention(q, k, v)                                             # (B, H, N, Dh)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))               # (B, N, D)


class Mlp(nn.Module):
    """The transformer's feed-forward branch: Linear, tanh-GELU (as DiT), Linear."""

    def __init__(self, hidden_size: int, mlp_ratio: float):
        super().__init__()
        inner = mlp_inner_width(hidden_size, mlp_ratio, "gelu")
        self.fc1 = Linear(hidden_size, inner)
        self.fc2 = Linear(inner, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(x), approximate="tanh")  # (B, N, D) -> (B, N, mlp_ratio * D)
        return self.fc2(h)                            # (B, N, D)


class SwiGLU(nn.Module):
    """SiLU-gated feed-forward branch (Shazeer 2020; LLaMA): fc2(silu(a) * b), [a, b] = fc1(x).

    The inner width is 2/3 of the GELU MLP's, so the three matrices hold as many parameters as
    its two. fc1 stacks the gate and value matrices (two row blocks for Muon).
    """

    def __init__(self, hidden_size: int, mlp_ratio: float):
        super().__init__()
        inner = mlp_inner_width(hidden_size, mlp_ratio, "swiglu")
        self.fc1 = Linear(hidden_size, 2 * inner)
        self.fc2 = Linear(inner, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)   # each (B, N, inner)
        return self.fc2(F.silu(gate) * value)         # (B, N, D)


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated by the conditioning (adaLN-Zero).

    One Linear produces the shift, scale and gate of both branches from c; zeroed at init, the
    gates make the whole block the identity until training moves them.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool = False,
                 mlp: str = "gelu"):
        super().__init__()
        if mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be gelu or swiglu, got {mlp!r}")
        self.norm1 = LayerNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads, qk_norm)
        self.norm2 = LayerNorm(hidden_size)
        self.mlp = Mlp(hidden_size, mlp_ratio) if mlp == "gelu" else SwiGLU(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor,
                rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=-1)                      # each (B, D)
        x = torch.addcmul(x, gate_msa.unsqueeze(1),                        # (B, N, D)
                          self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope))
        x = torch.addcmul(x, gate_mlp.unsqueeze(1),                        # (B, N, D)
                          self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x

    def fused_weights(self):
        """{name: (weight, row blocks)} of the weights that stack several matrices: q, k, v in
        attn.qkv; the six modulations in adaLN (forward's chunk(6)); SwiGLU's gate and value in
        mlp.fc1. Muon orthogonalizes each block."""
        fused = {"qkv": (self.attn.qkv.weight, 3), "adaln": (self.adaLN_modulation[-1].weight, 6)}
        if isinstance(self.mlp, SwiGLU):
            fused["swiglu"] = (self.mlp.fc1.weight, 2)
        return fused


# ----------------------------------------------------------------------------- final layer

class FinalLayer(nn.Module):
    """adaLN-modulated norm, then a Linear to p*p*C values per token (zeroed at init)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = LayerNorm(hidden_size)
        self.linear = Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)           # each (B, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))     # (B, N, p*p*C)
