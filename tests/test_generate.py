"""generate_flow_matching.py: every flag and every bad input against tiny checkpoints."""

import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import generate_flow_matching
import train_flow_matching
from tests.conftest import TINY_FLAGS, write_image_folder
from utils.checkpoint import load_checkpoint, save_checkpoint


def _train(tmp_path_factory, name, extra):
    root = tmp_path_factory.mktemp(name)
    data = write_image_folder(root / "images", classes=3, per_class=4)
    ckpt_dir = root / "ckpt"
    flags = TINY_FLAGS + ["--data_dir", data, "--checkpoint_dir", str(ckpt_dir), "--train_steps", "3",
                          "--lr", "0.01", "--warmup_steps", "0"] + extra
    assert train_flow_matching.main(flags) == 0
    return str(ckpt_dir / "flow_matching_final.pt")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _train(tmp_path_factory, "cond", [])


@pytest.fixture(scope="module")
def uncond_checkpoint(tmp_path_factory):
    return _train(tmp_path_factory, "uncond", ["--num_classes", "0"])


def run(checkpoint, out, *flags):
    return generate_flow_matching.main(["--checkpoint", checkpoint, "--output_dir", str(out), "--device", "cpu",
                                        "--num_steps", "2", *flags])


def npz(out):
    data = np.load(os.path.join(out, "samples.npz"))
    return data["images"], data["labels"]


def test_random_samples_write_grid_images_and_npz(checkpoint, tmp_path, capsys):
    assert run(checkpoint, tmp_path, "--num_samples", "5", "--save_npz", "--batch_size", "2") == 0
    images, labels = npz(tmp_path)
    assert images.shape == (5, 8, 8, 3) and images.dtype == np.uint8
    assert labels.shape == (5,) and labels.dtype == np.int64 and set(labels) <= {0, 1, 2}
    names = sorted(os.listdir(tmp_path / "images"))
    assert names == [f"{i:06d}_class{label}.png" for i, label in enumerate(labels)]
    assert np.array_equal(np.array(Image.open(tmp_path / "images" / names[3])), images[3])
    assert Image.open(tmp_path / "grid.png").size == (3 * 10 + 2, 2 * 10 + 2)  # 5 images, 3 a row, 2px padding
    out = capsys.readouterr().out
    assert "2 NFE per sample" in out and "samples.npz" in out


def test_the_sampling_rate_leaves_out_the_time_spent_writing_files(checkpoint, tmp_path, monkeypatch, capsys):
    """images/s and NFE/s are the sampler's (what benchmarks and GPU budgets compare), not the disk's:
    PNG and npz writes are timed apart."""
    import time as time_module
    clock = [0.0]
    monkeypatch.setattr(time_module, "perf_counter", lambda: clock[0])
    write_images = generate_flow_matching.write_images

    def slow_disk(*args):
        clock[0] += 10.0
        write_images(*args)

    monkeypatch.setattr(generate_flow_matching, "write_images", slow_disk)
    from evaluation.sampling import SamplingRun
    sample = SamplingRun.generate

    def sample_in_2s(self, labels, settings, **options):
        clock[0] += 2.0
        return sample(self, labels, settings, **options)

    monkeypatch.setattr(SamplingRun, "generate", sample_in_2s)
    assert run(checkpoint, tmp_path, "--num_samples", "4", "--batch_size", "2") == 0
    out = capsys.readouterr().out
    assert "sampling 2.0s (2.0 images/s, 4 NFE/s on 1 rank(s)), writing 20.0s" in out, out


def test_a_run_killed_while_writing_the_npz_leaves_no_partial_file(checkpoint, tmp_path, monkeypatch):
    def savez_then_die(file, **arrays):   # the first bytes land, then the process is stopped
        (open(file, "wb") if isinstance(file, str) else file).write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt
    monkeypatch.setattr(np, "savez", savez_then_die)
    assert run(checkpoint, tmp_path, "--num_samples", "2", "--save_npz") == 130   # Ctrl-C: one line
    assert not (tmp_path / "samples.npz").exists()
    assert not [name for name in os.listdir(tmp_path) if name.startswith("samples.npz")]


