"""torchrun on CPU (gloo, 2 processes): training matches one process, sampling matches exactly,
and a 2-rank checkpoint resumes on 1 rank."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import generate_flow_matching
import train_flow_matching
from tests.conftest import ROOT
from training.checkpoint import load_checkpoint


def torchrun(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def losses(ckpt_dir):
    return [json.loads(line)["loss"] for line in open(os.path.join(ckpt_dir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """One torchrun training run shared by the tests below."""
    from tests.conftest import TINY_FLAGS, write_image_folder
    root = tmp_path_factory.mktemp("ddp")
    flags = TINY_FLAGS + ["--data_dir", write_image_folder(root / "images", classes=3, per_class=6),
                          "--batch_size", "8", "--train_steps", "3", "--log_every", "1", "--save_every", "2",
                          "--lr", "0.003", "--warmup_steps", "0"]
    ckpt_dir = str(root / "ckpt2")
    torchrun("train_flow_matching.py", *flags, "--checkpoint_dir", ckpt_dir, "--sample_dir", str(root / "s2"))
    return root, flags, ckpt_dir


def test_two_ranks_match_one_process(two_rank_run):
    """Same global batch, same samples, same per-sample draws: the losses agree up to float
    summation order (gloo's all-reduce vs. one batch), far below the step-to-step changes."""
    root, flags, ckpt_dir = two_rank_run
    one_dir = str(root / "ckpt1")
    assert train_flow_matching.main(flags + ["--checkpoint_dir", one_dir, "--sample_dir", str(root / "s1")]) == 0
    two, one = losses(ckpt_dir), losses(one_dir)
    assert len(two) == len(one) == 3
    np.testing.assert_allclose(two, one, rtol=1e-4)
    assert abs(one[0] - one[2]) > 1e-3  # the steps changed the loss: the match is not trivial
    final = load_checkpoint(os.path.join(ckpt_dir, "flow_matching_final.pt"))
    assert final["step"] == 3 and not any(k.startswith("module.") for k in final["model"])


def test_two_rank_checkpoint_resumes_on_one_rank(two_rank_run):
    root, flags, ckpt_dir = two_rank_run
    assert train_flow_matching.main(flags + ["--checkpoint_dir", ckpt_dir, "--sample_dir", str(root / "s3"),
                                             "--train_steps", "4", "--resume", "latest"]) == 0
    resumed = load_checkpoint(os.path.join(ckpt_dir, "flow_matching_final.pt"))
    assert resumed["step"] == 4


def test_two_rank_sampling_writes_the_one_rank_npz(two_rank_run, tmp_path):
    _, _, ckpt_dir = two_rank_run
    checkpoint = os.path.join(ckpt_dir, "flow_matching_final.pt")
    common = ["--checkpoint", checkpoint, "--num_samples", "7", "--batch_size", "2", "--save_npz",
              "--num_steps", "2", "--device", "cpu"]
    torchrun("generate_flow_matching.py", *common, "--output_dir", str(tmp_path / "two"))
    assert generate_flow_matching.main(common + ["--output_dir", str(tmp_path / "one")]) == 0
    two, one = np.load(tmp_path / "two" / "samples.npz"), np.load(tmp_path / "one" / "samples.npz")
    assert np.array_equal(two["images"], one["images"]) and np.array_equal(two["labels"], one["labels"])
    assert len(os.listdir(tmp_path / "two" / "images")) == 7
