"""benchmarks/speedrun.py end to end on the CPU, in toy form: the real trainer in a subprocess stopped
by SIGTERM when a short budget runs out, its checkpoint scored by evaluate_fid.py's code with a
stand-in Inception, one full row; the peer pipeline the same way; bad input exits 2 with one line."""

import glob
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

import evaluate_fid
from benchmarks import speedrun
from evaluation import fid
from tests.conftest import StandIn, write_image_folder
from utils.checkpoint import load_checkpoint

CHECK_INCEPTION_WEIGHTS = fid.check_inception_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BUDGET_S = 15   # the trainer's start-up (~5 s on 2 busy cores) and some steps; far from its train_steps
# The tiny preset shrunk to a width-32, one-block DiT at 8x8; train_steps the budget cannot reach.
TOY = ["--preset", "tiny", "--image_size", "8", "--hidden_size", "32", "--depth", "1", "--num_heads", "2",
       "--batch_size", "4", "--num_workers", "0", "--device", "cpu", "--warmup_steps", "2", "--log_every", "1000",
       "--num_sampling_steps", "2", "--data_loader", "device", "--train_steps", "1000000"]
FIELDS = {"pipeline", "preset", "flags", "data", "budget_s", "steps", "batch_size", "images_seen", "train_wall_s",
          "finished", "train_steps", "weights", "sampler", "num_steps", "nfe", "cfg_scale", "time_shift",
          "guidance_interval", "fid", "num_samples", "reference", "reference_num_images", "score_s", "checkpoint",
          "sample_s", "samples_per_s",
          "cold_start", "peer_ignores", "gpu", "torch", "commit", "date"}


@pytest.fixture
def bench(tmp_path, monkeypatch):
    """The benchmark's own flags; the working directory (tmp_path) holds images/ (3 classes x 6) and
    the outputs; Inception is the stand-in."""
    pytest.importorskip("torch_fidelity", reason="FID needs requirements-eval.txt")
    write_image_folder(tmp_path / "images")
    monkeypatch.setattr(fid, "InceptionFeatures", StandIn)
    monkeypatch.setattr(fid, "check_inception_weights", lambda path, flag="--inception_weights": None)
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"")  # must exist; the stand-in ignores it
    return ["--data_dir", "images", "--inception_weights", str(weights), "--num_samples", "12",
            "--sample_batch_size", "12", "--fid_cache_dir", "fid", "--runs_dir", "runs", "--results", "results.jsonl"]


def the_rows() -> list:
    with open("results.jsonl") as f:
        rows = [json.loads(line) for line in f]
    for row in rows:
        assert set(row) == FIELDS
        assert all(v is not None for k, v in row.items() if k != "guidance_interval"), row
    return rows


def the_row() -> dict:
    [row] = the_rows()
    return row


