"""The speed work, pinned: the on-device loader gives the DataLoader's batches, bf16 stays bf16, the
CPU fp32 route gives bf16 numbers, parameter names are stable, the compiled model has no graph
break, the step reads nothing back to the host, and the benchmark FLOP count matches the model's
arithmetic."""

import dataclasses
import itertools
import json
import os
import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import count_flops_per_image
from configs.cli import make_config
from configs.flow_matching_config import FlowMatchingConfig
from configs.vqvae_config import VQVAEConfig
from data import device_loader as dl
from data import flow_matching_dataset as fdata
from data.datasets import listing_fingerprint
from data.flow_matching_dataset import get_flow_matching_dataloader
from data.vqvae_dataset import get_vqvae_dataloader, grid_images
from models import precision
from models.dit_2d import DiT2D, dit_from_config
from models.vqvae import vqvae_from_config
from tests.conftest import write_image_folder
from utils.distributed import DistInfo
from training.objectives import FlowMatchingObjective, VQVAEObjective
from training.trainer import Trainer


def folder_config(tmp_path, **kw):
    root = write_image_folder(tmp_path / "imgs", classes=3, per_class=7, size=(12, 10))
    values = {"dataset": "imagefolder", "data_dir": root, "image_size": 8, "batch_size": 2,
              "num_workers": 0, "data_cache_dir": str(tmp_path / "cache"), "hidden_size": 32,
              "depth": 2, "num_heads": 2, "device": "cpu"}
    values.update(kw)
    return make_config(FlowMatchingConfig, values)


# ----------------------------------------------------------------------------- data

@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_device_loader_yields_the_dataloader_batches(tmp_path, rank, world):
    """Same order, flips, rank share and mid-epoch resume, bit for bit, as the worker path."""
    workers, _ = get_flow_matching_dataloader(folder_config(tmp_path, data_loader="workers"), rank=rank, world_size=world)
    device, _ = get_flow_matching_dataloader(folder_config(tmp_path, data_loader="device"), rank=rank, world_size=world)
    assert isinstance(device, dl.DeviceLoader) and device.batch_size == workers.batch_size
    assert len(device) == len(workers)
    for epoch, start in ((0, 0), (1, 0), (1, 4)):
        batches = []
        for loader in (workers, device):
            loader.sampler.set_position(epoch, start)
            batches.append(list(loader))
        assert len(batches[0]) == len(batches[1]) > 0
        for (xa, ya), (xb, yb) in zip(*batches):
            assert xb.dtype == torch.float32 and torch.equal(xa, xb) and torch.equal(ya, yb)
    # That both paths do flip, about half the images, is test_training.py::test_half_of_the_images_are_mirrored.


def test_decoded_dataset_is_cached_and_reused(tmp_path, monkeypatch):
    config = folder_config(tmp_path, data_loader="device")
    get_flow_matching_dataloader(config)
    listing = listing_fingerprint(dl.uint8_dataset(config)[0], config.data_dir)
    path = dl.cache_path(config, listing)
    assert os.path.isfile(path) and path.startswith(str(tmp_path / "cache"))

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again although the cache exists")

    monkeypatch.setattr(dl, "decode_dataset", no_decode)
    images, labels, classes = dl.load_uint8_dataset(config, listing)
    assert images.dtype == torch.uint8 and images.shape == (21, 3, 8, 8) and classes == 3
    assert labels.tolist() == sorted(labels.tolist())

    # A file added to the folder: another key, so the next run decodes again instead of serving stale data.
    shutil.copy(os.path.join(config.data_dir, "class_0", "0.png"), os.path.join(config.data_dir, "class_0", "new.png"))
    assert dl.cache_path(config, listing_fingerprint(dl.uint8_dataset(config)[0], config.data_dir)) != path
    # The image decoder changed (as when 16-bit images came to be scaled): another key as well.
    import data.datasets as datasets_module
    before = listing_fingerprint(dl.uint8_dataset(config)[0], config.data_dir)
    monkeypatch.setattr(datasets_module, "IMAGE_DECODER", datasets_module.IMAGE_DECODER + 1)
    assert listing_fingerprint(dl.uint8_dataset(config)[0], config.data_dir) != before


