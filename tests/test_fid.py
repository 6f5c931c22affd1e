"""FID plumbing with a tiny stand-in feature network: the distance, the inputs, the sweep, training.

The real TF Inception runs only in the slow test, when FID_INCEPTION_WEIGHTS names a weights
file (built by make_fid_inception_weights.py); everything else needs no download.
"""

import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("torch_fidelity", reason="FID needs requirements-eval.txt")

import evaluate_fid  # noqa: E402
from flow_matching import SamplingSettings  # noqa: E402
import train_flow_matching  # noqa: E402
from evaluation import fid, sampling  # noqa: E402
from tests.conftest import TINY_FLAGS, StandIn, write_image_folder  # noqa: E402


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(fid, "InceptionFeatures", StandIn)
    StandIn.calls = 0
    return StandIn


def random_images(n, seed, size=8):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_fid_of_a_set_with_itself_is_zero_and_of_another_set_is_not(stand_in):
    net = stand_in()
    a = fid.image_statistics(random_images(40, 0), net, batch_size=7)
    b = fid.image_statistics(random_images(40, 1), net, batch_size=40)
    assert a["mu"].dtype == np.float64 and a["sigma"].shape == (8, 8)
    assert abs(fid.frechet_distance(a, a)) < 1e-9
    assert fid.frechet_distance(a, b) > 1e-4


def test_frechet_distance_matches_a_float64_reference_on_known_gaussians():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    # Reference: tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2), all symmetric, in float64.
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(inner))
    got = fid.frechet_distance({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2})
    assert got == pytest.approx(reference, rel=1e-10)
    # Closed form: N(0, I) vs N(1, 4 I) in d dimensions is d * 1 + d * (1 - 2)^2 = 2 d.
    assert fid.frechet_distance({"mu": np.zeros(d), "sigma": np.eye(d)},
                                {"mu": np.ones(d), "sigma": 4 * np.eye(d)}) == pytest.approx(2 * d, rel=1e-12)
    # Statistics of features drawn from a known Gaussian are their float64 mean and covariance.
    features = rng.multivariate_normal(mu1, s1, size=500).astype(np.float32)
    stats = fid.statistics(features)
    np.testing.assert_allclose(stats["mu"], features.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats["sigma"], np.cov(features.astype(np.float64), rowvar=False), rtol=1e-12)
    np.testing.assert_allclose(stats["sigma"], s1, atol=1.0)


@pytest.fixture
def folder(tmp_path):
    """18 native 8x8 RGB images in 3 classes: read at 8px they are the raw pixels."""
    return write_image_folder(tmp_path / "ref", classes=3, per_class=6, size=(8, 8))


def run(tmp_path, *flags):
    return evaluate_fid.main([*flags, "--fid_cache_dir", str(tmp_path / "cache"), "--device", "cpu",
                              "--num_workers", "0", "--output_jsonl", str(tmp_path / "fid.jsonl")])


def rows(tmp_path):
    with open(tmp_path / "fid.jsonl") as f:
        return [json.loads(line) for line in f]


def test_npz_of_the_reference_images_scores_zero_and_reuses_the_cache(stand_in, folder, tmp_path, capsys):
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names)
    images = np.stack([np.asarray(Image.open(p)) for p in paths])[::-1]
    npz = tmp_path / "samples.npz"
    np.savez(npz, images=images, labels=np.zeros(len(images), np.int64))
    flags = ["--samples", str(npz), "--ref_dataset", "imagefolder", "--ref_data_dir", folder]
    assert run(tmp_path, *flags) == 0
    assert "written to" in capsys.readouterr().out
    calls = stand_in.calls
    assert run(tmp_path, *flags, "--num_samples", "10") == 0
    out = capsys.readouterr().out
    assert "read from" in out and stand_in.calls == calls + 10   # the reference was not recomputed
    full, part = rows(tmp_path)
    assert full["fid"] == pytest.approx(0, abs=1e-9) and full["num_samples"] == 18
    assert full["source"] == "samples" and full["reference_num_images"] == 18 and full["features"] == "stand-in"
    assert part["num_samples"] == 10 and part["fid"] > 1e-4
    assert len(os.listdir(tmp_path / "cache")) == 1


