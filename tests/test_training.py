"""The trainer and train_flow_matching.py: exact resume, atomic saves, signals, data, accumulation."""

import dataclasses
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error

import numpy as np
import pytest
import torch

import flow_matching as fm
import train_flow_matching
import train_vqvae
from configs.cli import make_config
from configs.flow_matching_config import FlowMatchingConfig
from configs.vqvae_config import VQVAEConfig
from data.datasets import build_image_dataset
from data.flow_matching_dataset import get_flow_matching_dataloader
from models.dit_2d import dit_from_config
from evaluation import fid
from evaluation.periodic import PeriodicFID
from tests.conftest import ROOT, TINY_FLAGS, StandIn, write_image_folder
from tests.test_vqvae import vq_flags
from utils import checkpoint as ckpt_lib
from utils.distributed import DistInfo
from training import optim
from training.objectives import FlowMatchingObjective
from training.startup import announce_run
from training.trainer import Draws, NonFiniteLoss, Trainer


def flag_value(flags, name):
    return flags[flags.index(name) + 1]


def load(path):
    return ckpt_lib.load_checkpoint(path)


def assert_same_state(a, b):
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert a["step"] == b["step"] and a["data"] == b["data"]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for index in sa:
        for name in sa[index]:
            assert torch.equal(torch.as_tensor(sa[index][name]), torch.as_tensor(sb[index][name])), (index, name)


# ----------------------------------------------------------------------------- resume

ALL_OPTIONS = ["--qk_norm", "true", "--mlp", "swiglu", "--positions", "sincos_rope", "--fp32_residual", "true",
               "--mixed_precision", "bf16", "--time_sampling", "logit_normal", "--logit_normal_mean", "0.3",
               "--ema_gamma", "4", "--adam_beta2", "0.95", "--time_shift", "2", "--guidance_interval_start", "0.2",
               "--num_sampling_steps", "3", "--sampler", "heun",
               "--lr_schedule", "cosine", "--warmup_steps", "4"]   # the resume at step 3 is inside the warmup


MEANFLOW = ["--objective", "meanflow", "--meanflow_ratio", "0.5", "--meanflow_adaptive_p", "0.5",
            "--mixed_precision", "bf16"]


@pytest.mark.parametrize("options", [[], ALL_OPTIONS, MEANFLOW], ids=["default", "all_options", "meanflow"])
def test_resume_is_bit_exact(tiny_flags, tmp_path, options):
    """2N steps in one go == N steps, then resume for N more (model, EMA, optimizer, data position),
    with the brief's recipe and with every recipe option on."""
    common = tiny_flags + ["--micro_batch_size", "2", "--save_every", "100", *options]
    full_dir, half_dir = str(tmp_path / "full"), str(tmp_path / "half")
    assert train_flow_matching.main(common + ["--train_steps", "6", "--checkpoint_dir", full_dir]) == 0
    assert train_flow_matching.main(common + ["--train_steps", "3", "--checkpoint_dir", half_dir]) == 0
    half_final = os.path.join(half_dir, "flow_matching_final.pt")
    assert load(half_final)["step"] == 3
    assert train_flow_matching.main(common + ["--train_steps", "6", "--checkpoint_dir", half_dir,
                                              "--resume", "latest"]) == 0
    assert_same_state(load(os.path.join(full_dir, "flow_matching_final.pt")),
                      load(os.path.join(half_dir, "flow_matching_final.pt")))


@pytest.mark.parametrize("options", [[], MEANFLOW], ids=["flow_matching", "meanflow"])
def test_the_log_lines_after_a_resume_match_the_uninterrupted_run(tiny_flags, tmp_path, options):
    """A checkpoint in the middle of a log window (step 3, logs every 2) keeps the window's loss
    and extra metrics (MeanFlow's mse): the resumed run logs the values of steps 4 and 6 that the
    uninterrupted run logged."""
    common = tiny_flags + ["--train_steps", "6", "--save_every", "3", *options]
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    assert train_flow_matching.main(common + ["--checkpoint_dir", str(full_dir)]) == 0
    resumed_dir.mkdir()
    shutil.copy(full_dir / "checkpoint_0000003.pt", resumed_dir)
    assert load(str(resumed_dir / "checkpoint_0000003.pt"))["log_window"]["steps"] == 1
    assert train_flow_matching.main(common + ["--checkpoint_dir", str(resumed_dir), "--resume", "latest"]) == 0
    full, resumed = ([json.loads(line) for line in open(d / "metrics.jsonl")] for d in (full_dir, resumed_dir))
    assert [r["step"] for r in full] == [2, 4, 6] and [r["step"] for r in resumed] == [4, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[1:]]
    if options:
        assert [r["mse"] for r in resumed] == [r["mse"] for r in full[1:]]


def test_tensorboard_gets_every_record_and_grid(tiny_flags):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert train_flow_matching.main(tiny_flags + ["--train_steps", "4", "--sample_every", "2",
                                                  "--tensorboard", "true"]) == 0
    events = EventAccumulator(os.path.join(flag_value(tiny_flags, "--checkpoint_dir"), "tensorboard"),
                              size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    records = [json.loads(line) for line in open(os.path.join(flag_value(tiny_flags, "--checkpoint_dir"),
                                                                "metrics.jsonl"))]
    for key in ("loss", "lr", "grad_norm", "probe_loss_ema", "probe_loss_raw"):
        logged = [(e.step, e.value) for e in events.Scalars(f"flow_matching/{key}")]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in records], key
    assert [e.step for e in events.Images("flow_matching/samples")] == [2, 4]


def test_a_cpu_run_says_how_long_it_would_take(tiny_flags, capsys):
    config = make_config(FlowMatchingConfig, {"dataset": "imagefolder", "data_dir": flag_value(tiny_flags, "--data_dir"),
                                              "image_size": 8, "hidden_size": 32, "depth": 1, "num_heads": 2,
                                              "batch_size": 4, "num_workers": 0, "device": "cpu",
                                              "data_loader": "workers", "num_classes": 3, "train_steps": 100_000})
    loader, _ = get_flow_matching_dataloader(config, batch_size=4)
    trainer = Trainer(config, dit_from_config(config), FlowMatchingObjective(config, torch.device("cpu")), loader,
                      DistInfo(0, 0, 1, torch.device("cpu")))
    trainer.step = 7

    class Bar:
        def write(self, line):
            print(line)

    trainer._estimate_cpu_time(1.0, Bar())   # 5 steps in 1 s: 0.2 s a step
    out = capsys.readouterr().out
    assert "a step takes 0.20 s" in out and "99993 steps need about 5.6 hours" in out and "--preset tiny (300 steps" in out
    trainer.step = 99_000
    trainer._estimate_cpu_time(1.0, Bar())   # 200 s left: nothing to say
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("config_class", [FlowMatchingConfig, VQVAEConfig])
def test_a_run_shorter_than_its_warmup_says_where_its_lr_ends(config_class, capsys):
    dist = DistInfo(0, 0, 1, torch.device("cpu"))
    announce_run(config_class(train_steps=5, warmup_steps=20), torch.nn.Linear(2, 2), dist, micro=4)
    assert "note: --warmup_steps 20 is longer than --train_steps 5: the run ends mid-warmup, its learning rates at 25% " \
           "of their peak" in capsys.readouterr().out
    announce_run(config_class(train_steps=20, warmup_steps=20), torch.nn.Linear(2, 2), dist, micro=4)
    assert "warmup" not in capsys.readouterr().out.split("parameters;")[1]   # the config listing above names the field


@pytest.mark.parametrize("config_class", [FlowMatchingConfig, VQVAEConfig])
def test_images_not_at_image_size_get_a_note(config_class, capsys):
    dist = DistInfo(0, 0, 1, torch.device("cpu"))
    announce_run(config_class(image_size=32), torch.nn.Linear(2, 2), dist, micro=4, first_image_size=(48, 40))
    assert "note: the images of --data_dir are 48x40 (its first file); training resizes them (shorter side) and " \
           "center-crops them to --image_size 32" in capsys.readouterr().out
    for size in ((32, 32), None):   # at size already, or not an ImageFolder
        announce_run(config_class(image_size=32), torch.nn.Linear(2, 2), dist, micro=4, first_image_size=size)
        assert "images of --data_dir" not in capsys.readouterr().out


def test_both_training_scripts_report_the_size_of_their_images(tmp_path, capsys):
    """The folder's 12x10 images train at --image_size 8: each script says so (flow matching through
    the DataInfo of its data loader, the VQ-VAE through its loader's dataset)."""
    images = write_image_folder(tmp_path / "images", size=(12, 10))
    note = "note: the images of --data_dir are 12x10 (its first file)"
    assert train_flow_matching.main(TINY_FLAGS + ["--data_dir", images, "--checkpoint_dir", str(tmp_path / "fm"),
                                                  "--train_steps", "1"]) == 0
    assert note in capsys.readouterr().out
    assert train_vqvae.main(vq_flags(images, tmp_path) + ["--train_steps", "1", "--eval_images", "0"]) == 0
    assert note in capsys.readouterr().out


@pytest.mark.parametrize("splits", [["train"], ["test", "train"]])
def test_a_data_dir_one_level_too_high_is_refused(tmp_path, splits):
    """A folder holding only split folders is not a dataset of classes named after them: with
    train/ alone it trained a 1-class model, silently."""
    for split in splits:
        write_image_folder(tmp_path / "data" / split, classes=2, per_class=1)
    with pytest.raises(ValueError, match=f"--data_dir {tmp_path / 'data'} holds the splits? {', '.join(splits)}, not "
                                         f"classes: pass one split's folder, e.g. {tmp_path / 'data' / 'train'}"):
        build_image_dataset("imagefolder", str(tmp_path / "data"), 8, 3)


def test_a_split_folder_holding_its_images_is_one_class(tmp_path):
    """root/train/*.png (no class folders) is a one-class set: an unconditional dataset, or images
    to score; there is no level below to point at."""
    write_image_folder(tmp_path / "flat", classes=1, per_class=3)
    (tmp_path / "data").mkdir()
    os.rename(tmp_path / "flat" / "class_0", tmp_path / "data" / "train")
    dataset, classes = build_image_dataset("imagefolder", str(tmp_path / "data"), 8, 3)
    assert (len(dataset), classes) == (3, 1)