def test_auto_picks_the_device_loader_when_the_dataset_fits(tmp_path, monkeypatch):
    assert isinstance(get_flow_matching_dataloader(folder_config(tmp_path, data_loader="auto"))[0], dl.DeviceLoader)
    monkeypatch.setattr(fdata, "free_memory", lambda device: 4 * 3 * 8 * 8 * 21 - 1)  # 21 images: 1 byte short
    loader, _ = get_flow_matching_dataloader(folder_config(tmp_path, data_loader="auto"))
    assert not isinstance(loader, dl.DeviceLoader)


def test_an_unwritable_cache_folder_is_refused_before_decoding(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("not a folder")
    config = folder_config(tmp_path, data_loader="device", data_cache_dir=str(tmp_path / "a_file" / "cache"))

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded although the cache cannot be written")

    monkeypatch.setattr(dl, "decode_dataset", no_decode)
    with pytest.raises(ValueError, match="--data_cache_dir .*a_file/cache cannot be written"):
        get_flow_matching_dataloader(config)


def test_cache_inside_the_data_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--data_cache_dir .* inside --data_dir"):
        folder_config(tmp_path, data_cache_dir=str(tmp_path / "imgs" / "cache"))


# ----------------------------------------------------------------------------- model

def tiny(depth=2):
    torch.manual_seed(0)
    model = DiT2D(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=depth, num_heads=2, num_classes=10)
    with torch.no_grad():  # open the zero-initialized gates and output layer
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def inputs(batch=4):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 8, 8, generator=gen), torch.rand(batch, generator=gen), torch.tensor([0, 3, 9, 10])


def test_parameter_names_and_shapes_are_stable():
    """Optimizers (Muon) group weights by these names and split the fused qkv / adaLN rows."""
    model = DiT2D(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == {
        "x_embedder.proj.weight": (32, 12), "x_embedder.proj.bias": (32,),
        "t_embedder.mlp.0.weight": (32, 256), "t_embedder.mlp.0.bias": (32,),
        "t_embedder.mlp.2.weight": (32, 32), "t_embedder.mlp.2.bias": (32,),
        "y_embedder.embedding.weight": (11, 32),
        "blocks.0.attn.qkv.weight": (96, 32), "blocks.0.attn.qkv.bias": (96,),
        "blocks.0.attn.proj.weight": (32, 32), "blocks.0.attn.proj.bias": (32,),
        "blocks.0.mlp.fc1.weight": (128, 32), "blocks.0.mlp.fc1.bias": (128,),
        "blocks.0.mlp.fc2.weight": (32, 128), "blocks.0.mlp.fc2.bias": (32,),
        "blocks.0.adaLN_modulation.1.weight": (192, 32), "blocks.0.adaLN_modulation.1.bias": (192,),
        "final_layer.linear.weight": (12, 32), "final_layer.linear.bias": (12,),
        "final_layer.adaLN_modulation.1.weight": (64, 32), "final_layer.adaLN_modulation.1.bias": (64,),
    }
    assert all(isinstance(m, torch.nn.Linear) for name, m in model.named_modules() if name.endswith(("qkv", "fc1")))


@pytest.mark.parametrize("route", ["native", "fp32"])
def test_bf16_autocast_keeps_the_residual_stream_in_bf16(route):
    model = tiny()
    seen = []
    for module in [model.x_embedder, *model.blocks, model.final_layer]:
        module.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    precision.set_cpu_bf16_matmul(route)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(*inputs())
    finally:
        precision.set_cpu_bf16_matmul("auto")
    assert seen == [torch.bfloat16] * 4


def test_cpu_fp32_route_gives_the_bf16_numbers():
    """The fp32 GEMMs on bf16-rounded operands match native bf16 GEMMs (fp32 accumulation) to
    bf16 rounding, in the output and in every gradient, and stay close to full fp32."""
    model = tiny()
    results = {}
    for route in ("native", "fp32"):
        precision.set_cpu_bf16_matmul(route)
        model.zero_grad()
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(*inputs())
        finally:
            precision.set_cpu_bf16_matmul("auto")
        out.float().square().mean().backward()
        results[route] = (out.float(), [p.grad.clone() for p in model.parameters()])
    # Measured: the outputs (|v| < 1) differ by at most one bf16 ulp (2^-8) in 15% of the entries,
    # 1.4e-4 on average; gradients by at most 2^-12. Bounds: 2 ulp, and a mean gap of 4e-4, which
    # fp32 weights left unrounded exceed (1.0e-3: 63% of the entries differ).
    gap = (results["fp32"][0] - results["native"][0]).abs()
    assert gap.max() <= 2 ** -7 and gap.mean() < 4e-4, (gap.max(), gap.mean())
    for a, b in zip(results["fp32"][1], results["native"][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=2 ** -11)
    full = model(*inputs())
    assert (results["fp32"][0] - full).abs().max() < 0.05 * full.abs().max()


@pytest.mark.parametrize("options", [{}, {"qk_norm": True, "mlp": "swiglu", "positions": "sincos_rope"},
                                     {"two_times": True}], ids=["dit", "qk_swiglu_rope", "meanflow"])
@pytest.mark.parametrize("route", ["fp32", "native", "no_autocast"])
def test_compiled_forward_and_backward_have_no_graph_breaks(options, route):
    """A graph break splits the compiled step into pieces with eager glue between them (the first
    GPU run counted 12 in a 2-block forward: compile was slower than eager). Forward with labels
    under bf16 autocast (both CPU routes, whose probes must not break the graph) or none, and its
    backward through the same single graph, with the eager gradients."""
    torch.manual_seed(0)
    model = DiT2D(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                  num_classes=10, **options)
    for p in model.parameters():   # open the zero-initialized gates, so every weight gets a gradient
        p.data.normal_(0, 0.1)
    x, t, y = inputs()
    args = (x, t, y, torch.rand(4)) if options.get("two_times") else (x, t, y)
    precision.set_cpu_bf16_matmul(route if route != "no_autocast" else "auto")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=route != "no_autocast")
    try:
        torch._dynamo.reset()
        with autocast:
            explanation = torch._dynamo.explain(model)(*args)
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
        grads = []
        for net in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
            model.zero_grad()
            with autocast:
                loss = net(*args).float().square().mean()
            loss.backward()
            grads.append([p.grad.clone() for p in model.parameters()])
    finally:
        precision.set_cpu_bf16_matmul("auto")
        torch._dynamo.reset()
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-2, atol=1e-3)


