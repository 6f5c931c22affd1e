"""benchmarks/quality.py on a tiny run with stand-in Inception features: --checkpoint scores a
finished run in rows of the same form as the run's own (so --summarize groups them), the time
shift and guidance interval settings reach the sampler and the rows, bad flags exit 2, and
--summarize prints the tables of benchmarks/README.md from benchmarks/results/."""

import glob
import json
import os
import re
import shutil

import pytest

import train_flow_matching
from benchmarks import quality
from configs.flow_matching_config import parse_flow_matching_config
from evaluation import fid, sampling
from tests.conftest import TINY_FLAGS, StandIn, write_image_folder
from utils.checkpoint import load_checkpoint, save_checkpoint

SCORING = ["--num_samples", "6", "--ref_num_images", "12", "--num_steps_list", "2", "--cfg_scales", "2.5",
           "--time_shifts", "1", "3", "--guidance_intervals", "none", "0.5,1", "--sample_batch_size", "4"]
# The proxy16 preset shrunk to seconds; a relative data folder keeps the run's folder name short.
TRAINING = ["--dataset", "imagefolder", "--data_dir", "images", "--image_size", "8", "--hidden_size", "32",
            "--depth", "1", "--num_heads", "2", "--batch_size", "4", "--train_steps", "3", "--lr", "0.01",
            "--warmup_steps", "0", "--num_workers", "0", "--data_loader", "workers", "--device", "cpu",
            "--sample_every", "0"]
# What differs between two scorings of one checkpoint (and the training time a scoring cannot know).
PER_RUN = ("train_seconds", "eval_seconds", "time")


@pytest.fixture
def bench(tmp_path, monkeypatch):
    """The flags every call shares; the working directory (tmp_path) holds images/ and the outputs."""
    write_image_folder(tmp_path / "images")
    monkeypatch.setattr(fid, "InceptionFeatures", StandIn)
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"")  # must exist; the stand-in ignores it
    return ["--inception_weights", str(weights), "--results", "results.jsonl", "--runs_dir", "runs"]


def results():
    with open("results.jsonl") as f:
        return [json.loads(line) for line in f]


def test_a_scored_checkpoint_gives_the_rows_of_its_training_run(bench, monkeypatch):
    pytest.importorskip("torch_fidelity", reason="FID needs requirements-eval.txt")
    sampled, generate_images = [], sampling.generate_images

    def spy(model, labels, settings, **options):
        assert settings.cfg_scale == 2.5   # the swept scale, not the run's own (proxy16's 1.5)
        sampled.append((settings.time_shift, settings.guidance_interval))
        return generate_images(model, labels, settings, **options)

    monkeypatch.setattr(sampling, "generate_images", spy)
    assert quality.main(bench + SCORING + TRAINING) == 0
    [checkpoint] = glob.glob(os.path.join("runs", "*", "flow_matching_final.pt"))
    assert quality.main(bench + SCORING + ["--checkpoint", checkpoint, "--seed", "0", "--device", "cpu"]) == 0
    rows = results()
    trained, scored = rows[:8], rows[8:]
    assert len(scored) == 8
    settings = [(w, s, i) for w in ("ema", "raw") for s in (1.0, 3.0) for i in (None, [0.5, 1.0])]
    for t, s, setting in zip(trained, scored, settings):
        assert (s["weights"], s["time_shift"], s["guidance_interval"]) == setting
        assert t.keys() == s.keys()
        assert {k: v for k, v in t.items() if k not in PER_RUN} == {k: v for k, v in s.items() if k not in PER_RUN}
        assert t["train_seconds"] > 0 and s["train_seconds"] is None
    assert sampled == [(s, None if i is None else tuple(i)) for _, s, i in settings] * 2  # trained, then scored
    assert scored[0]["config_diff"]["hidden_size"] == 32 and scored[0]["steps"] == 3
    # raw rows score the training weights, not the EMA (3 steps apart from each other)
    assert all(trained[k]["fid"] != trained[k + 4]["fid"] for k in range(4))
    table = quality.summarize("results.jsonl").splitlines()
    lines = [line for line in table[2:] if line.startswith("| repo")]
    assert len(lines) == 8   # each setting's trained and scored rows share a line
    for line, t in zip(lines, trained):
        cells = [c.strip() for c in line.strip("|").split("|")]
        # seed 0 once (the re-scoring replaces its row, it is no second seed); train s of the trained row
        assert cells[10] == "0" and cells[12] == "0.00" and cells[14] == f"{t['train_seconds']:.0f}"
    folder = os.path.basename(os.path.dirname(checkpoint))
    assert os.path.isfile(os.path.join("runs", f"scored_{folder}", "grid_ema.png"))
    # An earlier checkpoint of the run is labelled with its own step, not the run's train_steps.
    earlier = load_checkpoint(checkpoint)
    earlier["step"] = 2
    save_checkpoint(earlier, os.path.join(os.path.dirname(checkpoint), "checkpoint_0000002.pt"))
    assert quality.main(bench + SCORING + ["--checkpoint", os.path.join(os.path.dirname(checkpoint),
                                                                        "checkpoint_0000002.pt"),
                                           "--seed", "0", "--device", "cpu", "--weights", "ema"]) == 0
    assert {r["steps"] for r in results()[16:]} == {2}


