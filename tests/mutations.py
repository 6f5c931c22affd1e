"""Mutation testing: plant one-line bugs, one at a time, in a copy of the repo, and check that the
tests meant to guard each behaviour fail.

    python tests/mutations.py                  # every mutation, then the table
    python tests/mutations.py --only ema cfg   # the mutations whose name contains any of these
    python tests/mutations.py --list           # names and target tests, nothing run

The working tree (tracked and untracked files that git does not ignore) is copied to a temporary
folder once. The target tests run there unmutated first (they must pass, or the table would mean
nothing); then each mutation replaces one exact piece of text (which must occur exactly once, so
a stale entry is an error, not a silent pass), runs its target tests with `pytest -x`, and
restores the file. A bug is KILLED when a test fails, SURVIVED when all pass.

Not part of the test suite (it runs the targeted tests once per bug); run it before calling a
test change done, and put its table in the note.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import List, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Mutation:
    name: str                # short id, shown in the table
    path: str                # file, relative to the repo root
    old: str                 # exact text; must occur exactly once in the file
    new: str                 # what replaces it
    tests: Sequence[str]     # pytest targets meant to catch it (files or node ids)
    why: str = ""            # the bug in words


MUTATIONS: List[Mutation] = [
    # --- EMA
    Mutation("ema_no_update", "training/trainer.py",
             "torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)",
             "pass", ["tests/test_ema.py"], "update_ema returns without updating"),
    Mutation("ema_decay_swapped", "training/trainer.py",
             "[p.detach() for p in model.parameters()], 1.0 - decay)",
             "[p.detach() for p in model.parameters()], decay)", ["tests/test_ema.py"],
             "decay where 1 - decay belongs"),
    Mutation("ema_no_ramp", "training/trainer.py",
             "return min(decay, power_ema_decay(step, gamma)) if warmup else decay",
             "return decay", ["tests/test_ema.py"], "the EMA warm-up ramp ignored"),
    Mutation("ema_ramp_off_by_ten", "evaluation/posthoc_ema.py",
             "(1.0 + step) / (gamma + 2.0 + step)", "(1.0 + step) / (gamma + 20.0 + step)",
             ["tests/test_ema.py", "tests/test_posthoc_ema.py"],
             "a slower ramp than documented"),
    Mutation("trainer_ignores_ema_gamma", "training/trainer.py",
             "c.ema_warmup, c.ema_gamma)", "c.ema_warmup)", ["tests/test_ema.py"],
             "--ema_gamma never reaches the EMA update"),
    # --- post-hoc EMA
    Mutation("posthoc_profile_wrong_gamma", "evaluation/posthoc_ema.py",
             "log_d = np.log1p(k) - np.log(gamma + 2.0 + k)", "log_d = np.log1p(k) - np.log(gamma + 1.0 + k)",
             ["tests/test_posthoc_ema.py"], "the profile of a gamma one lower than the EMA's decays"),
    Mutation("posthoc_profile_not_normalized", "evaluation/posthoc_ema.py",
             "share[1:] = (gamma + 1.0) / (gamma + 1.0 + np.arange(1, step + 1))",
             "share[1:] = 1.0 / (gamma + 1.0 + np.arange(1, step + 1))", ["tests/test_posthoc_ema.py"],
             "profile weights that do not sum to 1 (each snapshot's scale lost)"),
    Mutation("posthoc_snapshots_out_of_order", "evaluation/posthoc_ema.py",
             "states = [state for f in files for state in f[\"emas\"]]",
             "states = [state for f in reversed(files) for state in f[\"emas\"]]", ["tests/test_posthoc_ema.py"],
             "coefficients applied to the snapshots in the wrong order"),
    Mutation("posthoc_uses_later_snapshots", "evaluation/posthoc_ema.py",
             "used = [(s, p) for s, p in available if s <= at_step]", "used = available",
             ["tests/test_posthoc_ema.py"], "an earlier end point mixes in snapshots after it"),
    Mutation("posthoc_trainer_off_by_one", "training/trainer.py",
             "update_ema(ema, self.raw_model, power_ema_decay(self.step, gamma))",
             "update_ema(ema, self.raw_model, power_ema_decay(self.step + 1, gamma))", ["tests/test_posthoc_ema.py"],
             "the tracked EMAs decay one step ahead of the profile the reconstruction assumes"),
    Mutation("posthoc_resume_restarts_the_emas", "training/trainer.py",
             "ema.load_state_dict(state, strict=True)", "pass", ["tests/test_posthoc_ema.py"],
             "a resumed run's post-hoc EMAs restart from the current weights"),
    Mutation("probe_compares_raw_with_raw", "training/trainer.py",
             'for name, model in (("ema", self.ema), ("raw", self.raw_model)):',
             'for name, model in (("ema", self.raw_model), ("raw", self.raw_model)):',
             ["tests/test_ema.py"], "the logged EMA probe loss is the raw model's"),
    Mutation("resume_hides_an_ema_change", "training/trainer.py",
             'EMA_FIELDS = ("ema_decay", "ema_gamma", "ema_warmup")', 'EMA_FIELDS = ("ema_decay", "ema_gamma")',
             ["tests/test_ema.py::test_a_resume_that_changes_the_ema_says_what_changed"],
             "a resume that turns the EMA ramp on or off says nothing"),
    # --- training: time, draws, labels, schedule, clipping
    Mutation("logit_normal_is_uniform", "flow_matching.py",
             "return torch.sigmoid(mean + std * torch.randn(batch, device=device, generator=generator))",
             "return torch.rand(batch, device=device, generator=generator)",
             ["tests/test_flow_matching.py", "tests/test_training.py"], "logit-normal t replaced by U(0, 1)"),
    Mutation("logit_normal_ignores_mean_std", "flow_matching.py",
             "torch.sigmoid(mean + std * torch.randn(", "torch.sigmoid(0.0 + 1.0 * torch.randn(",
             ["tests/test_flow_matching.py", "tests/test_training.py"], "logit-normal mean/std ignored"),
    Mutation("objective_ignores_logit_normal_mean", "training/objectives.py",
             "            time_sampling=c.time_sampling, logit_normal_mean=c.logit_normal_mean,",
             "            time_sampling=c.time_sampling, logit_normal_mean=0.0,",
             ["tests/test_training.py"], "the objective drops --logit_normal_mean"),
    Mutation("micro_batches_reuse_draws", "training/trainer.py",
             "first = micro * self.micro_batch", "first = 0",
             ["tests/test_training.py"], "every micro-batch reuses the first micro-batch's t, noise, dropout"),
    Mutation("training_noise_indexed_by_local_row", "training/trainer.py",
             "return noise[self.rows]", "return noise[:len(self.rows)]",
             ["tests/test_training.py"], "a sample's training noise depends on the micro-batch split"),
    Mutation("null_label_never_trained", "training/objectives.py",
             "class_dropout_prob=c.class_dropout_prob,\n            time_sampling=c.time_sampling,",
             "class_dropout_prob=0.0,\n            time_sampling=c.time_sampling,",
             ["tests/test_training.py"], "labels never dropped to the null label in training"),
    Mutation("no_lr_schedule", "training/optim.py",
             "    if step < config.warmup_steps:\n        return (step + 1) / config.warmup_steps",
             "    return 1.0", ["tests/test_training.py"], "lr_factor always 1.0 (no warmup, no cosine)"),
    Mutation("cosine_half_period", "training/optim.py",
             "0.5 * (1 + math.cos(math.pi * progress))", "0.5 * (1 + math.cos(0.5 * math.pi * progress))",
             ["tests/test_training.py"], "cosine ends at the wrong LR"),
    Mutation("no_gradient_clipping", "training/trainer.py",
             "c.grad_clip or math.inf", "math.inf", ["tests/test_training.py"], "gradient clipping off"),
    # --- ranks
    Mutation("loss_summed_over_ranks", "training/trainer.py",
             "self.scaler.scale(loss / self.accum_steps).backward()",
             "self.scaler.scale(loss * world / self.accum_steps).backward()",
             ["tests/test_distributed.py::test_two_ranks_match_one_process"],
             "the loss scaled by world_size (summed, not averaged, over ranks)"),
    Mutation("data_position_ignores_ranks", "training/trainer.py",
             "self.index * self.micro_batch * self.dist.world_size,", "self.index * self.micro_batch,",
             ["tests/test_distributed.py::test_two_rank_checkpoint_resumes_on_one_rank"],
             "a checkpoint's data position counts one rank's samples"),
    Mutation("torchrun_one_process_no_group", "utils/distributed.py",
             'if "RANK" not in os.environ:', 'if os.environ.get("WORLD_SIZE", "1") == "1":',
             ["tests/test_distributed.py::test_torchrun_with_one_process_takes_the_multi_gpu_path",
              "tests/test_distributed.py::test_a_process_group_of_one_wraps_the_model_in_ddp"],
             "torchrun --nproc_per_node 1 skips the process group and DDP (one GPU never checks NCCL)"),
    Mutation("one_process_group_no_ddp", "training/trainer.py",
             "        if dist.distributed:\n            self.model = DistributedDataParallel(",
             "        if dist.world_size > 1:\n            self.model = DistributedDataParallel(",
             ["tests/test_distributed.py::test_a_process_group_of_one_wraps_the_model_in_ddp"],
             "a process group of one rank trains without DDP"),
    Mutation("resume_forgets_log_window", "training/trainer.py",
             'if "log_window" in ckpt:', "if False:",
             ["tests/test_training.py::test_the_log_lines_after_a_resume_match_the_uninterrupted_run"],
             "the first log line after a resume averages only the resumed steps"),
    # --- bad input that used to pass silently
    Mutation("folder_error_names_data_dir", "data/datasets.py",
             'raise FileNotFoundError(f"{flag} {data_dir} is not a readable ImageFolder',
             'raise FileNotFoundError(f"--data_dir {data_dir} is not a readable ImageFolder',
             ["tests/test_fid.py::test_bad_input_is_one_line_and_exit_code_2"],
             "a reference folder's error names --data_dir, a flag the user did not pass"),
    Mutation("moved_vqvae_generic_message", "rebuild.py",
             "    if not os.path.isfile(path):\n        raise FileNotFoundError(f\"the VQ-VAE this latent",
             "    if False:\n        raise FileNotFoundError(f\"the VQ-VAE this latent",
             ["tests/test_latent_flow.py::test_tiny_latent_run_trains_and_generates_pixel_images"],
             "a moved VQ-VAE reported as a missing flow checkpoint"),
    Mutation("latent_resume_lists_fields", "utils/checkpoint.py",
             "    if was and not now:", "    if False:",
             ["tests/test_latent_flow.py::test_tiny_latent_run_trains_and_generates_pixel_images"],
             "a latent run resumed without --vqvae_checkpoint lists latent fields the user never passed"),
    Mutation("speedrun_flat_reference_folder", "benchmarks/speedrun.py",
             "        if not any(entry.is_dir() for entry in os.scandir(folder)):", "        if False:",
             ["tests/test_speedrun.py::test_bad_input_exits_2_with_one_line"],
             "a reference folder without classes found only after the training budget"),
    Mutation("quality_sample_batch_named_batch_size", "benchmarks/quality.py",
             "    if args.sample_batch_size < 1:", "    if False:",
             ["tests/test_quality_benchmark.py::test_bad_flags_exit_2_with_one_line"],
             "--sample_batch_size 0 reported as --batch_size"),
    Mutation("gpu_check_skips_latent_stage", "benchmarks/gpu_check.sh",
             "    latent_steps\n", "\n", ["tests/test_gpu_check.py"],
             "the GPU job's extra stage never runs the VQ-VAE and latent paths"),
    Mutation("dataset_root_read_as_two_classes", "data/datasets.py",
             "if len(folder.classes) > 1 and set(folder.classes) <= SPLIT_NAMES:",
             "if False and set(folder.classes) <= SPLIT_NAMES:",
             ["tests/test_fid.py::test_bad_input_is_one_line_and_exit_code_2"],
             "a dataset root read as an ImageFolder whose classes are train/ and test/"),
    Mutation("ref_split_ignored_for_imagefolder", "evaluate_fid.py",
             'if args.ref_split is not None and dataset != "cifar10":', "if False:",
             ["tests/test_fid.py::test_bad_input_is_one_line_and_exit_code_2"],
             "--ref_split silently dropped for an ImageFolder reference"),
    Mutation("quality_traceback_on_bad_data", "benchmarks/quality.py",
             "    except USER_ERRORS as err:\n        if not is_user_error(err):\n            raise\n        print(f\"quality.py",
             "    except ZeroDivisionError as err:\n        if not is_user_error(err):\n            raise\n        print(f\"quality.py",
             ["tests/test_quality_benchmark.py::test_bad_data_is_one_line_exit_2"],
             "quality.py's run-time bad input as a traceback"),
    Mutation("speedrun_checks_weights_late", "benchmarks/speedrun.py",
             "        fid.check_inception_weights(args.inception_weights)", "        pass",
             ["tests/test_speedrun.py::test_a_wrong_inception_file_is_refused_before_training"],
             "a wrong Inception file found only after the training budget"),
    Mutation("vqvae_resume_ignores_image_size", "train_vqvae.py",
             '(*VQVAE_ARCHITECTURE_FIELDS, "image_size")', "VQVAE_ARCHITECTURE_FIELDS",
             ["tests/test_vqvae.py::test_resume_at_another_image_size_is_a_clear_error"],
             "a VQ-VAE resumed at another --image_size"),
    Mutation("posthoc_extrapolates_past_last_snapshot", "evaluation/posthoc_ema.py",
             "if not used or used[-1][0] != at_step:", "if not used:",
             ["tests/test_posthoc_ema.py::test_an_earlier_end_point_uses_only_the_snapshots_up_to_it"],
             "a rebuild at a step without a snapshot extrapolates (weights shrink towards zero)"),
    Mutation("sigterm_writes_no_snapshot", "training/trainer.py",
             "        if self.posthoc_emas:  # the post-hoc EMA at this checkpoint's step", "        if False:  #",
             ["tests/test_training.py::test_a_stop_signal_also_writes_the_steps_ema_snapshot"],
             "a SIGTERM checkpoint has no snapshot at its step"),
    Mutation("new_run_mixes_old_snapshots", "evaluation/posthoc_ema.py",
             "    if found:\n        raise ValueError(f\"--checkpoint_dir {checkpoint_dir} holds",
             "    if False:\n        raise ValueError(f\"--checkpoint_dir {checkpoint_dir} holds",
             ["tests/test_posthoc_ema.py::test_a_new_run_refuses_a_folder_that_holds_another_runs_snapshots"],
             "a new run starts beside another run's snapshots"),
    Mutation("posthoc_output_replaces_final", "evaluation/posthoc_ema.py",
             "    if is_training_checkpoint_name(args.output):", "    if False:",
             ["tests/test_posthoc_ema.py::test_a_rebuilt_ema_neither_replaces_nor_resumes_a_run"],
             "-o overwrites the run's final checkpoint"),
    Mutation("resume_from_weights_only", "training/trainer.py",
             '        if "optimizer" not in ckpt:\n', "        if False:\n",
             ["tests/test_posthoc_ema.py::test_a_rebuilt_ema_neither_replaces_nor_resumes_a_run"],
             "--resume of a rebuilt EMA dies in a KeyError"),
    Mutation("cfg_with_untrained_null_label", "flow_matching.py",
             "if scale != 1.0 and class_dropout_prob == 0:", "if False:",
             ["tests/test_generate.py::test_bad_input_is_one_line_exit_2_nothing_written"],
             "guidance against the null label of a model trained with class_dropout_prob 0"),
    Mutation("resume_past_train_steps", "training/trainer.py",
             'if ckpt["step"] > self.config.train_steps:', "if False:",
             ["tests/test_training.py::test_resume_with_fewer_train_steps_than_done_is_a_clear_error"],
             "resuming with --train_steps below the checkpoint's step writes a 'final' checkpoint"),
    Mutation("generate_keeps_earlier_samples", "generate_flow_matching.py",
             "        remove_earlier_samples(args.output_dir)", "        pass",
             ["tests/test_generate.py::test_a_run_replaces_an_earlier_runs_samples"],
             "a reused --output_dir mixes two runs' images"),
    Mutation("class_grid_ignores_class_label", "generate_flow_matching.py",
             "        if args.class_label is not None:\n            raise ValueError(f\"--class_grid draws",
             "        if False:\n            raise ValueError(f\"--class_grid draws",
             ["tests/test_generate.py::test_bad_input_is_one_line_exit_2_nothing_written"],
             "--class_grid silently drops --class_label"),
    # --- Muon
    Mutation("muon_rms_factor_0.18", "optimizers/muon.py", "return lr * 0.2 * math.sqrt(max(rows, cols))",
             "return lr * 0.18 * math.sqrt(max(rows, cols))", ["tests/test_muon.py"],
             "match_rms_adamw's 0.2 as 0.18 (a 10% LR error)"),
    Mutation("muon_rms_factor_0.22", "optimizers/muon.py", "return lr * 0.2 * math.sqrt(max(rows, cols))",
             "return lr * 0.22 * math.sqrt(max(rows, cols))", ["tests/test_muon.py"],
             "match_rms_adamw's 0.2 as 0.22 (a 10% LR error)"),
    # --- data, latents, precision, checkpoints
    Mutation("never_flip", "data/datasets.py",
             "flips = torch.rand(n, generator=gen) < 0.5 if self.hflip",
             "flips = torch.rand(n, generator=gen) < 0.0 if self.hflip",
             ["tests/test_training.py::test_half_of_the_images_are_mirrored"], "flip probability 0"),
    Mutation("latent_decode_skips_unnormalize", "models/vqvae.py",
             "return self.vqvae.decode(z.float().to(device) * self.std + self.mean).float().to(z.device)",
             "return self.vqvae.decode(z.float().to(device)).float().to(z.device)",
             ["tests/test_latent_flow.py"], "LatentSpace.decode without un-normalizing"),
    Mutation("fp16_without_grad_scaler", "training/trainer.py",
             'enabled=config.mixed_precision == "fp16")', "enabled=False)",
             ["tests/test_training.py::test_fp16_trains_with_a_grad_scaler_and_resumes_exactly"],
             "--mixed_precision fp16 runs without its GradScaler"),
    Mutation("checkpoint_saves_compiled_wrapper", "training/trainer.py",
             "self.raw_model, self.ema, self.optimizer, self.scaler,", "self.model, self.ema, self.optimizer, self.scaler,",
             ["tests/test_training.py::test_compiled_model_saves_unwrapped_weights"],
             "weights saved with the `_orig_mod.` prefix of torch.compile"),
    Mutation("checkpoint_ema_is_the_model", "training/trainer.py",
             "self.raw_model, self.ema, self.optimizer, self.scaler,",
             "self.raw_model, self.raw_model, self.optimizer, self.scaler,",
             ["tests/test_ema.py", "tests/test_training.py"], "the checkpoint's EMA holds the raw weights"),
    Mutation("resume_loads_ema_from_model", "training/trainer.py",
             'self.ema.load_state_dict(ckpt["ema"], strict=True)',
             'self.ema.load_state_dict(ckpt["model"], strict=True)',
             ["tests/test_training.py::test_resume_is_bit_exact"], "resume restores the EMA from the raw weights"),
    Mutation("cpu_bf16_route_skips_weight_rounding", "models/precision.py",
             "out = F.linear(_round_bf16(x), _round_bf16(self.weight), _round_bf16(self.bias))",
             "out = F.linear(_round_bf16(x), self.weight.float(), _round_bf16(self.bias))",
             ["tests/test_speed.py::test_cpu_fp32_route_gives_the_bf16_numbers"],
             "the CPU fp32 route leaves weights unrounded (not the bf16 numbers)"),
    Mutation("help_misses_lr", "configs/cli.py",
             'parser.add_argument(f"--{f.name}", type=parse,',
             'parser.add_argument(f"--{f.name}" if f.name != "lr" else "--learning_rate", type=parse,',
             ["tests/test_config.py::test_help_lists_every_flag"], "--lr missing from --help (--lr_schedule is there)"),
    # --- speed: the compiled graph
    Mutation("attention_asks_functorch_under_compile", "models/precision.py",
             "    if torch.compiler.is_compiling():\n        return False\n", "",
             ["tests/test_speed.py::test_compiled_forward_and_backward_have_no_graph_breaks"],
             "the forward-AD query in attention splits the compiled graph at every block"),
    Mutation("sampling_ignores_compile", "evaluation/sampling.py",
             "            self.forward_model, labels,", "            self.model, labels,",
             ["tests/test_generate.py::test_compile_flag_samples_through_one_static_shape_compile"],
             "--compile true compiles a model that sampling never calls"),
    # --- the speedrun benchmark
    Mutation("speedrun_scores_raw_weights", "benchmarks/speedrun.py",
             'args = flags.parse_args(["--weights", "ema", "--device", device.type])',
             'args = flags.parse_args(["--weights", "model", "--device", device.type])',
             ["tests/test_speedrun.py"], "the repo's run is scored with its raw weights, not the EMA"),
    Mutation("speedrun_kills_the_trainer", "benchmarks/speedrun.py",
             "        trainer.send_signal(signal.SIGTERM)\n", "        trainer.kill()\n",
             ["tests/test_speedrun.py"], "the budget ends the trainer with SIGKILL: no checkpoint of its last step"),
    Mutation("speedrun_wall_at_exit", "benchmarks/speedrun.py",
             "train_wall_s = os.path.getmtime(checkpoint) - start_wall",
             "train_wall_s = time.time() - start_wall",
             ["tests/test_speedrun.py"], "train_wall_s read after the trainer exits, not at the checkpoint's write"),
    # --- flow math, samplers, noise, VQ-VAE
    Mutation("path_reversed", "flow_matching.py", "return (1 - t) * noise + t * data",
             "return t * noise + (1 - t) * data", ["tests/test_flow_matching.py"], "x_t with t=0 at data"),
    Mutation("euler_uses_end_time", "flow_matching.py", "x = x + dt * velocity(x, t0)\n            nfe += 1\n        elif sampler == \"meanflow\"",
             "x = x + dt * velocity(x, t1)\n            nfe += 1\n        elif sampler == \"meanflow\"", ["tests/test_flow_matching.py"], "Euler evaluates at the step's end"),
    Mutation("heun_corrects_at_t1", "flow_matching.py",
             'elif sampler == "heun" and t1 < 1.0:', 'elif sampler == "heun" and t1 <= 1.0:',
             ["tests/test_flow_matching.py"], "Heun evaluates the model at t = 1 (FID 160 on the proxy at 5 steps)"),
    Mutation("heun_without_corrector", "flow_matching.py", "x = x + 0.5 * dt * (v0 + v1)",
             "x = x + dt * v1", ["tests/test_flow_matching.py"], "Heun's trapezoid replaced by its predictor slope"),
    Mutation("midpoint_at_the_end", "flow_matching.py", "x = x + dt * velocity(x + 0.5 * dt * v0, t0 + 0.5 * dt)",
             "x = x + dt * velocity(x + 0.5 * dt * v0, t0 + dt)", ["tests/test_flow_matching.py"],
             "midpoint evaluated at the wrong time"),
    Mutation("cfg_null_label_is_class_0", "flow_matching.py", "else torch.cat([y, torch.full_like(y, num_classes)])",
             "else torch.cat([y, torch.full_like(y, 0)])", ["tests/test_flow_matching.py", "tests/test_sampling_quality.py"],
             "CFG's unconditional half uses class 0, not the null label"),
    Mutation("dropout_to_the_last_class", "flow_matching.py",
             "class_dropout_prob\n        y = torch.where(drop, torch.full_like(y, num_classes), y)\n    elif",
             "class_dropout_prob\n        y = torch.where(drop, torch.full_like(y, num_classes - 1), y)\n    elif",
             ["tests/test_flow_matching.py", "tests/test_training.py"], "labels dropped to the last class, not the null label"),
    Mutation("every_sample_same_noise", "flow_matching.py", "gen.manual_seed(sample_seed(seed, int(index)))",
             "gen.manual_seed(sample_seed(seed, 0))", ["tests/test_flow_matching.py"],
             "every sample starts from the same noise"),
    Mutation("noise_seeded_by_batch_row", "flow_matching.py", "gen.manual_seed(sample_seed(seed, int(index)))",
             "gen.manual_seed(sample_seed(seed, row))", ["tests/test_flow_matching.py", "tests/test_generate.py"],
             "per-sample noise depends on the batch row, not the sample index"),
    Mutation("time_grid_shift_inverted", "flow_matching.py", "return (u / (u + shift * (1 - u))).tolist()",
             "return (u / (shift * u + (1 - u))).tolist()", ["tests/test_flow_matching.py"],
             "the time shift s acts as 1 / s (more steps near data for s > 1)"),
    Mutation("time_grid_ignores_shift", "flow_matching.py", "return (u / (u + shift * (1 - u))).tolist()",
             "return u.tolist()", ["tests/test_flow_matching.py"], "time_grid is uniform whatever the shift"),
    Mutation("time_grid_misses_data", "flow_matching.py",
             "u = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)",
             "u = torch.linspace(0.0, 1.0 - 1e-3, num_steps + 1, dtype=torch.float64)", ["tests/test_flow_matching.py"],
             "the grid stops short of t = 1"),
    Mutation("sample_drops_time_shift", "flow_matching.py",
             "return integrate(field, noise.float(), num_steps, sampler, time_shift)",
             "return integrate(field, noise.float(), num_steps, sampler)", ["tests/test_flow_matching.py"],
             "sample() integrates on the uniform grid whatever time_shift says"),
    Mutation("guidance_interval_open_start", "flow_matching.py", "guidance_interval[0] <= t <= guidance_interval[1]",
             "guidance_interval[0] < t <= guidance_interval[1]", ["tests/test_flow_matching.py"],
             "no guidance at t = a, the start of the guidance interval"),
    Mutation("guidance_interval_open_end", "flow_matching.py", "guidance_interval[0] <= t <= guidance_interval[1]",
             "guidance_interval[0] <= t < guidance_interval[1]", ["tests/test_flow_matching.py"],
             "no guidance at t = b, the end of the guidance interval"),
    Mutation("vq_no_straight_through", "models/vqvae.py", "z_st = z + (z_q - z).detach()", "z_st = z_q.detach()",
             ["tests/test_vqvae.py"], "no straight-through gradient to the encoder"),
    # --- no-op spot checks: the code a test names replaced by nothing
    Mutation("noop_set_lr", "training/optim.py", 'group["lr"] = group["base_lr"] * factor', "pass",
             ["tests/test_training.py::test_lr_schedule_and_clipping_as_the_optimizer_sees_them"], "set_lr does nothing"),
    Mutation("noop_prune_checkpoints", "utils/checkpoint.py", "    for path in periodic[:-keep]:\n        os.remove(path)",
             "    pass", ["tests/test_training.py::test_only_the_newest_periodic_checkpoints_are_kept"],
             "prune_checkpoints does nothing"),
    Mutation("noop_flip", "data/datasets.py", "return (x.flip(-1) if flip else x), y", "return x, y",
             ["tests/test_training.py::test_half_of_the_images_are_mirrored"], "FlipByIndex never mirrors"),
    Mutation("noop_check_config_fits", "utils/checkpoint.py", "    if diffs:\n        raise ValueError(",
             "    if False:\n        raise ValueError(",
             ["tests/test_training.py::test_resume_with_a_different_architecture_is_a_clear_error"],
             "check_config_fits accepts any config"),
    Mutation("objective_grid_ignores_time_shift", "training/objectives.py",
             "guidance_interval=self.guidance_interval, time_shift=c.time_shift, autocast_dtype=self.autocast_dtype)",
             "guidance_interval=self.guidance_interval, time_shift=1.0, autocast_dtype=self.autocast_dtype)",
             ["tests/test_training.py::test_the_grid_and_the_fid_sample_with_the_configs_time_shift_and_guidance_interval"],
             "the training grid samples on the uniform grid whatever --time_shift says"),
    Mutation("periodic_fid_ignores_time_shift", "evaluation/periodic.py",
             "guidance_interval=self.guidance_interval, time_shift=c.time_shift, batch_size=c.fid_batch_size,",
             "guidance_interval=self.guidance_interval, time_shift=1.0, batch_size=c.fid_batch_size,",
             ["tests/test_training.py::test_the_grid_and_the_fid_sample_with_the_configs_time_shift_and_guidance_interval"],
             "FID during training samples on the uniform grid whatever --time_shift says"),
    Mutation("objective_ignores_guidance_interval", "training/objectives.py",
             "self.guidance_interval = flow_matching.guidance_interval_or_none(",
             "self.guidance_interval = None and flow_matching.guidance_interval_or_none(",
             ["tests/test_training.py::test_the_grid_and_the_fid_sample_with_the_configs_time_shift_and_guidance_interval"],
             "training grids guide every step whatever --guidance_interval_start/_end say"),
    Mutation("periodic_fid_ignores_guidance_interval", "evaluation/periodic.py",
             "self.guidance_interval = flow_matching.guidance_interval_or_none(",
             "self.guidance_interval = None and flow_matching.guidance_interval_or_none(",
             ["tests/test_training.py::test_the_grid_and_the_fid_sample_with_the_configs_time_shift_and_guidance_interval"],
             "FID during training guides every step whatever --guidance_interval_start/_end say"),
    Mutation("noop_sample_grid", "training/objectives.py",
             "        return save_grid(images, c.grid_samples_per_class, path)", "        return None",
             ["tests/test_training.py::test_train_script_end_to_end"], "the training sample grid is never written"),
    # --- layers
    Mutation("data_imports_training", "data/datasets.py", "import hashlib\n",
             "import hashlib\nimport training.trainer\n", ["tests/test_layers.py"], "an import that points up"),
    # --- generation and evaluation: flags and labels reach the sampler
    Mutation("unconditional_cfg_rule_inverted", "flow_matching.py",
             "scale = default if cfg_scale is None else cfg_scale", "scale = cfg_scale if cfg_scale is None else default",
             ["tests/test_sampling_quality.py"], "a given CFG scale loses to the checkpoint's default"),
    Mutation("generate_always_class_0", "evaluation/sampling.py",
             "y = labels[first:index.stop].to(device) if num_classes else None",
             "y = torch.zeros_like(labels[first:index.stop]).to(device) if num_classes else None",
             ["tests/test_sampling_quality.py"], "generation always samples class 0"),
    Mutation("generate_ignores_cfg_scale", "generate_flow_matching.py",
             "[cfg_scale] = run.cfg_scales([args.cfg_scale] if args.cfg_scale is not None else None, \"--cfg_scale\")",
             "[cfg_scale] = run.cfg_scales(None, \"--cfg_scale\")",
             ["tests/test_sampling_quality.py"], "generate_flow_matching.py ignores --cfg_scale"),
    Mutation("generate_ignores_guidance_interval", "generate_flow_matching.py",
             "guidance_interval = run.guidance_interval(args.guidance_interval)",
             "guidance_interval = run.guidance_interval(None)",
             ["tests/test_sampling_quality.py"], "generate_flow_matching.py ignores --guidance_interval"),
    Mutation("generate_ignores_time_shift", "generate_flow_matching.py",
             "[time_shift] = run.time_shifts([args.time_shift] if args.time_shift is not None else None)",
             "[time_shift] = run.time_shifts(None)",
             ["tests/test_sampling_quality.py"], "generate_flow_matching.py ignores --time_shift"),
    Mutation("sampling_ignores_checkpoint_time_shift", "evaluation/sampling.py",
             'return list(given or [self.config.get("time_shift", 1.0)])', "return list(given or [1.0])",
             ["tests/test_sampling_quality.py"], "sampling defaults to a uniform grid, not the checkpoint's time_shift"),
    Mutation("sampling_ignores_checkpoint_interval", "evaluation/sampling.py",
             'start, end = given or (self.config.get("guidance_interval_start", 0.0),',
             'start, end = given or (0.0, 1.0) or (self.config.get("guidance_interval_start", 0.0),',
             ["tests/test_sampling_quality.py"], "sampling guides every step, not in the checkpoint's guidance interval"),
    Mutation("evaluate_ignores_time_shifts", "evaluate_fid.py", "cfg_scales, run.time_shifts(args.time_shifts)):",
             "cfg_scales, run.time_shifts(None)):", ["tests/test_sampling_quality.py"],
             "evaluate_fid.py ignores --time_shifts"),
    Mutation("quality_ignores_time_shift", "benchmarks/quality.py",
             "time_shift=time_shift, batch_size=args.sample_batch_size,",
             "time_shift=1.0, batch_size=args.sample_batch_size,", ["tests/test_quality_benchmark.py"],
             "quality.py samples every --time_shifts setting on the uniform grid"),
    Mutation("quality_checkpoint_takes_any_seed", "benchmarks/quality.py",
             'if "seed" in given and flags_config.seed != config.seed:', "if False:",
             ["tests/test_quality_benchmark.py"], "quality.py --checkpoint accepts a --seed other than the run's"),
    Mutation("quality_summary_ignores_time_shift", "benchmarks/quality.py",
             'row["cfg_scale"], row.get("time_shift", 1.0),', 'row["cfg_scale"], 1.0,',
             ["tests/test_quality_benchmark.py"], "--summarize merges rows of different time shifts"),
    Mutation("sampling_ignores_precision", "evaluation/sampling.py",
             "autocast_dtype=torch.bfloat16 if self.precision == \"bf16\" else None", "autocast_dtype=None",
             ["tests/test_sampling_quality.py"], "the sampling front end ignores --precision bf16"),
    Mutation("generate_ignores_sampler", "generate_flow_matching.py",
             "run.samplers([args.sampler] if args.sampler else None,", "run.samplers(None,",
             ["tests/test_sampling_quality.py"], "generate_flow_matching.py ignores --sampler"),
    Mutation("evaluate_ignores_cfg_scales", "evaluate_fid.py",
             "cfg_scales = run.cfg_scales(args.cfg_scales, \"--cfg_scales\")",
             "cfg_scales = run.cfg_scales(None, \"--cfg_scales\")",
             ["tests/test_sampling_quality.py"], "evaluate_fid.py ignores --cfg_scales"),
    Mutation("sampling_time_reversed", "flow_matching.py",
             "return model(x, t, labels, *r).float()", "return model(x, 1 - t, labels, *r).float()",
             ["tests/test_flow_matching.py", "tests/test_sampling_quality.py"],
             "sample() feeds the model 1 - t (convention reversed)"),
    Mutation("dit_ignores_t", "models/dit_2d.py",
             "c = self.t_embedder(t)", "c = self.t_embedder(torch.zeros_like(t))",
             ["tests/test_model.py", "tests/test_sampling_quality.py"], "the DiT ignores t"),
    Mutation("sampler_accepts_the_null_label", "flow_matching.py",
             "int(y.max()) >= num_classes)", "int(y.max()) > num_classes)", ["tests/test_model.py"],
             "the null label passes the sampler's label check (the model no longer checks)"),
    Mutation("gpu_check_bad_flag", "benchmarks/gpu_check.sh",
             "--profile \"$OUT/profile_train_$name.txt\" --sync_debug true", "--profile \"$OUT/profile_train_$name.txt\" --sync_debug yes",
             ["tests/test_gpu_check.py"], "a flag value the GPU job's training stage rejects"),
    Mutation("dit_ignores_y", "models/dit_2d.py",
             "c = c + self.y_embedder(y)", "c = c + 0 * self.y_embedder(y)",
             ["tests/test_model.py", "tests/test_sampling_quality.py"], "the DiT ignores its label"),
    # The recipe options of models/layers.py and models/dit_2d.py
    Mutation("rms_norm_no_rsqrt", "models/layers.py",
             "x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)",
             "x32 = x32 / (x32.pow(2).mean(-1, keepdim=True) + self.eps)",
             ["tests/test_architecture_options.py"], "RMSNorm divides by the mean square, not its root"),
    Mutation("qk_norm_skips_k", "models/layers.py",
             "q, k = self.q_norm(q), self.k_norm(k)", "q = self.q_norm(q)",
             ["tests/test_architecture_options.py"], "qk-norm normalizes q only"),
    Mutation("rope_rotation_sign", "models/layers.py",
             "x1 * sin + x2 * cos], dim=-1)", "x2 * cos - x1 * sin], dim=-1)",
             ["tests/test_architecture_options.py"], "the rotary map is not a rotation"),
    Mutation("rope_rows_and_columns_share_angles", "models/layers.py",
             "cols.reshape(-1, 1) * freqs], dim=1)", "rows.reshape(-1, 1) * freqs], dim=1)",
             ["tests/test_architecture_options.py"], "the second half turns with the row, not the column"),
    Mutation("rope_not_applied_to_k", "models/layers.py",
             "q, k = apply_rope(q, *rope), apply_rope(k, *rope)", "q = apply_rope(q, *rope)",
             ["tests/test_architecture_options.py"], "only q is rotated: scores stop being relative"),
    Mutation("swiglu_gates_the_value", "models/layers.py",
             "return self.fc2(F.silu(gate) * value)", "return self.fc2(gate * F.silu(value))",
             ["tests/test_architecture_options.py"], "SiLU on the value half instead of the gate"),
    Mutation("swiglu_full_width", "models/layers.py",
             "inner = int(2 * hidden_size * mlp_ratio / 3)", "inner = int(hidden_size * mlp_ratio)",
             ["tests/test_architecture_options.py"], "SwiGLU 1.5x the parameters of the MLP it replaces"),
    Mutation("fp32_residual_ignored", "models/dit_2d.py",
             "x = x.float() if self.fp32_residual else x", "x = x",
             ["tests/test_architecture_options.py"], "--fp32_residual leaves the stream in bf16"),
    Mutation("old_checkpoint_gets_options", "models/dit_2d.py",
             'qk_norm=get("qk_norm", False)', 'qk_norm=get("qk_norm", True)',
             ["tests/test_architecture_options.py"], "a checkpoint from before the options builds qk-norm"),
    # MeanFlow (flow_matching.py, models/, the scripts)
    Mutation("meanflow_target_sign", "flow_matching.py",
             "target[jump] += (r - t)[jump]", "target[jump] -= (r - t)[jump]",
             ["tests/test_meanflow.py"], "u = v - (r - t) du/dt: the paper's sign in the wrong orientation"),
    Mutation("meanflow_tangent_swapped", "flow_matching.py",
             "torch.ones_like(t[jump]), torch.zeros_like(r[jump])", "torch.zeros_like(t[jump]), torch.ones_like(r[jump])",
             ["tests/test_meanflow.py"], "the JVP moves r instead of t"),
    Mutation("meanflow_tangent_without_v", "flow_matching.py",
             "(direction.to(x_t.dtype), torch.ones_like", "(torch.zeros_like(x_t[jump]), torch.ones_like",
             ["tests/test_meanflow.py"], "du/dt without the transport term v . d_x u"),
    Mutation("meanflow_predicted_tangent_is_sampled", "flow_matching.py",
             "direction = u_c[jump] if u_c is not None else model(x_t[jump], t[jump], ys, t[jump])",
             "direction = v[jump]", ["tests/test_meanflow.py"],
             "--meanflow_tangent predicted moves along the sampled velocity (the paper's tangent)"),
    Mutation("meanflow_predicted_tangent_unconditional", "flow_matching.py",
             "direction = u_c[jump] if u_c", "direction = u_u[jump] if u_c", ["tests/test_meanflow.py"],
             "the guided run's predicted tangent is the unconditional velocity"),
    Mutation("objective_ignores_meanflow_tangent", "training/objectives.py",
             "tangent=c.meanflow_tangent, ", "", ["tests/test_meanflow.py"], "the objective drops --meanflow_tangent"),
    Mutation("meanflow_mse_is_the_weighted_error", "flow_matching.py",
             "squared.detach().mean()", "(weight * squared).detach().mean()",
             ["tests/test_meanflow.py::test_adaptive_weight_is_a_stop_gradient_power_of_the_error"],
             "MeanFlow's reported error carries the adaptive weight (~1 whatever the error)"),
    Mutation("meanflow_logs_the_weighted_loss_as_mse", "training/objectives.py",
             'return loss, {"mse": mse}', 'return loss, {"mse": loss.detach()}',
             ["tests/test_meanflow.py::test_the_objective_passes_the_configs_meanflow_fields_to_the_loss",
              "tests/test_training.py::test_meanflow_logs_and_probes_its_unweighted_error"],
             "a MeanFlow log's mse is its weighted loss, which stays ~1 while the error falls"),
    Mutation("meanflow_probe_compares_the_weighted_loss", "training/objectives.py",
             'return extras.get("mse", loss)', "return loss",
             ["tests/test_training.py::test_meanflow_logs_and_probes_its_unweighted_error"],
             "MeanFlow's EMA and raw probe losses are both ~1: a lagging EMA cannot show"),
    Mutation("resume_ignores_data_order", "training/trainer.py",
             "*OPTIMIZER_FIELDS, *RESUME_FIELDS), path)", "*OPTIMIZER_FIELDS), path)", ["tests/test_training.py"],
             "--resume accepts another --seed or --batch_size, which would not continue the run"),
    Mutation("init_from_ignores_vqvae", "rebuild.py",
             'latent_space.check_trained_on(ckpt, f"--init_from {path}")', "pass", ["tests/test_latent_flow.py"],
             "--init_from starts a latent run on another VQ-VAE's latents"),
    Mutation("init_from_trains_from_the_ema", "rebuild.py",
             'state = dict(ckpt["model"])', 'state = dict(ckpt["ema"])',
             ["tests/test_ema.py::test_init_from_starts_the_ema_at_the_weights_it_trains_from"],
             "--init_from trains from the checkpoint's EMA, not the trained weights its help names"),
    Mutation("meanflow_times_unordered", "flow_matching.py",
             "t, r = torch.minimum(a, b), torch.maximum(a, b)", "t, r = a, b",
             ["tests/test_meanflow.py"], "r may lie before t"),
    Mutation("meanflow_sampler_ignores_r", "flow_matching.py",
             "x = x + dt * velocity(x, t0, t1)", "x = x + dt * velocity(x, t0)",
             ["tests/test_meanflow.py"], "MeanFlow jumps with the instantaneous velocity"),
    Mutation("meanflow_guidance_mix_dropped", "flow_matching.py",
             "(1 - guidance_scale - guidance_mix) * u_u", "(1 - guidance_scale) * u_u",
             ["tests/test_meanflow.py"], "the guided target's weights do not sum to one"),
    Mutation("meanflow_guides_dropped_labels", "flow_matching.py",
             "torch.where((y != num_classes).reshape(shape), guided, v)", "guided",
             ["tests/test_meanflow.py"], "null-label samples get the guided target"),
    Mutation("meanflow_weight_not_detached", "flow_matching.py",
             "1.0 / (squared.detach() + adaptive_c) ** adaptive_p", "1.0 / (squared + adaptive_c) ** adaptive_p",
             ["tests/test_meanflow.py"], "the adaptive weight is differentiated"),
    Mutation("attention_no_forward_ad_path", "models/precision.py",
             "    if _forward_ad(q):", "    if False:",
             ["tests/test_meanflow.py"], "the JVP meets SDPA's kernel, which has no forward-mode derivative"),
    Mutation("interval_embedder_not_zeroed", "models/dit_2d.py",
             "            nn.init.zeros_(self.r_embedder.mlp[2].weight)\n", "",
             ["tests/test_meanflow.py"], "a flow-matching checkpoint loaded into MeanFlow changes its velocity"),
    Mutation("meanflow_run_samples_with_euler", "configs/flow_matching_config.py",
             'MEANFLOW_SAMPLING = {"sampler": "meanflow", "num_sampling_steps": 1, "cfg_scale": 1.0}',
             'MEANFLOW_SAMPLING = {}', ["tests/test_meanflow.py", "tests/test_config.py"],
             "a MeanFlow run keeps the preset's Euler, its step count and its CFG"),
    Mutation("meanflow_gap_jumps_with_euler", "benchmarks/meanflow_gap.py",
             'run("meanflow" if meanflow else "euler", k)', 'run("euler", k)',
             ["tests/test_meanflow_gap.py"], "the gap of a MeanFlow checkpoint measures Euler, not its jumps"),
    Mutation("meanflow_gap_reference_from_other_noise", "benchmarks/meanflow_gap.py",
             'reference = run("midpoint", args.reference_steps)',
             'reference = run("midpoint", args.reference_steps).roll(1, 0)',
             ["tests/test_meanflow_gap.py"], "the jumps are compared with the reference of another noise"),
    Mutation("meanflow_gap_bad_checkpoint_traceback", "benchmarks/meanflow_gap.py",
             "except (FileNotFoundError, ValueError) as err:", "except OSError as err:",
             ["tests/test_meanflow_gap.py"], "a foreign checkpoint given to meanflow_gap.py ends in a traceback"),
    Mutation("meanflow_sampler_accepted_on_flow_matching", "evaluation/sampling.py",
             'if "meanflow" in samplers and', 'if False and',
             ["tests/test_meanflow.py"], "--sampler meanflow on a flow-matching checkpoint is not refused"),
    Mutation("resume_old_checkpoint_without_defaults", "training/trainer.py",
             'saved, current = with_defaults(ckpt["config"], self.config),', 'saved, current = ckpt["config"],',
             ["tests/test_training.py"], "a checkpoint from before a field existed no longer resumes"),
    Mutation("quality_diff_counts_the_sampler", "benchmarks/quality.py",
             '"sampler", "num_sampling_steps", "cfg_scale",', '"cfg_scale",',
             ["tests/test_quality_benchmark.py::test_a_preset_shares_the_row_of_the_flags_it_stands_for"],
             "the winning preset's run gets a table row of its own, apart from its ablation"),
    Mutation("fid_curve_joins_time_shifts", "benchmarks/quality.py",
             '+ (f" shift {shift:g}" if shift != 1 else "")', '',
             ["tests/test_quality_benchmark.py::test_fid_curves_join_steps_of_one_setting_only"],
             "the FID-vs-steps plot joins two time shifts scored at one step into one line"),
    Mutation("winner_preset_keeps_rope", "configs/flow_matching_config.py",
             'mlp="swiglu", sampler="midpoint"', 'mlp="swiglu", positions="sincos_rope", sampler="midpoint"',
             ["tests/test_config.py::test_the_winning_presets_are_one_recipe_at_two_sizes"],
             "the preset is not the recipe that was measured"),
    Mutation("inf_gradient_steps_on", "training/trainer.py",
             "            finite = finite & torch.isfinite(grad_norm)", "            pass",
             ["tests/test_training.py::test_non_finite_loss_or_gradient_stops_naming_the_step"],
             "a finite loss with an inf gradient steps to NaN weights and saves them"),
    Mutation("snapshot_of_nan_weights", "training/trainer.py",
             "reconstruction.\"\"\"\n        self._check_finite()\n", "reconstruction.\"\"\"\n",
             ["tests/test_training.py::test_non_finite_loss_or_gradient_stops_naming_the_step"],
             "post-hoc EMA snapshots are written from NaN weights"),
    Mutation("stop_checkpoint_write_failure_ignored", "training/trainer.py",
             "            self._save(path, required=True)\n        except", "            self._save(path)\n        except",
             ["tests/test_training.py::test_a_stop_checkpoint_that_cannot_be_written_fails_the_run"],
             "a SIGTERM whose checkpoint could not be written reports it and exits as a clean stop"),
    Mutation("compile_off_by_default_on_cuda", "configs/flow_matching_config.py",
             "values[\"compile\"] = cuda and values[\"objective\"] == \"flow_matching\"", "values[\"compile\"] = False",
             ["tests/test_config.py::test_compile_defaults_to_on_for_flow_matching_on_cuda"],
             "the seed run trains eager on a GPU (1.33x slower than compiled)"),
    Mutation("given_none_loses_to_preset", "configs/cli.py",
             "    values.update(args)\n", "    values.update({k: v for k, v in args.items() if v is not None})\n",
             ["tests/test_config.py::test_a_given_none_overrides_the_presets_value"],
             "--compile none (or any none) is ignored where the preset sets the field"),
    Mutation("meanflow_defaults_after_validation", "configs/flow_matching_config.py",
             "    if values[\"objective\"] == \"meanflow\":\n        values.update(",
             "    if False:\n        values.update(",
             ["tests/test_config.py::test_an_unguided_meanflow_run_needs_no_null_label"],
             "validation judges a MeanFlow run by the preset's CFG scale, not its own"),
    Mutation("latent_resume_on_other_data", "training/objectives.py",
             "rtol=1e-4, atol=1e-6):", "rtol=1e9, atol=1e9):",
             ["tests/test_latent_flow.py::test_tiny_latent_run_trains_and_generates_pixel_images"],
             "a latent run resumed on other data continues in a shifted latent space"),
    Mutation("epoch_padded_per_rank", "data/datasets.py",
             "self.total_size = len(dataset) // global_batch * global_batch",
             "self.total_size = -(-len(dataset) // num_replicas) * num_replicas",
             ["tests/test_training.py::test_each_step_sees_the_same_images_whatever_the_split"],
             "after an epoch boundary a step's images depend on the rank / micro-batch split"),
    Mutation("padded_rows_kept", "evaluation/sampling.py",
             "        x = x[:stop - first]\n", "",
             ["tests/test_fid.py::test_a_padded_last_batch_keeps_the_forward_at_one_shape_and_the_same_samples"],
             "a padded last batch returns its padding rows as samples"),
    Mutation("last_batch_never_padded", "evaluation/sampling.py",
             "first + batch_size if pad_last_batch and n > batch_size else stop", "stop",
             ["tests/test_fid.py::test_a_padded_last_batch_keeps_the_forward_at_one_shape_and_the_same_samples"],
             "a compiled forward compiles the smaller last batch's shape again"),
    Mutation("compiled_run_does_not_pad", "evaluation/sampling.py",
             "pad_last_batch=self.compiled,", "pad_last_batch=False,",
             ["tests/test_generate.py::test_compile_flag_samples_through_one_static_shape_compile"],
             "generation with --compile compiles a second shape for the last batch"),
    Mutation("kernel_choices_crash_on_missing_backend", "benchmarks/kernel_choices.py",
             "except RuntimeError as err:", "except ValueError as err:",
             ["tests/test_gpu_check.py"], "the GPU job dies on a backend the device lacks"),
]


def copy_tree(dest: str) -> None:
    """Copy what git tracks or would track (tracked + untracked, not ignored) into dest."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if not os.path.isfile(src):
            continue  # deleted in the working tree
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dest, rel))