def test_fp16_trains_with_a_grad_scaler_and_resumes_exactly(tiny_flags, tmp_path):
    """--mixed_precision fp16: a GradScaler scales the loss, its state is checkpointed, and a
    resumed run matches the uninterrupted one bit for bit (scale included)."""
    common = tiny_flags + ["--mixed_precision", "fp16", "--save_every", "100"]
    full_dir, half_dir = str(tmp_path / "full"), str(tmp_path / "half")
    assert train_flow_matching.main(common + ["--train_steps", "6", "--checkpoint_dir", full_dir]) == 0
    assert train_flow_matching.main(common + ["--train_steps", "3", "--checkpoint_dir", half_dir]) == 0
    assert train_flow_matching.main(common + ["--train_steps", "6", "--checkpoint_dir", half_dir,
                                              "--resume", "latest"]) == 0
    full, half = (load(os.path.join(d, "flow_matching_final.pt")) for d in (full_dir, half_dir))
    assert_same_state(full, half)
    assert full["scaler"] is not None and full["scaler"] == half["scaler"]
    assert full["scaler"]["scale"] == 2.0 ** 16   # no overflow in 6 steps: the initial scale
    losses = [json.loads(line)["loss"] for line in open(os.path.join(full_dir, "metrics.jsonl"))]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(v).all() for v in full["model"].values())


@pytest.mark.parametrize("mode", ["default", "blocks"])
def test_compiled_model_saves_unwrapped_weights(tiny_flags, tmp_path, monkeypatch, mode):
    """--compile true (the eager backend here: no C++ toolchain needed), whole model or per block,
    saves weights without the `_orig_mod.` prefix, which load into a plain DiT2D and resume."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend="eager"))
    flags = tiny_flags + ["--compile", "true", "--compile_mode", mode, "--save_every", "100"]
    assert train_flow_matching.main(flags + ["--train_steps", "2"]) == 0
    final = load(os.path.join(flag_value(tiny_flags, "--checkpoint_dir"), "flow_matching_final.pt"))
    for key in ("model", "ema"):
        assert not any(k.startswith(("_orig_mod.", "module.")) for k in final[key]), key
    model = dit_from_config(final["config"])
    model.load_state_dict(final["model"], strict=True)
    assert train_flow_matching.main(flags + ["--train_steps", "3", "--resume", "latest"]) == 0


def test_compile_wraps_ddp_not_the_reverse(tiny_flags, monkeypatch):
    """torch.compile(DDP(model)), as PyTorch advises: the compiled backward then overlaps DDP's
    gradient all-reduce (DDP(compile(model)) would not). Stand-ins record the nesting."""
    from training import trainer as trainer_module

    class DDP(torch.nn.Module):
        def __init__(self, module, device_ids=None):
            super().__init__()
            self.module = module

    monkeypatch.setattr(trainer_module, "DistributedDataParallel", DDP)
    monkeypatch.setattr(torch, "compile", lambda model, **kw: ("compiled", model))
    config = make_config(FlowMatchingConfig, {"dataset": "imagefolder", "data_dir": flag_value(tiny_flags, "--data_dir"),
                                              "image_size": 8, "hidden_size": 32, "depth": 1, "num_heads": 2,
                                              "batch_size": 4, "num_workers": 0, "device": "cpu", "compile": True,
                                              "compile_mode": "default", "num_classes": 3})
    loader, _ = get_flow_matching_dataloader(config, batch_size=2)
    trainer = Trainer(config, dit_from_config(config), FlowMatchingObjective(config, torch.device("cpu")), loader,
                      DistInfo(0, 0, 2, torch.device("cpu"), "gloo"))
    kind, inner = trainer.model
    assert kind == "compiled" and isinstance(inner, DDP) and inner.module is trainer.raw_model


@pytest.mark.parametrize("optimizer, flag, group, key", [("adamw", "--lr", "adamw_decay", "base_lr"),
                                                          ("muon", "--muon_lr", "muon", "base_lr"),
                                                          ("adamw", "--weight_decay", "adamw_decay", "weight_decay")])
def test_resume_takes_optimizer_settings_from_the_flags(tiny_flags, capsys, optimizer, flag, group, key):
    """A rate or a decay changed on resume is used (torch's load_state_dict alone would restore the
    old one)."""
    common = tiny_flags + ["--optimizer", optimizer]
    assert train_flow_matching.main(common + ["--train_steps", "1", flag, "1e-3"]) == 0
    capsys.readouterr()
    assert train_flow_matching.main(common + ["--train_steps", "2", flag, "2e-3", "--resume", "latest"]) == 0
    out = capsys.readouterr().out
    assert f"{group}.{key}: 0.001 -> 0.002" in out and "training settings" not in out   # said once
    final = load(os.path.join(flag_value(tiny_flags, "--checkpoint_dir"), "flow_matching_final.pt"))
    groups = final["optimizer"]["param_groups"] if optimizer == "adamw" else final["optimizer"]["muon"]["param_groups"]
    assert {g["name"]: g[key] for g in groups}[group] == 2e-3


def test_a_resume_that_changes_the_lr_schedule_says_what_changed(tiny_flags, capsys):
    """Like the EMA's, the schedule's fields may change on resume (a longer cosine, another warmup),
    and the learning rates from the resumed step on then differ from the checkpoint's run's: the
    run names each changed field. A longer run under a constant LR changes nothing to report."""
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "1"]) == 0
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "2", "--resume", "latest", "--min_lr_ratio", "0.3"]) == 0
    assert "LR schedule" not in capsys.readouterr().out   # a constant LR reads neither min_lr_ratio nor train_steps
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "4", "--resume", "latest", "--lr_schedule", "cosine",
                                                  "--warmup_steps", "1", "--min_lr_ratio", "0.5"]) == 0
    assert ("LR schedule from the current flags, not the checkpoint: lr_schedule: 'constant' -> 'cosine'; "
            "warmup_steps: 2 -> 1; min_lr_ratio: 0.3 -> 0.5; train_steps: 2 -> 4") in (out := capsys.readouterr().out)
    assert "training settings" not in out   # said once
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "5", "--resume", "latest", "--lr_schedule", "cosine",
                                                  "--warmup_steps", "1", "--min_lr_ratio", "0.5"]) == 0
    assert "LR schedule from the current flags, not the checkpoint: train_steps: 4 -> 5" in capsys.readouterr().out


# A changed value of each training.optim.OPTIMIZER_SETTINGS field (KeyError for a field without one).
CHANGED_SETTINGS = {"lr": 2e-4, "weight_decay": 0.5, "adam_beta1": 0.8, "adam_beta2": 0.9, "muon_lr": 0.05,
                    "muon_momentum": 0.8, "muon_weight_decay": 0.3, "muon_adjust_lr": "original", "muon_split_fused": False}


@pytest.mark.parametrize("field", optim.OPTIMIZER_SETTINGS)
def test_every_optimizer_setting_is_held_by_the_param_groups(field):
    """A resume reports these fields' changes through the param groups (load_optimizer_state), and
    leaves them out of its other report: each must change a setting of some group, or its change
    on resume would go unreported."""
    base = {"num_classes": 3, "image_size": 8, "hidden_size": 32, "depth": 2, "num_heads": 2, "optimizer": "muon"}

    def settings(config):
        optimizer = optim.build_optimizer(dit_from_config(config), config, torch.device("cpu"))
        return [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.param_groups]   # lr: the schedule's
    assert CHANGED_SETTINGS[field] != getattr(FlowMatchingConfig(), field)
    assert settings(make_config(FlowMatchingConfig, base)) != settings(make_config(FlowMatchingConfig, {**base, field: CHANGED_SETTINGS[field]}))


def test_a_resume_reports_every_other_training_setting_it_changes(tiny_flags, capsys):
    """The fields no other rule covers (the objective's, clipping, precision) may change on resume,
    and are printed; what only moves files, logs or grids, or computes the same step, is not."""
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "1"]) == 0
    capsys.readouterr()
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "2", "--resume", "latest", "--log_every", "1",
                                                  "--micro_batch_size", "2", "--cfg_scale", "2", "--sampler", "heun",
                                                  "--time_shift", "2"]) == 0
    assert "training settings" not in capsys.readouterr().out
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "3", "--resume", "latest", "--grad_clip", "0.5",
                                                  "--class_dropout_prob", "0.2", "--time_sampling", "logit_normal"]) == 0
    assert ("training settings from the current flags, not the checkpoint: grad_clip: 1.0 -> 0.5; "
            "class_dropout_prob: 0.1 -> 0.2; time_sampling: 'uniform' -> 'logit_normal'") in capsys.readouterr().out


def test_a_vqvae_resume_on_another_micro_batch_split_says_so(tmp_path, capsys):
    """The VQ-VAE's codebook moves once per forward, so unlike the flow run's, its micro-batch split
    changes what is trained (docs/vqvae.md): a resume that changes it is reported."""
    images = write_image_folder(tmp_path / "images")
    assert train_vqvae.main(vq_flags(images, tmp_path) + ["--train_steps", "1", "--eval_images", "0"]) == 0
    capsys.readouterr()
    assert train_vqvae.main(vq_flags(images, tmp_path) + ["--train_steps", "2", "--eval_images", "0", "--resume", "latest",
                                                          "--micro_batch_size", "2"]) == 0
    assert ("training settings from the current flags, not the checkpoint: micro_batch_size: 0 -> 2"
            in capsys.readouterr().out)


def test_resume_with_a_different_architecture_is_a_clear_error(tiny_flags, tmp_path, capsys):
    """...and the refused run leaves the run's config.json as it was (it describes the checkpoints)."""
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "1"]) == 0
    saved = os.path.join(flag_value(tiny_flags, "--checkpoint_dir"), "config.json")
    before = open(saved).read()
    code = train_flow_matching.main(tiny_flags + ["--train_steps", "2", "--depth", "3", "--resume", "latest"])
    assert code == 2
    assert "depth: checkpoint 2 vs now 3" in capsys.readouterr().err
    assert open(saved).read() == before