def test_the_budget_stops_the_trainer_whose_checkpoint_is_scored_in_a_full_row(bench, monkeypatch):
    train_repo, written = speedrun.train_repo, {}

    def slow_to_exit(*args, **kwargs):   # a trainer whose teardown outlasts its checkpoint's write by 3 s
        checkpoint, code = train_repo(*args, **kwargs)
        written["mtime"] = os.path.getmtime(checkpoint)
        time.sleep(3)
        return checkpoint, code

    monkeypatch.setattr(speedrun, "train_repo", slow_to_exit)
    start, start_wall = time.perf_counter(), time.time()
    # Scored with its own sampler (Euler) and with midpoint, each at 2 steps, then at 1: a row each,
    # from the one checkpoint.
    sweep = ["--samplers", "euler", "midpoint", "--num_steps_list", "2", "1"]
    assert speedrun.main(["--budget_s", str(BUDGET_S), *bench, *TOY, *sweep]) == 0
    elapsed = time.perf_counter() - start
    rows = the_rows()
    row, fewer = rows[:2]
    setting = ("sampler", "num_steps", "nfe", "fid", "sample_s", "samples_per_s", "date")
    assert all({k: v for k, v in other.items() if k not in setting} == {k: v for k, v in row.items() if k not in setting}
               for other in rows)
    # Midpoint's rows took 2 NFE a step: the solver named is the one that ran. Their FIDs are
    # evaluate_fid.py's with the same flags (below).
    assert [(r["sampler"], r["num_steps"], r["nfe"]) for r in rows] == [
        ("euler", 2, 2), ("euler", 1, 1), ("midpoint", 2, 4), ("midpoint", 1, 2)]
    assert row["sample_s"] <= row["score_s"] and row["samples_per_s"] > 0
    # The SIGTERM path: a periodic checkpoint of the step reached, not the final one.
    assert os.path.basename(row["checkpoint"]).startswith("checkpoint_") and not row["finished"]
    ckpt = load_checkpoint(row["checkpoint"], kind="flow_matching")
    assert ckpt["step"] == row["steps"] > 0 and "ema" in ckpt
    assert row["images_seen"] == row["steps"] * 4 and row["train_steps"] == 1_000_000
    # The wall runs from the start to the checkpoint's write: past the budget (SIGTERM came then),
    # by the step in flight and the save (generous: a loaded CI machine must not fail it).
    assert BUDGET_S <= row["train_wall_s"] < BUDGET_S + 30, row["train_wall_s"]
    assert abs(row["train_wall_s"] - (written["mtime"] - start_wall)) < 1, (row["train_wall_s"], written)   # not the exit
    assert row["score_s"] >= 0 and row["train_wall_s"] + row["score_s"] <= elapsed + 1   # the budget check allows 1 s of slack
    # The EMA, sampled with the checkpoint's own CFG scale (tiny: 3) and
    # scored as evaluate_fid.py scores that checkpoint, to the row's rounding.
    assert (row["weights"], row["sampler"], row["num_steps"], row["cfg_scale"]) == ("ema", "euler", 2, 3.0)
    assert math.isfinite(row["fid"]) and row["fid"] > 0
    # (Not "the two FIDs differ": a model a few steps from its zero start can score the same at 1 and 2
    # steps to the row's 3 decimals.)
    assert evaluate_fid.main(["--checkpoint", row["checkpoint"], "--num_samples", "12", "--device", "cpu",
                              "--ref_data_dir", "images", "--fid_cache_dir", "fid", "--output_jsonl", "fid.jsonl",
                              *sweep]) == 0
    with open("fid.jsonl") as f:
        scored = [json.loads(line) for line in f]
    for ours, theirs in zip(rows, scored, strict=True):
        assert (theirs["sampler"], theirs["nfe"], theirs["reference"]) == (ours["sampler"], ours["nfe"], ours["reference"])
        assert round(theirs["fid"], 3) == ours["fid"]
    assert (row["num_samples"], row["reference_num_images"]) == (12, 18) and "images" in row["reference"]
    assert (row["pipeline"], row["preset"], row["gpu"]) == ("repo", "tiny", "cpu")
    assert row["flags"] == TOY[2:]
    # The cold caches were the run's own and are gone; the decoded data never went elsewhere.
    [run] = glob.glob(os.path.join("runs", "repo_tiny_*"))
    assert row["cold_start"] and not os.path.exists("data_cache")
    assert not any(os.path.exists(os.path.join(run, name)) for name in ("data_cache", "inductor_cache"))


def test_the_peer_trains_for_the_budget_and_is_scored_by_the_same_code(bench):
    pytest.importorskip("diffusers", reason="the peer needs benchmarks/requirements.txt")
    pytest.importorskip("torchcfm", reason="the peer needs benchmarks/requirements.txt")
    assert speedrun.main(["--budget_s", "8", "--pipeline", "peer", *bench, *TOY]) == 0
    row = the_row()
    assert row["pipeline"] == "peer" and row["weights"] == "raw" and not row["finished"]
    assert load_checkpoint(row["checkpoint"])["step"] == row["steps"] > 0
    assert 8 <= row["train_wall_s"] < 8 + 10
    assert (row["sampler"], row["num_steps"], row["num_samples"]) == ("euler", 2, 12) and math.isfinite(row["fid"])
    assert "ema_decay" in row["peer_ignores"]   # tiny's EMA: the repo's run would keep one, the peer none


