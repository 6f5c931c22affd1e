"""Building blocks of DiT2D: position tables, embedders, attention, MLP, the adaLN-Zero block and
the final layer. Token tensors are (B, N, D): batch, tokens, width.

Precision: under bf16 (or fp16) autocast the residual stream and every activation stay in the
autocast dtype. LayerNorm computes its statistics in fp32 inside the kernel and returns the input
dtype, and the position table is cast to the stream's dtype, so nothing upcasts the stream to fp32
(which would double the memory traffic of every elementwise op). The sampler integrates and the
loss reduces in fp32 (flow_matching.py). `Linear` and `attention` come from models/precision.py: they are nn.Linear and SDPA, with a faster
route for bf16 autocast on CPUs without bf16 instructions.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.precision import Linear, attention


# ----------------------------------------------------------------------------- norm

class LayerNorm(nn.LayerNorm):
    """LayerNorm without affine parameters whose output keeps the input's dtype.

    Autocast would run it in fp32 and hand fp32 to the rest of the block; the kernels already
    accumulate bf16/fp16 inputs in fp32, so only the needless fp32 output is avoided.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__(hidden_size, elementwise_affine=False, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
            return super().forward(x)
        with torch.autocast(device, enabled=False):
            return super().forward(x)


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
    """t in [0, 1] -> (B, D): sinusoidal features of 1000*t, then a two-layer MLP.

    The 1000x scale puts flow time on the range the usual diffusion frequencies were made for.
    """

    def __init__(self, hidden_size: int, frequency_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        half = frequency_size // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(Linear(frequency_size, hidden_size), nn.SiLU(),
                                 Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = (1000.0 * t.float()).unsqueeze(1) * self.freqs.unsqueeze(0)  # (B, F/2)
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
    """Multi-head self-attention with one fused qkv matmul and PyTorch's SDPA kernels."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(hidden_size, 3 * hidden_size)
        self.proj = Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                     # each (B, H, N, Dh)
        x = attention(q, k, v)                                             # (B, H, N, Dh)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))               # (B, N, D)


class Mlp(nn.Module):
    """The transformer's feed-forward branch: Linear, tanh-GELU (as DiT), Linear."""

    def __init__(self, hidden_size: int, mlp_ratio: float):
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.fc1 = Linear(hidden_size, inner)
        self.fc2 = Linear(inner, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(x), approximate="tanh")  # (B, N, D) -> (B, N, mlp_ratio * D)
        return self.fc2(h)                            # (B, N, D)


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated by the conditioning (adaLN-Zero).

    One Linear produces the shift, scale and gate of both branches from c; zeroed at init, the
    gates make the whole block the identity until training moves them.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = LayerNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = LayerNorm(hidden_size)
        self.mlp = Mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=-1)                      # each (B, D)
        x = torch.addcmul(x, gate_msa.unsqueeze(1), self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        x = torch.addcmul(x, gate_mlp.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x                                                           # (B, N, D)

    def fused_weights(self):
        """{name: (weight, row blocks)} of the weights that stack several matrices: q, k, v in
        attn.qkv; the six modulations in adaLN (forward's chunk(6)). Muon orthogonalizes each block."""
        return {"qkv": (self.attn.qkv.weight, 3), "adaln": (self.adaLN_modulation[-1].weight, 6)}


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
