"""Post-hoc EMA (evaluation/posthoc_ema.py): the profile math, the trainer's snapshots, the reconstruction
and its CLI, evaluate_fid.py's sigma_rel sweep."""

import glob
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evaluate_fid
import generate_flow_matching
import train_flow_matching
from evaluation import posthoc_ema
from evaluation.posthoc_ema import (SNAPSHOT_PATTERN, profile_weights, reconstruct, sigma_rel_to_gamma, snapshot_dir,
                                     solve_coefficients)
from tests.conftest import StandIn
from training.trainer import ema_decay_at, update_ema
from utils import checkpoint as ckpt_lib

SNAPSHOT_FLAGS = ["--ema_snapshot_every", "10", "--ema_snapshot_dtype", "fp32"]


def relative_errors(a, b):
    return {k: ((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item() for k in b if b[k].is_floating_point()}


def test_sigma_rel_and_gamma_are_inverse():
    """EDM2's pairs: gamma 6.94 <-> 0.10, 16.97 <-> 0.05; the default EMA's gamma 8 is 0.09."""
    for sigma_rel, gamma in ((0.10, 6.9372), (0.05, 16.9722)):
        assert sigma_rel_to_gamma(sigma_rel) == pytest.approx(gamma, abs=1e-4)
        assert posthoc_ema.gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, abs=1e-5)
    assert posthoc_ema.gamma_to_sigma_rel(8.0) == pytest.approx(0.0905, abs=1e-4)


@pytest.mark.parametrize("gamma", [3.0, 8.0, 16.97])
def test_profile_weights_are_what_the_trainers_ema_computes(gamma):
    """The trainer's EMA (update_ema with ema_decay_at's ramp, the cap not reached) of scalar
    'weights' theta_0..theta_T equals profile_weights @ theta, and the weights sum to 1."""
    steps = 60
    thetas = torch.randn(steps + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model, ema = torch.nn.Linear(1, 1, bias=False).double(), torch.nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        ema.weight.fill_(thetas[0])
        for k in range(steps):
            model.weight.fill_(thetas[k + 1])
            update_ema(ema, model, ema_decay_at(k, 0.99999, True, gamma))
    weights = profile_weights(gamma, steps)
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert ema.weight.item() == pytest.approx(float(weights @ thetas.numpy()), abs=1e-12)
    assert np.all(np.diff(weights[1:]) > 0)    # a power function: later weights count more


def test_a_tracked_profile_is_its_own_snapshot():
    """Least squares of a snapshot's own profile: coefficient 1 on it, 0 elsewhere, no fit error."""
    gammas = (sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10))
    columns = [(g, s) for s in range(20, 141, 20) for g in gammas]
    x, error = solve_coefficients(columns, gammas[1], 140)
    assert error < 1e-12
    expected = np.zeros(len(columns))
    expected[columns.index((gammas[1], 140))] = 1.0
    np.testing.assert_allclose(x, expected, atol=1e-9)


def test_a_profile_between_the_tracked_ones_fits_closely():
    """sigma_rel 0.07 from the 0.05 / 0.10 pair snapshotted every 10 of 300 steps: under 0.5% of
    the profile's norm (measured 0.2%); from the last pair alone, far worse."""
    gammas = (sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10))
    _, error = solve_coefficients([(g, s) for s in range(10, 301, 10) for g in gammas], sigma_rel_to_gamma(0.07), 300)
    _, last_only = solve_coefficients([(g, 300) for g in gammas], sigma_rel_to_gamma(0.07), 300)
    assert error < 5e-3 < last_only


@pytest.mark.parametrize("chunk_rows", [None, 7, 64])
def test_the_streamed_solve_is_the_dense_least_squares(chunk_rows):
    """Rows streamed through QR in chunks give what lstsq gives on the whole (step + 1, n) matrix,
    also for an end point between snapshots and with nearly collinear columns (snapshots 1 step apart)."""
    gammas = (sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10))
    snapshots = [(g, s) for s in (3, 4, 50, 120, 121, 200) for g in gammas]
    for gamma, step in ((sigma_rel_to_gamma(0.07), 200), (sigma_rel_to_gamma(0.15), 230)):
        dense = np.zeros((step + 1, len(snapshots)))
        for i, (g, s) in enumerate(snapshots):
            dense[:s + 1, i] = profile_weights(g, s)
        target = profile_weights(gamma, step)
        expected = np.linalg.lstsq(dense, target, rcond=None)[0]
        x, error = solve_coefficients(snapshots, gamma, step, chunk_rows=chunk_rows)
        np.testing.assert_allclose(dense @ x, dense @ expected, atol=1e-12)
        assert error == pytest.approx(np.linalg.norm(dense @ expected - target) / np.linalg.norm(target), rel=1e-6)