@pytest.mark.parametrize("weights", ["model", "ema"])
def test_resume_from_weights_that_do_not_fit_their_config_is_a_clear_error(tiny_flags, capsys, weights):
    """Weights of other names than the config builds (a checkpoint of other code or edited, or an
    architecture option its config does not record) are a one-line error naming the file, not a
    load_state_dict traceback."""
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "1"]) == 0
    path = os.path.join(flag_value(tiny_flags, "--checkpoint_dir"), "flow_matching_final.pt")
    ckpt = load(path)
    ckpt[weights]["registers"] = torch.zeros(4, 32)
    ckpt_lib.save_checkpoint(ckpt, path)
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "2", "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {path}: its '{weights}' weights do not fit the model this run's config describes" in err
    assert "Traceback" not in err and 'Unexpected key(s) in state_dict: "registers"' in err


def test_an_unwritable_sample_dir_is_refused_before_training(tiny_flags, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    code = train_flow_matching.main(tiny_flags + ["--train_steps", "2", "--sample_every", "1",
                                                  "--sample_dir", str(tmp_path / "a_file" / "samples")])
    assert code == 2
    assert f"--sample_dir {tmp_path / 'a_file' / 'samples'} cannot be written" in capsys.readouterr().err
    assert not os.path.exists(flag_value(tiny_flags, "--checkpoint_dir"))   # before any work


def test_grids_are_drawn_every_sample_every_steps_and_at_the_last(tiny_flags):
    """A run whose length is not a multiple of --sample_every still ends with the grid of its final
    weights (a run cut short by --train_steps showed none of its last steps)."""
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "3", "--sample_every", "2"]) == 0
    assert sorted(os.listdir(flag_value(tiny_flags, "--sample_dir"))) == ["step_0000002.png", "step_0000003.png"]


def test_a_new_run_says_when_its_grids_replace_an_earlier_runs(tiny_flags, tmp_path, capsys):
    """Checkpoints of another run in --checkpoint_dir refuse a new run; grids are not worth a refusal,
    but a new run in another --checkpoint_dir with the same --sample_dir says that it overwrites
    them. A resumed run continues its own grids."""
    flags = tiny_flags + ["--train_steps", "1", "--sample_every", "1"]
    assert train_flow_matching.main(flags) == 0
    assert "grid(s) of an earlier run" not in capsys.readouterr().out
    assert train_flow_matching.main(flags + ["--checkpoint_dir", str(tmp_path / "second")]) == 0
    assert (f"note: --sample_dir {flag_value(tiny_flags, '--sample_dir')} holds 1 grid(s) of an earlier run "
            f"(step_0000001.png, ...): this run's grids of the same steps replace them") in capsys.readouterr().out
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "2", "--sample_every", "1", "--resume", "latest"]) == 0
    assert "grid(s) of an earlier run" not in capsys.readouterr().out


def test_a_grid_that_cannot_be_written_is_a_warning(tiny_flags, monkeypatch, capsys):
    """A full disk at a grid step must not end the run before its next checkpoint."""
    from training import objectives

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(objectives, "save_grid", full_disk)
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "2", "--sample_every", "1"]) == 0
    assert capsys.readouterr().out.count("WARNING: could not write the sample grid") == 2
    assert os.path.isfile(os.path.join(flag_value(tiny_flags, "--checkpoint_dir"), "flow_matching_final.pt"))


@pytest.mark.parametrize("flags, diff", [(["--seed", "1"], "seed: checkpoint 0 vs now 1"),
                                         (["--batch_size", "8"], "batch_size: checkpoint 4 vs now 8"),
                                         (["--hflip", "false"], "hflip: checkpoint True vs now False")])
def test_resume_with_another_data_order_is_a_clear_error(tiny_flags, capsys, flags, diff):
    """The data position and the draws are keyed by seed and global batch: another value would not
    continue the run; --train_steps may change."""
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "1"]) == 0
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "2", *flags, "--resume", "latest"]) == 2
    assert diff in capsys.readouterr().err


def test_resume_on_a_dataset_of_another_size_warns(tiny_flags, capsys):
    """A folder copied only in part (or changed) cannot replay the run's data order: the epoch's
    permutation is over its images. The data position records them; a resume says so."""
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "1"]) == 0   # 18 images, batch 4: mid-epoch
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "2", "--resume", "latest"]) == 0
    assert "WARNING: the dataset" not in capsys.readouterr().out
    os.remove(os.path.join(flag_value(tiny_flags, "--data_dir"), "class_2", "5.png"))
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "3", "--resume", "latest"]) == 0
    assert "WARNING: the dataset has 17 images, the run resumed from had 18: its data order is not replayed " \
           "(this epoch repeats some images and skips others)" in capsys.readouterr().out


def test_resume_with_fewer_train_steps_than_done_is_a_clear_error(tiny_flags, capsys):
    """Not a silent 'final' checkpoint at step 2 whose config says train_steps 1; resuming a
    finished run with the same --train_steps stays allowed (nothing to do)."""
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "2"]) == 0
    final = os.path.join(flag_value(tiny_flags, "--checkpoint_dir"), "flow_matching_final.pt")
    before = os.path.getmtime(final)
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "1", "--resume", "latest"]) == 2
    assert "--train_steps 1 is below the step of" in capsys.readouterr().err
    assert os.path.getmtime(final) == before
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "2", "--resume", "latest"]) == 0


def test_a_checkpoint_from_before_the_recipe_options_resumes(tiny_flags, tmp_path):
    """Its config lacks the fields added since (the architecture options, the objective): they had
    their defaults then, so the run resumes."""
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "1"]) == 0
    path = os.path.join(flag_value(tiny_flags, "--checkpoint_dir"), "flow_matching_final.pt")
    ckpt = load(path)
    for name in ("qk_norm", "mlp", "positions", "fp32_residual", "objective", "ema_gamma", "time_shift"):
        del ckpt["config"][name]
    torch.save(ckpt, path)
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "2", "--resume", path]) == 0


def test_resume_missing_checkpoint_is_a_clear_error(tiny_flags, capsys):
    """Reported with the flags, before any data is read."""
    with pytest.raises(SystemExit) as exit_info:
        train_flow_matching.main(tiny_flags + ["--resume", "/no/such.pt"])
    assert exit_info.value.code == 2
    assert "--resume /no/such.pt does not exist" in capsys.readouterr().err


def test_resume_latest_without_checkpoints_starts_fresh(tiny_flags, capsys):
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "1", "--resume", "latest"]) == 0
    assert "starting from scratch" in capsys.readouterr().out


def test_checkpoints_of_another_run_are_never_pruned_or_overwritten(tiny_flags, capsys):
    """A fresh run, or a resume from an earlier step, in a folder that holds later checkpoints
    stops at once: its own checkpoints would be pruned in their favour."""
    common = tiny_flags + ["--save_every", "2", "--keep_checkpoints", "1"]
    assert train_flow_matching.main(common + ["--train_steps", "4"]) == 0
    ckpt_dir = flag_value(tiny_flags, "--checkpoint_dir")
    before = {name: os.path.getmtime(os.path.join(ckpt_dir, name)) for name in os.listdir(ckpt_dir)}
    capsys.readouterr()
    assert train_flow_matching.main(common + ["--train_steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "past step 0" in err and "flow_matching_final.pt (step 4)" in err and "--resume latest" in err
    # refused before any work: no file of the old run rewritten (config.json included)
    assert {name: os.path.getmtime(os.path.join(ckpt_dir, name)) for name in os.listdir(ckpt_dir)} == before
    assert train_flow_matching.main(common + ["--train_steps", "6", "--resume", "latest"]) == 0


def test_only_the_newest_periodic_checkpoints_are_kept(tiny_flags):
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "5", "--save_every", "1",
                                                  "--keep_checkpoints", "2"]) == 0
    names = sorted(n for n in os.listdir(flag_value(tiny_flags, "--checkpoint_dir")) if n.endswith(".pt"))
    assert names == ["checkpoint_0000003.pt", "checkpoint_0000004.pt", "flow_matching_final.pt"]


def test_latest_picks_the_highest_step(tmp_path):
    for step in (5, 10):
        ckpt_lib.save_checkpoint({"step": step}, str(tmp_path / ckpt_lib.CHECKPOINT_PATTERN.format(step=step)))
    assert ckpt_lib.find_latest(str(tmp_path), "flow_matching").endswith("checkpoint_0000010.pt")
    ckpt_lib.save_checkpoint({"step": 12}, str(tmp_path / "flow_matching_final.pt"))
    assert ckpt_lib.find_latest(str(tmp_path), "flow_matching").endswith("flow_matching_final.pt")