def test_fresh_model_is_exactly_zero_under_bf16_autocast():
    model = DiT2D(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*inputs())
    assert torch.equal(out.float(), torch.zeros_like(out.float()))


# ----------------------------------------------------------------------------- the step

class NoHostReads(TorchDispatchMode):
    """Fails on any op that copies a tensor value to the host (.item(), int(), bool()) or whose
    output size depends on values (nonzero, bincount, masked_select: a sync on CUDA, not on CPU)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                    torch.ops.aten.bincount.default, torch.ops.aten.masked_select.default):
            raise AssertionError(f"host read in the training step: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_training_step_reads_nothing_back_to_the_host(tmp_path, monkeypatch, precision):
    """On CUDA a host read stalls the pipeline: nothing in the step may read a value back."""
    config = folder_config(tmp_path, data_loader="device", mixed_precision=precision, batch_size=4,
                           micro_batch_size=2, train_steps=3)
    loader, info = get_flow_matching_dataloader(config, batch_size=2)
    config = dataclasses.replace(config, **info.config_fields(config))
    model = dit_from_config(config)
    objective = FlowMatchingObjective(config, torch.device("cpu"))
    trainer = Trainer(config, model, objective, loader, DistInfo(0, 0, 1, torch.device("cpu")))
    batches = iter(loader)
    with NoHostReads():
        for _ in range(2):
            loss, grad_norm, _ = trainer.train_step(next(batches) for _ in range(trainer.accum_steps))
    assert trainer.step == 2 and torch.isfinite(loss) and grad_norm > 0


def test_vqvae_training_step_reads_nothing_back_to_the_host(tmp_path):
    """The VQ-VAE's step too: codebook counts, EMA update and dead-code restarts stay on the device."""
    root = write_image_folder(tmp_path / "imgs", classes=2, per_class=4, size=(8, 8))
    config = make_config(VQVAEConfig, {"dataset": "imagefolder", "data_dir": root, "image_size": 8,
                                       "hidden_channels": 8, "num_res_blocks": 1, "downsample_factor": 2,
                                       "latent_channels": 3, "codebook_size": 16, "batch_size": 4,
                                       "num_workers": 0, "mixed_precision": "no", "device": "cpu",
                                       "checkpoint_dir": str(tmp_path / "ckpt")})
    loader = get_vqvae_dataloader(config, batch_size=4)
    model = vqvae_from_config(config)
    trainer = Trainer(config, model, VQVAEObjective(config, model, grid_images(loader, 2)), loader,
                      DistInfo(0, 0, 1, torch.device("cpu")))
    batches = list(itertools.islice(iter(loader), 2))  # read (and decoded) outside the step
    with NoHostReads():
        for batch in batches:
            loss, _, _ = trainer.train_step([batch])
    assert trainer.step == 2 and torch.isfinite(loss)


