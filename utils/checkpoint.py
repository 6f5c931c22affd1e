"""The one checkpoint format of the repo: atomic writes, validated loads, resume lookup, RNG state.
Rebuilding a model from a checkpoint is rebuild.py's job (it needs models/, a layer above this one).

A checkpoint is a plain dict that `torch.load(weights_only=True)` reads:
    kind       "flow_matching" | "vqvae"   (which script wrote it)
    model, ema state dicts of the unwrapped modules (no `module.` / `_orig_mod.` prefixes)
    optimizer, scaler (or None), step, config (dataclasses.asdict), rng, data {epoch, samples, images}
               (the epoch, how many of its samples all ranks have read, and the dataset's size)
    log_window {loss_sum, steps, extras_sum, extras_steps}: the open log window, so the first log line after a resume
               averages the same steps (absent in checkpoints from before 2026-12-06)
    plus any extras the objective adds (e.g. latent statistics).
"""

import contextlib
import dataclasses
import glob
import hashlib
import os
import random
import re
import socket
import time
from typing import Any, BinaryIO, Callable, Dict, List, Optional

import numpy as np
import torch

CHECKPOINT_PATTERN = "checkpoint_{step:07d}.pt"
FINAL_NAMES = {"flow_matching": "flow_matching_final.pt", "vqvae": "vqvae.pt"}
# The files of a run (periodic checkpoints, metrics.jsonl, config.json, sample grids) are prefixed
# by its kind, so a VQ-VAE run and a flow run can share one folder (the seed's layout:
# checkpoints/vqvae.pt beside the flow model's files) without overwriting, pruning or resuming
# each other's files.
RUN_PREFIXES = {"flow_matching": "", "vqvae": "vqvae_"}


def run_file(folder: str, kind: str, name: str) -> str:
    """The path of file `name` of a run of this kind in `folder`."""
    return os.path.join(folder, RUN_PREFIXES[kind] + name)


def periodic_checkpoint(checkpoint_dir: str, kind: str, step: int) -> str:
    return run_file(checkpoint_dir, kind, CHECKPOINT_PATTERN.format(step=step))


def rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch and CUDA generator states, as types weights_only can load."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *map(float, np_state[2:])],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_checkpoint(kind: str, model: torch.nn.Module, ema: torch.nn.Module, optimizer, scaler,
                        step: int, config, epoch: int, samples: int, images: int, log_window: Dict[str, Any],
                        extras: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The dict a training run saves (the format in the module docstring): the unwrapped model
    and EMA, optimizer and GradScaler (None when off) state, step, config as a plain dict, RNG
    state, data position (epoch, samples of it read by all ranks, images in the dataset), log window
    and the objective's extras."""
    return {"kind": kind, "model": model.state_dict(), "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "step": step, "config": dataclasses.asdict(config), "rng": rng_state(),
            "data": {"epoch": epoch, "samples": samples, "images": images}, "log_window": log_window, **(extras or {})}


def state_fingerprint(state: Dict[str, Any]) -> str:
    """SHA-256 of a state dict's names and values (tensors by their bytes, anything else by its
    repr): the identity of a set of weights (a VQ-VAE's latents, the FID Inception's statistics)."""
    digest = hashlib.sha256()
    for name, value in sorted(state.items()):
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


STALE_TMP_S = 600   # a temporary file untouched this long, of a process gone, is a killed writer's


def write_atomically(path: str, write: Callable[[BinaryIO], None]) -> None:
    """`write(f)` into a temporary file in the same folder, fsync, then os.replace onto `path`.

    A crash, a SIGKILL or a full disk mid-write leaves the previous file at `path` untouched. The
    temporary file such a process leaves (`path`.tmp-HOST-PID, possibly a checkpoint's or a dataset
    cache's size) is removed, best effort, by a later write into the same folder (to any path: a stop
    checkpoint's name is never written again) from the same host once that
    process is gone and the file has not changed for STALE_TMP_S: another host's (a shared file
    system) has PIDs we cannot check, and a container sharing the host name but not its PID
    namespace is still writing to a file it keeps fresh. On POSIX the folder is fsynced too (best
    effort: some network file systems refuse it), so that the rename itself survives a power loss.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    marker = f".tmp-{socket.gethostname()}-"
    for stale in glob.glob(os.path.join(glob.escape(folder), "*" + glob.escape(marker) + "*")):
        pid = stale.rpartition(marker)[2]
        with contextlib.suppress(OSError):   # another writer may remove it first
            if (re.fullmatch("[0-9]+", pid) and not process_alive(int(pid))
                    and time.time() - os.path.getmtime(stale) > STALE_TMP_S):
                os.remove(stale)
    tmp = f"{path}{marker}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if os.name == "posix":
            with contextlib.suppress(OSError):   # the file is in place; only the rename's durability is at stake
                fd = os.open(folder, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs (on this machine; one of another user counts). Off POSIX
    every process counts as running: there os.kill(pid, 0) would end it."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    """torch.save(state) atomically (write_atomically)."""
    write_atomically(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str, kind: Optional[str] = None) -> Dict[str, Any]:
    """Load with weights_only=True; FileNotFoundError / ValueError name the path and the fix."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass the path of a .pt file "
                                f"written by training (e.g. checkpoints/flow_matching_final.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, wrong format, unpickling refused
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise ValueError(f"checkpoint {path} cannot be read ({type(err).__name__}: {reason}); it is "
                         f"truncated or not a checkpoint of this repo") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint of this repo (no 'model' and 'config' keys)")
    if kind is not None and ckpt.get("kind") != kind:
        raise ValueError(f"{path} is a {ckpt.get('kind')!r} checkpoint, not a {kind!r} one; pass one that "
                         f"train_{kind}.py wrote (its last is {FINAL_NAMES[kind]})")
    return ckpt