@pytest.fixture
def posthoc_run(tiny_flags, tmp_path):
    """A 300-step tiny run with post-hoc EMAs (snapshots every 10 steps) whose sampling EMA is the
    power-function EMA of sigma_rel 0.07 (the --ema_decay cap is never reached): a directly
    tracked EMA to compare reconstructions with. Checkpoints at steps 100, 200 and 300."""
    flags = tiny_flags + SNAPSHOT_FLAGS + ["--train_steps", "300", "--log_every", "100",
                                           "--ema_gamma", str(sigma_rel_to_gamma(0.07)), "--ema_decay", "0.9999"]
    assert train_flow_matching.main(flags) == 0
    return flags, flag_value(tiny_flags, "--checkpoint_dir")


def flag_value(flags, name):
    return flags[flags.index(name) + 1]


def test_the_reconstruction_of_a_tracked_ema_equals_it(posthoc_run):
    """sigma_rel 0.07 rebuilt at the last step and at step 200 (from the snapshots up to it) equals the
    sampling EMA of the checkpoints of those steps within 1e-4 relative per tensor (measured 3.6e-5);
    the 0.05 EMA rebuilt at the end is the tracked 0.05 EMA itself."""
    _, run = posthoc_run
    for step, name in ((300, "flow_matching_final.pt"), (200, "checkpoint_0000200.pt")):
        ckpt = ckpt_lib.load_checkpoint(os.path.join(run, name))
        rebuilt = reconstruct(run, 0.07, at_step=step)
        assert max(relative_errors(rebuilt["ema"], ckpt["ema"]).values()) < 1e-4
        assert max(rebuilt["posthoc_ema"]["snapshots"]) == step == rebuilt["step"]
    final = ckpt_lib.load_checkpoint(os.path.join(run, "flow_matching_final.pt"))
    assert final["posthoc_ema"]["sigma_rels"] == [0.05, 0.10]
    own = reconstruct(run, 0.05)["ema"]
    for name, weight in final["posthoc_ema"]["emas"][0].items():
        torch.testing.assert_close(own[name], weight, rtol=1e-6, atol=1e-7)
    # A latent run's snapshots carry its latent statistics (the objective's extras); the rebuilt
    # checkpoint keeps them, or generation would write the raw latents as images.
    last = os.path.join(snapshot_dir(run, "flow_matching"), SNAPSHOT_PATTERN.format(step=300))
    snap = torch.load(last, weights_only=True)
    snap["extras"] = {"latent": {"mean": torch.arange(3.0)}}
    ckpt_lib.save_checkpoint(snap, last)
    assert torch.equal(reconstruct(run, 0.05)["latent"]["mean"], torch.arange(3.0))


def test_fp16_snapshots_rebuild_the_tracked_ema_within_their_rounding(tiny_flags):
    """The default --ema_snapshot_dtype fp16: the coefficients have both signs and could amplify the
    snapshots' rounding (2^-11 relative); sigma_rel 0.07 rebuilt from them equals the run's tracked
    EMA within 1e-3 relative per tensor (measured 2.4e-4, the rounding itself: no amplification)."""
    flags = tiny_flags + ["--ema_snapshot_every", "10", "--train_steps", "300", "--log_every", "100",
                          "--ema_gamma", str(sigma_rel_to_gamma(0.07)), "--ema_decay", "0.9999"]
    assert train_flow_matching.main(flags) == 0
    run = flag_value(tiny_flags, "--checkpoint_dir")
    snapshot = torch.load(glob.glob(os.path.join(run, "ema_snapshots", "*.pt"))[0], weights_only=True)
    assert all(v.dtype == torch.float16 for state in snapshot["emas"] for v in state.values() if v.is_floating_point())
    tracked = ckpt_lib.load_checkpoint(os.path.join(run, "flow_matching_final.pt"))["ema"]
    errors = relative_errors(reconstruct(run, 0.07)["ema"], tracked)
    assert max(errors.values()) < 1e-3


