"""Post-hoc EMA (EDM2, Karras et al. 2024): choose the EMA length after training.

    python -m evaluation.posthoc_ema checkpoints --sigma_rel 0.07 [--at_step N] -o checkpoints/ema_0.07.pt

A run trained with --ema_snapshot_every N keeps a power-function EMA per --ema_snapshot_sigma_rels
entry (default 0.05 and 0.10) beside the sampling EMA and writes them all every N steps (and at the last step) to
CHECKPOINT_DIR/ema_snapshots/ema_STEP.pt. Each snapshot is a known average of the trained weights
theta_0..theta_T; any other power-function average -- another sigma_rel, or an earlier end point --
is approximated by the linear combination of snapshots whose averaging weights are closest to the
wanted ones in least squares, and the same combination of the snapshots' weights is that EMA.

The profile. Update k (0-based) of the trainer's EMA has decay power_ema_decay(k, gamma) =
(1 + k) / (gamma + 2 + k), so after T updates theta_j carries a weight ~ j^gamma: EDM2's power
function, whose width relative to the run's length is sigma_rel = sqrt((g + 1) / ((g + 2)^2 (g + 3))).
profile_weights() computes these weights exactly for the discrete updates (not EDM2's continuous
approximation), so a tracked profile is recovered exactly (coefficient 1 on its own snapshot) and the
fit is measured in the same units as the iterates.

The output is a checkpoint that generate_flow_matching.py and evaluate_fid.py read as any other: its
`ema` and `model` entries both hold the reconstruction (there are no raw weights of a sigma_rel), plus
the run's config, the objective's extras (e.g. latent statistics) and `posthoc_ema` (sigma_rel, step,
the snapshots and their coefficients). It cannot be resumed (no optimizer).
"""

import argparse
import glob
import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from configs.cli import ArgumentParser, finite_float
from utils.checkpoint import FINAL_NAMES, is_training_checkpoint_name, run_file, save_checkpoint, start_checkpoint
from utils.validation import MAX_SIGMA_REL, check_sigma_rel, check_writable