def test_class_label(checkpoint, tmp_path):
    assert run(checkpoint, tmp_path, "--num_samples", "4", "--class_label", "2", "--save_npz") == 0
    assert npz(tmp_path)[1].tolist() == [2, 2, 2, 2]


def test_class_grid_has_a_row_per_class(checkpoint, tmp_path):
    assert run(checkpoint, tmp_path, "--class_grid", "--samples_per_class", "4", "--save_npz") == 0
    images, labels = npz(tmp_path)
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    grid = np.array(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (3 * 10 + 2, 4 * 10 + 2, 3)
    assert np.array_equal(grid[12:20, 32:40], images[7])  # row 1 (class 1), column 3


def test_same_seed_same_images_whatever_the_batch_size(checkpoint, tmp_path):
    assert run(checkpoint, tmp_path / "a", "--num_samples", "5", "--save_npz", "--batch_size", "5", "--cfg_scale", "2") == 0
    assert run(checkpoint, tmp_path / "b", "--num_samples", "5", "--save_npz", "--batch_size", "2", "--cfg_scale", "2") == 0
    (a, la), (b, lb) = npz(tmp_path / "a"), npz(tmp_path / "b")
    assert np.array_equal(la, lb)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # float summation order only
    assert run(checkpoint, tmp_path / "c", "--num_samples", "5", "--save_npz", "--seed", "1", "--cfg_scale", "2") == 0
    assert not np.array_equal(npz(tmp_path / "c")[0], a)


@pytest.mark.parametrize("base,flags,nfe", [
    ([], ["--sampler", "heun"], 3), ([], ["--sampler", "midpoint", "--num_steps", "3"], 6),
    ([], ["--sampler", "ab2", "--num_steps", "3"], 3),
    ([], ["--cfg_scale", "4.0"], 2), ([], ["--guidance_interval", "0.2", "0.8"], 2), ([], ["--weights", "model"], 2),
    ([], ["--precision", "bf16"], 2), ([], ["--time_shift", "3"], 2),
    (["--sampler", "heun"], ["--time_shift", "0.5"], 3)])
def test_solver_and_guidance_flags(checkpoint, tmp_path, capsys, base, flags, nfe):
    """Each flag runs its NFE and changes the samples against the same run without it (same seed and
    noise; defaults: euler 2 steps, the checkpoint's CFG scale, every t, EMA, fp32 on the CPU, a
    uniform grid)."""
    assert run(checkpoint, tmp_path / "default", "--num_samples", "2", "--save_npz", *base) == 0
    capsys.readouterr()
    assert run(checkpoint, tmp_path / "flagged", "--num_samples", "2", "--save_npz", *base, *flags) == 0
    assert f"{nfe} NFE per sample" in capsys.readouterr().out
    assert not np.array_equal(npz(tmp_path / "flagged")[0], npz(tmp_path / "default")[0])


def test_an_interval_no_evaluation_falls_in_is_said_and_samples_as_unguided(checkpoint, tmp_path, capsys):
    """Euler at 5 steps evaluates at t = 0, 0.2, ..., 0.8: a guidance interval of 0.85..0.95 holds
    none of them, so CFG 3 gives cfg 1's samples; the run says so instead of printing a scale it
    did not apply (and counts its guided NFE: 0; 2 with the interval 0.3..0.7)."""
    common = ["--num_samples", "2", "--save_npz", "--num_steps", "5", "--cfg_scale", "3"]
    assert run(checkpoint, tmp_path / "none", *common, "--guidance_interval", "0.85", "0.95") == 0
    out = capsys.readouterr().out
    assert ("note: euler at 5 steps evaluates the model at no t in the guidance interval 0.85..0.95: these samples "
            "are unguided (as at cfg_scale 1)") in out and "5 NFE per sample, 0 of them guided" in out
    assert run(checkpoint, tmp_path / "unguided", *common[:-1], "1") == 0
    assert np.array_equal(npz(tmp_path / "none")[0], npz(tmp_path / "unguided")[0])
    capsys.readouterr()
    assert run(checkpoint, tmp_path / "some", *common, "--guidance_interval", "0.3", "0.7") == 0
    out = capsys.readouterr().out
    assert "5 NFE per sample, 2 of them guided" in out and "note:" not in out


def test_the_steps_default_to_the_checkpoints(checkpoint, tmp_path, capsys):
    """Without --num_steps, generation takes the checkpoint's num_sampling_steps (2 in these runs;
    Euler: 2 NFE), e.g. a MeanFlow model's one or two."""
    assert generate_flow_matching.main(["--checkpoint", checkpoint, "--output_dir", str(tmp_path / "out"),
                                        "--device", "cpu", "--num_samples", "2"]) == 0
    assert re.search(r"\b2 NFE per sample", capsys.readouterr().out)


@pytest.mark.parametrize("choice, device, compiled", [("auto", "cuda", True), ("auto", "cpu", False),
                                                     ("true", "cpu", True), ("false", "cuda", False)])
def test_sampling_compiles_by_default_on_cuda_only(choice, device, compiled):
    """--compile auto (generate_flow_matching.py, evaluate_fid.py): compiled on CUDA (141 vs 113
    samples/s measured on an H200), eager on the CPU, where compiling costs more than it saves."""
    from evaluation.sampling import compiles
    assert compiles(choice, torch.device(device)) is compiled


def test_a_run_replaces_an_earlier_runs_samples(checkpoint, tmp_path, capsys):
    """A folder never mixes two runs' images (an ImageFolder FID of it would score both); files
    the script did not name are left alone."""
    assert run(checkpoint, tmp_path, "--num_samples", "5", "--save_npz") == 0
    (tmp_path / "images" / "notes.txt").write_text("mine")
    (tmp_path / "images" / "1000000_class0.png").write_bytes(b"")   # a run past 999,999 samples names 7 digits
    capsys.readouterr()
    assert run(checkpoint, tmp_path, "--num_samples", "2", "--class_label", "1") == 0
    assert "replacing an earlier run's 6 images and grid.png and samples.npz" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "images")) == ["000000_class1.png", "000001_class1.png", "notes.txt"]
    assert not (tmp_path / "samples.npz").exists()


