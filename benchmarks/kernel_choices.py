"""Which kernel each of DiT's hot non-GEMM costs should use on this machine, measured at the model's shapes.

    python benchmarks/kernel_choices.py --device cuda                     # DiT-B/2: batch 128 (training), 1000 with CFG (sampling)
    python benchmarks/kernel_choices.py --preset tiny --device cpu --batch_size 4 --sample_batch 4   # smoke

The H200 profile (docs/speed.md) leaves two costs beside the GEMMs that a different kernel could
cut, and this script times the candidates alone, before any model change:
- attention over (B, H, N, Dh) in bf16, q, k, v as the model makes them (strided views of one packed
  qkv GEMM output): each SDPA backend (cuDNN, flash, memory-efficient; the model lets PyTorch pick),
  forward + backward at the training shape and forward at the sampling shape (CFG: 2 rows a sample);
  plus the picked backend on contiguous q, k, v (what the layout costs).
- the MLP's first GEMM and its tanh-GELU in bf16: the plain GEMM (the floor), eager GEMM then GELU,
  compiled (inductor fuses bias and GELU into one elementwise pass: the model's compiled path), and
  cuBLASLt's GELU epilogue (`torch._addmm_activation`: the GEMM writes gelu(x W^T + b), no second
  pass over the (rows, 4 D) activation; no derivative, so sampling only). On a CPU the epilogue's
  GELU is the exact one (within bf16 rounding of the tanh one); PyTorch falls back to a GEMM and a
  separate GELU where cuBLASLt's epilogue does not apply, which its time would show.
Each row: median milliseconds of --iters calls (--repeats timings), TFLOP/s of the counted matmul
FLOPs (attention 4 B H N^2 Dh forward, twice that backward; GEMM 2 M K N), and the output's largest
error against an fp32 reference, relative to the reference's largest value. A backend that cannot
run the shape or device gets a row saying so.
"""

import argparse
import os
import sys
from statistics import median
from typing import Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import sdpa_kernel  # noqa: E402

from benchmarks.common import (SDPA_BACKENDS, benchmark_parser, machine, parse_benchmark, time_call,  # noqa: E402
                               write_json)


def bench_parser() -> argparse.ArgumentParser:
    p = benchmark_parser()
    p.add_argument("--sample_batch", type=int, default=1000, help="samples per sampling batch (CFG: twice the rows)")
    p.add_argument("--iters", type=int, default=10, help="calls per timing")
    p.add_argument("--repeats", type=int, default=5, help="timings; the median is reported")
    return p


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


class Bench:
    """Times candidates and prints / records one row each."""

    def __init__(self, args, device: torch.device):
        self.args, self.device, self.machine = args, device, machine(device)

    def run(self, op: str, shape: str, choice: str, fn: Callable[[], torch.Tensor], flops: float,
            ref: Optional[torch.Tensor]) -> None:
        try:
            out = fn()   # also the warm-up (and compilation)
        except RuntimeError as err:   # a backend that cannot run this shape or device
            print(f"  {op} {shape}, {choice}: unavailable ({str(err).splitlines()[0][:120]})")
            write_json(self.args.json, {"bench": "kernel", "machine": self.machine, "op": op, "shape": shape,
                                        "choice": choice, "ms": None, "note": str(err).splitlines()[0][:200]})
            return
        err = relative_error(out, ref) if ref is not None else None

        def calls():
            for _ in range(self.args.iters):
                fn()

        seconds = median(time_call(calls, self.device) for _ in range(self.args.repeats)) / self.args.iters
        tflops = flops / seconds / 1e12
        print(f"  {op} {shape}, {choice}: {1000 * seconds:.3f} ms, {tflops:.1f} TFLOP/s"
              + (f", max error {err:.1e} (relative)" if err is not None else ""))
        write_json(self.args.json, {"bench": "kernel", "machine": self.machine, "op": op, "shape": shape,
                                    "choice": choice, "ms": 1000 * seconds, "tflops": tflops, "rel_err": err})


