"""The training loop shared by every model of the repo (flow model, VQ-VAE).

What differs between models is an *objective* with these members:
    kind                                 "flow_matching" | "vqvae" (checkpoint kind, final file name)
    loss(model, batch, draws)            -> (scalar loss, {name: scalar tensor} extra metrics)
    sample(ema_model, path)              writes an image grid (class samples, reconstructions), returns
                                         it (H, W, C) uint8
    checkpoint_extras()                  -> dict stored in every checkpoint (may be empty)
    check_resume(ckpt, path)             raises ValueError when a checkpoint's extras do not fit
    probe_ema                            whether log lines compare the EMA's loss with the raw one's, and then
    probe_loss(model, batch, draws)      -> the scalar tensor they compare (an unweighted error: MeanFlow's
                                         adaptively weighted loss is ~1 whatever the error)
An optional `evaluator` (built by the script, e.g. evaluation.periodic.PeriodicFID) has
    every                                steps between evaluations, and
    __call__(ema_model, stop)            -> {name: number} (e.g. FID), called on every rank; rank
                                         0's result joins metrics.jsonl as its own record. `stop()`
                                         (a collective: ask it as often on every rank) says a stop
                                         signal came; the evaluator then raises
                                         evaluation.sampling.SamplingStopped
Everything else lives here: devices and torchrun, AMP, gradient accumulation, clipping, the LR
schedule, EMA (its decay ramped up from the first step), logging to stdout, metrics.jsonl and
optionally TensorBoard (with the loss of the EMA and of the raw weights on a fixed probe batch, so
a bad EMA shows), sample grids, atomic checkpoints, exact resume, SIGTERM/SIGINT, and a stop on a
non-finite loss or gradient.

The EMA starts as a copy of the model handed in, so a run started with --init_from (the trained
weights of a checkpoint) averages from the weights it trains from, as a fresh run does. The
checkpoint's own EMA is not used: the ramp would replace it within a few updates anyway (2e-4 of it
is left after 6), and a fine-tune's EMA averages the fine-tune.

Randomness in a step (noise, t, label dropout) is drawn for the whole global batch from a
generator seeded by (seed, step), and each micro-batch keeps the rows of its own samples
(`Draws`); the data order comes from (seed, epoch). So a resumed run replays exactly the steps
of the uninterrupted one, and one global batch gets the same draws whether it is split over
8 ranks or over 8 micro-batches on one.
"""

import contextlib
import copy
import dataclasses
import json
from dataclasses import dataclass
import math
import os
import resource
import signal
import sys
import time
from typing import Any, Dict, Iterator, Optional, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from evaluation.posthoc_ema import SNAPSHOT_PATTERN, power_ema_decay, sigma_rel_to_gamma, snapshot, snapshot_dir
from evaluation.sampling import SamplingStopped
from rebuild import load_weights
from utils.checkpoint import (FINAL_NAMES, check_config_fits, find_latest, load_checkpoint, periodic_checkpoint,
                              prune_checkpoints, run_file, save_checkpoint, set_rng_state, training_checkpoint,
                              with_defaults)
from utils.distributed import DistInfo, all_ranks, any_rank, wait_for_all_ranks
from utils.launch import RunFailed
from utils.validation import parse_sigma_rels
from training.optim import (OPTIMIZER_FIELDS, OPTIMIZER_SETTINGS, SCHEDULE_FIELDS, build_optimizer,
                            describe_param_groups, load_optimizer_state, lr_factor, schedule_changes, set_lr)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}