@pytest.mark.parametrize("flags, expected", [
    (["--budget_s", "60"], "--data_dir is required"),
    (["--budget_s", "0", "--data_dir", "images"], "--budget_s must be a positive number of seconds, got 0"),
    (["--budget_s", "-5", "--data_dir", "images"], "--budget_s must be a positive number of seconds, got -5"),
    (["--budget_s", "nan", "--data_dir", "images"], "--budget_s must be a positive number of seconds, got nan"),
    (["--data_dir", "missing"], "--data_dir missing is not a folder"),
    (["--data_dir", "images", "--ref_data_dir", "images/class_0"], "--ref_data_dir images/class_0 has no class subfolders"),
    (["--data_dir", "images", "--save_every", "10"], "--save_every: speedrun.py sets these itself"),
    (["--data_dir", "images", "--lr", "abc"], "--lr"),
    (["--data_dir", "images", "--data_cache_dir", "cache"], "--data_cache_dir: --cold_start true decodes"),
    (["--data_dir", "images", "--pipeline", "peer"], "pip install -r benchmarks/requirements.txt"),
    (["--data_dir", "images", "--pipeline", "peer", "--qk_norm", "true"], "--qk_norm: the peer pipeline does not"),
    (["--data_dir", "images", "--num_steps_list", "5", "0"], "--num_steps_list entries must be >= 1, got [5, 0]"),
    (["--data_dir", "images", "--budget_s", "1", "--samplers", "euler", "meanflow"], "--samplers meanflow needs a MeanFlow checkpoint"),
    (["--data_dir", "images", "--budget_s", "1", "--samplers", "no_such_sampler"], "--samplers: invalid choice: 'no_such_sampler'"),
])
def test_bad_input_exits_2_with_one_line(bench, tmp_path, monkeypatch, capsys, flags, expected):
    if flags[-1] == "peer":   # as without diffusers and torchcfm installed
        monkeypatch.setattr(speedrun, "missing_peer_packages", lambda: ["diffusers", "torchcfm"])
    else:
        monkeypatch.setattr(speedrun, "missing_peer_packages", lambda: [])
    weights = bench[bench.index("--inception_weights") + 1]
    with pytest.raises(SystemExit) as exit_info:
        speedrun.main(["--inception_weights", weights, "--device", "cpu", *flags])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert expected in err, err
    assert not os.path.exists("results.jsonl") and not os.path.exists(os.path.join("benchmarks", "runs"))


def test_a_wrong_inception_file_is_refused_before_training(bench, tmp_path, monkeypatch, capsys):
    """Not after the whole budget: a state dict of other tensors is named at once."""
    weights = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(2, 2)}, weights)
    monkeypatch.setattr(fid, "check_inception_weights", CHECK_INCEPTION_WEIGHTS)   # the real check
    with pytest.raises(SystemExit) as exit_info:
        speedrun.main([*bench, "--budget_s", "60", "--device", "cpu", "--inception_weights", str(weights)])
    assert exit_info.value.code == 2
    assert "is a state dict, but not of the FID Inception" in capsys.readouterr().err
    assert not os.path.exists("runs")