def test_a_users_files_named_like_checkpoints_are_left_alone(tmp_path):
    """checkpoint_best.pt (a user's copy, step 3) is neither pruned, resumed from nor read;
    checkpoint_notes.pt (not a checkpoint at all) does not stop the folder's runs."""
    for step in (1, 2, 4):
        ckpt_lib.save_checkpoint({"step": step}, str(tmp_path / ckpt_lib.CHECKPOINT_PATTERN.format(step=step)))
    ckpt_lib.save_checkpoint({"step": 5}, str(tmp_path / "checkpoint_best.pt"))
    (tmp_path / "checkpoint_notes.pt").write_text("not a checkpoint")
    assert ckpt_lib.find_latest(str(tmp_path), "flow_matching").endswith("checkpoint_0000004.pt")
    ckpt_lib.check_nothing_ahead(str(tmp_path), "flow_matching", "latest")
    ckpt_lib.prune_checkpoints(str(tmp_path), keep=1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_0000004.pt", "checkpoint_best.pt", "checkpoint_notes.pt"]


# ----------------------------------------------------------------------------- saving

def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    """A SIGKILLed save leaves c.pt.tmp-HOST-PID behind; a later save into that folder on that host
    (to any file: a stop checkpoint's name is never written again) removes it once PID is gone and
    the file is older than STALE_TMP_S. Left alone: a running process's (another rank's, another
    run's), a fresh one (a writer in another PID namespace under the same host name), another
    host's (on a shared file system its PIDs are not ours to check)."""
    import socket
    path = str(tmp_path / "c.pt")
    here = f"{path}.tmp-{socket.gethostname()}-"
    dead, running, fresh = f"{here}99999999", f"{here}{os.getppid()}", f"{here}99999998"
    stop = f"{tmp_path / 'checkpoint_0000137.pt'}.tmp-{socket.gethostname()}-99999999"
    elsewhere = f"{path}.tmp-other-node-99999999"
    old = time.time() - ckpt_lib.STALE_TMP_S - 60
    for stale in (dead, running, fresh, stop, elsewhere):
        open(stale, "wb").write(b"partial bytes")
        if stale != fresh:
            os.utime(stale, (old, old))
    ckpt_lib.save_checkpoint({"step": 1}, path)
    kept = ["c.pt"] + [os.path.basename(p) for p in (running, fresh, elsewhere)]
    assert sorted(os.listdir(tmp_path)) == sorted(kept)


def test_cleanup_and_folder_fsync_are_best_effort(tmp_path, monkeypatch):
    """A stale file another writer removes first, or a file system that refuses fsync on a folder
    (some network mounts), must not fail a write whose file is in place."""
    import socket
    import stat
    path = str(tmp_path / "c.pt")
    stale = f"{path}.tmp-{socket.gethostname()}-99999999"
    open(stale, "wb").write(b"partial bytes")
    os.utime(stale, (0, 0))

    def removed_by_another_writer(pid):
        os.remove(stale)
        return False
    monkeypatch.setattr(ckpt_lib, "process_alive", removed_by_another_writer)
    fsync = os.fsync

    def no_fsync_on_folders(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")
        return fsync(fd)
    monkeypatch.setattr(os, "fsync", no_fsync_on_folders)
    ckpt_lib.save_checkpoint({"step": 3}, path)
    assert torch.load(path, weights_only=True)["step"] == 3 and os.listdir(tmp_path) == ["c.pt"]


def test_runs_in_a_folder_named_with_glob_characters_find_their_checkpoints(tmp_path):
    """runs/lr[3e-4]: --resume latest, pruning and the ahead check see its checkpoints."""
    folder = tmp_path / "lr[3e-4]"
    for step in (1, 2):
        ckpt_lib.save_checkpoint({"step": step}, str(folder / ckpt_lib.CHECKPOINT_PATTERN.format(step=step)))
    assert ckpt_lib.find_latest(str(folder), "flow_matching").endswith("checkpoint_0000002.pt")
    ckpt_lib.prune_checkpoints(str(folder), keep=1)
    assert os.listdir(folder) == ["checkpoint_0000002.pt"]


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    ckpt_lib.save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}, "step": 1}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        ckpt_lib.save_checkpoint({"model": {"w": torch.zeros(3)}, "config": {}, "step": 2}, path)
    monkeypatch.undo()
    assert load(path)["step"] == 1
    assert os.listdir(tmp_path) == ["c.pt"]


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = str(tmp_path / "c.pt")
    ckpt_lib.save_checkpoint({"model": {"w": torch.ones(1000)}, "config": {}, "step": 1}, path)
    with open(path, "r+b") as f:
        f.truncate(200)
    with pytest.raises(ValueError, match="truncated"):
        load(path)


class WorkerSignals(torch.utils.data.Dataset):
    """Each item is whether the process reading it ignores SIGTERM and SIGINT."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        ignored = [signal.getsignal(s) is signal.SIG_IGN for s in (signal.SIGTERM, signal.SIGINT)]
        return torch.tensor(ignored, dtype=torch.float32), 0


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_data_loader_workers_ignore_stop_signals(context, monkeypatch):
    """SLURM's SIGTERM and a terminal's Ctrl-C go to the whole process group. A worker that died of
    one would fail the batch the trainer is waiting for (a loader slower than the GPU), so the stop
    ends in a crash instead of a checkpoint: the workers ignore both, however they are started
    (fork inherits the trainer's handlers; spawn and Python 3.14's default forkserver do not)."""
    from data import datasets
    real = datasets.DataLoader
    monkeypatch.setattr(datasets, "DataLoader", lambda *args, **kw: real(*args, multiprocessing_context=context, **kw))
    loader = datasets.make_loader(WorkerSignals(), 2, global_batch=2, seed=0, hflip=False, num_workers=1)
    for x, _ in loader:
        assert x.bool().all(), x


@pytest.mark.parametrize("workers, to_group, signum", [(0, False, signal.SIGTERM), (1, True, signal.SIGTERM),
                                                     (1, True, signal.SIGINT)])
def test_a_stop_signal_writes_a_checkpoint_and_says_how_to_resume(tiny_flags, tmp_path, workers, to_group, signum):
    """SIGTERM to the process, or (as SLURM and `kill -- -PGID` send it) to its whole process
    group, DataLoader workers included: the run still saves and exits 143. Ctrl-C (a terminal
    sends SIGINT to the whole foreground group) saves too, and the run ends by SIGINT."""
    ckpt_dir = flag_value(tiny_flags, "--checkpoint_dir")
    proc = subprocess.Popen([sys.executable, "train_flow_matching.py", *tiny_flags, "--train_steps", "100000",
                             "--log_every", "1", "--save_every", "100000", "--num_workers", str(workers)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=to_group)
    metrics = os.path.join(ckpt_dir, "metrics.jsonl")
    deadline = time.time() + 120
    while not os.path.exists(metrics) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    if not os.path.exists(metrics):
        os.killpg(proc.pid, signal.SIGKILL) if to_group else proc.kill()
        pytest.fail(f"no step logged within 120 s, so the signal would test nothing: {proc.communicate()[0][-2000:]}")
    if to_group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == (-signal.SIGINT if signum == signal.SIGINT else 128 + signum), out
    assert "--resume latest" in out
    latest = ckpt_lib.find_latest(ckpt_dir, "flow_matching")
    assert latest is not None and load(latest)["step"] >= 1


def test_a_stop_signal_also_writes_the_steps_ema_snapshot(tiny_flags):
    """With post-hoc EMAs, the checkpoint a SIGTERM writes at an arbitrary step comes with that
    step's snapshot, so evaluate_fid.py --ema_sigma_rels can rebuild EMAs at it."""
    from evaluation.posthoc_ema import reconstruct
    trainer, _ = tiny_trainer(tiny_flags, 8, train_steps=100, ema_snapshot_every=10, log_every=100, sample_every=0)
    trainer.stop_signal = signal.SIGTERM   # as the handler sets it: the loop stops after its first step
    with pytest.raises(SystemExit):
        trainer.fit()
    ckpt_dir = flag_value(tiny_flags, "--checkpoint_dir")
    assert load(os.path.join(ckpt_dir, "checkpoint_0000001.pt"))["step"] == 1
    assert reconstruct(ckpt_dir, 0.07, at_step=1)["posthoc_ema"]["snapshots"] == [1]


@pytest.mark.parametrize("periodic_write_fails", [False, True])
def test_a_stop_on_a_save_step_writes_its_checkpoint_once(tiny_flags, monkeypatch, periodic_write_fails):
    """A stop signal on a step that has just been saved (and snapshotted) must not write the same
    checkpoint and snapshot again: a DiT-B/2 checkpoint is ~2 GB, and the scheduler's grace before
    SIGKILL is short. If that step's periodic write failed (a full disk), the stop writes it."""
    from training import trainer as trainer_module
    trainer, _ = tiny_trainer(tiny_flags, 8, train_steps=100, save_every=1, ema_snapshot_every=1, log_every=100,
                              sample_every=0)
    trainer.stop_signal = signal.SIGTERM   # as the handler sets it: the loop stops after its first step
    writes, real_save = [], trainer_module.save_checkpoint

    def counted_save(obj, path):
        writes.append(os.path.basename(path))
        if periodic_write_fails and writes == ["ema_0000001.pt", "checkpoint_0000001.pt"]:
            raise OSError(28, "No space left on device")
        real_save(obj, path)

    monkeypatch.setattr(trainer_module, "save_checkpoint", counted_save)
    with pytest.raises(SystemExit):
        trainer.fit()
    assert writes == ["ema_0000001.pt", "checkpoint_0000001.pt"] + ["checkpoint_0000001.pt"] * periodic_write_fails
    ckpt_dir = flag_value(tiny_flags, "--checkpoint_dir")
    assert load(os.path.join(ckpt_dir, "checkpoint_0000001.pt"))["step"] == 1


def test_fp16_clips_and_logs_the_unscaled_gradient(tiny_flags):
    """Under fp16 the loss is scaled (2**16) for its backward: the gradient must be unscaled before
    it is clipped and logged, or --grad_clip 1 cuts every step to ~1/65536 of it and the log shows a
    norm 65536 times too large. One step's gradient norm matches fp32's up to fp16 rounding."""
    norms = {}
    for precision in ("no", "fp16"):
        trainer, _ = tiny_trainer(tiny_flags, 8, mixed_precision=precision, train_steps=1)
        _, grad_norm, _ = trainer.train_step([next(trainer.batches())])
        norms[precision] = grad_norm.item()
    assert norms["fp16"] == pytest.approx(norms["no"], rel=0.05), norms


def test_grids_and_periodic_fid_sample_the_ema(tiny_flags, monkeypatch):
    """The sample grids and the periodic FID come from the EMA (what generation samples by
    default), not from the raw training weights."""
    trainer, _ = tiny_trainer(tiny_flags, 8, train_steps=2, log_every=100, sample_every=2)
    sampled = []

    class Evaluator:
        every = 2

        def __call__(self, model, stop=None):
            sampled.append(("fid", model))
            return {}

    monkeypatch.setattr(trainer.objective, "sample", lambda model, path: sampled.append(("grid", model)))
    trainer.evaluator = Evaluator()
    trainer.fit()
    assert [(what, model is trainer.ema) for what, model in sampled] == [("grid", True), ("fid", True)]


