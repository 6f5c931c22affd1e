"""Shared pieces of the benchmark scripts: FLOP counting, timing, memory, the machine's description.

Benchmarks print numbers and are never part of the test suite's pass/fail. Timings are medians of
several repeats, each ended by a device synchronization so asynchronous CUDA work is counted.
"""

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
from torch.nn.attention import SDPBackend
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from configs.cli import ArgumentParser  # noqa: E402
from configs.flow_matching_config import parse_flow_matching_config  # noqa: E402
from models.dit_2d import dit_from_config, input_shape  # noqa: E402
from utils.distributed import resolve_device  # noqa: E402
from utils.launch import end_process  # noqa: E402


# The fused SDPA kernels a benchmark may restrict attention to (PyTorch picks among them by default:
# cuDNN first on Hopper).
SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION}


# Dense (no sparsity) bf16 / fp16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets, matched in
# order as substrings of torch.cuda.get_device_name() ("H100 PCIe" before "H100", "GB200" before
# "B200"): MFU is quoted against the card that ran, not against whichever card the job was written for.
PEAK_HALF_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200 NVL", 835.0),
                    ("H200", 989.0), ("GB200", 2500.0), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0))


def peak_half_tflops(device: torch.device):
    """(peak TFLOP/s, card name) of a CUDA card in PEAK_HALF_TFLOPS; (None, name) for any other
    card or a CPU."""
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_HALF_TFLOPS if key in name), None), name


def add_peak_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the device's peak TFLOP/s in the run's dtype, for MFU (default: under bf16 / fp16, the "
                        "card's dense peak when benchmarks/common.py knows the card; else no MFU)")


def peak_for(args, device: torch.device, half_precision: bool):
    """(peak TFLOP/s or None, the card it was looked up for or None): --peak_tflops, else the card's
    dense half-precision peak for a bf16 / fp16 run (fp32 matmuls run on other units), else none."""
    if args.peak_tflops:
        return args.peak_tflops, None
    return peak_half_tflops(device) if half_precision else (None, None)


def mfu_text(mfu: Optional[float], peak: Optional[float], card: Optional[str]) -> str:
    """The MFU clause of a benchmark's line: ', MFU x% of P TFLOP/s' naming the card whose peak it
    is, or the hint for a device without one."""
    if mfu is None:
        return " (pass --peak_tflops for MFU)"
    return f", MFU {100 * mfu:.1f}% of {peak:g} TFLOP/s" + (f" ({card}'s dense peak)" if card else "")


def clone_path(text: str) -> str:
    """`text` with every absolute path into the shared folder beside the repo written as a clone sees
    it (../shared/...): result rows hold the path of the machine that ran them."""
    return re.sub(r"/\S*/shared/", "../shared/", text)


def benchmark_parser() -> argparse.ArgumentParser:
    """The flags every benchmark takes; each script adds its own (config flags pass through)."""
    p = ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--json", default=None, help="append the results as JSON lines to this file")
    return p


def parse_benchmark(bench: argparse.ArgumentParser, argv, doc: str):
    """(the benchmark's args, a FlowMatchingConfig, the device) from one command line: the
    benchmark's own flags (`bench`, built on benchmark_parser) plus any config flag (--preset tiny,
    --hidden_size 384, --compile true)."""
    args, rest = bench.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        bench.print_help()
    config = parse_flow_matching_config(rest, description=doc)   # a MeanFlow config samples as a MeanFlow run
    try:
        device = resolve_device(config.device)
    except ValueError as err:
        bench.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    if config.num_classes is None:
        config.num_classes = 10  # no dataset to count them from: CIFAR-10's
    return args, config, device


def run_script(command: List[str], *, stop_after: Optional[float] = None, check: bool = False, **popen) -> int:
    """Run a repo script in a subprocess to its end; its exit code. `stop_after` seconds: send it
    SIGTERM then (a trainer saves and exits). On POSIX a SIGTERM or SIGINT to this process is passed
    on to it and waited for, then ends this process too (as the script would: 128 + signal, or by
    SIGINT): subprocess.run would leave it running, orphaned (SIGTERM), or kill it 0.25 s after a
    Ctrl-C, before its stop checkpoint. The script runs in its own process group, so a terminal's
    Ctrl-C (sent to the foreground group) reaches it once, forwarded, not twice (a second SIGINT
    would interrupt its clean exit). Only the script is signalled, not its group: DataLoader workers
    killed under a trainer would fail its last batch instead of letting it save. On Windows the
    console gives Ctrl-C to every process itself. `check`: CalledProcessError on exit != 0."""
    posix = os.name == "posix"
    stopped, child = [], None

    def forward(signum, _frame):
        stopped.append(signum)
        if child is not None:
            child.send_signal(signum)

    # Installed before the script starts, so no signal in between orphans it; an ignored SIGINT
    # (a background job of a non-interactive shell) stays ignored.
    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)
                if posix and signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        child = subprocess.Popen(command, **({"preexec_fn": os.setpgrp} if posix else {}), **popen)
        if stopped:   # a signal came while it started
            child.send_signal(stopped[0])
        try:
            child.wait(timeout=stop_after)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGTERM)
            child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if child is not None and child.poll() is None:   # failing for another reason: do not orphan it
            child.kill()
            child.wait()
    if stopped:
        end_process(128 + stopped[0])
    if check and child.returncode != 0:
        raise subprocess.CalledProcessError(child.returncode, command)
    return child.returncode