# A CPU run times steps ESTIMATE_AFTER[0]..[1] after its start to estimate the whole run.
ESTIMATE_AFTER = (2, 7)
PROBE_SIZE = 64  # images in the fixed batch on which the EMA and the raw weights are compared
# A resumed run replays the data order and the draws of the run it continues only with these as they
# were (the data position is a count of samples of the global batch); --data_dir may move.
RESUME_FIELDS = ("seed", "batch_size", "dataset", "hflip")
# A resume may change these (the decay of every later update follows the flags), and says which it changed.
EMA_FIELDS = ("ema_decay", "ema_gamma", "ema_warmup")
# Fields a resume may change without a word: where the run reads and writes, how often it logs and
# saves, the devices, kernels and memory trade-offs that compute the same step (micro_batch_size only
# where the objective is split-invariant), and what the grids and FIDs sample (not what is trained).
# Every other field a resume changes is printed: a field added to a config is reported by default,
# never silently changed.
QUIET_ON_RESUME = ("micro_batch_size", "compile", "compile_mode", "gradient_checkpointing", "num_workers", "device",
                   "log_every", "save_every", "sample_every", "keep_checkpoints", "tensorboard", "checkpoint_dir",
                   "sample_dir", "resume", "init_from", "data_dir", "data_loader", "data_cache_dir", "vqvae_checkpoint",
                   "ema_snapshot_every", "ema_snapshot_sigma_rels", "ema_snapshot_dtype",   # checked by _resume_posthoc
                   "num_sampling_steps", "sampler", "cfg_scale", "guidance_interval_start", "guidance_interval_end",
                   "time_shift", "grid_samples_per_class", "fid_every", "fid_num_samples", "fid_cfg_scale",
                   "fid_batch_size", "fid_ref_dir", "fid_ref_num_images", "fid_cache_dir", "inception_weights",
                   "grid_images", "eval_data_dir", "eval_images")


class NonFiniteLoss(RunFailed):
    """The loss (or, without GradScaler, the gradient) became non-finite: the run stops without saving (exit 1)."""