def test_gradient_checkpointing_runs_in_every_training_step(tiny_flags, monkeypatch):
    """--gradient_checkpointing true reaches the model, and stays on after each log step's probe
    (which runs the model in eval mode): every block of every step goes through checkpoint()."""
    from models import dit_2d
    calls, real = [], dit_2d.checkpoint
    monkeypatch.setattr(dit_2d, "checkpoint", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    assert train_flow_matching.main(tiny_flags + ["--gradient_checkpointing", "true", "--train_steps", "3",
                                                  "--log_every", "1", "--save_every", "100"]) == 0
    assert len(calls) == 3 * 2   # 3 steps x 2 blocks (tiny_flags' --depth 2)


@pytest.mark.parametrize("key, options", [("loss", []), ("mse", MEANFLOW)])
def test_a_log_line_averages_the_steps_since_the_previous_one(tiny_flags, tmp_path, key, options):
    """Each log line's loss and extra metrics (MeanFlow's mse) are means over its own window:
    logging every 2 steps gives the mean of the two lines that logging every step gives (the
    training itself is the same)."""
    def values(every, name):
        ckpt_dir = str(tmp_path / name)
        assert train_flow_matching.main(tiny_flags + ["--train_steps", "4", "--log_every", str(every), *options,
                                                      "--save_every", "100", "--checkpoint_dir", ckpt_dir]) == 0
        return [json.loads(line)[key] for line in open(os.path.join(ckpt_dir, "metrics.jsonl"))]

    each, pairs = values(1, "each"), values(2, "pairs")
    assert pairs == pytest.approx([(each[0] + each[1]) / 2, (each[2] + each[3]) / 2], rel=1e-6)


def test_a_checkpoint_that_kept_no_extras_resumes_with_extras_of_its_own_steps(tiny_flags, tmp_path):
    """A checkpoint from before the log window kept the extras (log_window without extras_sum),
    resumed mid-window at step 3 (logs every 2): the step-4 line's loss is still the window's, and its
    mse is step 4's own (not step 4's sum divided by the two steps of the window)."""
    common = tiny_flags + [*MEANFLOW, "--train_steps", "4", "--save_every", "3"]
    each_dir, old_dir = tmp_path / "each", tmp_path / "old"
    assert train_flow_matching.main(common + ["--log_every", "1", "--checkpoint_dir", str(each_dir)]) == 0
    old_dir.mkdir()
    assert train_flow_matching.main(common + ["--log_every", "2", "--checkpoint_dir", str(tmp_path / "pairs")]) == 0
    ckpt = load(str(tmp_path / "pairs" / "checkpoint_0000003.pt"))
    del ckpt["log_window"]["extras_sum"], ckpt["log_window"]["extras_steps"]
    ckpt_lib.save_checkpoint(ckpt, str(old_dir / "checkpoint_0000003.pt"))
    assert train_flow_matching.main(common + ["--log_every", "2", "--checkpoint_dir", str(old_dir), "--resume", "latest"]) == 0
    each = [json.loads(line) for line in open(each_dir / "metrics.jsonl")]
    pairs = [json.loads(line) for line in open(tmp_path / "pairs" / "metrics.jsonl")]
    (resumed,) = [json.loads(line) for line in open(old_dir / "metrics.jsonl")]
    assert resumed["loss"] == pairs[1]["loss"] and resumed["mse"] == pytest.approx(each[3]["mse"], rel=1e-6)


def test_a_log_lines_extra_metrics_average_the_micro_batches(tiny_flags, tmp_path):
    """MeanFlow's logged mse of the first step (same weights either way) is the whole batch's,
    whether the batch of 4 runs as one forward or as two micro-batches of 2 (not the last one's)."""
    def first_mse(micro):
        ckpt_dir = str(tmp_path / f"micro{micro}")
        assert train_flow_matching.main(tiny_flags + ["--train_steps", "1", "--log_every", "1", *MEANFLOW,
                                                      "--mixed_precision", "no", "--micro_batch_size", str(micro),
                                                      "--checkpoint_dir", ckpt_dir]) == 0
        return json.loads(open(os.path.join(ckpt_dir, "metrics.jsonl")).readline())["mse"]

    assert first_mse(2) == pytest.approx(first_mse(4), rel=1e-5)


class InfGradient(torch.autograd.Function):
    """The identity forward, an infinite gradient backward: a finite loss whose step would make NaN weights."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_the_other_ranks_wait_out_rank_zeros_grid_and_fid_on_the_long_barrier(tiny_flags, monkeypatch):
    """Rank 0 alone draws grids and scores FID (up to an hour on a CPU); the other ranks must wait
    for it on the long-timeout barrier, not in the next save's all-reduce, whose default timeout
    (10 min NCCL, 30 min gloo) killed the run when an FID step was also a save step."""
    from training import trainer as trainer_module
    events = []
    monkeypatch.setattr(trainer_module, "wait_for_all_ranks", lambda: events.append("wait"))
    trainer, _ = tiny_trainer(tiny_flags, 8, train_steps=4, log_every=100, sample_every=2, save_every=2)

    class Evaluator:
        every = 2

        def __call__(self, ema, stop=None):
            events.append(f"fid {trainer.step}")
            return {}

    monkeypatch.setattr(trainer.objective, "sample", lambda ema, path: events.append(f"grid {trainer.step}"))
    trainer.evaluator = Evaluator()
    trainer.fit()
    assert events == ["grid 2", "wait", "fid 2", "wait", "grid 4", "wait", "fid 4", "wait"]


@pytest.mark.parametrize("bad", ["loss", "gradient"])
def test_non_finite_loss_or_gradient_stops_naming_the_step(tiny_flags, tmp_path, bad):
    """At step 5 the loss (or, under fp32 / bf16 where no GradScaler skips the step, only the gradient)
    turns non-finite: the run stops at its next write, naming step 5, and writes neither the step-6
    checkpoint nor its post-hoc EMA snapshot from the NaN weights."""
    config = make_config(FlowMatchingConfig, {
        "dataset": "imagefolder", "data_dir": flag_value(tiny_flags, "--data_dir"), "image_size": 8,
        "hidden_size": 32, "depth": 1, "num_heads": 2, "batch_size": 4, "num_workers": 0,
        "mixed_precision": "no", "device": "cpu", "train_steps": 10, "save_every": 2, "log_every": 100,
        "ema_snapshot_every": 2, "sample_every": 0, "checkpoint_dir": str(tmp_path / "nan")})
    loader, info = get_flow_matching_dataloader(config)
    config = dataclasses.replace(config, **info.config_fields(config))

    class ExplodesAtStep5:
        kind = "flow_matching"
        probe_ema = False
        calls = 0

        def loss(self, model, batch, draws):
            self.calls += 1
            out = model(batch[0], torch.full((4,), 0.5), batch[1])
            if self.calls == 5:
                return (out.square().mean() * float("nan") if bad == "loss"
                        else InfGradient.apply(out).square().mean()), {}
            return out.square().mean(), {}

        def checkpoint_extras(self):
            return {}

    trainer = Trainer(config, dit_from_config(config), ExplodesAtStep5(), loader,
                      DistInfo(0, 0, 1, torch.device("cpu")))
    with pytest.raises(NonFiniteLoss, match="step 5"):
        trainer.fit()
    last = ckpt_lib.find_latest(config.checkpoint_dir, "flow_matching")
    assert last.endswith("checkpoint_0000004.pt") and load(last)["step"] == 4
    assert sorted(os.listdir(os.path.join(config.checkpoint_dir, "ema_snapshots"))) == [
        "ema_0000002.pt", "ema_0000004.pt"]


def test_a_stop_checkpoint_that_cannot_be_written_fails_the_run(tiny_flags, monkeypatch):
    """A SIGTERM whose checkpoint write fails (a full disk) must not report a checkpoint and exit as a
    clean stop: a requeued --resume latest would silently start from an older one."""
    from utils.launch import RunFailed
    trainer, _ = tiny_trainer(tiny_flags, 8, train_steps=100, log_every=100, sample_every=0)
    trainer.stop_signal = signal.SIGTERM   # as the handler sets it: the loop stops after its first step

    def full_disk(obj, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("training.trainer.save_checkpoint", full_disk)
    with pytest.raises(RunFailed, match=r"SIGTERM after step 1, but its checkpoint .*checkpoint_0000001.pt could not "
                                        r"be written .*No space left.*; the last one written is none yet"):
        trainer.fit()


# ----------------------------------------------------------------------------- accumulation

@pytest.mark.parametrize("batch, micro, world, expected", [
    (8, 0, 2, 4), (8, 2, 2, 2),
    (4, 0, 8, "--batch_size 4 must be a multiple of the 8 ranks: use a batch size that splits evenly"),
    (100, 0, 8, "--batch_size 100 must be a multiple of the 8 ranks"),
    (8, 3, 2, "--batch_size 8 must be a multiple of --micro_batch_size 3 x 2 ranks"),
])
def test_the_split_into_ranks_and_micro_batches(batch, micro, world, expected):
    """The error names only the flags the user set: no --micro_batch_size they never passed."""
    from training.trainer import micro_batch_size
    config = FlowMatchingConfig(batch_size=batch, micro_batch_size=micro)
    if isinstance(expected, int):
        assert micro_batch_size(config, world) == expected
    else:
        with pytest.raises(ValueError) as err:
            micro_batch_size(config, world)
        assert str(err.value).startswith(expected), err.value


@pytest.mark.parametrize("world, micro", [(1, 4), (2, 4), (2, 2), (4, 2), (4, 1)])
def test_each_step_sees_the_same_images_whatever_the_split(world, micro):
    """37 images, global batch 8, three epochs: every optimizer step gathers the same images over
    its ranks and micro-batches as one process with the whole batch (an epoch padded per rank or
    cut per micro-batch would move its boundary with the split)."""
    from data.device_loader import DeviceLoader
    n, batch, epochs = 37, 8, 3
    images, labels = torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.arange(n)   # the label names the image

    def steps(world, micro):
        accum = batch // (world * micro)
        per_rank = []
        for rank in range(world):
            loader = DeviceLoader(images, labels, micro, global_batch=batch, seed=3, hflip=False, rank=rank,
                                  world_size=world)
            read = []
            for epoch in range(epochs):
                loader.sampler.set_position(epoch, 0)
                read += [y for _, y in loader]
            per_rank.append(read)
        count = len(per_rank[0]) // accum
        return [sorted(torch.cat([y for r in per_rank for y in r[k * accum:(k + 1) * accum]]).tolist())
                for k in range(count)]

    whole = steps(1, batch)
    assert len(whole) == epochs * (n // batch) and all(len(set(s)) == batch for s in whole)
    assert steps(world, micro) == whole

def tiny_trainer(tiny_flags, micro, **overrides):
    """A Trainer of the real flow objective on the tiny folder (fp32, no flips), with weights
    moved off their zero init so every weight has a gradient."""
    config = make_config(FlowMatchingConfig, {
        "dataset": "imagefolder", "data_dir": flag_value(tiny_flags, "--data_dir"), "image_size": 8,
        "hidden_size": 32, "depth": 2, "num_heads": 2, "batch_size": 8, "micro_batch_size": micro,
        "num_workers": 0, "mixed_precision": "no", "device": "cpu", "hflip": False,
        "checkpoint_dir": flag_value(tiny_flags, "--checkpoint_dir"), "data_loader": "workers", **overrides})
    loader, info = get_flow_matching_dataloader(config, batch_size=micro)
    config = dataclasses.replace(config, **info.config_fields(config))
    torch.manual_seed(0)
    model = dit_from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    objective = FlowMatchingObjective(config, torch.device("cpu"))
    return Trainer(config, model, objective, loader, DistInfo(0, 0, 1, torch.device("cpu"))), loader


def test_meanflow_logs_its_unweighted_error_and_probes_a_fixed_target(tiny_flags):
    """MeanFlow's adaptively weighted loss is ~1 whatever the error: each log line carries `mse`, the
    unweighted error, beside it. That error's target holds the model's own du/dt, so it can grow while
    the model improves; the EMA and raw probe losses are the flow-matching loss instead (the velocity
    at r = t against data - noise, on the probe batch and draws), a fixed target on which a lagging
    EMA shows, comparable with a flow-matching run's probe."""
    trainer, _ = tiny_trainer(tiny_flags, 8, objective="meanflow", train_steps=2, log_every=1, sample_every=0)
    trainer.fit()
    records = [json.loads(line) for line in open(trainer.metrics_path)]
    assert [r["step"] for r in records] == [1, 2]
    assert all(abs(r["mse"] - r["loss"]) > 0.03 for r in records)   # measured: 0.065, 0.084
    flow = FlowMatchingObjective(dataclasses.replace(trainer.config, objective="flow_matching"), torch.device("cpu"))
    x, y = trainer.probe_batch()
    seed = trainer.config.seed
    for name, model in (("ema", trainer.ema), ("raw", trainer.raw_model.eval())):
        draws = Draws(torch.Generator().manual_seed(seed), torch.arange(len(x)), len(x), seed)
        with torch.no_grad():
            expected, _ = flow.loss(model, (x, y), draws)
        assert records[-1][f"probe_loss_{name}"] == pytest.approx(expected.item(), rel=1e-6), name


def test_micro_batches_give_the_full_batch_gradient(tiny_flags):
    """fp32 CPU, the real flow objective: 4 micro-batches of 2 accumulate the gradient of one batch
    of 8 (1e-6), as each sample draws the same t, noise and label dropout in either split."""
    grads = []
    for micro in (8, 2):
        trainer, loader = tiny_trainer(tiny_flags, micro, class_dropout_prob=0.5, grad_clip=0)
        step = trainer.optimizer.step
        trainer.optimizer.step = lambda: (grads.append([p.grad.clone() for p in trainer.raw_model.parameters()]),
                                          step())
        trainer.train_step(itertools.islice(iter(loader), 8 // micro))
    for full, accumulated in zip(*grads):
        torch.testing.assert_close(accumulated, full, rtol=0, atol=1e-6)


def test_training_drops_labels_to_the_null_label(tiny_flags):
    """Through the trainer, --class_dropout_prob 0.1 of the labels the model sees are the null
    label (3 classes: label 3); the rest are the batch's own labels."""
    trainer, loader = tiny_trainer(tiny_flags, 8, train_steps=60, log_every=1000, sample_every=0)
    seen = []
    trainer.raw_model.y_embedder.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
    batches = trainer.batches()
    for _ in range(60):
        trainer.train_step([next(batches)])
    labels = torch.cat(seen)
    assert len(labels) == 480
    dropped = (labels == 3).float().mean().item()
    assert 0.06 < dropped < 0.14, dropped   # binomial std 0.014 around 0.1
    assert set(labels.tolist()) == {0, 1, 2, 3}


def test_lr_schedule_and_clipping_as_the_optimizer_sees_them(tiny_flags):
    """At each optimizer step: the LR of every group follows linear warmup then cosine to
    min_lr_ratio, and the gradient it steps with has norm min(pre-clip norm, grad_clip)."""
    trainer, loader = tiny_trainer(tiny_flags, 8, lr=1e-3, warmup_steps=4, train_steps=12,
                                   lr_schedule="cosine", min_lr_ratio=0.1, grad_clip=0.05)
    seen, step = [], trainer.optimizer.step

    def spy(*args, **kwargs):
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.raw_model.parameters()]))
        seen.append(([g["lr"] for g in trainer.optimizer.param_groups], norm.item()))
        return step(*args, **kwargs)

    trainer.optimizer.step = spy
    batches = trainer.batches()
    pre_clip = [trainer.train_step([next(batches)])[1].item() for _ in range(12)]
    for k, (rates, norm) in enumerate(seen):
        factor = (k + 1) / 4 if k < 4 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k - 4) / 8))
        assert rates == pytest.approx([1e-3 * factor] * len(rates), rel=1e-12), k
        assert norm == pytest.approx(min(pre_clip[k], 0.05), rel=1e-4), k
    assert max(pre_clip) > 0.05   # clipping was active


