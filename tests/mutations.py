"""Mutation testing: plant one-line bugs, one at a time, in a copy of the repo, and check that the
tests meant to guard each behaviour fail.

    python tests/mutations.py                  # every mutation, then the table
    python tests/mutations.py --only ema cfg   # the mutations whose name contains any of these
    python tests/mutations.py --list           # names and target tests, nothing run

The working tree (tracked and untracked files that git does not ignore) is copied to a temporary
folder once. The target tests run there unmutated first (they must pass, or the table would mean
nothing); then each mutation replaces one exact piece of text (which must occur exactly once, so
a stale entry is an error, not a silent pass), runs its target tests with `pytest -x`, and
restores the file. A bug is KILLED when a test fails, SURVIVED when all pass.

Not part of the test suite (it runs the targeted tests once per bug); run it before calling a
test change done, and put its table in the note.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import List, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Mutation:
    name: str                # short id, shown in the table
    path: str                # file, relative to the repo root
    old: str                 # exact text; must occur exactly once in the file
    new: str                 # what replaces it
    tests: Sequence[str]     # pytest targets meant to catch it (files or node ids)
    why: str = ""            # the bug in words


MUTATIONS: List[Mutation] = [
    # --- EMA
    Mutation("ema_no_update", "training/trainer.py",
             "torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)",
             "pass", ["tests/test_ema.py"], "update_ema returns without updating"),
    Mutation("ema_decay_swapped", "training/trainer.py",
             "[p.detach() for p in model.parameters()], 1.0 - decay)",
             "[p.detach() for p in model.parameters()], decay)", ["tests/test_ema.py"],
             "decay where 1 - decay belongs"),
    Mutation("ema_no_ramp", "training/trainer.py",
             "return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay",
             "return decay", ["tests/test_ema.py"], "the EMA warm-up ramp ignored"),
    Mutation("ema_ramp_off_by_ten", "training/trainer.py",
             "(1.0 + step) / (10.0 + step)", "(1.0 + step) / (100.0 + step)", ["tests/test_ema.py"],
             "a slower ramp than documented"),
    Mutation("probe_compares_raw_with_raw", "training/trainer.py",
             'for name, model in (("ema", self.ema), ("raw", self.raw_model)):',
             'for name, model in (("ema", self.raw_model), ("raw", self.raw_model)):',
             ["tests/test_ema.py"], "the logged EMA probe loss is the raw model's"),
    # --- generation and evaluation: flags and labels reach the sampler
    Mutation("generate_always_class_0", "flow_matching.py",
             "y = labels[first:index.stop].to(device) if num_classes else None",
             "y = torch.zeros_like(labels[first:index.stop]).to(device) if num_classes else None",
             ["tests/test_sampling_quality.py"], "generation always samples class 0"),
    Mutation("generate_ignores_cfg_scale", "generate_flow_matching.py",
             "cfg_scale = args.cfg_scale if args.cfg_scale is not None else (config[\"cfg_scale\"] if num_classes else 1.0)",
             "cfg_scale = config[\"cfg_scale\"] if num_classes else 1.0",
             ["tests/test_sampling_quality.py"], "generate_flow_matching.py ignores --cfg_scale"),
    Mutation("generate_ignores_guidance_interval", "generate_flow_matching.py",
             "guidance_interval=args.guidance_interval,", "guidance_interval=None,",
             ["tests/test_sampling_quality.py"], "generate_flow_matching.py ignores --guidance_interval"),
    Mutation("generate_ignores_precision", "generate_flow_matching.py",
             "autocast_dtype=torch.bfloat16 if precision == \"bf16\" else None", "autocast_dtype=None",
             ["tests/test_sampling_quality.py"], "generate_flow_matching.py ignores --precision bf16"),
    Mutation("generate_ignores_sampler", "generate_flow_matching.py",
             "sampler = args.sampler or config[\"sampler\"]", "sampler = config[\"sampler\"]",
             ["tests/test_sampling_quality.py"], "generate_flow_matching.py ignores --sampler"),
    Mutation("evaluate_ignores_cfg_scales", "evaluate_fid.py",
             "cfg_scales = args.cfg_scales or [config[\"cfg_scale\"] if num_classes else 1.0]",
             "cfg_scales = [config[\"cfg_scale\"] if num_classes else 1.0]",
             ["tests/test_sampling_quality.py"], "evaluate_fid.py ignores --cfg_scales"),
    Mutation("sampling_time_reversed", "flow_matching.py",
             "return model(x, t, labels).float()", "return model(x, 1 - t, labels).float()",
             ["tests/test_sampling_quality.py"], "sample() feeds the model 1 - t (convention reversed)"),
    Mutation("dit_ignores_t", "models/dit_2d.py",
             "c = self.t_embedder(t)", "c = self.t_embedder(torch.zeros_like(t))",
             ["tests/test_model.py", "tests/test_sampling_quality.py"], "the DiT ignores t"),
    Mutation("dit_ignores_y", "models/dit_2d.py",
             "c = c + self.y_embedder(y)", "c = c + 0 * self.y_embedder(y)",
             ["tests/test_model.py", "tests/test_sampling_quality.py"], "the DiT ignores its label"),
]


def copy_tree(dest: str) -> None:
    """Copy what git tracks or would track (tracked + untracked, not ignored) into dest."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if not os.path.isfile(src):
            continue  # deleted in the working tree
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dest, rel))