@dataclass
class Draws:
    """A micro-batch's share of the randomness of one global batch of `total` samples; `rows` (a
    device tensor) are its samples' positions in that batch.

    Every draw is made for all `total` samples, of which `rows` are kept, so each sample gets the
    same draws however the batch is split over ranks and micro-batches: t and label dropout from
    `generator`, the noise from its own generator seeded by the step's `seed` (`normal`).
    """
    generator: torch.Generator
    rows: torch.Tensor
    total: int
    seed: int

    def normal(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise (len(rows), *shape) on the generator's device: the global batch's
        noise in one kernel, indexed. Drawing `total` rows where a micro-batch needs fewer costs
        a few MB of memory traffic a step (128 CIFAR images: 1.5 MB) and no host sync; one kernel
        per sample cost 128 launches and reseeds a step."""
        generator = torch.Generator(device=self.generator.device).manual_seed(noise_seed(self.seed))
        noise = torch.randn((self.total, *shape), generator=generator, device=generator.device, dtype=dtype)
        return noise[self.rows]


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model for parameters; buffers are copied."""
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


def ema_decay_at(step: int, decay: float, warmup: bool, gamma: float = 8.0) -> float:
    """The EMA decay of the update after optimizer step `step` (0-based).

    With warmup, min(decay, (1 + step) / (gamma + 2 + step)), which is (1 + step) / (10 + step) for
    the default gamma = 8: the EMA starts at the trained weights and weighs step j by
    ~j^gamma (EDM2's power-function EMA; sigma_rel 0.09 for gamma 8, an average centred 10% of the
    run back), so it never holds a large share of the initial weights, whose adaLN-Zero gates and
    output layer are zero. A fixed decay from step 1 keeps decay ** step of them: 37% at step
    10,000 for 0.9999, a velocity shrunk toward zero.
    It depends on the step only, so a resumed run continues the same sequence.
    """
    return min(decay, power_ema_decay(step, gamma)) if warmup else decay


def step_seed(seed: int, step: int) -> int:
    """The generator seed of one optimizer step; Python's hash of an int tuple is not salted."""
    return hash((seed, step)) & (2 ** 63 - 1)


def noise_seed(seed: int) -> int:
    """The seed of a step's training noise, apart from the stream of its t and label dropout."""
    return hash((seed, -1)) & (2 ** 63 - 1)


def micro_batch_size(config, world_size: int) -> int:
    """Images per forward on one rank; batch_size must split into ranks x micro-batches."""
    if not config.micro_batch_size:
        if config.batch_size % world_size:
            raise ValueError(f"--batch_size {config.batch_size} must be a multiple of the {world_size} ranks: "
                             f"use a batch size that splits evenly over them")
        return config.batch_size // world_size
    if config.batch_size % (config.micro_batch_size * world_size):
        raise ValueError(f"--batch_size {config.batch_size} must be a multiple of --micro_batch_size "
                         f"{config.micro_batch_size} x {world_size} ranks")
    return config.micro_batch_size


def learning_rates(optimizer) -> Dict[str, float]:
    """{"lr": the AdamW rate} and, under Muon, {"muon_lr": its matrices' rate}, as the flags name them."""
    rates = {}
    for group in optimizer.param_groups:
        rates.setdefault("muon_lr" if group.get("name", "").startswith("muon") else "lr", group["lr"])
    return dict(sorted(rates.items()))


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kB on Linux


class Trainer:
    def __init__(self, config, model: torch.nn.Module, objective, loader, dist: DistInfo,
                 architecture_fields: Sequence[str] = (), evaluator=None):
        self.config, self.objective, self.loader, self.dist = config, objective, loader, dist
        self.evaluator = evaluator
        self.device = dist.device
        self.architecture_fields = architecture_fields
        # The script sized the loader with micro_batch_size(config, world_size): its batch is the micro-batch.
        self.micro_batch = loader.batch_size
        self.accum_steps = config.batch_size // (self.micro_batch * dist.world_size)
        assert self.accum_steps * self.micro_batch * dist.world_size == config.batch_size, \
            (config.batch_size, self.micro_batch, dist.world_size)

        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls left outside autocast
        self.raw_model = model.to(self.device)
        self.ema = copy.deepcopy(self.raw_model).eval().requires_grad_(False)
        # Post-hoc EMA: pure power-function EMAs (no --ema_decay cap, so their profiles are known
        # exactly), kept beside the sampling EMA, whose defaults every run without the flag keeps.
        self.posthoc_sigma_rels = (parse_sigma_rels(config.ema_snapshot_sigma_rels, "--ema_snapshot_sigma_rels")
                                   if config.ema_snapshot_every else [])
        self.posthoc_gammas = [sigma_rel_to_gamma(s) for s in self.posthoc_sigma_rels]
        self.posthoc_emas = [copy.deepcopy(self.ema) for _ in self.posthoc_sigma_rels]
        self.optimizer = build_optimizer(self.raw_model, config, self.device)
        if dist.is_main:
            print(describe_param_groups(self.optimizer))
        self.autocast_dtype = AUTOCAST_DTYPES[config.mixed_precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.mixed_precision == "fp16")
        self.model = self.raw_model
        if dist.distributed:
            self.model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if config.compile and config.compile_mode == "blocks":   # in place: names and DDP's hooks unchanged
            # Only the DiT2D's config offers it (VQVAEConfig narrows --compile_mode's choices).
            assert isinstance(getattr(self.raw_model, "blocks", None), torch.nn.ModuleList), type(self.raw_model)
            for block in self.raw_model.blocks:
                block.compile()
        elif config.compile:  # compile(DDP(model)): the compiled backward overlaps DDP's all-reduce
            self.model = torch.compile(self.model, mode=config.compile_mode)
        self.generator = torch.Generator(device=self.device)
        self.step, self.epoch, self.index = 0, 0, 0
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.stop_signal: Optional[int] = None
        # The open log window's sums of the loss and of the objective's extra metrics (averaged over
        # ranks when saved) and its step count: checkpoints keep them, so the first log line after a
        # resume averages the same steps as without one.
        self.window_loss, self.window_steps = torch.zeros((), device=self.device), 0
        # The extras' own step count: a checkpoint from before they were kept resumes with none.
        self.window_extras, self.extras_steps = {}, 0
        self.writer = None
        self.last_checkpoint: Optional[str] = None
        # The steps of the last checkpoint and snapshot written (a checkpoint: on ranks > 0, attempted),
        # so a stop on a save step does not write the same gigabytes again inside a scheduler's grace.
        self.saved_step, self.snapshot_step = -1, -1
        self.final_path = os.path.join(config.checkpoint_dir, FINAL_NAMES[objective.kind])
        self.metrics_path = run_file(config.checkpoint_dir, objective.kind, "metrics.jsonl")
        if config.resume:
            self._resume(config.resume)

    # ------------------------------------------------------------------------- the loop

    def fit(self) -> str:
        """Train to config.train_steps; returns the final checkpoint's path."""
        c, main = self.config, self.dist.is_main
        probe = self.probe_batch() if main and self.objective.probe_ema else None
        self.writer = self._tensorboard() if main and c.tensorboard else None
        batches = self.batches()
        handlers = self._install_signal_handlers()
        bar = tqdm(total=c.train_steps, initial=self.step, disable=not main, dynamic_ncols=True)
        # images/s counts the steps since the last pause (start, log, grid, FID, snapshot, save).
        rate_steps, window_start = 0, time.perf_counter()
        first, timed = self.step, None
        try:
            while self.step < c.train_steps:
                loss, grad_norm, extras = self.train_step(next(batches) for _ in range(self.accum_steps))
                self.window_loss += loss
                self.window_extras = {k: self.window_extras.get(k, 0) + v for k, v in extras.items()}
                self.window_steps += 1
                self.extras_steps += 1
                rate_steps += 1
                bar.update(1)
                if self.step - first == ESTIMATE_AFTER[0]:  # the first steps warm up: time the next ones
                    timed = time.perf_counter()
                elif self.step - first == ESTIMATE_AFTER[1] and main and self.device.type == "cpu":
                    self._estimate_cpu_time(time.perf_counter() - timed, bar)

                if self.step % c.log_every == 0 or self.step == c.train_steps:
                    self._log(grad_norm, rate_steps, time.perf_counter() - window_start, bar, probe)
                    self.window_loss, self.window_steps = torch.zeros((), device=self.device), 0
                    self.window_extras, self.extras_steps = {}, 0
                    rate_steps, window_start = 0, time.perf_counter()
                if c.sample_every and (self.step % c.sample_every == 0 or self.step == c.train_steps):
                    self._sample_grid()
                    rate_steps, window_start = 0, time.perf_counter()
                if self.evaluator is not None and self.step % self.evaluator.every == 0:
                    self._evaluate(bar)
                    rate_steps, window_start = 0, time.perf_counter()
                if self.posthoc_emas and (self.step % c.ema_snapshot_every == 0 or self.step == c.train_steps):
                    self._snapshot()
                    rate_steps, window_start = 0, time.perf_counter()
                if self.step % c.save_every == 0 and self.step < c.train_steps:
                    self._save(periodic_checkpoint(c.checkpoint_dir, self.objective.kind, self.step))
                    rate_steps, window_start = 0, time.perf_counter()
                if any_rank(self.stop_signal is not None):
                    self._stop_on_signal()
            self._save(self.final_path, required=True)
            return self.final_path
        finally:
            bar.close()
            if self.writer is not None:
                self.writer.close()
            for signum, handler in handlers.items():
                signal.signal(signum, handler)

    def _sample_grid(self) -> None:
        """The EMA's grid of this step to --sample_dir (and TensorBoard), after every rank has
        checked that its weights are finite. A grid that cannot be written (a full disk) is a
        warning: it must not end the run before its next checkpoint."""
        self._check_finite()
        if self.dist.is_main:
            kind = self.objective.kind
            path = run_file(self.config.sample_dir, kind, f"step_{self.step:07d}.png")
            try:
                grid = self.objective.sample(self.ema, path)
            except OSError as err:
                tqdm.write(f"WARNING: could not write the sample grid {path} ({err}); training goes on")
            else:
                if self.writer is not None:
                    self.writer.add_image(f"{kind}/samples", grid, self.step, dataformats="HWC")
        wait_for_all_ranks()   # the others wait out rank 0's work here, not in a short-timeout collective

    def _tensorboard(self):
        """A SummaryWriter in --checkpoint_dir/tensorboard (the package is imported only here)."""
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(run_file(self.config.checkpoint_dir, self.objective.kind, "tensorboard"))

    def _estimate_cpu_time(self, seconds: float, bar) -> None:
        """On a CPU, say how long the whole run would take at the measured pace."""
        steps = ESTIMATE_AFTER[1] - ESTIMATE_AFTER[0]
        left = (self.config.train_steps - self.step) * seconds / steps
        if left > 600:
            bar.write(f"on this CPU a step takes {seconds / steps:.2f} s: the remaining "
                      f"{self.config.train_steps - self.step} steps need about {left / 3600:.1f} hours. "
                      f"This config is meant for a GPU; on a CPU, --preset tiny (300 steps of a small model) takes minutes")

    def train_step(self, micro_batches):
        """One optimizer step, top to bottom: LR; for each micro-batch an autocast forward and the
        loss, scaled for accumulation and backward (DDP all-reduces the gradient on the last one
        only); unscale, clip, step; EMA.

        Returns (mean loss, grad norm, the mean of the objective's extra metrics over the
        micro-batches) as device tensors:
        nothing here reads a value back to the host (the loop does that only on log steps), so on
        CUDA the host runs ahead of the GPU. Benchmarks time this same method.
        """
        c, world = self.config, self.dist.world_size
        set_lr(self.optimizer, lr_factor(self.step, c))
        loss_sum, extras_sum = torch.zeros((), device=self.device), {}
        positions = torch.arange(self.micro_batch, device=self.device)
        for micro, batch in enumerate(micro_batches):
            x, y = (t.to(self.device, non_blocking=True) for t in batch)
            seed = step_seed(c.seed, self.step)
            self.generator.manual_seed(seed)
            # The sampler deals samples to ranks round-robin: local sample k of this step on rank
            # r is sample r + world * k of the global batch, whose draws it keeps.
            first = micro * self.micro_batch
            rows = self.dist.rank + world * (first + positions)
            draws = Draws(self.generator, rows, c.batch_size, seed)
            last = micro == self.accum_steps - 1
            with contextlib.nullcontext() if last or not self.dist.distributed else self.model.no_sync():
                with self.autocast():
                    loss, extras = self.objective.loss(self.model, (x, y), draws)
                self.scaler.scale(loss / self.accum_steps).backward()
            loss_sum += loss.detach()
            extras_sum = {k: extras_sum.get(k, 0) + v.detach().float() for k, v in extras.items()}
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), c.grad_clip or math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        update_ema(self.ema, self.raw_model, ema_decay_at(self.step, c.ema_decay, c.ema_warmup, c.ema_gamma))
        for ema, gamma in zip(self.posthoc_emas, self.posthoc_gammas):
            update_ema(ema, self.raw_model, power_ema_decay(self.step, gamma))
        loss = loss_sum / self.accum_steps
        finite = torch.isfinite(loss)
        if not self.scaler.is_enabled():   # under fp16 GradScaler skips a step whose gradient is not finite
            finite = finite & torch.isfinite(grad_norm)   # a finite loss with an inf gradient stepped to NaN weights
        self.first_bad_step = torch.where((self.first_bad_step < 0) & ~finite, self.step, self.first_bad_step)
        self.step += 1
        return loss, grad_norm, {k: v / self.accum_steps for k, v in extras_sum.items()}

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    @torch.no_grad()
    def probe_losses(self, batch) -> Dict[str, float]:
        """The objective's probe loss of the EMA and of the raw weights on one fixed batch with fixed draws.

        The training loss is the raw model's, so it cannot show a bad EMA, which every sample
        comes from; the gap between these two can (an EMA that still holds the zero-output
        initial weights scores near the loss of v = 0). Eval mode: no gradient checkpointing.
        """
        x, y = (t.to(self.device) for t in batch)
        losses, training = {}, self.raw_model.training
        self.raw_model.eval()
        try:
            for name, model in (("ema", self.ema), ("raw", self.raw_model)):
                self.generator.manual_seed(self.config.seed)
                draws = Draws(self.generator, torch.arange(len(x), device=self.device), len(x), self.config.seed)
                with self.autocast():
                    loss = self.objective.probe_loss(model, (x, y), draws)
                losses[f"probe_loss_{name}"] = loss.item()
        finally:
            self.raw_model.train(training)
        return losses

    # ------------------------------------------------------------------------- data

    def probe_batch(self, size: int = PROBE_SIZE):
        """The first `size` images this rank reads in epoch 0 (fewer if its share is smaller): the
        same batch for a fresh and a resumed run on the same number of ranks."""
        self.loader.sampler.set_position(0, 0)
        parts = []
        for batch in self.loader:
            parts.append(batch)
            if sum(len(x) for x, _ in parts) >= size:
                break
        x, y = (torch.cat(p)[:size] for p in zip(*parts))
        return x, y

    def batches(self) -> Iterator:
        """Endless micro-batches; self.epoch / self.index always name the next one to read."""
        while True:
            self.loader.sampler.set_position(self.epoch, self.index * self.micro_batch)
            for batch in self.loader:
                self.index += 1
                yield batch
            self.epoch, self.index = self.epoch + 1, 0

    # ------------------------------------------------------------------------- logging

    def _log(self, grad_norm, steps: int, seconds: float, bar, probe) -> None:
        """The window's mean loss and extra metrics; the last step's grad norm; images/s over
        `steps` in `seconds`."""
        self._check_finite()
        values = torch.stack([self.window_loss / max(self.window_steps, 1), grad_norm.float(),
                              *[v / max(self.extras_steps, 1) for v in self.window_extras.values()]])
        values = self._mean_over_ranks(values).tolist()
        record = {"step": self.step, "loss": values[0], **learning_rates(self.optimizer),
                  "grad_norm": values[1],
                  **{k: v for k, v in zip(self.window_extras, values[2:])},
                  "images_per_sec": steps * self.config.batch_size / max(seconds, 1e-9),
                  "peak_mem_gb": peak_memory_gb(self.device)}
        if self.dist.is_main:
            self._write_record({**record, **(self.probe_losses(probe) if probe is not None else {})}, bar)

    def _mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if self.dist.distributed:  # gloo has no AVG
            values = values.clone()
            torch.distributed.all_reduce(values)
            values /= self.dist.world_size
        return values

    def _evaluate(self, bar) -> None:
        self._check_finite()
        try:
            # A stop signal ends the sampling at once: a scheduler's grace before SIGKILL (30 s under
            # torchrun and SLURM's defaults) is shorter than a 10,000-sample FID.
            metrics = self.evaluator(self.ema, stop=lambda: any_rank(self.stop_signal is not None))
        except SamplingStopped:
            if self.dist.is_main:
                bar.write(f"FID of step {self.step} abandoned for the stop signal")
            return
        if self.dist.is_main:   # rank 0 alone scores: up to an hour on a CPU
            self._write_record({"step": self.step, **metrics}, bar)
        wait_for_all_ranks()   # the others wait out rank 0's scoring here, not in a short-timeout collective

    def _write_record(self, record: Dict[str, Any], bar) -> None:
        """One line on stdout and one JSON line in metrics.jsonl (and TensorBoard scalars; rank 0 only)."""
        line = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
        bar.write(line)
        os.makedirs(self.config.checkpoint_dir, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{self.objective.kind}/{key}", value, record["step"])

    def _check_finite(self) -> None:
        """Stop on every rank together if any rank saw a non-finite loss or (bf16, fp32) gradient norm
        (under fp16 the others may not: GradScaler skips the step everywhere, so only that rank's own
        loss shows it). Called before anything is written from the weights."""
        bad = self.first_bad_step
        if self.dist.distributed:
            bad = torch.where(bad < 0, torch.iinfo(bad.dtype).max, bad)
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MIN)
            bad = torch.where(bad == torch.iinfo(bad.dtype).max, -1, bad)
        bad = int(bad)
        if bad >= 0:
            kept = self.last_checkpoint or "none was written yet"
            raise NonFiniteLoss(f"the loss or the gradient became non-finite at step {bad + 1}; stopping without "
                                f"saving. Last good checkpoint: {kept}. Try a lower --lr, --grad_clip 1, or "
                                f"--mixed_precision bf16")

    # ------------------------------------------------------------------------- checkpoints

    def state_dict(self, log_window: Dict[str, Any]) -> Dict[str, Any]:
        """The checkpoint (utils/checkpoint.py's format); `log_window` is _save's, averaged over ranks."""
        state = training_checkpoint(self.objective.kind, self.raw_model, self.ema, self.optimizer, self.scaler,
                                    self.step, self.config, self.epoch,
                                    self.index * self.micro_batch * self.dist.world_size,
                                    len(self.loader.sampler.dataset), log_window,
                                    self.objective.checkpoint_extras())
        if self.posthoc_emas:
            state["posthoc_ema"] = {"sigma_rels": self.posthoc_sigma_rels,
                                    "emas": [ema.state_dict() for ema in self.posthoc_emas]}
        return state

    def _snapshot(self) -> None:
        """The post-hoc EMAs of this step to CHECKPOINT_DIR/ema_snapshots (rank 0; atomic). Never
        pruned: every one of them is part of every later reconstruction."""
        self._check_finite()
        if self.dist.is_main:
            c, kind = self.config, self.objective.kind
            path = os.path.join(snapshot_dir(c.checkpoint_dir, kind), SNAPSHOT_PATTERN.format(step=self.step))
            save_checkpoint(snapshot(self.step, self.posthoc_sigma_rels, self.posthoc_emas, c.ema_snapshot_dtype,
                                     dataclasses.asdict(c), kind, self.objective.checkpoint_extras()), path)
        self.snapshot_step = self.step

    def _save(self, path: str, required: bool = False) -> None:
        """The checkpoint to `path` (rank 0; atomic). A periodic one that cannot be written (a full
        disk) is skipped with a warning and tried again at the next save; a `required` one (the
        final and the stop checkpoints) raises the OSError."""
        self._check_finite()
        sums = self._mean_over_ranks(torch.stack([self.window_loss, *self.window_extras.values()])).cpu()
        window = {"loss_sum": sums[0], "steps": self.window_steps,
                  "extras_sum": dict(zip(self.window_extras, sums[1:])), "extras_steps": self.extras_steps}
        if self.dist.is_main:
            try:
                save_checkpoint(self.state_dict(window), path)
            except OSError as err:
                if required:
                    raise
                tqdm.write(f"WARNING: could not write checkpoint {path} ({err}); the last one written is "
                           f"{self.last_checkpoint or 'none yet'}; training goes on and tries again at the next save")
                return
            prune_checkpoints(self.config.checkpoint_dir, self.config.keep_checkpoints, self.objective.kind)
            tqdm.write(f"saved {path} (step {self.step})")
        self.last_checkpoint, self.saved_step = path, self.step

    def _resume(self, resume: str) -> None:
        path = resume
        if resume == "latest":
            path = find_latest(self.config.checkpoint_dir, self.objective.kind)
            if path is None:
                if self.dist.is_main:
                    print(f"--resume latest: no checkpoint in {self.config.checkpoint_dir}; starting from scratch")
                return
        ckpt = load_checkpoint(path, kind=self.objective.kind)
        if "optimizer" not in ckpt:
            raise ValueError(f"{path} holds weights only (e.g. a post-hoc EMA written by evaluation.posthoc_ema), "
                             f"not a training state: resume from one of the run's checkpoint_*.pt or its final checkpoint")
        saved, current = with_defaults(ckpt["config"], self.config), dataclasses.asdict(self.config)
        if ckpt["step"] > self.config.train_steps:
            raise ValueError(f"--train_steps {self.config.train_steps} is below the step of {path} "
                             f"({ckpt['step']}): pass --train_steps > {ckpt['step']} to train on from it")
        check_config_fits(saved, current, (*self.architecture_fields, *OPTIMIZER_FIELDS, *RESUME_FIELDS), path)
        ema_changed = [f"{k}: {saved[k]!r} -> {current[k]!r}" for k in EMA_FIELDS if saved[k] != current[k]]
        schedule_changed = schedule_changes(saved, current)
        said = {*self.architecture_fields, *OPTIMIZER_FIELDS, *RESUME_FIELDS,   # refused above when they differ
                *OPTIMIZER_SETTINGS, *EMA_FIELDS, *SCHEDULE_FIELDS, *QUIET_ON_RESUME}
        if not self.objective.split_invariant:
            said.discard("micro_batch_size")
        other_changed = [f"{k}: {saved[k]!r} -> {v!r}" for k, v in current.items()
                         if k not in said and saved.get(k, v) != v]
        self.objective.check_resume(ckpt, path)
        load_weights(self.raw_model, ckpt["model"], path, "model", "this run's config")
        load_weights(self.ema, ckpt["ema"], path, "ema", "this run's config")
        self._resume_posthoc(ckpt.get("posthoc_ema"), path)
        changed = load_optimizer_state(self.optimizer, ckpt["optimizer"])
        if ckpt["scaler"] is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = ckpt["step"]
        if "log_window" in ckpt:  # absent in checkpoints from before 2026-12-06
            self.window_loss = ckpt["log_window"]["loss_sum"].to(self.device)
            self.window_steps = ckpt["log_window"]["steps"]
            self.window_extras = {k: v.to(self.device)   # absent before 2026-12-07
                                  for k, v in ckpt["log_window"].get("extras_sum", {}).items()}
            self.extras_steps = ckpt["log_window"].get("extras_steps", 0)
        self.epoch = ckpt["data"]["epoch"]
        self.index = ckpt["data"]["samples"] // (self.micro_batch * self.dist.world_size)
        set_rng_state(ckpt["rng"])
        self.last_checkpoint = path
        if self.dist.is_main:
            print(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.index})")
            if changed:
                print("optimizer settings from the current flags, not the checkpoint: " + "; ".join(changed))
            if ema_changed:
                print("EMA settings from the current flags, not the checkpoint: " + "; ".join(ema_changed))
            if schedule_changed:
                print("LR schedule from the current flags, not the checkpoint: " + "; ".join(schedule_changed))
            if other_changed:
                print("training settings from the current flags, not the checkpoint: " + "; ".join(other_changed))
            images, saved_images = len(self.loader.sampler.dataset), ckpt["data"].get("images")   # absent before 2026-12-07
            if saved_images not in (None, images):
                print(f"WARNING: the dataset has {images} images, the run resumed from had {saved_images}: its data "
                      f"order is not replayed{' (this epoch repeats some images and skips others)' if self.index else ''}; "
                      f"if the folder is an incomplete copy, stop and copy it whole")

    def _resume_posthoc(self, saved: Optional[Dict[str, Any]], path: str) -> None:
        """The post-hoc EMAs continue from the checkpoint's; they must have run from step 0 with the
        same widths, or their snapshots would not be the profiles the reconstruction assumes."""
        if not self.posthoc_emas:
            if saved is not None and self.dist.is_main:
                print(f"{path} kept post-hoc EMAs; this run does not (--ema_snapshot_every 0): no more snapshots")
            return
        if saved is None:
            raise ValueError(f"--ema_snapshot_every {self.config.ema_snapshot_every}: checkpoint {path} kept no "
                             f"post-hoc EMAs, and they must run from step 0; resume with --ema_snapshot_every 0 "
                             f"or start a new run")
        if saved["sigma_rels"] != self.posthoc_sigma_rels:
            given = ",".join(f"{s:g}" for s in saved["sigma_rels"])
            raise ValueError(f"--ema_snapshot_sigma_rels {self.config.ema_snapshot_sigma_rels}: checkpoint {path} "
                             f"tracked {given}; resume with --ema_snapshot_sigma_rels {given}")
        for ema, state in zip(self.posthoc_emas, saved["emas"]):
            ema.load_state_dict(state, strict=True)

    # ------------------------------------------------------------------------- signals

    def _install_signal_handlers(self) -> Dict[int, Any]:
        def request_stop(signum, _frame):
            self.stop_signal = signum

        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, request_stop)
        return previous

    def _stop_on_signal(self) -> None:
        path = periodic_checkpoint(self.config.checkpoint_dir, self.objective.kind, self.step)
        signum = self.stop_signal or signal.SIGTERM
        try:
            # The post-hoc EMA at this checkpoint's step needs this step's snapshot.
            if self.posthoc_emas and self.snapshot_step != self.step:
                self._snapshot()
            # Every rank must agree: rank 0's periodic write of this step may have failed.
            if not all_ranks(self.saved_step == self.step):
                self._save(path, required=True)
        except OSError as err:   # a requeued --resume latest would silently go back to an older one
            raise RunFailed(f"stopped by {signal.Signals(signum).name} after step {self.step}, but its checkpoint "
                            f"{path} could not be written ({err}); the last one written is "
                            f"{self.last_checkpoint or 'none yet'}") from err
        # torchrun stops every rank once one exits non-zero: the others wait for rank 0's write.
        wait_for_all_ranks()
        if self.dist.is_main:
            tqdm.write(f"stopped by {signal.Signals(signum).name} after step {self.step}; checkpoint {path}. "
                       f"Resume with the same command and --resume latest (or --resume {path})")
        sys.exit(128 + signum)
