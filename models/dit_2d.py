"""DiT2D: a Diffusion Transformer over 2D patches that predicts the flow-matching velocity.

    v = DiT2D(...)(x_t, t, y)    x_t (B, C, H, W), t (B,) in [0, 1], y (B,) int64 -> v (B, C, H, W)
    u = DiT2D(..., two_times=True)(x_t, t, y, r)     MeanFlow: the average velocity from t to r

With `two_times` (the MeanFlow objective) the conditioning also embeds the interval r - t; that
embedder's output layer starts at zero, so a flow-matching checkpoint loads into it and predicts
its own velocity, and r = t (or r omitted) always asks for the instantaneous velocity.

The original DiT (Peebles & Xie: sin-cos positions, GELU MLP, times embedded as 1000 t) is the default;
`qk_norm`, `mlp="swiglu"`, `positions` ("rope" or "sincos_rope"), `time_embed_scale` and `fp32_residual` are
the options of models/layers.py and of the stream's precision.

Labels are 0..num_classes-1; label `num_classes` is the null label used for classifier-free
guidance; num_classes=0 builds an unconditional model (y is ignored and may be None). The model
only predicts: the loss and the samplers live in flow_matching.py.
"""

from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from models.layers import (DiTBlock, FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder, rope_2d_angles,
                           sincos_2d)

POSITIONS = ("sincos", "rope", "sincos_rope")


class DiT2D(nn.Module):
    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 3,
                 hidden_size: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, num_classes: int = 10, qk_norm: bool = False,
                 mlp: str = "gelu", positions: str = "sincos", fp32_residual: bool = False,
                 two_times: bool = False, time_embed_scale: float = 1000.0):
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.gradient_checkpointing = False
        self.fp32_residual = fp32_residual
        grid = input_size // patch_size

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, scale=time_embed_scale)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes > 0 else None
        self.r_embedder = TimestepEmbedder(hidden_size, scale=time_embed_scale) if two_times else None   # embeds r - t
        # Fixed tables, rebuilt from the config: non-persistent buffers (not in checkpoints).
        table = sincos_2d(hidden_size, grid).unsqueeze(0) if positions != "rope" else None  # (1, N, D)
        angles = rope_2d_angles(hidden_size // num_heads, grid) if positions != "sincos" else None  # (N, Dh/2)
        self.register_buffer("pos_embed", table, persistent=False)
        self.register_buffer("rope_cos", None if angles is None else angles.cos(), persistent=False)
        self.register_buffer("rope_sin", None if angles is None else angles.sin(), persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, mlp)
                                    for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialization.

        Xavier for every Linear, N(0, 0.02) for the label table and the timestep MLP (as in DiT).
        The adaLN modulations of every block are zeroed, so every gate is 0 and each block starts
        as the identity (the residual stream passes through untouched); the final layer's
        modulation and projection are zeroed too, so a fresh model predicts exactly v = 0.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.r_embedder is not None:
            # Zero output: the interval changes nothing until trained, so flow-matching weights
            # loaded into this model give exactly their velocity.
            nn.init.normal_(self.r_embedder.mlp[0].weight, std=0.02)
            nn.init.zeros_(self.r_embedder.mlp[2].weight)
            nn.init.zeros_(self.r_embedder.mlp[2].bias)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W), the inverse of PatchEmbed's layout."""
        B, N, _ = x.shape
        p, C = self.patch_size, self.in_channels
        h = w = int(N ** 0.5)
        x = x.reshape(B, h, w, C, p, p).permute(0, 3, 1, 4, 2, 5)          # (B, C, h, p, w, p)
        return x.reshape(B, C, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None,
                r: Optional[torch.Tensor] = None) -> torch.Tensor:
        # Nothing here reads a value back to the host (that would stall a CUDA step and split a
        # compiled graph): labels are validated where they enter (the data layer, the scripts'
        # flags, flow_matching.sample).
        x = self.x_embedder(x)                                             # (B, N, D)
        # An fp32 stream stays fp32 through the blocks: their residual adds promote the branches'
        # bf16 outputs; otherwise the table is cast so that a bf16 stream stays bf16.
        x = x.float() if self.fp32_residual else x
        if self.pos_embed is not None:
            x = x + self.pos_embed.to(x.dtype)                             # (B, N, D)
        rope = (self.rope_cos, self.rope_sin) if self.rope_cos is not None else None
        c = self.t_embedder(t)                                             # (B, D)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y)                                     # (B, D)
        if self.r_embedder is not None:
            c = c + self.r_embedder(r - t if r is not None else torch.zeros_like(t))  # (B, D)
        else:
            assert r is None, "a flow-matching DiT2D predicts the velocity at t only: build it with two_times"
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if checkpointing:
                x = checkpoint(block, x, c, rope, use_reentrant=False)
            else:
                x = block(x, c, rope)                                      # (B, N, D)
        x = self.final_layer(x, c)                                         # (B, N, p*p*C)
        return self.unpatchify(x)                                          # (B, C, H, W)


def input_shape(config) -> Tuple[int, int, int]:
    """(C, H, W) of what the DiT2D of a config (or its checkpointed dict) sees: VQ-VAE latents
    when latent_size is set (a latent run), else images."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k)
    if get("latent_size") is not None:
        return get("latent_channels"), get("latent_size"), get("latent_size")
    return get("in_channels"), get("image_size"), get("image_size")


def dit_from_config(config) -> DiT2D:
    """Build the DiT2D a (flow-matching) config or its checkpointed dict describes."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k)
    channels, size, _ = input_shape(config)
    return DiT2D(input_size=size, patch_size=get("patch_size"),
                 in_channels=channels, hidden_size=get("hidden_size"),
                 depth=get("depth"), num_heads=get("num_heads"), mlp_ratio=get("mlp_ratio"),
                 num_classes=get("num_classes"), **options(config))


def options(config) -> dict:
    """The DiT2D options beyond the original DiT; a checkpoint written before they existed has
    none of them and gets the original DiT."""
    get = config.get if isinstance(config, dict) else lambda k, default: getattr(config, k)
    return dict(qk_norm=get("qk_norm", False), mlp=get("mlp", "gelu"), positions=get("positions", "sincos"),
                fp32_residual=get("fp32_residual", False),
                two_times=get("objective", "flow_matching") == "meanflow",
                time_embed_scale=get("time_embed_scale", 1000.0))