PERIODIC_NAME = re.compile(r"checkpoint_(\d+)\.pt$")   # CHECKPOINT_PATTERN's names, any run prefix


def is_training_checkpoint_name(path: str) -> bool:
    """Whether `path` is named as a run's periodic or final checkpoint (any kind)."""
    return os.path.basename(path) in FINAL_NAMES.values() or PERIODIC_NAME.search(path) is not None


def checkpoint_step(path: str) -> int:
    """The step of a checkpoint, read from its name or, for a final one, from the file."""
    match = PERIODIC_NAME.search(path)
    if match:
        return int(match.group(1))
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception as err:  # truncated, foreign or not a checkpoint at all
        raise ValueError(f"checkpoint {path} cannot be read ({type(err).__name__}); it is truncated "
                         f"or not a checkpoint of this repo") from None


def periodic_checkpoints(checkpoint_dir: str, kind: str) -> List[str]:
    """The periodic checkpoints of this kind in the folder, by their exact name: a user's
    checkpoint_best.pt beside them is neither read, resumed from nor pruned."""
    prefix = len(RUN_PREFIXES[kind])   # the glob fixes the kind's prefix, PERIODIC_NAME the rest
    return [p for p in glob.glob(run_file(glob.escape(checkpoint_dir), kind, "checkpoint_*.pt"))
            if PERIODIC_NAME.fullmatch(os.path.basename(p)[prefix:])]


def run_checkpoints(checkpoint_dir: str, kind: str) -> List[str]:
    """Every checkpoint (periodic and final) of this kind in the folder."""
    found = periodic_checkpoints(checkpoint_dir, kind)
    final = os.path.join(checkpoint_dir, FINAL_NAMES[kind])
    return found + [final] if os.path.isfile(final) else found


def find_latest(checkpoint_dir: str, kind: str) -> Optional[str]:
    """The newest checkpoint (highest step) of this kind in the folder, or None."""
    candidates = run_checkpoints(checkpoint_dir, kind)
    return max(candidates, key=checkpoint_step) if candidates else None


def start_checkpoint(checkpoint_dir: str, kind: str, resume: Optional[str]) -> Optional[str]:
    """The checkpoint a run with this --resume starts from, or None for a fresh start."""
    return resume if resume != "latest" else find_latest(checkpoint_dir, kind)


def check_nothing_ahead(checkpoint_dir: str, kind: str, resume: Optional[str], fix: Optional[str] = None) -> None:
    """ValueError when the folder holds checkpoints past the step this run starts from (0, or the
    step of its --resume checkpoint); the training scripts call it before any other work.

    They belong to another run (or to this run's abandoned future): they would outlive this run's
    own checkpoints when old ones are pruned, `--resume latest` would return to them, and the
    final one would be overwritten.
    """
    start = start_checkpoint(checkpoint_dir, kind, resume)
    step = checkpoint_step(start) if start else 0
    ahead = sorted((p for p in run_checkpoints(checkpoint_dir, kind) if checkpoint_step(p) > step),
                   key=checkpoint_step)
    if ahead:
        names = ", ".join(f"{os.path.basename(p)} (step {checkpoint_step(p)})" for p in ahead)
        raise ValueError(f"--checkpoint_dir {checkpoint_dir} holds checkpoints past step {step}, where this "
                         f"run starts: {names}. " + (fix or "Pass --resume latest to continue that run (with its "
                                                     "flags), another --checkpoint_dir for a new run, or move them away"))


def prune_checkpoints(checkpoint_dir: str, keep: int, kind: str = "flow_matching") -> None:
    """Delete all but the `keep` newest periodic checkpoints of this kind (final ones are never pruned)."""
    periodic = sorted(periodic_checkpoints(checkpoint_dir, kind), key=checkpoint_step)
    for path in periodic[:-keep]:
        os.remove(path)


def with_defaults(saved: Dict[str, Any], config) -> Dict[str, Any]:
    """A checkpoint's config with every field it predates set to its default in `config`'s
    dataclass (the value those runs had)."""
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    return {**defaults, **saved}


def check_config_fits(saved: Dict[str, Any], current: Dict[str, Any], fields, path: str,
                      fix: str = "Drop these flags (or pass the checkpoint's values) to resume it",
                      use: str = "resume it") -> None:
    """ValueError listing every field of `fields` (architecture, optimizer, data order) on which the
    two configs disagree. A latent run resumed (or started from, `use`) without its VQ-VAE, or a
    pixel run with one, is named as such: the latent fields it would list come from that flag, not
    from the user's."""
    was, now = saved.get("vqvae_checkpoint"), current.get("vqvae_checkpoint")
    if was and not now:
        raise ValueError(f"checkpoint {path} was trained on the latents of VQ-VAE {was}: {use} with "
                         f"--vqvae_checkpoint {was}")
    if now and not was:
        raise ValueError(f"checkpoint {path} was trained in pixel space: {use} without --vqvae_checkpoint")
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
             for k in fields if saved.get(k) != current.get(k)]
    if diffs:
        raise ValueError(f"the config does not fit checkpoint {path}: " + "; ".join(diffs) + f". {fix}")

