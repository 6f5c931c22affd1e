"""benchmarks/meanflow_gap.py: the distance of K jumps to the model's own fine ODE endpoint."""

import json

import pytest
import torch

import flow_matching
import train_flow_matching
from benchmarks import meanflow_gap
from evaluation import fid
from models.dit_2d import input_shape
from rebuild import load_flow_model
from tests.conftest import TINY_FLAGS, write_image_folder
from utils.checkpoint import load_checkpoint, save_checkpoint


def _train(root, objective):
    data = write_image_folder(root / "images", classes=3, per_class=4)
    flags = TINY_FLAGS + ["--data_dir", data, "--checkpoint_dir", str(root / "ckpt"), "--train_steps", "3",
                          "--lr", "0.01", "--warmup_steps", "0", "--objective", objective]
    assert train_flow_matching.main(flags) == 0
    return str(root / "ckpt" / "flow_matching_final.pt")


@pytest.fixture(scope="module", params=["flow_matching", "meanflow"])
def checkpoint(request, tmp_path_factory):
    path = _train(tmp_path_factory.mktemp(request.param), request.param)
    if request.param == "meanflow":  # three steps leave the zero-initialized interval embedding near
        ckpt = load_checkpoint(path, kind="flow_matching")  # zero: give it weight, so a jump is not Euler
        generator = torch.Generator().manual_seed(0)
        for name, tensor in ckpt["ema"].items():
            if name.startswith("r_embedder.mlp.2."):
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
        save_checkpoint(ckpt, path)
    return path


def _gap_rows(tmp_path, *argv):
    out = tmp_path / "gap.jsonl"
    assert meanflow_gap.main([*argv, "--device", "cpu", "--json", str(out)]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def _sampler_of(checkpoint, seed, num_samples):
    """run(sampler, steps): the checkpoint's EMA samples from the noise and labels the script uses."""
    model, ckpt = load_flow_model(checkpoint)
    config = ckpt["config"]
    noise = flow_matching.per_sample_noise(seed, range(num_samples), input_shape(config), "cpu")
    y = fid.class_labels(num_samples, config["num_classes"])

    def run(sampler, steps):
        with torch.no_grad():
            return flow_matching.sample(model, noise, y, flow_matching.SamplingSettings(
                sampler, steps, cfg_scale=config["cfg_scale"]), num_classes=config["num_classes"])[0]
    return run, config


def test_the_gap_is_k_jumps_of_the_objective_sampler_against_fine_midpoint(checkpoint, tmp_path):
    """Euler on a flow-matching checkpoint, the meanflow sampler on a MeanFlow one, each from the
    noise and labels the reference starts from."""
    [row] = _gap_rows(tmp_path, checkpoint, "--num_samples", "6", "--seed", "4", "--jumps", "1", "2",
                      "--reference_steps", "5")
    run, config = _sampler_of(checkpoint, seed=4, num_samples=6)
    reference = run("midpoint", 5)
    jumps = "meanflow" if config["objective"] == "meanflow" else "euler"
    for k in (1, 2):
        expected = (run(jumps, k) - reference).pow(2).mean().item()
        assert expected > 1e-6  # a trained model: the jumps miss the reference
        assert row[f"gap_{k}"] == pytest.approx(expected, rel=1e-3)
    assert row["objective"] == config["objective"] and row["step"] == 3
    assert row["reference_variance"] == pytest.approx(reference.var().item(), abs=1e-4)


def test_samplers_set_the_solvers_of_a_flow_matching_checkpoint_a_row_each(checkpoint, tmp_path):
    """--samplers ab2 midpoint: a row for K ab2 steps (K NFE), one for K midpoint steps (2K NFE),
    against one reference; a MeanFlow checkpoint still jumps with meanflow (K NFE), in one row."""
    rows = _gap_rows(tmp_path, checkpoint, "--num_samples", "4", "--jumps", "1", "3", "--samplers", "ab2",
                     "midpoint", "--reference_steps", "6")
    run, config = _sampler_of(checkpoint, seed=0, num_samples=4)
    meanflow = config["objective"] == "meanflow"
    expected = {"meanflow": (1, 3)} if meanflow else {"ab2": (1, 3), "midpoint": (2, 6)}
    assert [row["sampler"] for row in rows] == list(expected)
    reference = run("midpoint", 6)
    for row in rows:
        assert (row["nfe_1"], row["nfe_3"]) == expected[row["sampler"]]
        for k in (1, 3):
            gap = (run(row["sampler"], k) - reference).pow(2).mean().item()
            assert row[f"gap_{k}"] == pytest.approx(gap, rel=1e-3)


def test_a_model_that_stands_still_has_no_gap(checkpoint, tmp_path):
    """A zero velocity leaves every sampler on its noise: any gap is noise the two runs did not share."""
    ckpt = load_checkpoint(checkpoint, kind="flow_matching")
    for name, tensor in ckpt["ema"].items():
        if name.startswith("final_layer.linear."):
            tensor.zero_()
    still = str(tmp_path / "still.pt")
    save_checkpoint(ckpt, still)
    [row] = _gap_rows(tmp_path, still, "--num_samples", "4", "--jumps", "1", "3")
    assert row["gap_1"] == 0 and row["gap_3"] == 0
    assert row["reference_variance"] == pytest.approx(1, abs=0.3)  # unit Gaussian noise


@pytest.mark.parametrize("argv, needle", [
    (["missing.pt"], "checkpoint missing.pt does not exist"),
    (["CKPT", "--jumps", "0"], "must be >= 1, got 64, 17, [0]"),
    (["CKPT", "VQVAE"], "VQVAE is a 'vqvae' checkpoint, not a 'flow_matching' one"),
])
def test_bad_input_exits_2_naming_the_value(checkpoint, argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_checkpoint({"kind": "vqvae", "model": {}, "config": {}}, "VQVAE")
    with pytest.raises(SystemExit) as exit_:
        meanflow_gap.main([checkpoint if a == "CKPT" else a for a in argv])
    assert exit_.value.code == 2 and needle in capsys.readouterr().err