def test_an_earlier_end_point_uses_only_the_snapshots_up_to_it(posthoc_run):
    """At step 150: snapshots 10..150 only, and the result does not change when later snapshots are
    deleted (they play no part). Step 155 has no snapshot: an error, not an extrapolation (whose
    coefficients shrink the weights)."""
    _, run = posthoc_run
    rebuilt = reconstruct(run, 0.12, at_step=150)
    assert rebuilt["posthoc_ema"]["snapshots"] == list(range(10, 151, 10))
    with pytest.raises(ValueError, match="no EMA snapshot at step 155 .*the nearest before it is step 150"):
        reconstruct(run, 0.12, at_step=155)
    for path in glob.glob(os.path.join(run, "ema_snapshots", "*.pt")):
        if int(os.path.basename(path)[4:11]) > 150:
            os.remove(path)
    again = reconstruct(run, 0.12, at_step=150)
    for name in rebuilt["ema"]:
        assert torch.equal(rebuilt["ema"][name], again["ema"][name])


def test_cli_writes_a_checkpoint_generate_samples_from(posthoc_run, tmp_path, capsys):
    _, run = posthoc_run
    out = str(tmp_path / "ema_0.07.pt")
    assert posthoc_ema.main([run, "--sigma_rel", "0.07", "-o", out]) == 0
    assert "from 60 EMA snapshots (steps 10..300)" in capsys.readouterr().out
    assert generate_flow_matching.main(["--checkpoint", out, "--num_samples", "6", "--device", "cpu",
                                        "--output_dir", str(tmp_path / "gen")]) == 0
    assert glob.glob(str(tmp_path / "gen" / "*.png"))