# ----------------------------------------------------------------------------- FLOPs

@pytest.mark.parametrize("space", ["pixels", "latents"])
def test_counted_flops_match_the_model_arithmetic(space):
    """8x8 RGB images, or 4x4x4 VQ-VAE latents of 16x16 images (the model sees the latent; the
    checkpoint path only has to exist)."""
    shape = ({"image_size": 8} if space == "pixels" else
             {"image_size": 16, "latent_size": 4, "latent_channels": 4, "vqvae_checkpoint": __file__})
    config = make_config(FlowMatchingConfig, {**shape, "hidden_size": 32, "depth": 2,
                                              "num_heads": 2, "num_classes": 10})
    D, L = 32, 2
    N, P = (16, 3 * 2 * 2) if space == "pixels" else (4, 4 * 2 * 2)
    block = 2 * N * (3 * D * D + D * D + 2 * 4 * D * D) + 4 * N * N * D + 2 * D * 6 * D
    embed = 2 * N * P * D + 2 * (256 * D + D * D)
    final = 2 * D * 2 * D + 2 * N * D * P
    forward = count_flops_per_image(config, backward=False)
    assert forward == L * block + embed + final
    train = count_flops_per_image(config, backward=True)
    assert 2.9 * forward < train <= 3 * forward


def test_sample_throughput_times_compiled_batches_at_one_shape(monkeypatch, capsys):
    """The benchmark's compiled sampling pads its last batch as generation does (10 samples at
    batch 4: no third batch shape to compile inside the timed loop); eager sampling does not."""
    from benchmarks import sample_throughput
    rows = {}

    def recorder(model, **kwargs):
        seen = rows.setdefault(kwargs.get("mode"), set())

        def compiled(*args):
            seen.add(len(args[0]))
            return model(*args)
        return compiled

    monkeypatch.setattr(torch, "compile", recorder)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: None)
    assert sample_throughput.main(["--preset", "tiny", "--hidden_size", "32", "--depth", "1", "--num_heads", "2",
                                   "--image_size", "8", "--device", "cpu", "--num_samples", "10", "--batch_sizes", "4",
                                   "--cfg_modes", "guided", "--num_steps", "1", "--compile_modes", "default"]) == 0
    assert rows == {"default": {8}}   # CFG: 2 x 4 rows, the last batch of 2 padded


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 80GB HBM3", 989.0),
                                        ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0),
                                        ("NVIDIA GB200", 2500.0), ("NVIDIA A100-SXM4-40GB", 312.0),
                                        ("NVIDIA GeForce RTX 4090", None)])
def test_the_peak_is_the_card_that_ran(monkeypatch, name, peak):
    """MFU's denominator is looked up by the card's name (the PCIe H100 is not the SXM one); an
    unknown card gets none rather than another card's."""
    from benchmarks.common import peak_half_tflops
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_half_tflops(torch.device("cuda", 0)) == (peak, name)
    assert peak_half_tflops(torch.device("cpu")) == (None, "cpu")