def attention_choices(bench: Bench, batch: int, heads: int, tokens: int, head_dim: int, backward: bool) -> None:
    """SDPA backends at one shape; q, k, v as the model's Attention makes them."""
    gen = torch.Generator(bench.device).manual_seed(0)
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, device=bench.device, generator=gen, dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                       # each (B, H, N, Dh), strided
    grad = torch.randn_like(q.contiguous()) if backward else None
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    shape = f"B {batch} H {heads} N {tokens} Dh {head_dim}" + (" fwd+bwd" if backward else " fwd")
    flops = 4 * batch * heads * tokens ** 2 * head_dim * (3 if backward else 1)

    def call(q, k, v, backend=None):
        def fn():
            with torch.enable_grad() if backward else torch.no_grad():
                leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
                if backend is None:
                    out = F.scaled_dot_product_attention(*leaves)
                else:
                    with sdpa_kernel(backend):
                        out = F.scaled_dot_product_attention(*leaves)
                if backward:
                    out.backward(grad)
                return out.detach()
        return fn

    for name, backend in SDPA_BACKENDS.items():
        bench.run("attention", shape, name, call(q, k, v, backend), flops, ref)
    bench.run("attention", shape, "picked by PyTorch (the model)", call(q, k, v), flops, ref)
    bench.run("attention", shape, "picked, contiguous q k v", call(q.contiguous(), k.contiguous(), v.contiguous()),
              flops, ref)


def gelu_choices(bench: Bench, rows: int, width: int, inner: int, backward: bool) -> None:
    """The MLP's first GEMM and tanh-GELU (bf16, as under autocast)."""
    gen = torch.Generator(bench.device).manual_seed(0)
    x = torch.randn(rows, width, device=bench.device, generator=gen).bfloat16()
    w = (torch.randn(inner, width, device=bench.device, generator=gen) * width ** -0.5).bfloat16()
    b = (torch.randn(inner, device=bench.device, generator=gen) * 0.1).bfloat16()
    ref = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate="tanh")
    grad = torch.randn_like(ref).bfloat16() if backward else None
    shape = f"{rows} x {width} -> {inner}" + (" fwd+bwd" if backward else " fwd")
    flops = 2 * rows * width * inner * (3 if backward else 1)

    def gemm_gelu(x, w, b):
        return F.gelu(F.linear(x, w, b), approximate="tanh")

    def call(fn, gelu=True):
        def run():
            with torch.enable_grad() if backward else torch.no_grad():
                xl, wl, bl = (t.detach().requires_grad_(backward) for t in (x, w, b))
                out = fn(xl, wl, bl) if gelu else F.linear(xl, wl, bl)
                if backward:
                    out.backward(grad)
                return out.detach()
        return run

    bench.run("mlp_gelu", shape, "GEMM only (the floor)", call(None, gelu=False), flops, None)
    bench.run("mlp_gelu", shape, "eager GEMM, then GELU", call(gemm_gelu), flops, ref)
    torch._dynamo.reset()
    bench.run("mlp_gelu", shape, "compiled (inductor: bias + GELU fused)",
              call(torch.compile(gemm_gelu, dynamic=False)), flops, ref)
    if not backward:
        bench.run("mlp_gelu", shape, "cuBLASLt GELU epilogue (torch._addmm_activation)",
                  call(lambda x, w, b: torch._addmm_activation(b, x, w.t(), use_gelu=True)), flops, ref)


def main(argv=None) -> int:
    bench_args = bench_parser()
    args, config, device = parse_benchmark(bench_args, argv, __doc__)
    if min(args.sample_batch, args.iters, args.repeats) < 1:
        bench_args.error(f"--sample_batch, --iters and --repeats must be >= 1, got "
                         f"{args.sample_batch}, {args.iters}, {args.repeats}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    tokens = (config.image_size // config.patch_size) ** 2
    head_dim = config.hidden_size // config.num_heads
    inner = int(config.hidden_size * config.mlp_ratio)
    bench = Bench(args, device)
    print(f"machine: {bench.machine}")
    print(f"kernels: width {config.hidden_size}, {config.num_heads} heads of {head_dim}, {tokens} tokens, "
          f"MLP {inner}; training batch {config.batch_size}, sampling batch {args.sample_batch} (x2 rows, CFG)")
    attention_choices(bench, config.batch_size, config.num_heads, tokens, head_dim, backward=True)
    attention_choices(bench, 2 * args.sample_batch, config.num_heads, tokens, head_dim, backward=False)
    gelu_choices(bench, config.batch_size * tokens, config.hidden_size, inner, backward=True)
    gelu_choices(bench, 2 * args.sample_batch * tokens, config.hidden_size, inner, backward=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
