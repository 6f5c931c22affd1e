"""benchmarks/muon_vs_adamw.py: runs that differ only in their optimizer spec, their loss against
training seconds, and the losses the table compares."""

import json
import math

import pytest

from benchmarks import muon_vs_adamw
from tests.conftest import write_image_folder

# The tiny preset shrunk further; every run gets these through --set.
SMALL = ["image_size=8", "hidden_size=32", "depth=2", "num_heads=2", "batch_size=4", "warmup_steps=0",
         "data_loader=workers", "num_workers=0"]


def write_run(folder, batch_size, windows):
    """A run folder as train_flow_matching.py leaves it: config.json and metrics.jsonl."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"batch_size": batch_size}))
    (folder / "metrics.jsonl").write_text("".join(
        json.dumps({"step": step, "loss": loss, "images_per_sec": rate}) + "\n" for step, loss, rate in windows))
    return str(folder)


def test_training_seconds_add_up_each_windows_steps_over_its_pace(tmp_path):
    """A window of 10 steps of 4 images at 20 images/s took 2 s; the next, at 40 images/s, 1 s."""
    curve = muon_vs_adamw.read_curve(write_run(tmp_path / "run", 4, [(10, 0.9, 20.0), (20, 0.7, 40.0)]))
    assert curve == [{"step": 10, "seconds": 2.0, "loss": 0.9}, {"step": 20, "seconds": 3.0, "loss": 0.7}]
    # At a given time a run shows the loss of the last window it had finished by then.
    assert [muon_vs_adamw.loss_at_time(curve, s) for s in (2.0, 2.9, 3.0)] == [0.9, 0.9, 0.7]
    assert [muon_vs_adamw.step_at_time(curve, s) for s in (1.0, 2.5, 3.0)] == [0, 10, 20]
    assert math.isnan(muon_vs_adamw.loss_at_time(curve, 1.0))


def test_runs_differ_only_in_their_spec_and_are_scored_on_the_same_draws(tmp_path, monkeypatch, capsys):
    """Two identical AdamW runs train to the same losses and the same held-out loss (fixed noise and
    times), each with a row of its own; the Muon run's config differs from theirs only in what its
    spec sets; the table has a row per run and runs.csv a row per logged window."""
    monkeypatch.chdir(tmp_path)
    train = write_image_folder(tmp_path / "cifar" / "train", classes=2, per_class=4)
    write_image_folder(tmp_path / "cifar" / "test", classes=2, per_class=3, seed=1)
    runs = ["adamw", "adamw", "muon:muon_lr=0.01"]
    assert muon_vs_adamw.main(["--data_dir", train, "--runs", *runs, "--steps", "2", "--log_every", "1",
                               "--eval_images", "4", "--set", *SMALL, "--out", str(tmp_path / "out")]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| adamw")
            or line.startswith("| muon")]
    assert [r[0] for r in rows] == ["| adamw #1", "| adamw #2", "| muon:muon_lr=0.01"]
    assert rows[0][1:3] == rows[1][1:3]   # last-window loss and held-out loss, to 4 decimals
    assert all(math.isfinite(float(x)) for r in rows for x in r[1:3])

    configs = [json.loads((tmp_path / "out" / f"run{n}" / "config.json").read_text()) for n in range(3)]
    differ = {k for k in configs[0] if configs[0][k] != configs[2][k]}
    assert differ == {"optimizer", "muon_lr", "checkpoint_dir"}, differ
    assert (configs[2]["optimizer"], configs[2]["muon_lr"], configs[2]["image_size"]) == ("muon", 0.01, 8)

    csv_rows = (tmp_path / "out" / "runs.csv").read_text().splitlines()
    assert csv_rows[0] == "run,step,seconds,loss" and len(csv_rows) == 1 + 3 * 2
    assert (tmp_path / "out" / "loss.png").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["--runs", "muon:lr=1:x"], "has more than one ':'"),
    (["--steps", "5", "--log_every", "10"], "--steps 5 must be >= --log_every 10"),
    (["--eval_dir", "/nonexistent"], "--eval_dir /nonexistent is not a folder"),
    (["--set", "lr"], "'lr' is not flag=value"),
])
def test_bad_arguments_exit_2_naming_the_value(argv, message, tmp_path, capsys):
    train = write_image_folder(tmp_path / "d" / "train", classes=2, per_class=2)
    (tmp_path / "d" / "test").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        muon_vs_adamw.main(["--data_dir", train, "--out", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
