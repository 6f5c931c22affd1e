"""benchmarks/gpu_check.sh's CPU smoke form: every stage of the GPU job runs at toy sizes, so the job
never fails on a flag or a path when a GPU is finally lent (compile is switched off there;
tests/test_speed.py covers the compiled graph)."""

import json
import math
import os
import subprocess
import sys
import tarfile


from tests.conftest import write_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_form_runs_the_speed_and_speedrun_stages(tmp_path):
    write_image_folder(tmp_path / "src" / "train", classes=2, per_class=6, size=(8, 8))
    gpu_dir = tmp_path / "gpu"
    gpu_dir.mkdir()
    with tarfile.open(gpu_dir / "cifar10_train.tar.gz", "w:gz") as tar:   # the layout of the shared tarball
        tar.add(tmp_path / "src" / "train", arcname="train")
    out = tmp_path / "out"
    env = dict(os.environ, SMOKE="1", GPU_DIR=str(gpu_dir), OUT=str(out), GPU_CHECK_BUDGET="100000",
               SCRATCH=str(tmp_path / "scratch"), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "speed", "speedrun"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "Traceback" not in log and "skipped (budget" not in log, log[-3000:]
    with open(out / "gpu_check.jsonl") as f:
        rows = [json.loads(line) for line in f]
    trains = [r for r in rows if r.get("bench") == "train"]
    assert [(r["config"]["compile"], r["config"]["compile_mode"]) for r in trains] == [
        (False, "blocks"), (True, "default"), (True, "blocks"), (True, "blocks"), (True, "blocks"), (True, "blocks"),
        (False, "blocks"), (True, "blocks"), (True, "blocks"), (True, "max-autotune-no-cudagraphs")]
    assert [r["config"]["optimizer"] for r in trains].index("muon") == 7
    assert [r["config"]["mixed_precision"] for r in trains].index("fp16") == 8
    # One step restricts attention to one SDPA kernel (flash on the GPU; math here, where PyTorch's own
    # pick is the CPU flash kernel), and its profile shows that kernel ran instead of the default.
    assert [r["sdpa_backend"] for r in trains] == ["auto"] * 3 + ["math"] + ["auto"] * 6
    math_op = "aten::_scaled_dot_product_attention_math"
    assert math_op in (out / "profile_train_attention.txt").read_text()
    assert math_op not in (out / "profile_train_blocks.txt").read_text()
    assert [r["config"]["fp32_residual"] for r in trains].count(True) == 1
    assert all(r["profile"]["kernel_s"] > 0 and r["sync_check"] for r in trains)
    assert [r["config"]["objective"] for r in trains].count("meanflow") == 1
    # MeanFlow's JVP is not in the counted FLOPs: no MFU rather than an understated one.
    assert all((r["mfu"] is None) == (r["config"]["objective"] == "meanflow") for r in trains)
    samples = [r for r in rows if r.get("bench") == "sample"]
    assert [(r["compile_mode"], r["batch_size"]) for r in samples] == [
        ("none", 4), ("default", 4), ("default", 3), ("reduce-overhead", 4), ("max-autotune-no-cudagraphs", 4)]
    assert all(r["nfe"] == 2 and r["images_per_s"] > 0 for r in samples)
    assert all(r["mfu"] > 0 and r["images_per_s_at_peak"] > 0 for r in samples)   # the smoke form's nominal peak
    kernels = [r for r in rows if r.get("bench") == "kernel"]
    assert {r["op"] for r in kernels} == {"attention", "mlp_gelu"} and len(kernels) == 17
    # On the CPU the cuDNN and memory-efficient backends do not run: a row says so instead of a failure.
    assert [r["choice"] for r in kernels if r["ms"] is None] == ["cudnn", "efficient"] * 2
    assert all(r["rel_err"] < 0.02 for r in kernels if r.get("rel_err") is not None)
    assert "=== torchrun --nproc_per_node 1" in log
    # Its working files under this call's SCRATCH only (a concurrent call, e.g. a mutation run's, has its own).
    assert (tmp_path / "scratch" / "torchrun" / "flow_matching_final.pt").is_file()
    assert (tmp_path / "scratch" / "data" / "train").is_dir() and (tmp_path / "scratch" / "latent").is_dir()
    assert "1 rank(s) (torchrun, gloo) on cpu" in log  # the multi-GPU path (NCCL on the GPU), not a world of one
    latent = log[log.index("=== train_vqvae.py, then train_flow_matching.py on its latents"):]
    assert "latent flow matching: 4x2x2 latents" in latent and "samples.npz" in latent
    table = log[log.index("=== table"):]
    assert table.count("| train ") == 10 and table.count("| sample ") == 5 and table.count("| kernel ") == 17
    assert ", SDPA math |" in table and ", meanflow |" in table and ", fp32 residual |" in table and ", muon |" in table
    if os.environ.get("FID_INCEPTION_WEIGHTS"):   # CI builds them; the speedrun stage scores with them
        with open(out / "speedrun.jsonl") as f:
            rows = [json.loads(line) for line in f]
        assert [(r["sampler"], r["nfe"]) for r in rows] == [("midpoint", 4), ("ab2", 2)]
        assert all(r["steps"] > 0 and r["num_samples"] == 8 and math.isfinite(r["fid"]) for r in rows)
        assert table.count("| speedrun repo tiny") == 2 and "ab2 2 steps = 2 NFE" in table
    else:
        assert "speedrun skipped: no FID Inception weights" in log


def test_baseline_stage_measures_the_rows_extra_is_read_against(tmp_path):
    """On another card than the first job's, `baseline extra` puts the compiled training step and
    compiled sampling at full batch beside extra's rows, so ratios never cross cards."""
    out = tmp_path / "out"
    env = dict(os.environ, SMOKE="1", GPU_DIR=str(tmp_path / "none"), OUT=str(out), GPU_CHECK_BUDGET="100000",
               SCRATCH=str(tmp_path / "scratch"), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "baseline"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in log, log[-3000:]
    with open(out / "gpu_check.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [(r["bench"], r["config"]["compile"], r["config"]["compile_mode"]) for r in rows if r["bench"] == "train"] \
        == [("train", True, "blocks")]
    assert [(r["compile_mode"], r["batch_size"]) for r in rows if r["bench"] == "sample"] == [("default", 4)]


def test_the_table_reads_a_train_row_per_step_at_the_median_window():
    """The profile holds one window's launches (steps_per_window steps); ms/step is the median
    window's, the one images/s comes from."""
    from benchmarks.gpu_table import describe
    row = {"bench": "train", "config": {"hidden_size": 768, "depth": 12, "batch_size": 128, "mixed_precision": "bf16",
                                        "compile": True, "compile_mode": "blocks"},
           "images_per_s": 2000.0, "mfu": 0.3, "step_seconds": [0.05, 0.07, 0.06], "steps_per_window": 15,
           "profile": {"busy": 0.98, "launches": 15 * 1400}, "warmup_seconds": 12.0, "sync_check": "none"}
    [(what, figure, note)] = describe(row)
    assert "60.0 ms/step" in note and "1400 launches/step" in note and "MFU 30.0%" in figure


def test_the_table_gives_a_sample_rows_mfu_and_ceiling():
    from benchmarks.gpu_table import describe
    row = {"bench": "sample", "config": {"sampler": "midpoint"}, "num_steps": 17, "nfe": 34, "cfg_scale": 1.5,
           "batch_size": 1000, "compile_mode": "default", "images_per_s": 141.0, "nfe_per_s": 4794.0,
           "mfu": 0.446, "images_per_s_at_peak": 316.2, "first_batch_seconds": 20.0}
    [(what, figure, note)] = describe(row)
    assert "(34 NFE)" in what and figure == "141.0 img/s, 4,794 NFE/s, MFU 44.6% (ceiling 316 img/s)"


def test_the_job_reads_the_files_the_preparation_writes():
    """Every input gpu_check.sh reads from $GPU_DIR is a name gpu_prepare.sh writes into .gpu/: a
    renamed file would skip its stage on the GPU with one line (the smoke form reads other paths)."""
    import re
    check = open(os.path.join(ROOT, "benchmarks", "gpu_check.sh")).read()
    prepare = open(os.path.join(ROOT, "benchmarks", "gpu_prepare.sh")).read()
    read = set(re.findall(r'\$GPU_DIR"?/([\w.]+\.(?:pth|tar\.gz))', check))
    written = set(re.findall(r"\.gpu/([\w.]+\.(?:pth|tar\.gz))", prepare))
    assert read == written == {"cifar10_train.tar.gz", "fid_inception_fp16.pth"}, (read, written)