def test_a_run_that_fails_midway_leaves_no_earlier_runs_grid(checkpoint, tmp_path, monkeypatch, capsys):
    """The earlier run's grid.png would look like this run's finished result."""
    assert run(checkpoint, tmp_path, "--num_samples", "4", "--save_npz") == 0

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(generate_flow_matching, "write_images", disk_full)
    assert run(checkpoint, tmp_path, "--num_samples", "2") == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["images"] and os.listdir(tmp_path / "images") == []


def test_weights_flag_selects_the_weights(checkpoint, tmp_path):
    assert run(checkpoint, tmp_path / "ema", "--num_samples", "3", "--save_npz") == 0
    assert run(checkpoint, tmp_path / "raw", "--num_samples", "3", "--save_npz", "--weights", "model") == 0
    assert not np.array_equal(npz(tmp_path / "ema")[0], npz(tmp_path / "raw")[0])


def test_unconditional_checkpoint(uncond_checkpoint, tmp_path):
    assert run(uncond_checkpoint, tmp_path, "--num_samples", "3", "--save_npz") == 0
    images, labels = npz(tmp_path)
    assert images.shape == (3, 8, 8, 3) and labels.tolist() == [-1, -1, -1]
    assert sorted(os.listdir(tmp_path / "images")) == ["000000.png", "000001.png", "000002.png"]


def not_a_flow_checkpoint(tmp_path):
    path = str(tmp_path / "other.pt")
    save_checkpoint({"kind": "vqvae", "model": {}, "config": {}}, path)
    return path


