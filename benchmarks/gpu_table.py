"""The closing table of benchmarks/gpu_check.sh: one line per measurement of its JSON rows.

    python benchmarks/gpu_table.py OUT/gpu_check.jsonl [OUT/speedrun.jsonl]

Reads the rows train_throughput.py, sample_throughput.py, kernel_choices.py, compare_diffusers.py and speedrun.py
append, in order, and prints a Markdown table (what, figure, note); missing files are skipped.
"""

import argparse
import json
import os
import statistics
import sys
from typing import Iterator, List


def rows(paths: List[str]) -> Iterator[dict]:
    for path in paths:
        if os.path.isfile(path):
            with open(path) as f:
                yield from (json.loads(line) for line in f if line.strip())


def describe(row: dict) -> List[tuple]:
    """(what, figure, note) lines for one JSON row."""
    if row.get("bench") == "train":
        c = row["config"]
        what = (f"train {c['hidden_size']}/{c['depth']}, batch {c['batch_size']}, {c['mixed_precision']}, "
                f"compile {c['compile_mode'] if c['compile'] else 'off'}"
                + (", qk-norm+SwiGLU" if c.get("qk_norm") and c.get("mlp") == "swiglu" else "")
                + (", fp32 residual" if c.get("fp32_residual") else "")
                + (f", {c['optimizer']}" if c.get("optimizer", "adamw") != "adamw" else "")
                + (f", {c['objective']}" if c.get("objective", "flow_matching") != "flow_matching" else "")
                + (f", SDPA {row['sdpa_backend']}" if row.get("sdpa_backend", "auto") != "auto" else ""))
        figure = f"{row['images_per_s']:,.0f} img/s" + (f", MFU {100 * row['mfu']:.1f}%" if row.get("mfu") else "")
        prof = row.get("profile") or {}
        # The median window, as images/s; the profile covers one window of steps_per_window steps.
        note = (f"{1000 * statistics.median(row['step_seconds']):.1f} ms/step, busy {100 * prof['busy']:.0f}%, "
                f"{prof['launches'] / row['steps_per_window']:.0f} launches/step" if prof else "")
        note += f"; warm-up {row['warmup_seconds']:.0f} s; {row.get('sync_check') or ''}"
        return [(what, figure, note)]
    if row.get("bench") == "sample":
        c = row["config"]
        what = (f"sample {c['sampler']} {row['num_steps']} steps ({row['nfe']} NFE), cfg {row['cfg_scale']:g}, "
                f"batch {row['batch_size']}, compile {row['compile_mode']}")
        est = row.get("extrapolated_seconds", {}).get("50000")
        figure = f"{row['images_per_s']:,.1f} img/s, {row['nfe_per_s']:,.0f} NFE/s" + (
            f", MFU {100 * row['mfu']:.1f}% (ceiling {row['images_per_s_at_peak']:,.0f} img/s)" if row.get("mfu") else "")
        return [(what, figure, f"first batch {row['first_batch_seconds']:.0f} s" + (f"; 50k in {est:.0f} s" if est else ""))]
    if "params" in row and "args" in row:   # compare_diffusers.py
        out = []
        for part in ("train", "sample", "loop"):
            if part in row:
                r = row[part]["images_per_s"]
                ours = "compiled" if row["args"]["compile"] else "eager"
                out.append((f"vs diffusers: {part}, batch {row['args']['batch_size']}, ours {ours} vs diffusers "
                            f"eager", f"{row[part]['ratio']:.2f}x",
                            f"ours {r['ours']:,.1f}, diffusers {r['diffusers']:,.1f} img/s"))
        return out
    if row.get("bench") == "kernel":
        if row["ms"] is None:
            return [(f"kernel {row['op']}, {row['shape']}: {row['choice']}", "unavailable", row.get("note", ""))]
        err = row.get("rel_err")
        return [(f"kernel {row['op']}, {row['shape']}: {row['choice']}",
                 f"{row['ms']:.3f} ms, {row['tflops']:,.0f} TFLOP/s",
                 f"max error {err:.1e} (relative)" if err is not None else "")]
    if "fid" in row and "train_wall_s" in row:   # speedrun.py
        return [(f"speedrun {row.get('pipeline', 'repo')} {row.get('preset', '')}, budget {row.get('budget_s')} s",
                 f"FID {row['fid']:.2f} (N {row.get('num_samples')}), {row.get('sampler')} {row.get('num_steps')} "
                 f"steps = {row.get('nfe')} NFE",
                 f"{row.get('steps')} steps in {row['train_wall_s']:.0f} s"
                 + (f"; sampled at {row['samples_per_s']:,.0f}/s" if row.get("samples_per_s") else ""))]
    return []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="JSON-lines files of benchmark rows (a missing one is skipped)")
    paths = p.parse_args(argv).paths
    lines = [line for row in rows(paths) for line in describe(row)]
    print("| what | figure | note |\n|---|---|---|")
    for what, figure, note in lines:
        print(f"| {what} | {figure} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
