"""The EMA every sample comes from: its decay ramp, its closed form, and the probe that shows it."""

import json
import math
import os

import pytest
import torch

import train_flow_matching
from utils import checkpoint as ckpt_lib
from training.trainer import ema_decay_at, update_ema


def ramp_share_of_start(steps: int) -> float:
    """prod_{k<steps} (1 + k) / (10 + k) = 9! steps! / (steps + 9)!: the share of the starting
    weights left in the EMA after `steps` ramped updates (while the ramp is below the decay)."""
    return math.exp(math.lgamma(10) + math.lgamma(steps + 1) - math.lgamma(steps + 10))


def test_ramp_values():
    assert ema_decay_at(0, 0.9999, True) == pytest.approx(0.1)
    assert ema_decay_at(1, 0.9999, True) == pytest.approx(2 / 11)
    assert ema_decay_at(90, 0.9999, True) == pytest.approx(91 / 100)
    # The ramp reaches 0.999 at k = 8,991 and stays at the final decay from there on.
    assert ema_decay_at(8990, 0.999, True) == pytest.approx(8991 / 9000)
    assert ema_decay_at(8991, 0.999, True) == 0.999
    assert ema_decay_at(10 ** 6, 0.999, True) == 0.999
    assert ema_decay_at(0, 0.9999, False) == 0.9999
    assert ema_decay_at(5000, 0.5, False) == 0.5
    # --ema_gamma shapes the ramp: (1 + k) / (gamma + 2 + k); 8 is the default above.
    assert ema_decay_at(0, 0.9999, True, gamma=3.0) == pytest.approx(1 / 5)
    assert ema_decay_at(10, 0.9999, True, gamma=17.0) == pytest.approx(11 / 29)
    assert ema_decay_at(10, 0.9999, True, gamma=8.0) == ema_decay_at(10, 0.9999, True)


def test_the_trainer_ramps_with_ema_gamma(tiny_flags, tmp_path):
    """One step with --ema_gamma 1: the update's decay is 1 / 3, so the EMA of the zero-initialized
    output layer is exactly 2/3 of the trained weights."""
    ckpt_dir = str(tmp_path / "gamma")
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "1", "--ema_gamma", "1",
                                                  "--checkpoint_dir", ckpt_dir]) == 0
    assert output_layer_norm_ratio(os.path.join(ckpt_dir, "flow_matching_final.pt")) == pytest.approx(2 / 3, rel=1e-5)


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_after_n_updates_is_the_closed_form(warmup):
    """EMA of a model that jumped from A to B: A * prod(d_k) + B * (1 - prod(d_k)), with the
    trainer's decays, for every parameter (and buffers copied, not averaged)."""
    ema, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    model.register_buffer("counter", torch.tensor(7.0))
    ema.register_buffer("counter", torch.tensor(0.0))
    with torch.no_grad():
        for p in ema.parameters():
            p.fill_(1.0)   # A
        for p in model.parameters():
            p.fill_(-2.0)  # B
    steps, decay = 25, 0.99
    for k in range(steps):
        update_ema(ema, model, ema_decay_at(k, decay, warmup))
    share = ramp_share_of_start(steps) if warmup else decay ** steps
    for p in ema.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 1.0 * share - 2.0 * (1 - share)), rtol=1e-6, atol=1e-7)
    assert ema.counter.item() == 7.0


def output_layer_norm_ratio(path):
    ckpt = ckpt_lib.load_checkpoint(path)
    name = "final_layer.linear.weight"
    return (ckpt["ema"][name].norm() / ckpt["model"][name].norm()).item()


def run_20_steps(tiny_flags, tmp_path, warmup: bool):
    ckpt_dir = str(tmp_path / f"warmup_{warmup}")
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "20", "--log_every", "20",
                                                  "--ema_decay", "0.9999", "--ema_warmup", str(warmup).lower(),
                                                  "--checkpoint_dir", ckpt_dir]) == 0
    record = json.loads(open(os.path.join(ckpt_dir, "metrics.jsonl")).readline())
    return output_layer_norm_ratio(os.path.join(ckpt_dir, "flow_matching_final.pt")), record


def test_ema_of_the_zero_initialized_output_layer_moves_from_the_start(tiny_flags, tmp_path):
    """20 steps at --ema_decay 0.9999: with the ramp the EMA's output layer (zero at init) holds
    most of the raw model's norm, and the probe losses of EMA and raw weights agree; without it,
    under 1% of the norm, and the EMA's probe loss is that of v = 0, far above the raw model's."""
    ratio, record = run_20_steps(tiny_flags, tmp_path, warmup=True)
    assert ratio > 0.5
    gap = record["probe_loss_ema"] - record["probe_loss_raw"]
    assert abs(gap) < 0.05 * record["probe_loss_raw"]          # measured: 2.3%
    fixed_ratio, fixed = run_20_steps(tiny_flags, tmp_path, warmup=False)
    assert fixed_ratio < 0.01
    assert fixed["probe_loss_ema"] - fixed["probe_loss_raw"] > 3 * abs(gap)   # measured: 6.7x
    # The same fixed batch, noise and times in both runs: the raw models' losses are those of the
    # same trained weights (the ramp changes only the EMA).
    assert fixed["probe_loss_raw"] == record["probe_loss_raw"]


def test_a_resume_that_changes_the_ema_says_what_changed(tiny_flags, capsys):
    """The EMA fields are not part of the run's identity (a resume may lengthen the average), but
    the decay sequence changes from the resumed step on: the run names each changed field."""
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "1"]) == 0
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "2", "--resume", "latest"]) == 0
    assert "EMA settings" not in capsys.readouterr().out
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "3", "--resume", "latest", "--ema_decay", "0.999",
                                                  "--ema_gamma", "4", "--ema_warmup", "false"]) == 0
    out = capsys.readouterr().out
    assert ("EMA settings from the current flags, not the checkpoint: ema_decay: 0.99 -> 0.999; "
            "ema_gamma: 8.0 -> 4.0; ema_warmup: True -> False") in out


def test_init_from_starts_the_ema_at_the_weights_it_trains_from(tiny_flags, tmp_path):
    """--init_from trains from the checkpoint's raw weights, and its EMA starts equal to them, as in a
    fresh run (the checkpoint's own EMA is not used). The source run keeps its EMA far from its
    weights (a fixed decay of 0.9999), so after one ramped update (decay 0.1) the fine-tune's EMA is
    0.1 x the source's raw weights + 0.9 x its own trained weights, and not 0.1 x the source's EMA."""
    source, tuned = str(tmp_path / "source"), str(tmp_path / "tuned")
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "2", "--ema_warmup", "false", "--ema_decay", "0.9999",
                                                  "--checkpoint_dir", source]) == 0
    start = ckpt_lib.load_checkpoint(os.path.join(source, "flow_matching_final.pt"))
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "1", "--checkpoint_dir", tuned, "--init_from",
                                                  os.path.join(source, "flow_matching_final.pt")]) == 0
    end = ckpt_lib.load_checkpoint(os.path.join(tuned, "flow_matching_final.pt"))
    assert end["ema"].keys() == start["model"].keys()
    for name, weight in end["ema"].items():
        torch.testing.assert_close(weight, torch.lerp(start["model"][name], end["model"][name], 0.9),
                                   msg=lambda text: f"{name}: {text}")