SNAPSHOT_DIR = "ema_snapshots"
SNAPSHOT_PATTERN = "ema_{step:07d}.pt"
SNAPSHOT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def power_ema_decay(step: int, gamma: float) -> float:
    """The decay of EMA update `step` (0-based) that weighs theta_j by ~j^gamma (EDM2's power-function EMA)."""
    return (1.0 + step) / (gamma + 2.0 + step)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma whose power-function profile has relative width sigma_rel: the largest real
    root of sigma_rel^2 (g + 2)^2 (g + 3) = g + 1, i.e. g^3 + 7g^2 + (16 - s^-2) g + (12 - s^-2) = 0."""
    check_sigma_rel(sigma_rel, "sigma_rel")
    t = sigma_rel ** -2
    return float(np.roots([1.0, 7.0, 16.0 - t, 12.0 - t]).real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    return ((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) ** 0.5


def _shares(gamma: float, rows: np.ndarray) -> np.ndarray:
    """What update j - 1 hands theta_j: 1 - d_{j-1} = (gamma + 1) / (gamma + 1 + j); theta_0 starts with 1."""
    return np.where(rows == 0, 1.0, (gamma + 1.0) / (gamma + 1.0 + rows))


def _log_decay_prefix(gamma: float, step: int) -> np.ndarray:
    """L (step + 1,): L[m] = sum of log d_k for k < m, so theta_j's share shrinks by exp(L[s] - L[j])
    over updates j .. s - 1."""
    k = np.arange(step, dtype=np.float64)
    return np.concatenate([[0.0], np.cumsum(np.log1p(k) - np.log(gamma + 2.0 + k))])


def profile_weights(gamma: float, step: int) -> np.ndarray:
    """The weights (step + 1,) of theta_0..theta_step in the trainer's power EMA after `step` updates,
    update k being ema = d_k * ema + (1 - d_k) * theta_{k+1} with d_k = power_ema_decay(k, gamma);
    theta_0 is the initial weights the EMA starts from. They sum to 1."""
    prefix = _log_decay_prefix(gamma, step)
    return _shares(gamma, np.arange(step + 1)) * np.exp(prefix[-1] - prefix)


def solve_coefficients(snapshots: Sequence[Tuple[float, int]], gamma: float, step: int,
                       chunk_rows: Optional[int] = None) -> Tuple[np.ndarray, float]:
    """Least-squares coefficients x of the snapshots ((gamma_i, step_i), each step_i <= step) whose
    combined profile sum_i x_i p_i best matches the profile (gamma, step); returns (x, the fit's
    relative error ||sum x_i p_i - p|| / ||p||).

    The (step + 1, n) matrix of profiles is never held: its rows stream through a QR factorization
    in chunks (TSQR), whose R has the singular values of the whole matrix, so the solution is
    lstsq's at O(n^2) memory (a dense one is 16 GB for 2,000 snapshot columns of a 1M-step run).
    """
    assert snapshots and max(s for _, s in snapshots) <= step, (snapshots, step)
    n = len(snapshots)
    chunk_rows = chunk_rows or max(n + 1, 2 ** 20 // (n + 1))   # ~8 MB a chunk
    prefixes = {g: _log_decay_prefix(g, step) for g in {*(g for g, _ in snapshots), gamma}}
    r, target_sq = np.zeros((0, n + 1)), 0.0
    for first in range(0, step + 1, chunk_rows):
        rows = np.arange(first, min(first + chunk_rows, step + 1))
        block = np.zeros((len(rows), n + 1))
        for i, (g, s) in enumerate([*snapshots, (gamma, step)]):
            live = rows <= s
            block[live, i] = _shares(g, rows[live]) * np.exp(prefixes[g][s] - prefixes[g][rows[live]])
        target_sq += float(block[:, n] @ block[:, n])
        r = np.linalg.qr(np.vstack([r, block]), mode="r")
    # min ||A x - b|| = min ||R11 x - r12|| with the rest r22 (R of [A | b]) left over.
    x = np.linalg.lstsq(r[:n, :n], r[:n, n], rcond=None)[0]
    residual = np.linalg.norm(r[:n, :n] @ x - r[:n, n]) ** 2 + (r[n, n] ** 2 if r.shape[0] > n else 0.0)
    return x, float(np.sqrt(residual / target_sq))


# ----------------------------------------------------------------------------- snapshots on disk

def snapshot_dir(checkpoint_dir: str, kind: str = "flow_matching") -> str:
    return run_file(checkpoint_dir, kind, SNAPSHOT_DIR)


def snapshot(step: int, sigma_rels: Sequence[float], emas: Sequence[torch.nn.Module], dtype: str,
             config: Dict[str, Any], kind: str, extras: Dict[str, Any]) -> Dict[str, Any]:
    """One snapshot file's contents: the EMAs' floating-point tensors in `dtype`, and what a
    reconstruction needs to make a checkpoint (kind, config, the objective's extras)."""
    def cast(state):
        return {k: v.detach().to("cpu", SNAPSHOT_DTYPES[dtype]) if v.is_floating_point() else v.detach().cpu()
                for k, v in state.items()}

    return {"kind": kind, "step": step, "sigma_rels": list(sigma_rels),
            "gammas": [sigma_rel_to_gamma(s) for s in sigma_rels],
            "emas": [cast(ema.state_dict()) for ema in emas], "config": config, "extras": extras}


def list_snapshots(folder: str) -> List[Tuple[int, str]]:
    """[(step, path)] of the snapshots in `folder`, by step."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(folder), "ema_*.pt")):
        match = re.fullmatch(r"ema_(\d+)\.pt", os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def check_no_earlier_snapshots(checkpoint_dir: str, kind: str, resume: Optional[str]) -> None:
    """ValueError when a run that starts from step 0 finds snapshots in its folder: they are another
    run's, and every reconstruction from the folder would mix them with this run's. (A resumed
    run rewrites the snapshots past its step identically.) The training scripts call it first."""
    if start_checkpoint(checkpoint_dir, kind, resume) is not None:
        return
    folder = snapshot_dir(checkpoint_dir, kind)
    found = list_snapshots(folder) if os.path.isdir(folder) else []
    if found:
        raise ValueError(f"--checkpoint_dir {checkpoint_dir} holds {len(found)} post-hoc EMA snapshots of an "
                         f"earlier run ({folder}, steps {found[0][0]}..{found[-1][0]}); a new run would mix its "
                         f"own with them. Use another --checkpoint_dir, or move {folder} away")


def find_snapshot_dir(run: str, kind: str = "flow_matching") -> str:
    """The snapshot folder of a run: `run` itself when it holds snapshots, else its SNAPSHOT_DIR."""
    for folder in (run, snapshot_dir(run, kind)):
        if os.path.isdir(folder) and list_snapshots(folder):
            return folder
    raise ValueError(f"{run} holds no post-hoc EMA snapshots (no {SNAPSHOT_DIR}/ema_*.pt): train with "
                     f"--ema_snapshot_every N (e.g. the --save_every interval) to keep them")


def reconstruct(run: str, sigma_rel: float, at_step: Optional[int] = None, kind: str = "flow_matching",
                verbose: bool = False) -> Dict[str, Any]:
    """The checkpoint dict of the power-function EMA of `sigma_rel` at step `at_step` (default: the
    last snapshot) of the run in folder `run`, from the snapshots up to that step."""
    check_sigma_rel(sigma_rel, "--sigma_rel")
    folder = find_snapshot_dir(run, kind)
    available = list_snapshots(folder)
    at_step = available[-1][0] if at_step is None else at_step
    used = [(s, p) for s, p in available if s <= at_step]
    if not used or used[-1][0] != at_step:
        # The newest weights enter only through the snapshot of that step: without it the fit
        # extrapolates, and its coefficients shrink the weights towards zero.
        before = f"; the nearest before it is step {used[-1][0]}" if used else ""
        raise ValueError(f"no EMA snapshot at step {at_step} in {folder} (snapshots at steps {available[0][0]}.."
                         f"{available[-1][0]}, every --ema_snapshot_every steps{before}): rebuild at a snapshot's "
                         f"step (python -m evaluation.posthoc_ema RUN --at_step S), or evaluate a checkpoint "
                         f"written at one")
    files = [torch.load(p, map_location="cpu", weights_only=True, mmap=True) for _, p in used]
    columns = [(g, f["step"]) for f in files for g in f["gammas"]]
    gamma = sigma_rel_to_gamma(sigma_rel)
    coefficients, fit_error = solve_coefficients(columns, gamma, at_step)
    if verbose:
        print(f"sigma_rel {sigma_rel} (gamma {gamma:.3f}) at step {at_step} from {len(columns)} EMA snapshots "
              f"(steps {used[0][0]}..{used[-1][0]}); profile fit error {fit_error:.2e} (relative L2)")
    # Accumulate in fp64: the coefficients have both signs and cancel.
    states = [state for f in files for state in f["emas"]]
    combined = {}
    for key, value in states[-1].items():
        if value.is_floating_point():
            total = torch.zeros(value.shape, dtype=torch.float64)
            for x, state in zip(coefficients, states):
                total.add_(state[key].double(), alpha=float(x))
            combined[key] = total.float()
        else:
            combined[key] = value.clone()
    last = files[-1]
    return {"kind": last["kind"], "model": combined, "ema": combined, "step": at_step, "config": last["config"],
            "posthoc_ema": {"sigma_rel": sigma_rel, "gamma": gamma, "fit_error": fit_error,
                            "snapshots": [f["step"] for f in files], "coefficients": coefficients.tolist()},
            **last["extras"]}


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the run's --checkpoint_dir (or its ema_snapshots folder)")
    p.add_argument("--sigma_rel", type=finite_float, required=True,
                   help=f"EMA length relative to the run, in (0, {MAX_SIGMA_REL:.3f}); the default EMA is 0.09")
    p.add_argument("--at_step", type=int, default=None,
                   help="the EMA as it was at this step, a snapshot's, from the snapshots up to it (default: the last snapshot)")
    p.add_argument("--kind", default="flow_matching", choices=sorted(FINAL_NAMES), help="which run's snapshots")
    p.add_argument("-o", "--output", required=True, help="checkpoint to write (e.g. checkpoints/ema_0.07.pt)")
    args = p.parse_args(argv)
    if is_training_checkpoint_name(args.output):
        p.error(f"-o {args.output} is a training checkpoint's name: writing there would replace a run's "
                f"weights and optimizer state; choose another name (e.g. ema_{args.sigma_rel:g}.pt)")
    try:
        if os.path.isdir(args.output):
            raise ValueError(f"-o {args.output} is a folder: name the checkpoint file to write")
        check_writable(os.path.dirname(os.path.abspath(args.output)), f"-o {args.output}")   # before the work
        ckpt = reconstruct(args.run, args.sigma_rel, args.at_step, args.kind, verbose=True)
    except ValueError as err:
        p.error(str(err))
    save_checkpoint(ckpt, args.output)
    print(f"wrote {args.output}: sample it with python generate_flow_matching.py --checkpoint {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