@pytest.mark.parametrize("flags, peak", [([], 100.0), (["--peak_tflops", "50"], 50.0),
                                         (["--mixed_precision", "no"], None)])
def test_mfu_uses_the_looked_up_peak_unless_one_is_given(tmp_path, monkeypatch, flags, peak):
    """The card's half-precision peak applies to bf16 / fp16 steps only (fp32 runs on other units);
    --peak_tflops overrides it."""
    from benchmarks import common, train_throughput
    monkeypatch.setattr(common, "peak_half_tflops", lambda device: (100.0, "NVIDIA Test"))
    rows = tmp_path / "rows.jsonl"
    train_throughput.main(["--preset", "tiny", "--hidden_size", "32", "--depth", "1", "--num_heads", "2",
                           "--image_size", "8", "--batch_size", "4", "--device", "cpu", "--steps", "1",
                           "--windows", "1", "--warmup", "0", "--mixed_precision", "bf16",
                           "--json", str(rows)] + flags)
    row = json.loads(rows.read_text())
    assert row["peak_tflops"] == peak
    assert row["mfu"] == (pytest.approx(row["tflops"] / peak) if peak else None)


def test_the_profile_table_lists_every_operator(tmp_path):
    """The table is written whole: the gpu_check smoke test asks whether the attention it restricted
    ran, and on CI that cheap wrapper fell below the first 80 rows of 100 (sorted by self time)."""
    from benchmarks.common import profile

    def regions():
        for i in range(100):
            with torch.profiler.record_function(f"region_{i:03d}"):
                torch.ones(1)
    table = tmp_path / "table.txt"
    profile(regions, torch.device("cpu"), str(table))
    text = table.read_text()
    assert all(f"region_{i:03d}" in text for i in range(100))


