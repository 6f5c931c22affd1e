"""nn.Linear and attention with a fast route for bf16 autocast on CPUs without bf16 instructions.

CPUs without bf16 instructions (no AVX-512: oneDNN reports no bf16 support) run a bf16 GEMM several
times slower than an fp32 one. There, under bf16 autocast, `Linear` and `attention` multiply the
bf16-rounded operands in fp32 and round the result to bf16: the same numbers a bf16 GEMM with
fp32 accumulation gives, at fp32 speed (`set_cpu_bf16_matmul` picks the route). Everywhere else
(CUDA, fp32, CPUs with bf16 kernels) they are exactly nn.Linear and F.scaled_dot_product_attention.
"""

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

_cpu_bf16_matmul_in_fp32 = False


def set_cpu_bf16_matmul(mode: str) -> None:
    """How bf16-autocast GEMMs and attention run on the CPU.

    "auto" (the default): in fp32 on bf16-rounded operands when this CPU has no fast bf16 kernels,
    natively otherwise. "fp32" / "native" force one path (benchmarks measure both).
    """
    global _cpu_bf16_matmul_in_fp32
    if mode not in ("auto", "fp32", "native"):
        raise ValueError(f"CPU bf16 matmul mode must be auto, fp32 or native, got {mode!r}")
    slow_bf16 = not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    _cpu_bf16_matmul_in_fp32 = mode == "fp32" or (mode == "auto" and slow_bf16)


set_cpu_bf16_matmul("auto")


def _bf16_via_fp32(x: torch.Tensor) -> bool:
    """True where a bf16-autocast matmul on x should run as an fp32 one (see the module doc).

    The device test comes first: on a GPU the rest is never evaluated, so the CPU probes cannot
    enter (or break) a compiled CUDA graph.
    """
    return (x.device.type == "cpu" and _cpu_bf16_matmul_in_fp32 and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def _round_bf16(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """x rounded to bf16 and held in fp32 (exact): a bf16 operand for an fp32 kernel."""
    return None if x is None else x.to(torch.bfloat16).float()


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) that takes the fp32 route for bf16 on slow-bf16 CPUs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _bf16_via_fp32(x):
            return super().forward(x)
        with torch.autocast("cpu", enabled=False):
            out = F.linear(_round_bf16(x), _round_bf16(self.weight), _round_bf16(self.bias))
        return out.to(torch.bfloat16)


def _forward_ad(x: torch.Tensor) -> bool:
    """True when x carries a forward-mode tangent (torch.func.jvp or forward_ad dual tensors).

    Never under torch.compile: dynamo cannot trace the functorch query (every attention call
    would split the compiled graph), and MeanFlow takes its JVP on the unwrapped model, where
    blocks compiled in place (--compile_mode blocks) run eagerly on its functorch-wrapped tensors
    (tests/test_meanflow.py checks that the target is the eager one).
    """
    if torch.compiler.is_compiling():
        return False
    return (torch._C._functorch.is_functorch_wrapped_tensor(x)
            or torch.autograd.forward_ad.unpack_dual(x).tangent is not None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA over (B, H, N, Dh); flash / memory-efficient kernels on CUDA.

    Under forward-mode AD (MeanFlow's JVP) it is written out as softmax(q k^T / sqrt(Dh)) v: the
    fused SDPA kernels (flash on CUDA and CPU) have no forward-mode derivative.
    """
    if _forward_ad(q):
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5                  # (B, H, N, N)
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype) @ v
    if not _bf16_via_fp32(q):
        return F.scaled_dot_product_attention(q, k, v)
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(_round_bf16(q), _round_bf16(k), _round_bf16(v))
    return out.to(torch.bfloat16)