def test_the_constant_schedule_holds_the_peak_after_warmup():
    from training.optim import lr_factor
    config = make_config(FlowMatchingConfig, {"warmup_steps": 4, "train_steps": 12, "lr_schedule": "constant",
                                              "min_lr_ratio": 0.1})
    assert [lr_factor(k, config) for k in range(12)] == [0.25, 0.5, 0.75] + [1.0] * 9


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_the_optimizer_gets_the_configs_settings(optimizer):
    """AdamW: matrices decay by --weight_decay, vectors (biases, norms' gains) not at all, both with
    --lr and --adam_beta1/2; Muon (its groups: the blocks' hidden matrices): --muon_lr, --muon_momentum,
    --muon_weight_decay, --muon_adjust_lr."""
    from training.optim import build_optimizer
    config = make_config(FlowMatchingConfig, {"image_size": 8, "hidden_size": 32, "depth": 2, "num_heads": 2,
                                              "num_classes": 3, "optimizer": optimizer, "lr": 3e-4,
                                              "weight_decay": 0.05, "adam_beta1": 0.8, "adam_beta2": 0.95,
                                              "muon_lr": 0.01, "muon_momentum": 0.9, "muon_weight_decay": 0.02,
                                              "muon_adjust_lr": "original"})
    model = dit_from_config(config)
    opt = build_optimizer(model, config, torch.device("cpu"))
    groups = {g["name"]: g for g in opt.param_groups}
    adamw = [g for name, g in groups.items() if name.startswith("adamw")]
    muon = [g for name, g in groups.items() if not name.startswith("adamw")]
    assert all(g["lr"] == g["base_lr"] == 3e-4 and g["betas"] == (0.8, 0.95) for g in adamw)
    assert all(p.dim() >= 2 for p in groups["adamw_decay"]["params"]) and groups["adamw_decay"]["weight_decay"] == 0.05
    assert all(p.dim() < 2 for p in groups["adamw_no_decay"]["params"]) and groups["adamw_no_decay"]["weight_decay"] == 0
    assert bool(muon) == (optimizer == "muon")
    for g in muon:
        assert (g["lr"], g["momentum"], g["weight_decay"], g["adjust_lr_fn"]) == (0.01, 0.9, 0.02, "original")
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


# Per --time_sampling: (logit_normal_mean, logit_normal_std, a check of 100,000 drawn t).
TIME_SAMPLING_CHECKS = {
    "uniform": (0.0, 1.0, lambda t, mean, std: abs(t.mean().item() - 0.5) < 0.005 and abs(t.var().item() - 1 / 12) < 0.002),
    "logit_normal": (-1.0, 0.5, lambda t, mean, std: abs(torch.logit(t).mean().item() - mean) < 0.01
                     and abs(torch.logit(t).std().item() / std - 1) < 0.01),
}


@pytest.mark.parametrize("scheme", fm.TIME_SAMPLINGS)
def test_the_objective_draws_t_as_the_config_says(scheme):
    """FlowMatchingObjective passes --time_sampling and its mean/std to the loss (a scheme added to
    TIME_SAMPLINGS needs its row in TIME_SAMPLING_CHECKS)."""
    mean, std, check = TIME_SAMPLING_CHECKS[scheme]
    config = make_config(FlowMatchingConfig, {"num_classes": 3, "time_sampling": scheme,
                                              "logit_normal_mean": mean, "logit_normal_std": std})
    seen = {}

    def model(x_t, t, y):
        seen["t"] = t.double()
        return torch.zeros_like(x_t)

    n = 100_000
    draws = Draws(torch.Generator().manual_seed(0), torch.arange(n), n, 0)
    FlowMatchingObjective(config, torch.device("cpu")).loss(model, (torch.zeros(n, 1, 1, 1), torch.zeros(n, dtype=torch.long)), draws)
    assert check(seen["t"], mean, std)


def test_the_grid_and_the_fid_sample_with_the_configs_time_shift_and_guidance_interval(tmp_path, monkeypatch):
    """The training grid and the FID during training (evaluation.periodic) step through time_grid(4, --time_shift 3) =
    0, 0.1, 0.25, 0.5, 1 (Heun: both ends of each step) and guide (null label) only while
    0.1 <= t <= 0.25."""
    pytest.importorskip("torch_fidelity")
    config = make_config(FlowMatchingConfig, {"num_classes": 3, "image_size": 4, "patch_size": 2, "sampler": "heun",
                                              "num_sampling_steps": 4, "time_shift": 3.0, "cfg_scale": 2.0,
                                              "guidance_interval_start": 0.1, "guidance_interval_end": 0.25,
                                              "grid_samples_per_class": 1, "fid_num_samples": 6, "fid_batch_size": 6})
    seen = []

    def model(x, t, y):
        seen.append((t[0].item(), bool((y == 3).any())))
        return torch.zeros_like(x)

    objective = FlowMatchingObjective(config, torch.device("cpu"))
    reference = np.random.default_rng(0).integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    monkeypatch.setattr(fid, "InceptionFeatures", lambda weights: StandIn())
    monkeypatch.setattr(fid, "reference_statistics", lambda image_set, extractor, *args, **kwargs: (
        fid.image_statistics(reference, extractor), len(reference), "in memory", True))
    monkeypatch.setattr(fid, "class_counts", lambda image_set: [2, 2, 2])
    evaluator = PeriodicFID(dataclasses.replace(config, fid_every=1), torch.device("cpu"))
    expected = [(0.0, False), (0.1, True), (0.1, True), (0.25, True), (0.25, True), (0.5, False), (0.5, False)]
    for run in (lambda: objective.sample(model, str(tmp_path / "grid.png")), lambda: evaluator(model)):
        seen.clear()
        run()
        assert [null for _, null in seen] == [null for _, null in expected]
        assert [t for t, _ in seen] == pytest.approx([t for t, _ in expected], rel=1e-6)  # float32 t


