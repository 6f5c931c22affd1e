"""The compact FID Inception weights (fp16 but for small tensors, no fc): what the writer keeps,
that it round-trips, that bad files fail in one line, and, with the real weights, that FID moves
by < 0.1%.

The real-weights test runs only when FID_INCEPTION_WEIGHTS names the fp32 file (CI builds it with
evaluation/fid_weights.sh) and ../shared/data/cifar10 holds the CIFAR-10 JPEG folders.
"""

import os

import pytest
import torch

pytest.importorskip("torch_fidelity", reason="FID needs requirements-eval.txt")

from evaluation import fid  # noqa: E402
from utils.checkpoint import state_fingerprint  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

CIFAR10 = os.path.join(ROOT, "..", "shared", "data", "cifar10")
# Images per set in the real-weights test. Each image goes through two networks at 299x299, about
# 0.3 s an image and network on a 2-core CPU, so CI compares 100 vs 100 (2 minutes; the relative
# difference, 2.6e-4, is the same as at 2,000 vs 2,000). FID_FP16_NUM_IMAGES=2000 runs the full
# comparison (30 minutes on 2 cores).
NUM_IMAGES = int(os.environ.get("FID_FP16_NUM_IMAGES", "100"))


def stand_in_weights():
    """A few keys of each kind the real file has: small conv and BatchNorm floats (kept fp32), a
    large conv (fp16), BatchNorm's int64 counter, and the fc layer the compact form drops."""
    gen = torch.Generator().manual_seed(0)
    return {"Conv2d_1a_3x3.conv.weight": torch.randn(4, 3, 3, 3, generator=gen) * 0.1,
            "Conv2d_1a_3x3.bn.running_var": torch.rand(4, generator=gen) + 1e-3,
            "Conv2d_1a_3x3.bn.num_batches_tracked": torch.tensor(7),
            "Mixed_7c.branch_pool.conv.weight": torch.randn(256, 256, 1, 1, generator=gen) * 0.01,
            "fc.weight": torch.randn(5, 4, generator=gen),
            "fc.bias": torch.randn(5, generator=gen)}


def test_the_compact_file_keeps_every_needed_key_drops_fc_and_round_trips(tmp_path):
    src, dst = tmp_path / "fp32.pth", tmp_path / "fp16.pth"
    original = stand_in_weights()
    torch.save(original, src)
    fid.write_compact_weights(str(src), str(dst))
    compact = fid.read_weights(str(dst))
    needed = set(original) - {"fc.weight", "fc.bias"}
    assert set(compact) == needed | {fid.COMPACT_MARKER}
    large = "Mixed_7c.branch_pool.conv.weight"
    assert original[large].numel() == fid.FP32_BELOW_NUMEL
    assert {k: compact[k].dtype for k in needed} == {k: torch.float16 if k == large else original[k].dtype
                                                    for k in needed}
    assert not list(tmp_path.glob("*.tmp*"))   # written atomically: no temporary left behind

    expanded = fid.expand_compact(compact)
    for k in needed:   # exactly the original, the large tensor rounded to fp16, all back in fp32
        want = original[k].half().float() if k == large else original[k]
        assert expanded[k].dtype == want.dtype and torch.equal(expanded[k], want), k
    assert not torch.equal(expanded[large], original[large])   # it was rounded, not kept
    assert {k: tuple(v.shape) for k, v in expanded.items() if k.startswith("fc.")} == fid.FC_SHAPES
    assert torch.isnan(expanded["fc.weight"]).all()   # never read for pool3; loud if it were

    # The CLI names the output beside the input by default and refuses to compact twice.
    assert fid.main(["--compact", str(src)]) == 0
    assert set(torch.load(tmp_path / "fp32_fp16.pth", weights_only=True)) == set(compact)
    with pytest.raises(ValueError, match="is a compact file already"):
        fid.write_compact_weights(str(dst), str(tmp_path / "again.pth"))