def test_the_peer_pipeline_trains_and_scores_its_rows(bench):
    """The diffusers + torchcfm peer learns the number of classes from the data like the repo's run
    and is scored by the same code (one row per setting, raw weights: the peer keeps no EMA)."""
    pytest.importorskip("torch_fidelity", reason="FID needs requirements-eval.txt")
    pytest.importorskip("diffusers", reason="the peer needs benchmarks/requirements.txt")
    pytest.importorskip("torchcfm", reason="the peer needs benchmarks/requirements.txt")
    at = TRAINING.index("--sample_every")
    training = TRAINING[:at] + TRAINING[at + 2:]   # the peer draws no grids during training
    assert quality.main(bench + SCORING + training + ["--pipeline", "peer"]) == 0
    rows = results()
    assert len(rows) == 4 and {(r["pipeline"], r["weights"], r["steps"]) for r in rows} == {("peer", "raw", 3)}


@pytest.fixture
def checkpoint(bench, tmp_path):
    """A one-step run of seed 3 on the images of `bench`."""
    flags = TINY_FLAGS + ["--data_dir", str(tmp_path / "images"), "--checkpoint_dir", str(tmp_path / "ckpt"),
                          "--train_steps", "1", "--seed", "3"]
    assert train_flow_matching.main(flags) == 0
    return str(tmp_path / "ckpt" / "flow_matching_final.pt")