@pytest.mark.parametrize("args, output, message", [
    (["--sigma_rel", "0.3"], "x.pt", "--sigma_rel must be in (0, 0.2887)"),
    (["--sigma_rel", "0.07", "--at_step", "5"], "x.pt", "no EMA snapshot at step 5"),
    # refused before the reconstruction, not with a traceback after it
    (["--sigma_rel", "0.07"], "a_file/x.pt", "a_file is not a writable folder"),
    (["--sigma_rel", "0.07"], "", "is a folder: name the checkpoint file to write"),
])
def test_cli_bad_input_is_one_clear_line(posthoc_run, tmp_path, capsys, args, output, message):
    _, run = posthoc_run
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        posthoc_ema.main([run, *args, "-o", str(tmp_path / output)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_run_without_snapshots_is_a_clear_error_and_keeps_no_extra_emas(tiny_flags, tmp_path, capsys):
    """Without --ema_snapshot_every nothing extra is kept (no EMAs in the checkpoint, no snapshots)."""
    assert train_flow_matching.main(tiny_flags + ["--train_steps", "2"]) == 0
    run = flag_value(tiny_flags, "--checkpoint_dir")
    assert "posthoc_ema" not in ckpt_lib.load_checkpoint(os.path.join(run, "flow_matching_final.pt"))
    assert not os.path.exists(os.path.join(run, "ema_snapshots"))
    with pytest.raises(SystemExit):
        posthoc_ema.main([run, "--sigma_rel", "0.07", "-o", str(tmp_path / "x.pt")])
    assert "holds no post-hoc EMA snapshots" in capsys.readouterr().err


def test_a_rebuilt_ema_neither_replaces_nor_resumes_a_run(tiny_flags, tmp_path, capsys):
    """-o onto the run's final checkpoint is refused (it would replace weights and optimizer
    state); a rebuilt EMA given to --resume is a clear error, not a KeyError."""
    flags = tiny_flags + SNAPSHOT_FLAGS + ["--train_steps", "20"]
    assert train_flow_matching.main(flags) == 0
    run = flag_value(tiny_flags, "--checkpoint_dir")
    final = os.path.join(run, "flow_matching_final.pt")
    before = os.path.getmtime(final)
    with pytest.raises(SystemExit) as exit_info:
        posthoc_ema.main([run, "--sigma_rel", "0.07", "-o", final])
    assert exit_info.value.code == 2 and "is a training checkpoint's name" in capsys.readouterr().err
    assert os.path.getmtime(final) == before
    rebuilt = str(tmp_path / "ema_0.07.pt")
    assert posthoc_ema.main([run, "--sigma_rel", "0.07", "-o", rebuilt]) == 0
    capsys.readouterr()
    assert train_flow_matching.main(flags[:-1] + ["30", "--resume", rebuilt]) == 2
    assert "holds weights only" in capsys.readouterr().err


def test_a_new_run_refuses_a_folder_that_holds_another_runs_snapshots(tiny_flags, capsys):
    """Its checkpoints deleted, a run's snapshots would still be mixed into every reconstruction
    of the next run in that folder: the new run refuses to start, naming them."""
    flags = tiny_flags + SNAPSHOT_FLAGS + ["--train_steps", "20"]
    assert train_flow_matching.main(flags) == 0
    run = flag_value(tiny_flags, "--checkpoint_dir")
    for path in glob.glob(os.path.join(run, "*.pt")):
        os.remove(path)
    capsys.readouterr()
    for resume in ([], ["--resume", "latest"]):   # latest finds no checkpoint: a fresh start too
        assert train_flow_matching.main(flags + ["--seed", "1", *resume]) == 2
        assert "holds 2 post-hoc EMA snapshots of an earlier run" in capsys.readouterr().err


def test_resume_continues_the_snapshots_bit_exactly(tiny_flags, tmp_path):
    """20 steps, then resumed to 40, writes the same snapshots and post-hoc EMAs as 40 straight."""
    straight = tiny_flags + SNAPSHOT_FLAGS + ["--checkpoint_dir", str(tmp_path / "straight")]
    assert train_flow_matching.main(straight + ["--train_steps", "40"]) == 0
    assert train_flow_matching.main(tiny_flags + SNAPSHOT_FLAGS + ["--train_steps", "20"]) == 0
    assert train_flow_matching.main(tiny_flags + SNAPSHOT_FLAGS + ["--train_steps", "40", "--resume", "latest"]) == 0
    resumed = flag_value(tiny_flags, "--checkpoint_dir")
    names = sorted(os.listdir(os.path.join(resumed, "ema_snapshots")))
    assert names == sorted(os.listdir(str(tmp_path / "straight" / "ema_snapshots"))) == \
        [f"ema_{s:07d}.pt" for s in (10, 20, 30, 40)]
    for name in names:
        a, b = (torch.load(os.path.join(d, "ema_snapshots", name), weights_only=True)
                for d in (resumed, str(tmp_path / "straight")))
        for state_a, state_b in zip(a["emas"], b["emas"]):
            for key in state_a:
                assert torch.equal(state_a[key], state_b[key]), (name, key)


@pytest.mark.parametrize("flags, message", [
    (["--ema_snapshot_sigma_rels", "0.05,0.2"], "tracked 0.05,0.1; resume with --ema_snapshot_sigma_rels 0.05,0.1"),
    (None, "kept no post-hoc EMAs, and they must run from step 0"),
])
def test_a_resume_that_breaks_the_profiles_is_refused(tiny_flags, capsys, flags, message):
    first = tiny_flags + (SNAPSHOT_FLAGS if flags is not None else [])
    assert train_flow_matching.main(first + ["--train_steps", "2"]) == 0
    code = train_flow_matching.main(tiny_flags + SNAPSHOT_FLAGS + (flags or []) + ["--train_steps", "4", "--resume", "latest"])
    assert code == 2
    assert message in capsys.readouterr().err


def test_evaluate_fid_scores_one_row_per_sigma_rel(posthoc_run, tmp_path, monkeypatch):
    """--ema_sigma_rels: one row per length, each from its own weights (different FIDs), the row of the
    tracked 0.05 equal to scoring that EMA."""
    monkeypatch.setattr(evaluate_fid.fid, "InceptionFeatures", StandIn)
    flags, run = posthoc_run
    out = str(tmp_path / "fid.jsonl")
    common = ["--num_samples", "12", "--device", "cpu", "--ref_num_images", "12", "--output_jsonl", out,
              "--num_workers", "0"]
    checkpoint = os.path.join(run, "flow_matching_final.pt")
    assert evaluate_fid.main(["--checkpoint", checkpoint, "--ema_sigma_rels", "0.05", "0.07", "0.2", *common]) == 0
    rows = [json.loads(line) for line in open(out)]
    assert [r["ema_sigma_rel"] for r in rows] == [0.05, 0.07, 0.2]
    assert all(r["weights"] == "posthoc_ema" for r in rows)
    assert len({r["fid"] for r in rows}) == 3
    # The tracked 0.05 EMA itself, as a checkpoint's sampling EMA: the same samples, the same FID.
    ckpt = ckpt_lib.load_checkpoint(checkpoint)
    ckpt["ema"] = ckpt["posthoc_ema"]["emas"][ckpt["posthoc_ema"]["sigma_rels"].index(0.05)]
    tracked = str(tmp_path / "tracked_0.05.pt")
    ckpt_lib.save_checkpoint(ckpt, tracked)
    assert evaluate_fid.main(["--checkpoint", tracked, "--weights", "ema", *common]) == 0
    direct = json.loads(open(out).read().splitlines()[-1])
    assert direct["weights"] == "ema" and direct["fid"] == pytest.approx(rows[0]["fid"], rel=1e-4)
    # An earlier checkpoint's EMA is rebuilt at its own step (from the snapshots up to it), not at
    # the run's last snapshot: a FID-against-step curve needs each step's own weights.
    earlier = os.path.join(run, "checkpoint_0000200.pt")
    assert evaluate_fid.main(["--checkpoint", earlier, "--ema_sigma_rels", "0.07", *common]) == 0
    row = json.loads(open(out).read().splitlines()[-1])
    assert row["step"] == 200 and abs(row["fid"] - rows[1]["fid"]) > 1e-6


@pytest.mark.parametrize("step, ema_decay, kind", [(1000, 0.9999, "tracked"), (1000, 0.99, "tracked (capped)")])
def test_the_benchmark_names_a_capped_tracked_ema(tmp_path, monkeypatch, step, ema_decay, kind):
    """benchmarks/posthoc_ema.py labels the tracked EMA with ema_gamma's sigma_rel only while the
    --ema_decay cap never bound (gamma 8 reaches 0.99 at step ~890): a capped one gets no verdict."""
    from benchmarks import posthoc_ema as bench
    ckpt_lib.save_checkpoint({"kind": "flow_matching", "step": step, "model": {},
                     "config": {"seed": 0, "ema_gamma": 8.0, "ema_decay": ema_decay, "ema_warmup": True}},
                    str(tmp_path / "flow_matching_final.pt"))

    def evaluate(argv, check):   # evaluate_fid.py's row for the tracked EMA
        with open(argv[argv.index("--output_jsonl") + 1], "w") as f:
            f.write(json.dumps({"fid": 50.0}) + "\n")

    monkeypatch.setattr(bench, "run_script", evaluate)
    args = SimpleNamespace(num_samples=10, ref_num_images=10, inception_weights="w", device="cpu",
                           results=str(tmp_path / "rows.jsonl"))
    bench.score(str(tmp_path), args, None, {})
    [row] = [json.loads(line) for line in open(tmp_path / "rows.jsonl")]
    assert row["ema"] == kind and row["sigma_rel"] == pytest.approx(0.09045, abs=1e-4)


def test_the_benchmarks_snapshot_copies_are_cast_to_their_dtype(posthoc_run, tmp_path):
    """benchmarks/posthoc_ema.py scores the post-hoc EMA from fp16 and bf16 copies of the fp32
    snapshots: each copy really holds that dtype, or its 'the dtype does not show in FID' verdict
    would compare fp32 with itself."""
    from benchmarks import posthoc_ema as bench
    _, run = posthoc_run
    for dtype, expected in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        copy = bench.cast_copy(run, dtype, str(tmp_path / dtype))
        snaps = glob.glob(os.path.join(snapshot_dir(copy, "flow_matching"), "*.pt"))
        assert len(snaps) == 30
        for path in snaps[:3]:
            for ema in torch.load(path, weights_only=True)["emas"]:
                assert {v.dtype for v in ema.values() if v.is_floating_point()} == {expected}