def run_tests(copy: str, tests: Sequence[str], timeout: int) -> Tuple[str, str, float]:
    """(status, first failing test or message, seconds): status passed | failed | error."""
    start = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider",
                                 *tests], cwd=copy, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "error", f"timed out after {timeout} s", time.perf_counter() - start
    seconds = time.perf_counter() - start
    if result.returncode == 0:
        return "passed", "", seconds
    failed = re.findall(r"^FAILED (\S+)", result.stdout, re.M)
    if result.returncode == 1 and failed:
        return "failed", failed[0], seconds
    return "error", (result.stdout + result.stderr).strip().splitlines()[-1][:120], seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                   help="run only the mutations whose name contains one of these")
    p.add_argument("--list", action="store_true", help="list the mutations and their target tests")
    p.add_argument("--timeout", type=int, default=900, help="seconds per pytest run (default: %(default)s)")
    args = p.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or any(s in m.name for s in args.only)]
    if not chosen:
        p.error(f"--only {args.only} matches no mutation; --list shows them")
    if args.list:
        for m in chosen:
            print(f"{m.name:<34} {m.path:<28} {' '.join(m.tests)}  # {m.why}")
        return 0

    with tempfile.TemporaryDirectory(prefix="mutations_") as copy:
        copy_tree(copy)
        for m in chosen:  # every mutation must still apply to the code as it is
            count = open(os.path.join(copy, m.path)).read().count(m.old)
            if count != 1:
                print(f"error: mutation {m.name}: the text occurs {count} times in {m.path} (must be once): "
                      f"{m.old!r}", file=sys.stderr)
                return 2
        targets = sorted({t for m in chosen for t in m.tests})
        status, detail, seconds = run_tests(copy, targets, args.timeout * 4)
        print(f"baseline: {len(targets)} target(s) {status} in {seconds:.0f} s {detail}", flush=True)
        if status != "passed":
            print("error: the target tests fail without any mutation; fix them first", file=sys.stderr)
            return 1
        rows = []
        for m in chosen:
            path = os.path.join(copy, m.path)
            original = open(path).read()
            with open(path, "w") as f:
                f.write(original.replace(m.old, m.new))
            try:
                status, detail, seconds = run_tests(copy, m.tests, args.timeout)
            finally:
                with open(path, "w") as f:
                    f.write(original)
            verdict = {"failed": "KILLED", "passed": "SURVIVED", "error": "ERROR"}[status]
            rows.append((m, verdict, detail, seconds))
            print(f"{m.name:<34} {verdict:<8} {detail} ({seconds:.0f} s)", flush=True)

    print(f"\n| bug | what it breaks | verdict | killed by |\n|---|---|---|---|")
    for m, verdict, detail, _ in rows:
        print(f"| `{m.name}` | {m.why} | {verdict} | {detail.replace('|', '/') if verdict != 'SURVIVED' else '-'} |")
    survived = sum(v != "KILLED" for _, v, _, _ in rows)
    print(f"\n{len(rows) - survived} of {len(rows)} killed")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