def count_flops_per_image(config, backward: bool) -> int:
    """Matmul FLOPs (2 per multiply-add) of one image through DiT2D: forward, or forward + backward.
    The input is what the config's DiT sees: its VQ-VAE latent in a latent run, else the image.

    Counted by torch's FlopCounterMode on the meta device (no memory, no time), where attention
    runs as explicit matmuls and is counted too (QK^T and AV, and their gradients).
    """
    with torch.device("meta"):
        model = dit_from_config(config)
        x = torch.randn(1, *input_shape(config))
        t = torch.rand(1)
        y = torch.zeros(1, dtype=torch.long) if config.num_classes else None
    with FlopCounterMode(display=False) as counter:
        out = model(x, t, y)
        if backward:
            out.sum().backward()
    return counter.get_total_flops()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call of fn, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def profile(fn: Callable[[], object], device: torch.device, table_path: Optional[str] = None) -> Dict:
    """Where one call of fn spends its time: wall seconds, the device's kernel seconds (their sum,
    from torch.profiler), the share of the wall the device is busy (the rest is launch overhead,
    host work and syncs: the gaps), kernel launches, and the kernels' table, sorted by device
    time, written whole to `table_path` (a kernel asked about, such as which attention ran, may be
    cheap enough to fall below any row limit). On a CPU the operators' self time stands in for kernel time."""
    from torch.profiler import ProfilerActivity
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        synchronize(device)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.self_device_time_total for e in kernels) / 1e6
        launches = sum(e.count for e in kernels)
        sort = "self_device_time_total"
    else:
        busy = sum(e.self_cpu_time_total for e in events) / 1e6
        launches = sum(e.count for e in events)
        sort = "self_cpu_time_total"
    if table_path:
        os.makedirs(os.path.dirname(os.path.abspath(table_path)), exist_ok=True)
        with open(table_path, "w") as f:
            f.write(events.table(sort_by=sort, row_limit=-1, max_name_column_width=70) + "\n")
    return {"wall_s": wall, "kernel_s": busy, "busy": busy / wall, "launches": launches}


def check_no_sync(fn: Callable[[], object], device: torch.device) -> str:
    """'no host sync' when fn runs under torch.cuda.set_sync_debug_mode('error'), else the first
    offending call's error line; 'not checked' off CUDA."""
    if device.type != "cuda":
        return "not checked (CUDA only)"
    synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "no host sync"
    except RuntimeError as err:
        return "host sync: " + str(err).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode(0)
        synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def machine(device: torch.device) -> str:
    """One line naming the hardware and software a number was measured on."""
    if device.type == "cuda":
        hw = f"{torch.cuda.get_device_name(device)}"
    else:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        hw = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, " \
             f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    return f"{hw}; torch {torch.__version__}; python {platform.python_version()}"


def write_json(path: Optional[str], record: Dict) -> None:
    """Append one JSON line to path (nothing when path is None)."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- line charts (PIL, no matplotlib)

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def draw_panel(draw, box, series: Dict[str, List[tuple]], xlabel: str, y_range, y_format: str = "{:.3f}") -> None:
    """One framed panel of lines: `series` maps a name to its (x, y) points; x from 0 to its max."""
    left, top, right, bottom = box
    x_max = max(x for points in series.values() for x, _ in points)
    y_lo, y_hi = y_range
    draw.rectangle(box, outline=(0, 0, 0))

    def to_px(x, y):
        return (left + (right - left) * x / x_max,
                bottom - (bottom - top) * (min(max(y, y_lo), y_hi) - y_lo) / (y_hi - y_lo))

    for i in range(5):
        y = y_lo + (y_hi - y_lo) * i / 4
        _, py = to_px(0, y)
        draw.line([(left - 4, py), (left, py)], fill=(0, 0, 0))
        draw.text((left - 44, py - 6), y_format.format(y), fill=(0, 0, 0))
        x = x_max * i / 4
        px, _ = to_px(x, y_lo)
        draw.line([(px, bottom), (px, bottom + 4)], fill=(0, 0, 0))
        draw.text((px - 12, bottom + 8), f"{x:.0f}", fill=(0, 0, 0))
    draw.text(((left + right) / 2 - 20, bottom + 24), xlabel, fill=(0, 0, 0))
    for color, points in zip(COLORS * 4, series.values()):
        pixels = [to_px(x, y) for x, y in points]
        draw.line(pixels, fill=color, width=2)
        for px, py in pixels:
            draw.ellipse([(px - 3, py - 3), (px + 3, py + 3)], fill=color)


def save_chart(panels: List[tuple], names: List[str], title: str, path: str, y_range,
               y_format: str = "{:.3f}") -> None:
    """Panels side by side, each (series, xlabel) with the same names and colours; a legend below."""
    from PIL import Image, ImageDraw
    width = 550 * len(panels)
    # Legend columns as wide as the longest name (PIL's default font: ~6 px a character).
    column = max(340, 30 + 6 * max(map(len, names)) + 20)
    per_row = max(1, min(3, (width - 70) // column))
    height = max(480, 430 + 16 * -(-len(names) // per_row))
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.text((70, 12), title, fill=(0, 0, 0))
    for k, (series, xlabel) in enumerate(panels):
        draw_panel(draw, (70 + 550 * k, 40, 520 + 550 * k, 380), series, xlabel, y_range, y_format)
    for i, (name, color) in enumerate(zip(names, COLORS * 4)):
        x, y = 70 + column * (i % per_row), 420 + 16 * (i // per_row)
        draw.line([(x, y + 6), (x + 24, y + 6)], fill=color, width=3)
        draw.text((x + 30, y), name, fill=(0, 0, 0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)