# ----------------------------------------------------------------------------- data

@pytest.mark.parametrize("mode,channels,size", [("RGB", 3, 12), ("L", 1, 8)])
def test_image_folder_loader(tmp_path, mode, channels, size):
    root = write_image_folder(tmp_path / "imgs", classes=2, per_class=5, size=(20, 14), mode=mode)
    config = make_config(FlowMatchingConfig, {"dataset": "imagefolder", "data_dir": root, "image_size": size,
                                              "in_channels": channels, "batch_size": 4, "num_workers": 0,
                                              "patch_size": 2})
    loader, info = get_flow_matching_dataloader(config)
    assert info.num_classes == 2 and info.input_shape == (channels, size, size)
    assert info.config_fields(config) == {"num_classes": 2} and config.num_classes is None
    x, y = next(iter(loader))
    assert x.shape == (4, channels, size, size) and x.dtype == torch.float32
    assert -1 <= x.min() and x.max() <= 1 and x.min() < -0.5 and x.max() > 0.5
    assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1}


def test_a_larger_image_is_resized_whole_then_center_cropped(tmp_path):
    """--image_size: the shorter side is resized to it, then the centre is cropped, so a square image
    keeps its whole content (here a white 4-pixel border around a black 8x8 centre: a crop alone
    would read only the black centre)."""
    from PIL import Image
    pixels = np.full((16, 16, 3), 255, np.uint8)
    pixels[4:12, 4:12] = 0
    os.makedirs(tmp_path / "imgs" / "a")
    Image.fromarray(pixels).save(tmp_path / "imgs" / "a" / "0.png")
    dataset, _ = build_image_dataset("imagefolder", str(tmp_path / "imgs"), 8, 3)
    x, _ = dataset[0]
    assert x[:, 0, 0].min() > 0.9 and x[:, 4, 4].max() < -0.9   # border white, centre black, at half the size


def test_the_log_counts_images_per_second_over_the_global_batch(tiny_flags):
    """images_per_sec in metrics.jsonl is steps x --batch_size / seconds (not steps / seconds)."""
    trainer, _ = tiny_trainer(tiny_flags, 8, train_steps=1, log_every=1)
    from tqdm import tqdm
    trainer._log(torch.tensor(0.5), 4, 2.0, tqdm(disable=True), None)
    record = json.loads(open(trainer.metrics_path).read().splitlines()[-1])
    assert record["images_per_sec"] == 4 * 8 / 2.0


def test_the_grid_samples_the_same_noise_at_every_step(tiny_flags, tmp_path):
    """Training grids start from fixed noise (seeded by --seed), so grids of different steps show the
    same samples as the weights change: whatever the global RNG did in between, the same weights
    give the same grid."""
    trainer, _ = tiny_trainer(tiny_flags, 8, train_steps=1, num_sampling_steps=2)
    torch.manual_seed(1)
    first = trainer.objective.sample(trainer.ema, str(tmp_path / "a.png"))
    torch.manual_seed(2)
    assert np.array_equal(first, trainer.objective.sample(trainer.ema, str(tmp_path / "b.png")))


def test_a_checkpoints_rng_state_restores_the_global_generators():
    """Checkpoints carry Python's, NumPy's and torch's global RNG states (a dataset with random
    transforms in the trainer's process replays them after a resume)."""
    import random
    state = ckpt_lib.rng_state()
    drawn = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(3)
    ckpt_lib.set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert drawn[:2] == again[:2] and torch.equal(drawn[2], again[2])


@pytest.mark.parametrize("channels", [1, 3])
def test_a_16_bit_image_reads_as_its_8_bit_copy(tmp_path, channels):
    """PIL's convert("RGB") clips 16-bit values (an image turned almost white); they are scaled instead."""
    from PIL import Image
    from data.datasets import build_image_dataset
    gray = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    for name, image in (("a8", Image.fromarray(gray)), ("b16", Image.fromarray(gray.astype(np.uint16) * 257))):
        os.makedirs(tmp_path / "imgs" / name)
        image.save(tmp_path / "imgs" / name / "0.png")
    assert Image.open(tmp_path / "imgs" / "b16" / "0.png").mode.startswith("I")
    dataset, _ = build_image_dataset("imagefolder", str(tmp_path / "imgs"), 8, channels)
    assert torch.equal(dataset[0][0], dataset[1][0])


@pytest.mark.parametrize("pixels", [np.full((8, 8), 70_000, np.int32), np.full((8, 8), -1, np.int32),
                                    np.full((8, 8), 0.5, np.float32)], ids=["32_bit", "negative", "float"])
def test_an_image_without_an_8_bit_scale_is_refused_by_name(tmp_path, pixels):
    """PIL's convert("RGB") clips them: a 32-bit image read as all white, a [0, 1] float one as black."""
    from PIL import Image
    from data.datasets import load_image
    path = tmp_path / "image.tif"
    Image.fromarray(pixels).save(path)
    with pytest.raises(ValueError, match=f"{path} is a .* image .*: convert it to an 8- or 16-bit image"):
        load_image(str(path))


def test_a_system_error_reading_an_image_is_not_blamed_on_the_file(tmp_path):
    """An OSError with an errno (too many open files, a network share gone, here a folder) is the
    system's: it keeps its type and message instead of "cannot be read as an image: replace or
    delete it", which would have the user delete good images; a file PIL cannot decode gets that."""
    from data.datasets import load_image
    with pytest.raises(IsADirectoryError) as err:
        load_image(str(tmp_path))
    assert "replace or delete" not in str(err.value)
    (tmp_path / "noise.png").write_bytes(b"not an image")
    with pytest.raises(OSError, match=r"noise.png cannot be read as an image .*: replace or delete it"):
        load_image(str(tmp_path / "noise.png"))


@pytest.mark.parametrize("bad, data_loader", [("32_bit.tif", "workers"), ("truncated.jpg", "device")])
def test_a_bad_image_read_by_a_worker_is_one_line_naming_it(tiny_flags, tmp_path, bad, data_loader):
    """An image refused (ValueError) or unreadable (OSError) in a DataLoader worker, as the worker
    loader reads it or the device loader decodes it: exit 2 and one line naming the file, not the
    traceback torch re-raises it with."""
    from PIL import Image
    path = os.path.join(flag_value(tiny_flags, "--data_dir"), "class_0", bad)
    if bad.endswith(".tif"):
        Image.fromarray(np.full((8, 8), -1, np.int32)).save(path)
    else:
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(path)
        with open(path, "r+b") as f:
            f.truncate(300)
    flags = [*tiny_flags, "--num_workers", "1", "--data_loader", data_loader,
             "--data_cache_dir", str(tmp_path / "cache"), "--train_steps", "2"]
    result = subprocess.run([sys.executable, "train_flow_matching.py", *flags], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"train_flow_matching.py: error: {path} ")
    assert ("convert it to an 8- or 16-bit image" if bad.endswith(".tif") else "replace or delete it") in result.stderr


class Raises(torch.utils.data.Dataset):
    """A dataset whose items raise in the worker: a check's ValueError, a bug's, or an OSError."""

    def __init__(self, kind):
        self.kind = kind

    def __len__(self):
        return 2

    def __getitem__(self, index):
        if self.kind == "check":
            raise ValueError(f"item {index} is refused: replace it")
        if self.kind == "bug":
            return int("x")
        raise OSError(f"item {index} cannot be read")


def test_launch_judges_a_workers_error_by_the_workers_traceback(capsys):
    """torch re-raises a worker's exception in the main process from its own code, the worker's
    traceback as text in the message: a repo check's ValueError or an OSError is still one line
    (the worker's message), a ValueError of Python's own (a bug) still keeps its traceback."""
    from utils.launch import launch

    def read(kind):
        return lambda dist: next(iter(torch.utils.data.DataLoader(Raises(kind), num_workers=1)))

    assert launch("prog", "cpu", read("check")) == 2
    assert capsys.readouterr().err == "prog: error: item 0 is refused: replace it\n"
    assert launch("prog", "cpu", read("oserror")) == 2
    assert capsys.readouterr().err == "prog: error: item 0 cannot be read\n"
    with pytest.raises(ValueError, match="DataLoader worker(.|\n)*invalid literal for int"):
        launch("prog", "cpu", read("bug"))


def test_a_crash_while_loader_workers_run_exits(tmp_path):
    """An uncaught exception (a bug, CUDA out of memory) while the training loader's workers run:
    its traceback keeps them alive to the interpreter's exit, where they ignore the SIGTERM Python
    stops them with (ignore_stop_signals). The process must still exit, with no second error."""
    script = ("import torch\n"
              "from data.datasets import make_loader\n"
              "data = torch.utils.data.TensorDataset(torch.zeros(8, 3, 4, 4), torch.zeros(8, dtype=torch.long))\n"
              "def main():\n"
              "    loader = make_loader(data, 4, global_batch=4, seed=0, hflip=True, num_workers=1)\n"
              "    for batch in loader:   # the loader (as the Trainer's) lives on in the traceback's frame\n"
              "        raise RuntimeError('a bug mid-step')\n"
              "main()\n")
    try:
        result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the process hung at exit, waiting for its DataLoader workers")
    assert result.returncode == 1
    assert result.stderr.rstrip().endswith("RuntimeError: a bug mid-step"), result.stderr