def test_a_backend_that_cannot_run_the_shape_is_one_line(monkeypatch, capsys):
    """--sdpa_backend flash on a CUDA shape flash lacks: exit 2 naming the backend and the head dim,
    not SDPA's page of per-backend warnings (the CPU kernels run any shape, so SDPA's error is
    stood in for here)."""
    from benchmarks import train_throughput

    def no_kernel(*args, **kwargs):
        raise RuntimeError("No available kernel. Aborting execution.")
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_kernel)
    argv = ["--preset", "tiny", "--hidden_size", "32", "--depth", "1", "--num_heads", "2", "--image_size", "8",
            "--batch_size", "4", "--device", "cpu", "--steps", "1", "--windows", "1", "--warmup", "0"]
    with pytest.raises(SystemExit) as exit_info:
        train_throughput.main(argv + ["--sdpa_backend", "flash"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--sdpa_backend flash cannot run this attention (head dim 16, " in err and "Traceback" not in err
    with pytest.raises(RuntimeError, match="No available kernel"):   # PyTorch's own pick failing is a real bug
        train_throughput.main(argv)


def test_sample_throughput_counts_the_rows_a_guidance_interval_saves(tmp_path):
    """Midpoint 5 steps evaluates t = 0, 0.1, ..., 0.9: guided only from t = 0.5, CFG forwards two
    rows at 5 of them and one at the other 5; unguided, one row at each. The counted TFLOP/s and the
    ceiling at the peak are those rows' forwards."""
    from benchmarks import sample_throughput
    out = tmp_path / "rows.jsonl"
    assert sample_throughput.main(["--preset", "tiny", "--hidden_size", "32", "--depth", "1", "--num_heads", "2",
                                   "--image_size", "8", "--device", "cpu", "--num_samples", "6", "--batch_sizes", "4",
                                   "--cfg_modes", "guided,unguided", "--compile_modes", "none", "--sampler", "midpoint",
                                   "--num_steps", "5", "--guidance_interval_start", "0.5", "--peak_tflops", "2",
                                   "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["cfg_scale"], r["nfe"], r["rows_per_sample"]) for r in rows] == [(3.0, 10, 15), (1.0, 10, 10)]
    flops = count_flops_per_image(make_config(FlowMatchingConfig, {"hidden_size": 32, "depth": 1, "num_heads": 2,
                                                                   "image_size": 8, "num_classes": 10}), backward=False)
    for r in rows:
        assert r["flops_per_row"] == flops and r["peak_tflops"] == 2.0
        assert r["tflops"] == pytest.approx(r["images_per_s"] * r["rows_per_sample"] * flops / 1e12)
        assert r["mfu"] == pytest.approx(r["tflops"] / 2)
        assert r["images_per_s_at_peak"] == pytest.approx(2e12 / (r["rows_per_sample"] * flops))


def fake_clock(monkeypatch):
    """time.perf_counter as a list cell the test advances: benchmark timings become exact."""
    import time
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    return clock


def test_train_throughput_times_its_windows_and_counts_forward_and_backward(tmp_path, monkeypatch):
    """With every step taking exactly 1 s: images/s is --steps x batch / a window's seconds (the
    median window, warm-up excluded), and TFLOP/s counts a forward and a backward per image."""
    from benchmarks import train_throughput
    from training.trainer import Trainer
    clock, real = fake_clock(monkeypatch), Trainer.train_step

    def one_second(self, micro_batches):
        out = real(self, micro_batches)
        clock[0] += 1.0
        return out

    monkeypatch.setattr(Trainer, "train_step", one_second)
    rows = tmp_path / "rows.jsonl"
    train_throughput.main(["--preset", "tiny", "--hidden_size", "32", "--depth", "1", "--num_heads", "2",
                           "--image_size", "8", "--batch_size", "4", "--device", "cpu", "--steps", "3",
                           "--windows", "2", "--warmup", "2", "--peak_tflops", "1", "--json", str(rows)])
    row = json.loads(rows.read_text())
    assert row["images_per_s"] == 4.0
    flops = count_flops_per_image(make_config(FlowMatchingConfig, {"hidden_size": 32, "depth": 1, "num_heads": 2,
                                                                   "image_size": 8, "num_classes": 10}),
                                  backward=True)
    assert row["tflops"] == pytest.approx(4.0 * flops / 1e12)


def test_sample_throughput_times_the_run_after_its_warm_up_batch(tmp_path, monkeypatch):
    """With every sample taking exactly 1 s: images/s is 1, the first (warm-up, compiling) batch left
    out of the timed run."""
    from benchmarks import sample_throughput
    clock, real = fake_clock(monkeypatch), sample_throughput.generate_images

    def one_second_a_sample(model, labels, settings, **options):
        out = real(model, labels, settings, **options)
        clock[0] += len(labels)
        return out

    monkeypatch.setattr(sample_throughput, "generate_images", one_second_a_sample)
    out = tmp_path / "rows.jsonl"
    assert sample_throughput.main(["--preset", "tiny", "--hidden_size", "32", "--depth", "1", "--num_heads", "2",
                                   "--image_size", "8", "--device", "cpu", "--num_samples", "6", "--batch_sizes", "4",
                                   "--cfg_modes", "guided", "--compile_modes", "none", "--num_steps", "1",
                                   "--json", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["seconds"] == 6.0 and row["images_per_s"] == 1.0


def test_kernel_timings_are_per_call(tmp_path, monkeypatch):
    """kernel_choices times --iters calls in each of --repeats windows: a row's ms is one call's."""
    from benchmarks import kernel_choices
    monkeypatch.setattr(kernel_choices, "time_call", lambda fn, device: (fn(), 3.0)[1])   # 3 calls, 3 s
    out = tmp_path / "rows.jsonl"
    kernel_choices.main(["--preset", "tiny", "--hidden_size", "32", "--depth", "1", "--num_heads", "2",
                         "--image_size", "8", "--batch_size", "4", "--sample_batch", "4", "--iters", "3",
                         "--repeats", "1", "--device", "cpu", "--json", str(out)])
    timed = [r for r in map(json.loads, out.read_text().splitlines()) if r.get("ms") is not None]
    assert timed and all(r["ms"] == 1000.0 for r in timed)


def test_timing_waits_for_the_gpu(monkeypatch):
    """On CUDA a timed call is bracketed by device synchronizations: kernels run asynchronously, and
    without them a benchmark times the launches only."""
    from benchmarks import common
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    common.time_call(lambda: events.append("call"), torch.device("cuda"))
    assert events == ["sync", "call", "sync"]