def run_tests(copy: str, tests: Sequence[str], timeout: int) -> Tuple[str, str, float]:
    """(status, first failing test or message, seconds): status passed | failed | error."""
    start = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider",
                                 *tests], cwd=copy, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "error", f"timed out after {timeout} s", time.perf_counter() - start
    seconds = time.perf_counter() - start
    if result.returncode == 0:
        return "passed", "", seconds
    failed = re.findall(r"^FAILED (\S+)", result.stdout, re.M)
    if result.returncode == 1 and failed:
        return "failed", failed[0], seconds
    return "error", (result.stdout + result.stderr).strip().splitlines()[-1][:120], seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                   help="run only the mutations whose name contains one of these")
    p.add_argument("--list", action="store_true", help="list the mutations and their target tests")
    p.add_argument("--timeout", type=int, default=900, help="seconds per pytest run (default: %(default)s)")
    args = p.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or any(s in m.name for s in args.only)]
    if not chosen:
        p.error(f"--only {args.only} matches no mutation; --list shows them")
    if args.list:
        for m in chosen:
            print(f"{m.name:<34} {m.path:<28} {' '.join(m.tests)}  # {m.why}")
        return 0

    with tempfile.TemporaryDirectory(prefix="mutations_") as copy:
        copy_tree(copy)
        for m in chosen:  # every mutation must still apply to the code as it is
            count = open(os.path.join(copy, m.path)).read().count(m.old)
            if count != 1:
                print(f"error: mutation {m.name}: the text occurs {count} times in {m.path} (must be once): "
                      f"{m.old!r}", file=sys.stderr)
                return 2
        targets = sorted({t for m in chosen for t in m.tests})
        status, detail, seconds = run_tests(copy, targets, args.timeout * 4)
        print(f"baseline: {len(targets)} target(s) {status} in {seconds:.0f} s {detail}", flush=True)
        if status != "passed":
            print("error: the target tests fail without any mutation; fix them first", file=sys.stderr)
            return 1
        rows = []
        for m in chosen:
            path = os.path.join(copy, m.path)
            original = open(path).read()
            with open(path, "w") as f:
                f.write(original.replace(m.old, m.new))
            try:
                status, detail, seconds = run_tests(copy, m.tests, args.timeout)
            finally:
                with open(path, "w") as f:
                    f.write(original)
            verdict = {"failed": "KILLED", "passed": "SURVIVED", "error": "ERROR"}[status]
            rows.append((m, verdict, detail, seconds))
            print(f"{m.name:<34} {verdict:<8} {detail} ({seconds:.0f} s)", flush=True)

    print("\n| bug | what it breaks | verdict | killed by |\n|---|---|---|---|")
    for m, verdict, detail, _ in rows:
        print(f"| `{m.name}` | {m.why} | {verdict} | {detail.replace('|', '/') if verdict != 'SURVIVED' else '-'} |")
    survived = sum(v != "KILLED" for _, v, _, _ in rows)
    print(f"\n{len(rows) - survived} of {len(rows)} killed")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
