#!/usr/bin/env bash
# Lays out .gpu/ (git-ignored) with what one call of benchmarks/gpu_check.sh needs, and checks that
# the checkout plus .gpu/ fit the device tool's 64 MiB. Run here, before the call:
#
#   bash benchmarks/gpu_prepare.sh speed      # CIFAR-10 tarball + diffusers wheel (the comparison)
#   bash benchmarks/gpu_prepare.sh speedrun   # CIFAR-10 tarball + torch-fidelity wheel + compact FID Inception
#
# Then: run(command="bash benchmarks/gpu_check.sh STAGE", carry=[".gpu"], timeout_s=600). Both kinds
# do not fit one call (the Inception weights are ~44 MB of the 64 MiB), so each call brings its own.
# CIFAR10_TAR (default ../shared/data/cifar10_train.tar.gz: train/<class>/*.jpg, 16.5 MB) is the data;
# the machine there has torch and torchvision but neither diffusers nor torch-fidelity.
set -euo pipefail
cd "$(dirname "$0")/.."
stage="${1:-}"
case "$stage" in
    speed|speedrun) ;;
    *) echo "usage: bash benchmarks/gpu_prepare.sh speed|speedrun" >&2; exit 2 ;;
esac
tar_path="${CIFAR10_TAR:-../shared/data/cifar10_train.tar.gz}"
[ -f "$tar_path" ] || { echo "gpu_prepare.sh: no CIFAR-10 tarball at $tar_path (set CIFAR10_TAR)" >&2; exit 2; }
rm -rf .gpu && mkdir -p .gpu
cp "$tar_path" .gpu/cifar10_train.tar.gz
# The machine's Python is 3.12 on x86-64; these wheels are pure Python.
wheel() { python -m pip download -q --no-deps --only-binary=:all: -d .gpu "$1"; }
if [ "$stage" = speed ]; then
    wheel "diffusers==$(python -c 'import diffusers; print(diffusers.__version__)' 2>/dev/null || echo 0.42.1)"
else
    wheel "torch-fidelity==$(python -c 'import importlib.metadata as m; print(m.version("torch-fidelity"))')"
    compact=$(bash evaluation/fid_weights.sh --compact)
    cp "$compact" .gpu/fid_inception_fp16.pth
fi
# What travels: tracked and untracked-not-ignored files, plus .gpu/.
# A tracked file deleted in the working tree does not travel: stat skips it (and fails, which must
# not end the script under set -e and pipefail).
tree_bytes=$( (git ls-files -z; git ls-files -z --others --exclude-standard) \
    | { xargs -0 -r stat -c %s 2>/dev/null || true; } | awk '{s += $1} END {print s + 0}')
gpu_bytes=$(du -sb .gpu | cut -f1)
total=$((tree_bytes + gpu_bytes))
limit=$((64 * 1024 * 1024))
ls -la .gpu
echo "checkout $((tree_bytes / 1024)) KiB + .gpu $((gpu_bytes / 1024)) KiB = $((total / 1024)) KiB of $((limit / 1024)) KiB"
if [ "$total" -gt "$limit" ]; then
    echo "gpu_prepare.sh: over the device tool's 64 MiB" >&2; exit 1
fi
echo "ready: run(command=\"bash benchmarks/gpu_check.sh $stage\", carry=[\".gpu\"], timeout_s=600)"