@pytest.mark.parametrize("content, expected", [
    (None, "--inception_weights {path} is not a file"),
    ("code", "--inception_weights {path} is not a state dict of tensors (UnpicklingError)"),
    ("list", "--inception_weights {path} is not a state dict of tensors (a list of other values)"),
    ("stand-in", "--inception_weights {path} does not fit the FID Inception (Error(s) in loading state_dict"),
])
def test_a_bad_compact_file_is_one_clear_line(tmp_path, content, expected):
    path = tmp_path / "fid_inception_fp16.pth"
    if content == "code":
        torch.save({fid.COMPACT_MARKER: fid.COMPACT_NOTE, "x": torch.nn.ReLU()}, path)
    elif content == "list":
        torch.save([torch.zeros(2)], path)
    elif content == "stand-in":   # compact, but of another network: keys missing, shapes wrong
        torch.save(fid.compact_state_dict(stand_in_weights()), path)
    with pytest.raises((FileNotFoundError, ValueError)) as info:
        fid.InceptionFeatures(str(path))
    message = str(info.value)
    assert len(message.splitlines()) == 1 and message.startswith(expected.format(path=path))
    assert not list(tmp_path.glob("*.tmp*"))


def test_a_bad_compact_input_exits_2_with_one_line(tmp_path, capsys):
    torch.save([1, 2], tmp_path / "list.pth")
    for argv, expected in [(["--compact", str(tmp_path / "none.pth")], "is not a file"),
                           (["--compact", str(tmp_path / "list.pth")], "is not a state dict of tensors"),
                           (["--compact", str(tmp_path / "list.pth"), "-o", str(tmp_path / "list.pth")],
                            "is the input file")]:
        assert fid.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err
    assert sorted(os.listdir(tmp_path)) == ["list.pth"]


@pytest.mark.slow
def test_fid_with_the_compact_weights_equals_fid_with_the_fp32_weights(tmp_path):
    """CIFAR-10 train vs test images at 32px (fixed subsets): FID from the compact file equals FID
    from the fp32 file within 0.1% relative, and both networks compute in fp32."""
    weights = os.environ.get("FID_INCEPTION_WEIGHTS")
    if not weights or not os.path.isfile(weights):
        pytest.skip("set FID_INCEPTION_WEIGHTS to a FID Inception weights file")
    if not all(os.path.isdir(os.path.join(CIFAR10, split)) for split in ("train", "test")):
        pytest.skip(f"{CIFAR10} has no train/ and test/ JPEG folders")
    compact = tmp_path / "fid_inception_fp16.pth"
    fid.write_compact_weights(weights, str(compact))
    assert os.path.getsize(compact) < 46e6   # fits a GPU job's 64 MiB beside its data

    sets = [fid.ImageSet("imagefolder", os.path.join(CIFAR10, split), 32, num_images=NUM_IMAGES)
            for split in ("train", "test")]
    scores = []
    names = [fid.InceptionFeatures(weights).name]
    for path in (weights, str(compact)):
        net = fid.InceptionFeatures(path)
        names.append(net.name)
        assert {p.dtype for p in net.parameters()} == {torch.float32}
        stats = [fid.image_set_statistics(s, net, batch_size=50)[0] for s in sets]
        scores.append(fid.frechet_distance(*stats))
    full, half = scores
    print(f"FID {NUM_IMAGES} vs {NUM_IMAGES}: fp32 {full:.4f}, compact {half:.4f}, "
          f"relative {(half - full) / full:+.2e}")
    assert full > 1 and half == pytest.approx(full, rel=1e-3)
    # Cached reference statistics key on the extractor's name: one per weights, the same per file.
    assert names[0] == names[1] != names[2]


def test_the_state_fingerprint_follows_every_value_and_name():
    state = stand_in_weights()
    base = state_fingerprint(state)
    assert state_fingerprint(dict(state)) == base
    nudged = dict(state, **{"Mixed_7c.branch_pool.conv.weight": state["Mixed_7c.branch_pool.conv.weight"] * 1.01})
    renamed = {("x" + k if k.startswith("fc.") else k): v for k, v in state.items()}
    assert len({base, state_fingerprint(nudged), state_fingerprint(renamed)}) == 3