def test_flips_and_order_are_reproducible_and_resumable(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=2, per_class=6)
    config = make_config(FlowMatchingConfig, {"dataset": "imagefolder", "data_dir": root, "image_size": 8,
                                              "batch_size": 3, "num_workers": 0})
    loader, _ = get_flow_matching_dataloader(config)
    loader.sampler.set_position(1, 0)
    epoch = [x for x, _ in loader]
    loader.sampler.set_position(1, 6)
    resumed = [x for x, _ in loader]
    assert len(epoch) == 4 and len(resumed) == 2
    assert torch.equal(epoch[2], resumed[0]) and torch.equal(epoch[3], resumed[1])
    loader.sampler.set_position(2, 0)
    assert not torch.equal(torch.cat(epoch), torch.cat([x for x, _ in loader]))
    reseeded, _ = get_flow_matching_dataloader(dataclasses.replace(config, seed=1))   # --seed sets order and flips
    reseeded.sampler.set_position(1, 0)
    assert not torch.equal(torch.cat(epoch), torch.cat([x for x, _ in reseeded]))


@pytest.mark.parametrize("data_loader", ["workers", "device"])
def test_half_of_the_images_are_mirrored(tmp_path, data_loader):
    """With --hflip every yielded image is its source or the source's mirror image, and over 20
    epochs about half are mirrored (binomial std 0.03 around 0.5); without it none is."""
    root = write_image_folder(tmp_path / "imgs", classes=2, per_class=6, size=(8, 8))
    for hflip in (True, False):
        config = make_config(FlowMatchingConfig, {"dataset": "imagefolder", "data_dir": root, "image_size": 8,
                                                  "batch_size": 4, "num_workers": 0, "hflip": hflip,
                                                  "data_loader": data_loader, "data_cache_dir": str(tmp_path / "c")})
        loader, _ = get_flow_matching_dataloader(config)
        base, _ = build_image_dataset("imagefolder", root, 8, 3)
        sources = torch.stack([base[i][0] for i in range(len(base))])
        mirrored = []
        for epoch in range(20):
            loader.sampler.set_position(epoch, 0)
            for x, _ in loader:
                for image in x:
                    plain = (image == sources).flatten(1).all(1)
                    flipped = (image.flip(-1) == sources).flatten(1).all(1)
                    assert plain.sum() + flipped.sum() == 1
                    mirrored.append(bool(flipped.any()))
        share = sum(mirrored) / len(mirrored)
        assert len(mirrored) == 240
        assert (0.4 < share < 0.6) if hflip else share == 0, share


def test_worker_processes_start_under_forkserver(tmp_path):
    """Workers started by forkserver (or spawn: macOS, Linux from Python 3.14) receive the dataset
    pickled, transforms included, and yield the batches of the in-process loader."""
    root = write_image_folder(tmp_path / "imgs", classes=2, per_class=4)
    batches = {}
    for workers in (0, 1):
        config = make_config(FlowMatchingConfig, {"dataset": "imagefolder", "data_dir": root, "image_size": 8,
                                                  "batch_size": 4, "num_workers": workers, "data_loader": "workers"})
        loader, _ = get_flow_matching_dataloader(config)
        if workers:
            loader.multiprocessing_context = "forkserver"
        loader.sampler.set_position(0, 0)
        batches[workers] = [x for x, _ in loader]
    assert len(batches[1]) == 2
    for a, b in zip(batches[0], batches[1]):
        assert torch.equal(a, b)


def test_image_folder_errors(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=3, per_class=2)
    base = {"dataset": "imagefolder", "image_size": 8, "batch_size": 2, "num_workers": 0}
    with pytest.raises(ValueError, match="--num_classes 5 does not match the 3 classes"):
        get_flow_matching_dataloader(make_config(FlowMatchingConfig, {**base, "data_dir": root, "num_classes": 5}))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        get_flow_matching_dataloader(make_config(FlowMatchingConfig, {**base, "data_dir": str(tmp_path / "none")}))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a readable ImageFolder"):
        get_flow_matching_dataloader(make_config(FlowMatchingConfig, {**base, "data_dir": str(tmp_path / "empty")}))


def test_cifar10_offline_without_a_copy_is_one_clear_error(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.datasets.CIFAR10", offline)
    code = train_flow_matching.main(["--data_dir", str(tmp_path / "empty"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "CIFAR-10 is not in" in err and "--dataset imagefolder --data_dir PATH" in err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- end to end

def test_device_and_worker_loaders_train_the_same_model(tiny_flags, tmp_path):
    """--data_loader device (the default on a GPU) through the script: the same batches, so the
    same weights as the worker DataLoader."""
    finals = []
    for mode in ("workers", "device"):
        ckpt_dir = str(tmp_path / mode)
        assert train_flow_matching.main(tiny_flags + ["--train_steps", "3", "--data_loader", mode,
                                                      "--checkpoint_dir", ckpt_dir,
                                                      "--data_cache_dir", str(tmp_path / "cache")]) == 0
        finals.append(load(os.path.join(ckpt_dir, "flow_matching_final.pt")))
    for name, value in finals[0]["model"].items():
        assert torch.equal(value, finals[1]["model"][name]), name


def test_train_script_end_to_end(tiny_flags, tmp_path):
    """A real subprocess run of the tiny preset writes the final checkpoint, grids and metrics."""
    result = subprocess.run([sys.executable, "train_flow_matching.py", *tiny_flags, "--train_steps", "4",
                             "--sample_every", "2", "--save_every", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    ckpt_dir, sample_dir = flag_value(tiny_flags, "--checkpoint_dir"), flag_value(tiny_flags, "--sample_dir")
    final = load(os.path.join(ckpt_dir, "flow_matching_final.pt"))
    assert final["step"] == 4 and final["kind"] == "flow_matching"
    assert set(final) >= {"model", "ema", "optimizer", "scaler", "step", "config", "rng", "data"}
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in final["model"])
    assert final["config"]["num_classes"] == 3
    assert sorted(os.listdir(sample_dir)) == ["step_0000002.png", "step_0000004.png"]
    records = [json.loads(line) for line in open(os.path.join(ckpt_dir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [2, 4]
    assert {"loss", "lr", "grad_norm", "images_per_sec", "peak_mem_gb"} <= set(records[0])
    assert json.load(open(os.path.join(ckpt_dir, "config.json")))["hidden_size"] == 32
    assert "config:" in result.stdout


def test_under_torchrun_the_agents_summary_names_the_one_line_error(tmp_path, monkeypatch, capsys):
    """torchrun's closing summary reads each failed rank's TORCHELASTIC_ERROR_FILE: launch writes
    its one line there, so the summary's root cause is that line, not "To enable traceback see"."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
    from utils.launch import launch

    def bad_value(dist):
        raise ValueError("--data_dir /x is not a folder")
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert launch("prog", "cpu", bad_value) == 2
    assert capsys.readouterr().err == "prog: error: --data_dir /x is not a folder\n"
    failure = ProcessFailure(local_rank=1, pid=1, exitcode=2, error_file=str(error_file))
    assert failure.message == "prog: error: --data_dir /x is not a folder"
    # Rank 0, which then failed in a collective without a file, is stamped when the agent sees it,
    # often in the same second; the root cause must still be rank 1's line.
    other = ProcessFailure(local_rank=0, pid=2, exitcode=1, error_file=str(tmp_path / "none.json"))
    assert ChildFailedError("prog", {0: other, 1: failure}).get_first_failure()[0] == 1
    # A bad flag, refused by the parser before launch, the same way.
    from configs.flow_matching_config import parse_flow_matching_config
    with pytest.raises(SystemExit) as exit:
        parse_flow_matching_config(["--lr", "x"])
    assert exit.value.code == 2
    message = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(error_file)).message
    assert ": error: argument --lr: invalid float value: 'x'" in message and message in capsys.readouterr().err


@pytest.mark.skipif(os.name != "posix", reason="ending by a signal is POSIX")
@pytest.mark.parametrize("main, returncode", [("lambda: 130", -signal.SIGINT), ("stop", -signal.SIGINT),
                                              ("lambda: 2", 2), ("lambda: 143", 143)])
def test_a_ctrl_c_exit_ends_the_script_by_sigint_so_a_shell_loop_stops(main, returncode):
    """run_main turns 130 (launch's 'interrupted', or the trainer's stop checkpoint's sys.exit) into
    death by SIGINT: bash stops a loop or script only when its child died by the signal, and goes
    on to the next command after a plain exit 130. Other codes pass through unchanged."""
    code = ("import sys\nfrom utils.launch import run_main\n"
            "def stop():\n    sys.exit(130)\n"
            f"run_main({main})\n")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == returncode


def test_launch_reports_bad_input_in_one_line_and_keeps_a_librarys_traceback(capsys):
    """Exit 2 and one line for the repo's own ValueErrors and for OSErrors; a ValueError raised
    inside a library (here the standard library's statistics), or by Python on a line of ours (an
    unpacking, an int() of a bad string), is a bug and keeps its traceback."""
    import statistics
    from utils.launch import launch

    def bad_value(dist):
        raise ValueError("--lr -1 must be > 0 "
                         "(a check's message over two lines)")

    def bad_unpacking(dist):
        only, = [1, 2]

    assert launch("prog", "cpu", bad_value) == 2
    assert capsys.readouterr().err == "prog: error: --lr -1 must be > 0 (a check's message over two lines)\n"
    assert launch("prog", "cpu", lambda dist: open("/nonexistent/data/x.jpg")) == 2
    with pytest.raises(statistics.StatisticsError):
        launch("prog", "cpu", lambda dist: statistics.mean([]))
    with pytest.raises(ValueError, match="too many values to unpack"):
        launch("prog", "cpu", bad_unpacking)
    with pytest.raises(ValueError, match="invalid literal for int"):
        launch("prog", "cpu", lambda dist: int("x"))

    def ctrl_c(dist):   # Ctrl-C outside the training loop (decoding a cache, generating, scoring)
        raise KeyboardInterrupt
    capsys.readouterr()
    try:
        code = launch("prog", "cpu", ctrl_c)
    except KeyboardInterrupt:   # caught here: left to pytest it would end the whole session
        code = "a KeyboardInterrupt traceback"
    assert code == 130
    assert capsys.readouterr().err == "prog: interrupted\n"