def test_the_budget_counts_from_the_process_start_not_the_import():
    """A script that imports speedrun 1.5 s after it started has a budget origin 1.5 s back (the
    interpreter's start-up and torch's import are part of the cost)."""
    code = ("import time; t = time.time(); time.sleep(1.5); from benchmarks import speedrun; "
            "print(t - (time.time() - (time.perf_counter() - speedrun.PROCESS_START)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    started_before = float(out.stdout.strip().splitlines()[-1])   # seconds from the origin to `t`
    assert 0 <= started_before < 1.0, started_before


def test_a_signal_to_a_benchmark_reaches_the_script_it_runs(tmp_path):
    """SIGTERM to a benchmark while it waits for a training script (run_script): the script gets
    the signal (a trainer writes its stop checkpoint) and the benchmark exits after it with 143,
    instead of dying alone and leaving the trainer running to its train_steps."""
    import signal
    child = ("import os, pathlib, signal, sys, time\n"
             f"done = pathlib.Path({str(tmp_path / 'stopped')!r})\n"
             "signal.signal(signal.SIGTERM, lambda *_: (done.write_text(str(os.getpid())), sys.exit(143)))\n"
             "print('ready', flush=True)\n"
             "time.sleep(60)\n")
    parent = ("import signal, sys\n"
              # A terminal's job starts with SIGINT's default action even when this suite runs in the
              # background, whose jobs inherit SIGINT ignored (and run_script keeps an ignored SIGINT).
              "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
              "from benchmarks.common import run_script\n"
              f"sys.exit(run_script([sys.executable, '-c', {child!r}]))\n")
    bench = subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert bench.stdout.readline() == "ready\n"
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=30) == 128 + signal.SIGTERM
        assert (tmp_path / "stopped").exists()
    finally:
        bench.kill()


@pytest.mark.skipif(os.name != "posix", reason="process groups and signal forwarding are POSIX")
def test_a_terminal_ctrl_c_reaches_the_script_once_and_ends_the_benchmark_by_sigint(tmp_path):
    """A terminal sends Ctrl-C's SIGINT to its foreground process group. run_script starts the script
    in a group of its own, so it gets one SIGINT (forwarded), not a second one that would interrupt
    its clean exit; the benchmark then ends by SIGINT, so a shell loop running it stops."""
    import signal
    count = tmp_path / "sigints"
    child = ("import pathlib, signal, sys, time\n"
             f"count = pathlib.Path({str(count)!r})\n"
             "got = []\n"
             "signal.signal(signal.SIGINT, lambda *_: got.append(1))\n"
             "print('ready', flush=True)\n"
             "while not got:\n    time.sleep(0.01)\n"
             "time.sleep(1.0)\n"   # a second SIGINT, if any, lands here
             "count.write_text(str(len(got)))\n"
             "sys.exit(130)\n")
    parent = ("import signal, sys\n"
              # A terminal's job starts with SIGINT's default action even when this suite runs in the
              # background, whose jobs inherit SIGINT ignored (and run_script keeps an ignored SIGINT).
              "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
              "from benchmarks.common import run_script\n"
              f"sys.exit(run_script([sys.executable, '-c', {child!r}]))\n")
    bench = subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                             start_new_session=True)   # its own group, as a terminal's job
    try:
        assert bench.stdout.readline() == "ready\n"
        os.killpg(bench.pid, signal.SIGINT)
        assert bench.wait(timeout=30) == -signal.SIGINT
        assert count.read_text() == "1"
    finally:
        bench.kill()


@pytest.mark.parametrize("cold_start", [True, False])
def test_a_cold_start_trains_with_empty_compile_caches_of_its_own(tmp_path, monkeypatch, cold_start):
    """--cold_start true points torch.compile's caches (inductor's, Triton's) into the run folder,
    which starts empty, so a speedrun never reuses an earlier run's compiled kernels and its budget
    includes compiling; without it the caches are the user's own."""
    envs = []
    monkeypatch.setattr(speedrun, "run_script", lambda command, stop_after, env: envs.append(env) or 1)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/shared/warm_cache")
    config = speedrun.FlowMatchingConfig(checkpoint_dir=str(tmp_path / "ckpt"))
    speedrun.train_repo([], config, str(tmp_path), time.perf_counter() + 60, cold_start)
    caches = {envs[0]["TORCHINDUCTOR_CACHE_DIR"], envs[0].get("TRITON_CACHE_DIR")}
    if cold_start:
        assert caches == {str(tmp_path / "inductor_cache"), str(tmp_path / "triton_cache")}
    else:
        assert envs[0]["TORCHINDUCTOR_CACHE_DIR"] == "/shared/warm_cache"