def without_label_dropout(checkpoint, tmp_path):
    """The checkpoint as trained with --class_dropout_prob 0 (and so --cfg_scale 1)."""
    ckpt = load_checkpoint(checkpoint)
    ckpt["config"].update(class_dropout_prob=0.0, cfg_scale=1.0)
    path = str(tmp_path / "no_dropout.pt")
    save_checkpoint(ckpt, path)
    return path


def config_edited(checkpoint, tmp_path):
    """A checkpoint whose config no longer describes its weights (edited, or older code's)."""
    ckpt = load_checkpoint(checkpoint)
    ckpt["config"]["depth"] += 1
    path = str(tmp_path / "edited.pt")
    save_checkpoint(ckpt, path)
    return path


def truncated(checkpoint, tmp_path):
    path = str(tmp_path / "cut.pt")
    with open(checkpoint, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read()[:3000])
    return path


@pytest.mark.parametrize("case,needle", [
    ("missing", "does not exist"),
    ("truncated", "truncated"),
    ("other_kind", "not a 'flow_matching'"),
    ("label_range", "--class_label 3 is out of range"),
    ("uncond_label", "unconditional"),
    ("uncond_grid", "unconditional"),
    ("uncond_cfg", "--cfg_scale 2.0 needs a class-conditional model"),
    ("steps", "--num_steps must be >= 1"),
    ("samples", "--num_samples must be >= 1"),
    ("sampler", "invalid choice: 'no_such_sampler'"),
    ("output", "cannot be written"),
    ("cfg_inf", "--cfg_scale: must be a finite number, got 'inf'"),
    ("interval_nan", "--guidance_interval: must be a finite number, got 'nan'"),
    ("interval_order", "--guidance_interval A B must satisfy 0 <= A <= B <= 1, got 0.9 0.1"),
    ("shift", "--time_shift must be > 0 (1 = a uniform grid), got -1.0"),
    ("shift_inf", "--time_shift: must be a finite number, got 'inf'"),
    ("untrained_null", "--cfg_scale 4.0 guides with the null label, which this model never trained"),
    ("grid_and_label", "--class_grid draws every class; it cannot be combined with --class_label 1"),
    ("grid_and_count", "--num_samples 5 with --class_grid: the grid draws (classes x --samples_per_class)"),
    ("per_class_no_grid", "--samples_per_class 4 sets the columns of --class_grid: add --class_grid"),
    ("per_class_zero", "--samples_per_class must be >= 1, got 0"),
    ("seed_wide", "--seed must be in [0, 2^32), got 4294967296"),   # would alias --seed 0's noise
    ("config_edited", "weights do not fit the model its own config describes"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(checkpoint, uncond_checkpoint, tmp_path, capsys, case, needle):
    out = tmp_path / "out"
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    argv = {
        "missing": ["--checkpoint", str(tmp_path / "nope.pt")],
        "truncated": ["--checkpoint", truncated(checkpoint, tmp_path)],
        "other_kind": ["--checkpoint", not_a_flow_checkpoint(tmp_path)],
        "label_range": ["--checkpoint", checkpoint, "--class_label", "3"],
        "uncond_label": ["--checkpoint", uncond_checkpoint, "--class_label", "0"],
        "uncond_grid": ["--checkpoint", uncond_checkpoint, "--class_grid"],
        "uncond_cfg": ["--checkpoint", uncond_checkpoint, "--cfg_scale", "2.0"],
        "steps": ["--checkpoint", checkpoint, "--num_steps", "0"],
        "samples": ["--checkpoint", checkpoint, "--num_samples", "0"],
        "sampler": ["--checkpoint", checkpoint, "--sampler", "no_such_sampler"],
        "output": ["--checkpoint", checkpoint, "--output_dir", str(blocker / "sub")],
        "cfg_inf": ["--checkpoint", checkpoint, "--cfg_scale", "inf"],
        "interval_nan": ["--checkpoint", checkpoint, "--guidance_interval", "0", "nan"],
        "interval_order": ["--checkpoint", checkpoint, "--guidance_interval", "0.9", "0.1"],
        "shift": ["--checkpoint", checkpoint, "--time_shift", "-1"],
        "shift_inf": ["--checkpoint", checkpoint, "--time_shift", "inf"],
        "untrained_null": ["--checkpoint", without_label_dropout(checkpoint, tmp_path), "--cfg_scale", "4"],
        "grid_and_label": ["--checkpoint", checkpoint, "--class_grid", "--class_label", "1"],
        "grid_and_count": ["--checkpoint", checkpoint, "--class_grid", "--num_samples", "5"],
        "per_class_no_grid": ["--checkpoint", checkpoint, "--samples_per_class", "4"],
        "per_class_zero": ["--checkpoint", checkpoint, "--class_grid", "--samples_per_class", "0"],
        "seed_wide": ["--checkpoint", checkpoint, "--seed", str(2 ** 32)],
        "config_edited": ["--checkpoint", config_edited(checkpoint, tmp_path)],
    }[case]
    if case != "output":
        argv += ["--output_dir", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        code = generate_flow_matching.main(argv + ["--device", "cpu"])
        raise SystemExit(code)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("flag,compiled", [("true", True), ("false", False), ("auto", False)])
def test_compile_flag_samples_through_one_static_shape_compile(checkpoint, tmp_path, monkeypatch, capsys, flag,
                                                                compiled):
    """--compile true samples through torch.compile(model, dynamic=False) (auto: only on CUDA), with the
    images of the eager model: the wrapper is the only difference, and the smaller last batch runs
    padded, so the compiled forward sees one shape. torch.compile is replaced by a recorder here; the
    compiled graph itself is tested in tests/test_speed.py."""
    import torch
    calls, forwards = [], []

    def recorder(model, **kwargs):
        calls.append(kwargs)

        def compiled_model(*args):
            forwards.append(len(args[0]))
            return model(*args)
        return compiled_model

    monkeypatch.setattr(torch, "compile", recorder)
    assert run(checkpoint, tmp_path / "a", "--num_samples", "3", "--batch_size", "2", "--save_npz",
               "--compile", flag) == 0
    assert calls == ([{"dynamic": False}] if compiled else [])
    # 2 batches x 2 Euler steps, every forward through the wrapper, at one shape (CFG: 2 x 2 rows)
    assert forwards == ([4] * 4 if compiled else [])
    monkeypatch.undo()
    assert run(checkpoint, tmp_path / "b", "--num_samples", "3", "--save_npz", "--compile", "false") == 0
    (a, la), (b, lb) = npz(tmp_path / "a"), npz(tmp_path / "b")
    assert a.shape == b.shape and np.array_equal(la, lb)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # float summation order only


def test_the_readmes_python_sampling_makes_the_scripts_samples(checkpoint, tmp_path):
    """README's "From Python" lines run as printed (on this checkpoint's 3 classes) and give the
    samples generate_flow_matching.py makes with the same settings, seed and labels."""
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as f:
        readme = f.read()
    code = re.search(r"From Python.*?```python\n(.*?)```", readme, re.S).group(1)
    for text, here in (('"checkpoints/flow_matching_final.pt"', repr(checkpoint)), ("torch.arange(8)", "torch.arange(3)"),
                       (" range(8)", " range(3)")):
        assert text in code
        code = code.replace(text, here)
    scope = {}
    exec(code, scope)
    assert scope["nfe"] == 20
    assert run(checkpoint, tmp_path, "--class_grid", "--samples_per_class", "1", "--num_steps", "20",
               "--cfg_scale", "2", "--seed", "0", "--save_npz") == 0
    images, labels = npz(tmp_path)
    assert labels.tolist() == [0, 1, 2]
    from utils.images import to_uint8
    assert np.abs(to_uint8(scope["x"]).astype(int) - images.astype(int)).max() <= 1