@pytest.mark.parametrize("flags, expected", [
    (["--checkpoint", "missing.pt"], "--checkpoint: checkpoint missing.pt does not exist"),
    (["--checkpoint", "CKPT", "--lr", "1e-3", "--depth", "3"],
     "--depth --lr: training flags do not apply to --checkpoint"),
    (["--checkpoint", "CKPT", "--seed", "0"], "--seed 0: CKPT was trained with seed 3"),
    (["--checkpoint", "CKPT", "--pipeline", "peer", "--weights", "raw"], "drop --pipeline peer"),
    (["--checkpoint", "CKPT", "--guidance_intervals", "none", "0.8,0.2"], "'0.8,0.2' must satisfy 0 <= A <= B <= 1"),
    (["--checkpoint", "CKPT", "--guidance_intervals", "0.5"], "expected \"A,B\" or \"none\", got '0.5'"),
    (["--checkpoint", "CKPT", "--time_shifts", "1", "0"], "--time_shifts entries must be > 0"),
    (["--checkpoint", "LATENT"], "--checkpoint LATENT is a latent (VQ-VAE) model"),
    (["--checkpoint", "CKPT", "--sample_batch_size", "0"], "--sample_batch_size must be >= 1, got 0"),
])
def test_bad_flags_exit_2_with_one_line(bench, checkpoint, capsys, flags, expected):
    if "LATENT" in flags:   # the run's checkpoint as a latent model would record itself
        ckpt = load_checkpoint(checkpoint)
        ckpt["config"].update(latent_size=4, latent_channels=3)
        latent = os.path.join(os.path.dirname(checkpoint), "latent.pt")
        save_checkpoint(ckpt, latent)
        flags, expected = [latent if f == "LATENT" else f for f in flags], expected.replace("LATENT", latent)
    flags = [checkpoint if f == "CKPT" else f for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        quality.main(bench + flags)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert expected.replace("CKPT", checkpoint) in err, err
    assert not os.path.exists("results.jsonl")


def test_bad_data_is_one_line_exit_2(bench, capsys):
    """Errors found while running (here: more reference images asked than the folder holds) are
    one line too, not a traceback, and nothing is trained."""
    assert quality.main(bench + TRAINING + SCORING + ["--ref_num_images", "100"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "quality.py: error: 100 images were asked of images, which holds only 18; ask for 18 or fewer (0 = all)"
    assert not os.path.exists("results.jsonl")


def test_guidance_intervals_parse_to_pairs_or_none():
    assert quality.guidance_interval_arg("none") is None
    assert quality.guidance_interval_arg("0,1") is None   # every step, as "none"
    assert quality.guidance_interval_arg("0.2,0.9") == (0.2, 0.9)
    assert quality.guidance_interval_arg("0.5,0.5") == (0.5, 0.5)


def test_summarize_groups_by_time_shift_and_interval_reading_old_rows_as_1_and_none(tmp_path):
    base = {"pipeline": "repo", "config_diff": {}, "steps": 1000, "weights": "ema", "sampler": "euler", "nfe": 20,
            "cfg_scale": 1.5, "num_samples": 1000, "reference": "ref", "eval_seconds": 10.0}
    rows = [dict(base, seed=0, fid=60.0, train_seconds=100.0),                                 # before the fields
            dict(base, seed=1, fid=62.0, train_seconds=None, time_shift=1.0, guidance_interval=None),
            dict(base, seed=0, fid=50.0, train_seconds=100.0, time_shift=3.0, guidance_interval=None),
            dict(base, seed=0, fid=55.0, train_seconds=None, time_shift=1.0, guidance_interval=[0.2, 0.9])]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = quality.summarize(str(path)).splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[6:9] == ["cfg", "shift", "interval"]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:5]]
    assert [(c[7], c[8], c[10], c[11]) for c in cells] == [("1", "-", "0,1", "61.00"), ("3", "-", "0", "50.00"),
                                                           ("1", "0.2,0.9", "0", "55.00")]
    assert [c[14] for c in cells] == ["100", "100", "-"]   # train s: the mean of the rows that know it


def test_a_preset_shares_the_row_of_the_flags_it_stands_for():
    """The winning preset's run groups with the ablation runs of the same training flags (its own
    sampler is a column of the row, not a recipe difference); a training field stays in the diff."""
    def diff(*argv):
        return quality.config_diff(parse_flow_matching_config(["--preset", "proxy16", *argv]))

    winner = {"qk_norm": True, "mlp": "swiglu"}
    assert diff("--preset", "proxy16_qk_swiglu") == winner
    assert diff("--qk_norm", "true", "--mlp", "swiglu") == winner
    assert diff("--sampler", "heun", "--cfg_scale", "3", "--save_every", "250") == {}
    assert diff("--lr", "0.002", "--ema_gamma", "7") == {"lr": 0.002, "ema_gamma": 7.0}
    assert diff("--device", "cpu", "--num_workers", "0", "--data_loader", "workers") == {}   # where, not what


def test_an_effect_needs_two_seeds_on_each_side():
    def rows(*fids):
        return [{"fid": f, "seed": i} for i, f in enumerate(fids)]

    assert quality.effect(rows(50.0), rows(60.0, 60.5))[2] == "one seed: no claim"
    assert quality.effect(rows(50.0, 50.4), rows(60.0, 60.5))[2] == "lower (better)"
    assert quality.effect(rows(60.2, 60.4), rows(60.0, 60.5))[2] == "none beyond the spread"


def test_fid_curves_join_steps_of_one_setting_only(tmp_path):
    """The FID-vs-steps plot's lines: a setting's rows at different step counts, never two settings
    (here: two time shifts) scored at the same step."""
    base = {"pipeline": "repo", "config_diff": {}, "weights": "ema", "sampler": "midpoint", "nfe": 10,
            "cfg_scale": 1.5, "num_samples": 1000, "reference": "ref", "eval_seconds": 1.0, "train_seconds": None}
    rows = [dict(base, steps=1000, seed=0, fid=60.0), dict(base, steps=1000, seed=1, fid=62.0),
            dict(base, steps=500, seed=0, fid=70.0),
            dict(base, steps=1000, seed=0, fid=80.0, time_shift=3.0),      # one step count: no line
            dict(base, steps=1000, seed=0, fid=90.0, time_shift=0.5)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert list(quality.curves(str(path)).values()) == [[(500, 70.0), (1000, 61.0)]]


README = os.path.join(quality.ROOT, "benchmarks", "README.md")


def test_summarize_prints_every_results_table_of_the_readme_as_it_stands_there(capsys):
    """Each table `--summarize` builds from benchmarks/results/ stands verbatim between its markers in
    benchmarks/README.md, and every marked table of the README is one of them."""
    assert quality.main(["--summarize"]) == 0
    out = capsys.readouterr().out
    with open(README) as f:
        readme = f.read()
    for name, make in quality.TABLES.items():
        block = quality.marked(name, make())
        assert block in out
        assert block in readme, f"benchmarks/README.md's {name!r} table differs from --summarize's; " \
                                f"python benchmarks/quality.py --summarize --readme benchmarks/README.md"
    assert set(re.findall(r"<!-- /(.+?) -->", readme)) == set(quality.TABLES)


def test_readme_rewrites_a_table_whose_numbers_are_off(tmp_path, capsys):
    readme = tmp_path / "README.md"
    shutil.copy(README, readme)
    text = readme.read_text()
    readme.write_text(text.replace("| baseline | 0,1 | 65.83 (65.52 / 66.13) | 0.61 |",
                                   "| baseline | 0,1 | 65.84 (65.52 / 66.13) | 0.61 |"))
    assert quality.main(["--summarize", "--readme", str(readme)]) == 0
    assert capsys.readouterr().out.endswith(f"{readme}: rewrote options\n")
    assert readme.read_text() == text
