"""Muon for the hidden matrices of DiT2D's transformer blocks, AdamW for everything else, as one
optimizer-like object (`MuonAdamW`) that the trainer steps, zeroes, schedules and checkpoints.

Muon (Keller Jordan, 2024; `torch.optim.Muon`) replaces a weight matrix's momentum by its nearest
semi-orthogonal matrix (a few Newton-Schulz iterations), so every direction of the update moves
at the same rate. It is meant for the hidden matrices only; this module owns the rule that picks
them (`muon_param_groups`):

    Muon   every 2-D weight inside `model.blocks`: attn.qkv, attn.proj, mlp.fc1, mlp.fc2 and the
           block's adaLN modulation
    AdamW  everything else: patch embedding, label table, timestep MLP, final layer (its adaLN
           and projection), and every bias

DiT2D fuses q/k/v into one (3D, D) weight and the six adaLN outputs (shift, scale, gate of both
branches) into one (6D, D) weight. Orthogonalizing such a stack as one matrix lets its blocks
trade update magnitude with each other; with `split_fused` each block is orthogonalized (and its
learning rate shape-adjusted) as the separate (D, D) matrix it is. That is the one change to
torch.optim.Muon's rule, so `ChunkedMuon` subclasses it (same constructor, checks, defaults and
state layout) and runs its step through the pure functions below; with one chunk per matrix and
bf16 the step is torch.optim.Muon's (pinned by tests/test_muon.py). On CPUs Newton-Schulz runs in
fp32 instead, because emulated bf16 matmuls are 10-20x slower there.

Learning-rate scaling: `match_rms_adamw` (Moonshot, "Muon is Scalable for LLM Training") scales
each update to the RMS of a typical AdamW update (0.2 * lr * sqrt(max(rows, cols)) on an
orthogonal matrix), so Muon's learning rate and weight decay live on AdamW's scale and the two
halves of the model move at comparable speeds under one schedule. `original` (Keller Jordan's
sqrt(max(1, rows / cols))) is offered too; on a square matrix it takes steps 0.2 * sqrt(width)
times smaller at the same rate (2.3x at width 128, 5.5x at 768).
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

# torch.optim.Muon's defaults (Keller Jordan's quintic, tuned for steepest slope at 0).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7
ADJUST_LR_FNS = ("match_rms_adamw", "original")


# ----------------------------------------------------------------------------- pure functions

def ns_dtype_for(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (tensor cores; torch.optim.Muon's choice), fp32 elsewhere: CPUs without bf16
    matrix units emulate it, 10-20x slower than fp32 on the 2-core machine of the benchmark."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def newton_schulz(matrices: torch.Tensor, steps: int = NS_STEPS, coefficients: Sequence[float] = NS_COEFFICIENTS,
                  eps: float = NS_EPS, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """An approximate U V^T of each matrix U S V^T of a (rows, cols) matrix or an (n, rows, cols)
    stack, computed in `dtype`. Singular values land near 1 (roughly 0.7..1.2) rather than on it,
    which costs nothing in training and saves iterations.

    torch.optim.Muon's arithmetic (which always uses bf16), batched: normalize each matrix by its
    Frobenius norm (so its spectral norm is <= 1), then iterate X <- a X + (b A + c A^2) X with
    A = X X^T on the wide orientation (the Gram matrix is the smaller side).
    """
    if matrices.dim() not in (2, 3):
        raise ValueError(f"Newton-Schulz needs a matrix or a stack of matrices, got shape {tuple(matrices.shape)}")
    a, b, c = coefficients
    x = matrices.to(dtype, copy=True).reshape(-1, *matrices.shape[-2:])
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x.div_(x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return (x.mT if tall else x).reshape(matrices.shape)


def orthogonalize(matrices: torch.Tensor, chunks: int = 1, steps: int = NS_STEPS,
                  coefficients: Sequence[float] = NS_COEFFICIENTS, eps: float = NS_EPS,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Newton-Schulz of each of `chunks` equal row blocks of a matrix (the q/k/v or adaLN parts of a
    fused weight) or of every matrix in a stack, in the input's shape; chunks=1 is the whole matrix."""
    rows, cols = matrices.shape[-2:]
    if rows % chunks:
        raise ValueError(f"a ({rows}, {cols}) matrix does not split into {chunks} row blocks")
    blocks = matrices.reshape(-1, rows // chunks, cols)
    return newton_schulz(blocks, steps, coefficients, eps, dtype).reshape(matrices.shape)


def adjusted_lr(lr: float, adjust_lr_fn: Optional[str], rows: int, cols: int) -> float:
    """The step size of an orthogonalized (rows, cols) update; None means `original`, as in torch."""
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn in (None, "original"):
        return lr * math.sqrt(max(1.0, rows / cols))
    raise ValueError(f"adjust_lr_fn must be one of {', '.join(ADJUST_LR_FNS)}, got {adjust_lr_fn!r}")


@torch.no_grad()
def muon_step_(params: List[torch.Tensor], grads: List[torch.Tensor], momentum_buffers: List[torch.Tensor], *,
               lr: float, weight_decay: float, momentum: float, nesterov: bool, chunks: int = 1,
               adjust_lr_fn: Optional[str] = None, steps: int = NS_STEPS,
               coefficients: Sequence[float] = NS_COEFFICIENTS, eps: float = NS_EPS,
               ns_dtype: torch.dtype = torch.bfloat16) -> None:
    """One Muon step on a list of matrices, in place on `params` and `momentum_buffers`.

    Per matrix: buffer <- lerp(buffer, grad, 1 - momentum); update = lerp(grad, buffer, momentum)
    (Nesterov) or the buffer; param <- param * (1 - lr * weight_decay) - lr' * orthogonalize(update,
    chunks), with lr' adjusted for the shape of one chunk. Matrices of one shape go through
    Newton-Schulz as one stack: a few batched matmuls per step rather than a few per matrix.
    """
    updates = []
    for grad, buf in zip(grads, momentum_buffers):
        buf.lerp_(grad, 1 - momentum)
        updates.append(grad.lerp(buf, momentum) if nesterov else buf)
    by_shape: Dict[Tuple[int, ...], List[int]] = {}
    for i, update in enumerate(updates):
        by_shape.setdefault(tuple(update.shape), []).append(i)
    for (rows, cols), index in by_shape.items():
        ortho = orthogonalize(torch.stack([updates[i] for i in index]), chunks, steps, coefficients, eps, ns_dtype)
        step_size = adjusted_lr(lr, adjust_lr_fn, rows // chunks, cols)
        for i, update in zip(index, ortho):
            params[i].mul_(1 - lr * weight_decay)
            params[i].add_(update, alpha=-step_size)


# ----------------------------------------------------------------------------- optimizers

class ChunkedMuon(torch.optim.Muon):
    """torch.optim.Muon whose param groups may carry `chunks` (default 1): each matrix of the group
    is orthogonalized as that many equal row blocks, in bf16 on GPUs and fp32 on CPUs
    (`ns_dtype_for`). State: one `momentum_buffer` per matrix, exactly as torch.optim.Muon keeps it."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            group.setdefault("chunks", 1)
            for p in group["params"]:
                if p.size(0) % group["chunks"]:
                    raise ValueError(f"a parameter of shape {tuple(p.shape)} does not split into "
                                     f"{group['chunks']} row blocks")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            if params:
                muon_step_(params, [p.grad for p in params], [self.state[p]["momentum_buffer"] for p in params],
                           lr=group["lr"], weight_decay=group["weight_decay"], momentum=group["momentum"],
                           nesterov=group["nesterov"], chunks=group["chunks"], adjust_lr_fn=group["adjust_lr_fn"],
                           steps=group["ns_steps"], coefficients=group["ns_coefficients"], eps=group["eps"],
                           ns_dtype=ns_dtype_for(params[0].device))
        return loss


class MuonAdamW:
    """A ChunkedMuon and an AdamW stepped as one optimizer.

    `param_groups` is the live list of both optimizers' groups (Muon's first), so an LR schedule
    that writes group["lr"] reaches both; `state_dict()` is {"muon": ..., "adamw": ...}, plain
    tensors and numbers that torch.load(weights_only=True) reads. torch.amp.GradScaler needs only
    `param_groups` (to unscale and check for inf) and `step()` (skipped on inf), so fp16 works.
    """

    def __init__(self, muon_groups: List[dict], adamw_groups: List[dict], *, momentum: float,
                 weight_decay: float, adjust_lr_fn: str, betas: Tuple[float, float], fused: bool = False):
        if adjust_lr_fn not in ADJUST_LR_FNS:
            raise ValueError(f"adjust_lr_fn must be one of {', '.join(ADJUST_LR_FNS)}, got {adjust_lr_fn!r}")
        self.muon = ChunkedMuon(muon_groups, momentum=momentum, weight_decay=weight_decay,
                                adjust_lr_fn=adjust_lr_fn)
        self.adamw = torch.optim.AdamW(adamw_groups, betas=betas, fused=fused)

    @property
    def param_groups(self) -> List[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self, closure=None):
        loss = self.muon.step(closure)  # evaluates the closure (once, with grad) before any update
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> Dict[str, dict]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: Dict[str, dict]) -> None:
        if not isinstance(state, dict) or set(state) != {"muon", "adamw"}:
            raise ValueError("this optimizer state was not written by --optimizer muon; resume with "
                             "the --optimizer the checkpoint was trained with")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


# ----------------------------------------------------------------------------- the parameter rule

def muon_param_groups(model: nn.Module, lr: float, split_fused: bool) -> Tuple[List[dict], List[nn.Parameter]]:
    """(Muon param groups at `lr`, the parameters left for AdamW) of a transformer whose
    `model.blocks` describe their fused weights (`fused_weights()`: {name: (weight, row blocks)},
    as DiTBlock does); every trainable parameter lands in exactly one of them.

    The groups are named for the start-up summary: `muon` (the blocks' other matrices) and one
    `muon_<name>` per fused weight (`muon_qkv`, `muon_adaln`), whose `chunks` are its row blocks
    with `split_fused` and 1 without. The layout is the same either way, so an optimizer state
    loads whatever the flag. Each group records `base_lr`, the peak rate the trainer's schedule scales.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not all(hasattr(b, "fused_weights") for b in blocks):
        raise ValueError(f"--optimizer muon needs a DiT2D (blocks with fused_weights() in model.blocks); "
                         f"{type(model).__name__} has none. Use --optimizer adamw")
    plain, fused = [], {}
    for block in blocks:
        chunks_of = {id(w): (name, chunks) for name, (w, chunks) in block.fused_weights().items()}
        for p in block.parameters():
            if not p.requires_grad or p.dim() != 2:
                continue
            if id(p) in chunks_of:
                name, chunks = chunks_of[id(p)]
                fused.setdefault(name, (chunks, []))[1].append(p)
            else:
                plain.append(p)
    groups = [{"name": "muon", "params": plain, "chunks": 1}]
    groups += [{"name": f"muon_{name}", "params": params, "chunks": chunks if split_fused else 1}
               for name, (chunks, params) in fused.items()]
    groups = [dict(g, lr=lr, base_lr=lr) for g in groups if g["params"]]
    taken = {id(p) for g in groups for p in g["params"]}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    return groups, rest