def test_a_reference_folder_changed_in_place_is_scored_again(stand_in, folder, tmp_path, capsys):
    """The reference statistics' cache is keyed on the folder's files: an image rewritten in place
    (same name, same count) makes new statistics instead of reading the stale ones."""
    assert run(tmp_path, "--images", folder, "--ref_data_dir", folder) == 0
    first = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names)[0]
    Image.fromarray(random_images(1, 7)[0]).save(first)
    capsys.readouterr()
    assert run(tmp_path, "--images", folder, "--ref_data_dir", folder) == 0
    assert "written to" in capsys.readouterr().out
    assert len(os.listdir(tmp_path / "cache")) == 2


def test_images_source_and_reference_subsets(stand_in, folder, tmp_path):
    assert run(tmp_path, "--images", folder, "--ref_data_dir", folder) == 0
    assert run(tmp_path, "--images", folder, "--ref_data_dir", folder, "--ref_num_images", "9") == 0
    same, subset = rows(tmp_path)
    assert same["fid"] == pytest.approx(0, abs=1e-9) and same["source"] == "images"
    assert subset["reference_num_images"] == 9 and subset["fid"] > 1e-4
    assert len(os.listdir(tmp_path / "cache")) == 2


def train_tiny(tmp_path, data, *extra):
    flags = TINY_FLAGS + ["--data_dir", data, "--checkpoint_dir", str(tmp_path / "ckpt"),
                          "--sample_dir", str(tmp_path / "samples"), "--fid_cache_dir", str(tmp_path / "cache"),
                          *extra]
    assert train_flow_matching.main(flags) == 0
    return str(tmp_path / "ckpt" / "flow_matching_final.pt")


def test_checkpoint_sweep_prints_a_table_and_appends_every_row(stand_in, folder, tmp_path, capsys):
    checkpoint = train_tiny(tmp_path, folder, "--train_steps", "2")
    assert run(tmp_path, "--checkpoint", checkpoint, "--num_samples", "6", "--batch_size", "4",
               "--samplers", "euler", "heun", "--num_steps_list", "1", "2", "--cfg_scales", "1", "2.5") == 0
    out = capsys.readouterr().out
    table = out[out.index("FID of "):].splitlines()
    assert "vs 18 images of" in table[0]
    assert table[1].split() == ["samples", "sampler", "steps", "NFE", "shift", "cfg_scale", "interval", "FID"]
    got = rows(tmp_path)
    assert len(got) == 8 == len(table) - 3   # header, column names, rows, "appended ..."
    assert [(r["sampler"], r["num_steps"], r["nfe"], r["cfg_scale"], r["guided_nfe"]) for r in got[:4]] == [
        ("euler", 1, 1, 1.0, 0), ("euler", 1, 1, 2.5, 1), ("euler", 2, 2, 1.0, 0), ("euler", 2, 2, 2.5, 2)]
    assert {r["nfe"] for r in got[4:]} == {1, 3}   # heun: 2 NFE a step, the last one 1
    for r, line in zip(got, table[2:]):
        assert r["num_samples"] == 6 and r["step"] == 2 and r["weights"] == "ema" and r["source"] == "checkpoint"
        assert r["time_shift"] == 1.0 and r["guidance_interval"] is None  # the checkpoint's defaults
        assert np.isfinite(r["fid"]) and r["fid"] > 0
        assert line.split()[-1] == f"{r['fid']:.3f}"


def test_a_checkpoint_is_scored_by_default_with_its_own_sampling_settings_against_its_training_data(
        stand_in, folder, tmp_path):
    """Without sweep flags evaluate_fid samples with the checkpoint's solver and steps; the
    reference is its training data (for CIFAR-10 the train split, as published FIDs use)."""
    from utils.checkpoint import load_checkpoint
    checkpoint = train_tiny(tmp_path, folder, "--train_steps", "2", "--num_sampling_steps", "3")
    assert run(tmp_path, "--checkpoint", checkpoint, "--num_samples", "6", "--batch_size", "4") == 0
    row, = rows(tmp_path)
    assert (row["sampler"], row["num_steps"]) == (load_checkpoint(checkpoint)["config"]["sampler"], 3)
    args = evaluate_fid.build_parser().parse_args(["--checkpoint", checkpoint])
    reference = evaluate_fid.reference_set(args, {"dataset": "cifar10", "data_dir": "data"}, 32, 3)
    assert (reference.dataset, reference.split) == ("cifar10", "train")


