"""Process-group set-up for torchrun (one process per GPU; gloo on CPU) and small collectives.

A plain `python script.py` run is a world of one and touches no process group. Under torchrun
(RANK, WORLD_SIZE, LOCAL_RANK set) each process joins the group, picks its GPU, and rank 0 alone
logs and writes files; `torchrun --nproc_per_node 1` too (as nanoGPT), so that one GPU runs the
multi-GPU path (NCCL, DDP) the way eight do.
"""

import datetime
import os
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist


# Rank 0 alone may work for long minutes before the others' next collective (a download, decoding
# a dataset, encoding latents, FID reference statistics); they wait for it on the gloo group with
# this timeout instead of NCCL's default 10 minutes.
LONG_WAIT = datetime.timedelta(hours=2)

# The gloo group of this process's torchrun world (set by setup_distributed), for host-side waits.
_cpu_group = None


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: Optional[str] = None  # the process group's ("nccl" or "gloo") under torchrun, else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(name)


def setup_distributed(device_name: str) -> DistInfo:
    """Join the torchrun process group if there is one; return rank, world size and device."""
    device = resolve_device(device_name)
    if "RANK" not in os.environ:
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        return DistInfo(0, 0, 1, device)
    global _cpu_group
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    # A gloo group for host-side agreements (stop flags, waits) that must not sync the GPU, with
    # its own timeout: every rank's side of wait_for_all_ranks waits up to LONG_WAIT.
    _cpu_group = dist.new_group(backend="gloo", timeout=LONG_WAIT)
    return DistInfo(rank, local_rank, world_size, device, dist.get_backend())


def cleanup_distributed() -> None:
    global _cpu_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _cpu_group = None


T = TypeVar("T")


def _reduce_flag(flag: bool, op) -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=op, group=_cpu_group)  # host-only: no GPU sync
    return bool(value.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is set on any rank (outside torchrun: `flag`)."""
    return _reduce_flag(flag, dist.ReduceOp.MAX)


def all_ranks(flag: bool) -> bool:
    """True on every rank when `flag` is set on every rank (outside torchrun: `flag`)."""
    return _reduce_flag(flag, dist.ReduceOp.MIN)


def wait_for_all_ranks() -> None:
    """A barrier with the LONG_WAIT timeout (a no-op outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        dist.monitored_barrier(group=_cpu_group, timeout=LONG_WAIT)


def rank_zero_first(rank: int, build: Callable[[], T]) -> T:
    """`build()` on rank 0 first, then on the other ranks, so what rank 0 downloads or caches is
    on disk, whole, when they look for it (8 ranks extracting one tarball at once corrupt it)."""
    if rank != 0:
        wait_for_all_ranks()
    result = build()
    if rank == 0:
        wait_for_all_ranks()
    return result