def test_evaluate_fids_guidance_interval_seed_and_image_count_reach_what_it_scores(stand_in, folder, tmp_path):
    """--guidance_interval and --seed change the samples scored (and are recorded), and
    --images DIR --num_samples N scores N of the folder's images."""
    checkpoint = train_tiny(tmp_path, folder, "--train_steps", "4", "--lr", "0.01", "--warmup_steps", "0")
    base = ["--checkpoint", checkpoint, "--num_samples", "6", "--batch_size", "6", "--cfg_scales", "3"]
    assert run(tmp_path, *base) == 0
    assert run(tmp_path, *base, "--guidance_interval", "0.2", "0.8") == 0
    assert run(tmp_path, *base, "--seed", "1") == 0
    assert run(tmp_path, "--images", folder, "--num_samples", "9", "--ref_data_dir", folder) == 0
    plain, interval, seeded, images = rows(tmp_path)
    assert interval["guidance_interval"] == [0.2, 0.8] and interval["fid"] != plain["fid"]
    assert seeded["seed"] == 1 and seeded["fid"] != plain["fid"]
    assert images["num_samples"] == 9


def test_evaluate_fid_says_when_its_guidance_interval_holds_no_evaluation(stand_in, folder, tmp_path, capsys):
    """Euler at 2 steps evaluates at t = 0 and 0.5: the interval 0.6..0.9 guides none of them, so the
    row is cfg 1's samples; the run says so, and records 0 guided NFE."""
    checkpoint = train_tiny(tmp_path, folder, "--train_steps", "1")
    assert run(tmp_path, "--checkpoint", checkpoint, "--num_samples", "4", "--batch_size", "4", "--cfg_scales", "3",
               "--guidance_interval", "0.6", "0.9") == 0
    assert "note: euler at 2 steps evaluates the model at no t in the guidance interval 0.6..0.9" in capsys.readouterr().out
    assert rows(tmp_path)[0]["guided_nfe"] == 0


def test_a_reference_subset_is_drawn_across_a_sorted_folder(stand_in, folder, monkeypatch):
    """--ref_num_images N takes a fixed random subset: an ImageFolder is sorted by class, so its
    first N files would be one class (the first 6 of these 18 are all class 0); this one draws
    from more than one."""
    picked, real = [], fid.DataLoader
    monkeypatch.setattr(fid, "DataLoader", lambda dataset, **kw: picked.append(dataset.indices) or real(dataset, **kw))
    image_set = fid.ImageSet("imagefolder", folder, 8, num_images=6)
    fid.image_set_statistics(image_set, stand_in())
    dataset, _ = fid._load(image_set)
    assert len({dataset.targets[i] for i in picked[0]}) > 1
    assert picked[0] == sorted(picked[0]) and len(set(picked[0])) == 6


def test_fid_every_scores_against_fid_ref_dir(stand_in, image_folder, tmp_path, capsys):
    """--fid_ref_dir replaces the training folder as the periodic FID's reference."""
    other = write_image_folder(tmp_path / "other", classes=3, per_class=3)
    train_tiny(tmp_path, image_folder, "--train_steps", "2", "--fid_every", "2", "--fid_num_samples", "6",
               "--fid_batch_size", "6", "--fid_ref_dir", other)
    assert f"FID reference: 9 images of {other}" in capsys.readouterr().out


def test_fid_labels_follow_the_reference_class_mix():
    """A model that draws the data's own class mix must not be scored against another mix."""
    assert fid.class_labels(7, 3).tolist() == fid.class_labels(7, 3, [5, 5, 5]).tolist() == [0, 1, 2, 0, 1, 2, 0]
    labels = fid.class_labels(20, 3, [60, 30, 10])
    assert torch.bincount(labels).tolist() == [12, 6, 2] and torch.bincount(labels[:10]).tolist() == [6, 3, 1]
    assert torch.bincount(fid.class_labels(7, 3, [6, 3, 1])).tolist() == [4, 2, 1]   # largest remainders of 4.2, 2.1, 0.7
    assert fid.class_labels(7, 3, [6, 3]).tolist() == [0, 1, 2, 0, 1, 2, 0]          # not the model's classes: balanced
    assert fid.class_labels(3, 0, None).tolist() == [-1, -1, -1]
    assert fid.label_mix(3, [60, 30, 10]) == "the reference's class mix (60 to 10 images a class)"
    assert fid.label_mix(3, [5, 5, 5]) == "each class equally often"
    # Why: two classes with distinct features, the reference 90/10. The data's own mix scores ~0, 50/50 does not.
    rng = np.random.default_rng(0)
    centre = np.zeros((2, 8))
    centre[1, 0] = 10.0

    def features(labels):
        return centre[labels] + rng.standard_normal((len(labels), 8))

    reference = fid.statistics(features(np.repeat([0, 1], [9000, 1000])))
    own_mix = fid.frechet_distance(fid.statistics(features(fid.class_labels(4000, 2, [9000, 1000]).numpy())), reference)
    balanced = fid.frechet_distance(fid.statistics(features(fid.class_labels(4000, 2).numpy())), reference)
    assert own_mix < 0.1 and balanced > 10


def test_a_checkpoint_and_fid_every_sample_the_reference_class_mix(stand_in, tmp_path, monkeypatch, capsys):
    uneven = write_image_folder(tmp_path / "uneven", classes=3, per_class=6, size=(8, 8))
    for c, keep in ((1, 2), (2, 1)):                     # 6, 2 and 1 images
        for i in range(keep, 6):
            os.remove(os.path.join(uneven, f"class_{c}", f"{i}.png"))
    periodic_labels, checkpoint_labels = [], []
    from evaluation import periodic
    monkeypatch.setattr(periodic, "generate_images",
                        lambda ema, labels, settings, **kw: (periodic_labels.append(labels),
                                                             sampling.generate_images(ema, labels, settings, **kw))[1])
    checkpoint = train_tiny(tmp_path, uneven, "--train_steps", "2", "--fid_every", "2", "--fid_num_samples", "9",
                            "--fid_batch_size", "9")
    assert "labels: the reference's class mix (6 to 1 images a class)" in capsys.readouterr().out
    generate = sampling.SamplingRun.generate
    monkeypatch.setattr(sampling.SamplingRun, "generate",
                        lambda self, labels, settings, **kw: (checkpoint_labels.append(labels),
                                                              generate(self, labels, settings, **kw))[1])
    assert run(tmp_path, "--checkpoint", checkpoint, "--num_samples", "18", "--batch_size", "18") == 0
    assert "labels: the reference's class mix (6 to 1 images a class)" in capsys.readouterr().out
    assert [torch.bincount(labels).tolist() for labels in periodic_labels + checkpoint_labels] == [[6, 2, 1], [12, 4, 2]]
    assert rows(tmp_path)[0]["labels"] == "the reference's class mix (6 to 1 images a class)"


@pytest.mark.parametrize("flags, expected", [
    (["--samples", "missing.npz", "--ref_data_dir", "REF"], "--samples missing.npz does not exist"),
    (["--samples", "NPZ", "--ref_data_dir", "REF", "--num_samples", "99"], "--num_samples 99 exceeds the 18 images"),
    (["--samples", "NPZ"], "--ref_data_dir is required"),
    (["--samples", "NPZ", "--ref_data_dir", "REF", "--cfg_scales", "2"], "--cfg_scales only apply to --checkpoint"),
    (["--images", "REF", "--ref_data_dir", "REF", "--inception_weights", "nowhere.pth"], "--inception_weights nowhere.pth is not a file"),
    (["--images", "REF", "--ref_data_dir", "REF", "--ref_num_images", "40"], "40 images were asked of"),
    (["--checkpoint", "missing.pt"], "checkpoint missing.pt does not exist"),
    (["--checkpoint", "missing.pt", "--ema_sigma_rels", "0.05"], "checkpoint missing.pt does not exist"),
    (["--checkpoint", "missing.pt", "--cfg_scales", "1", "inf"], "--cfg_scales: must be a finite number, got 'inf'"),
    (["--samples", "NPZ", "--ref_data_dir", "REF", "--time_shifts", "2"], "--time_shifts only apply to --checkpoint"),
    (["--checkpoint", "missing.pt", "--time_shifts", "1", "0"], "--time_shifts entries must be > 0 (1 = a uniform grid), got [1.0, 0.0]"),
    (["--checkpoint", "missing.pt", "--guidance_interval", "0.8", "0.2"], "--guidance_interval A B must satisfy 0 <= A <= B <= 1, got 0.8 0.2"),
    (["--checkpoint", "missing.pt", "--guidance_interval", "0", "1.5"], "--guidance_interval A B must satisfy"),
    (["--samples", "NPZ", "--ref_data_dir", "REF", "--ref_split", "test"], "--ref_split test picks a split of "
     "--ref_dataset cifar10; this reference is an ImageFolder"),
    (["--samples", "NPZ", "--ref_data_dir", "ROOT"], "--ref_data_dir ROOT holds the splits test, train, not classes"),
    (["--images", "ROOT", "--ref_data_dir", "REF"], "--images ROOT holds the splits test, train, not classes"),
    (["--samples", "NPZ", "--ref_data_dir", "REF/class_0"], "--ref_data_dir REF/class_0 is not a readable ImageFolder"),
    # what a generate run killed mid-write used to leave, and a .npy under the npz's name
    (["--samples", "TRUNCATED", "--ref_data_dir", "REF"], "is not a samples.npz with an 'images' array (BadZipFile"),
    (["--samples", "NPY", "--ref_data_dir", "REF"], "is not a samples.npz with an 'images' array (TypeError"),
    (["--samples", "EMPTY", "--ref_data_dir", "REF"], "is not a samples.npz with an 'images' array (EOFError"),
    (["--samples", "NPZ", "--ref_data_dir", "REF", "JSONL_IS_A_FOLDER"], "fid.jsonl is a folder or a read-only file"),
    (["--samples", "ONE", "--ref_data_dir", "REF"], "holds 1 image(s); FID needs at least 2"),
    (["--samples", "FLOATS", "--ref_data_dir", "REF"], "'images' must be uint8 (N, H, H, C) with C = 1 or 3, got float32"),
])
def test_bad_input_is_one_line_and_exit_code_2(stand_in, folder, tmp_path, capsys, flags, expected):
    npz = tmp_path / "samples.npz"
    np.savez(npz, images=random_images(18, 0))
    root = tmp_path / "cifar"   # a dataset root: its subfolders are splits
    for split in ("train", "test"):
        write_image_folder(root / split, classes=2, per_class=2, size=(8, 8))
    truncated, npy, empty = tmp_path / "truncated.npz", tmp_path / "array.npz", tmp_path / "empty.npz"
    empty.write_bytes(b"")
    truncated.write_bytes(npz.read_bytes()[:len(npz.read_bytes()) // 2])
    with open(npy, "wb") as f:
        np.save(f, random_images(2, 0))
    if "JSONL_IS_A_FOLDER" in flags:
        flags = [f for f in flags if f != "JSONL_IS_A_FOLDER"]
        (tmp_path / "fid.jsonl").mkdir()
    one, floats = tmp_path / "one.npz", tmp_path / "floats.npz"
    np.savez(one, images=random_images(1, 0))
    np.savez(floats, images=random_images(4, 0).astype(np.float32))
    subst = {"NPZ": str(npz), "REF": folder, "ROOT": str(root), "TRUNCATED": str(truncated), "NPY": str(npy),
             "EMPTY": str(empty), "ONE": str(one), "FLOATS": str(floats)}
    flags = [subst.get(f, f.replace("REF", folder)) for f in flags]
    expected = expected.replace("ROOT", str(root)).replace("REF", folder)
    try:
        code = run(tmp_path, *flags)
    except SystemExit as exit_info:  # a bad flag value: argparse exits itself
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err


def test_generate_images_is_the_same_for_any_batch_size():
    def model(x, t, y):
        return -x + y.float().reshape(-1, 1, 1, 1) / 3

    labels = fid.class_labels(7, 3)
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    seen = []
    kwargs = dict(settings=SamplingSettings("heun", 3), shape=(3, 4, 4), num_classes=3, seed=5)
    whole, nfe = sampling.generate_images(model, labels, batch_size=7, **kwargs)
    parts, _ = sampling.generate_images(model, labels, batch_size=3, **kwargs,
                                        on_batch=lambda first, batch: seen.append((first, len(batch))))
    assert whole.shape == (7, 4, 4, 3) and whole.dtype == np.uint8 and nfe == 5
    np.testing.assert_array_equal(whole, parts)
    assert seen == [(0, 3), (3, 3), (6, 1)]


def test_a_padded_last_batch_keeps_the_forward_at_one_shape_and_the_same_samples():
    rows = []

    def model(x, t, y):
        rows.append(len(x))
        return -x + y.float().reshape(-1, 1, 1, 1) / 3

    labels = fid.class_labels(7, 3)
    kwargs = dict(settings=SamplingSettings("euler", 2, cfg_scale=2.0), shape=(3, 4, 4), num_classes=3, seed=5)
    plain, _ = sampling.generate_images(model, labels, batch_size=3, **kwargs)
    assert sorted(set(rows)) == [2, 6]          # CFG doubles the rows: the last batch of 1 is a second shape
    rows.clear()
    seen = []
    padded, _ = sampling.generate_images(model, labels, batch_size=3, pad_last_batch=True, **kwargs,
                                         on_batch=lambda first, batch: seen.append((first, len(batch))))
    assert set(rows) == {6} and seen == [(0, 3), (3, 3), (6, 1)]
    np.testing.assert_array_equal(padded, plain)
    rows.clear()
    sampling.generate_images(model, labels[:2], batch_size=3, pad_last_batch=True, **kwargs)
    assert set(rows) == {4}                     # a single batch is not padded: it is the only shape


def test_fid_every_logs_fid_to_metrics_jsonl(stand_in, image_folder, tmp_path):
    train_tiny(tmp_path, image_folder, "--train_steps", "4", "--fid_every", "2", "--fid_num_samples", "6",
               "--fid_batch_size", "4")
    with open(tmp_path / "ckpt" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    fids = [r for r in records if "fid" in r]
    assert [r["step"] for r in fids] == [2, 4]
    for r in fids:
        assert np.isfinite(r["fid"]) and r["fid_num_samples"] == 6 and r["fid_nfe"] == 2 and r["fid_cfg_scale"] == 3.0
    assert len(os.listdir(tmp_path / "cache")) == 1


def test_a_stop_signal_during_fid_abandons_it_and_checkpoints_at_once(stand_in, image_folder, tmp_path,
                                                                       monkeypatch, capsys):
    """SIGTERM in the middle of a periodic FID's sampling: the FID is dropped after the batch in
    flight and the stop checkpoint written, instead of first sampling the rest (a 10,000-sample FID
    outlasts the 30 s torchrun and SLURM grant before SIGKILL, which left no stop checkpoint)."""
    batches = []
    real_sample = sampling.flow_matching.sample

    def sample(*args, **kwargs):
        batches.append(1)
        if len(batches) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(sampling.flow_matching, "sample", sample)
    flags = TINY_FLAGS + ["--data_dir", image_folder, "--checkpoint_dir", str(tmp_path / "ckpt"),
                          "--sample_dir", str(tmp_path / "samples"), "--fid_cache_dir", str(tmp_path / "cache"),
                          "--train_steps", "100", "--fid_every", "2", "--fid_num_samples", "40", "--fid_batch_size", "4"]
    with pytest.raises(SystemExit) as stopped:
        train_flow_matching.main(flags)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert len(batches) == 2                    # of the FID's 10 batches
    out = capsys.readouterr().out
    assert "FID of step 2 abandoned for the stop signal" in out and "stopped by SIGTERM after step 2" in out
    assert os.path.isfile(tmp_path / "ckpt" / "checkpoint_0000002.pt")
    with open(tmp_path / "ckpt" / "metrics.jsonl") as f:
        assert not [r for r in map(json.loads, f) if "fid" in r]


@pytest.mark.parametrize("n", [8, 7])
def test_every_rank_asks_stop_as_often_whatever_its_share_of_batches(monkeypatch, n):
    """`stop` may hold a collective (the trainer's any_rank): with 3 or 2 batches over 2 ranks, both
    ranks ask it twice, once a round, even the rank with no batch in the last round."""
    def gather(mine, parts, dst):   # one process plays both ranks: rank 0 gathers its own batches
        if parts is not None:
            parts[:] = [mine, {}]

    monkeypatch.setattr(sampling.tdist, "gather_object", gather)
    asked = {}
    for rank in (0, 1):
        asked[rank] = 0

        def stop(rank=rank):
            asked[rank] += 1
            return False

        sampling.generate_images(lambda x, t, y: -x, fid.class_labels(n, 3), SamplingSettings(num_steps=1),
                                 shape=(3, 4, 4), num_classes=3, seed=0, batch_size=3, rank=rank, world_size=2, stop=stop)
    assert asked == {0: 2, 1: 2}


def test_fid_every_samples_at_fid_cfg_scale(stand_in, image_folder, tmp_path, monkeypatch):
    """The periodic FID guides at --fid_cfg_scale (not the grids' --cfg_scale), and says so."""
    from evaluation import periodic
    scales, real = [], periodic.generate_images
    monkeypatch.setattr(periodic, "generate_images", lambda ema, labels, settings, **kw: scales.append(settings.cfg_scale)
                        or real(ema, labels, settings, **kw))
    train_tiny(tmp_path, image_folder, "--train_steps", "2", "--fid_every", "2", "--fid_num_samples", "6",
               "--fid_batch_size", "4", "--fid_cfg_scale", "1.5", "--cfg_scale", "3")
    with open(tmp_path / "ckpt" / "metrics.jsonl") as f:
        fids = [r for r in map(json.loads, f) if "fid" in r]
    assert len(fids) == 1 and fids[0]["fid_cfg_scale"] == 1.5
    assert scales == [1.5]


def test_features_are_extracted_in_full_fp32_and_the_tf32_flags_restored():
    """Inception runs in true fp32 (FIDs comparable with published ones) even where the trainer
    turned TF32 on for CUDA matmuls and convolutions; the flags are back on afterwards."""
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, images):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
            return torch.zeros(len(images), 4)

    # Set and restored by hand: torch 2.11's cuBLAS flags object defeats monkeypatch's undo.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        fid.extract_features(Recorder(), fid.array_batches(random_images(3, 0), 2))
        assert seen == [(False, False)] * 2
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("flags, expected", [
    (["--fid_every", "-1"], "--fid_every must be >= 0"),
    (["--fid_every", "5", "--inception_weights", "nowhere.pth"], "--inception_weights nowhere.pth is not a file"),
    (["--fid_num_samples", "1"], "--fid_num_samples must be >= 2"),
])
def test_bad_fid_flags_exit_2(tiny_flags, capsys, flags, expected):
    with pytest.raises(SystemExit) as exit_info:
        train_flow_matching.main(tiny_flags + flags)
    assert exit_info.value.code == 2 and expected in capsys.readouterr().err


@pytest.mark.slow
def test_real_inception_matches_torch_fidelity_end_to_end(tmp_path):
    """Our pipeline (arrays -> features -> statistics -> distance) equals torch-fidelity's own."""
    weights = os.environ.get("FID_INCEPTION_WEIGHTS")
    if not weights or not os.path.isfile(weights):
        pytest.skip("set FID_INCEPTION_WEIGHTS to a FID Inception weights file")
    import torch_fidelity

    net = fid.InceptionFeatures(weights)
    a, b = random_images(12, 0, size=16), random_images(12, 1, size=16)
    ours = fid.frechet_distance(fid.image_statistics(a, net, batch_size=5),
                                fid.image_statistics(b, net, batch_size=12))

    class Images(torch.utils.data.Dataset):
        def __init__(self, images):
            self.images = torch.from_numpy(images).permute(0, 3, 1, 2)

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return self.images[i]

    theirs = torch_fidelity.calculate_metrics(
        input1=Images(a), input2=Images(b), fid=True, cuda=False, verbose=False, cache=False,
        feature_extractor_weights_path=weights, batch_size=12)["frechet_inception_distance"]
    assert net(torch.from_numpy(a[:2]).permute(0, 3, 1, 2)).shape == (2, 2048)
    assert ours == pytest.approx(theirs, rel=1e-4)


@pytest.mark.parametrize("model, expected", [
    (["--num_classes", "0"], "--fid_cfg_scale 1.5 needs a class-conditional model"),
    (["--class_dropout_prob", "0"], "--fid_cfg_scale 1.5 guides with the null label, which this model never trained"),
])
def test_a_bad_fid_cfg_scale_fails_before_the_first_step(stand_in, image_folder, tmp_path, capsys, model, expected):
    """An unconditional run, or one whose null label is never trained, cannot be guided:
    --fid_cfg_scale 1.5 is refused at start-up, not at the first FID evaluation (hours in)."""
    flags = TINY_FLAGS + ["--data_dir", image_folder, "--checkpoint_dir", str(tmp_path / "ckpt"),
                          "--sample_dir", str(tmp_path / "samples"), "--fid_cache_dir", str(tmp_path / "cache"),
                          *model, "--cfg_scale", "1", "--train_steps", "4", "--fid_every", "4",
                          "--fid_cfg_scale", "1.5"]
    assert train_flow_matching.main(flags) == 2
    assert expected in capsys.readouterr().err
    assert not list((tmp_path / "ckpt").glob("*.pt")) and not (tmp_path / "ckpt" / "metrics.jsonl").exists()
