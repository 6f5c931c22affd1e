#!/usr/bin/env bash
# One short GPU session's worth of speed figures (< 8 minutes on one H200), printed and, when $OUT
# is set, written there as gpu_check.log and gpu_check.jsonl.
#
#   here, once:  cp -r ../shared/data/cifar10/train datasets/cifar10_train   # ~46 MB of JPEGs
#                pip download -d .whl diffusers                                # optional: the comparison
#   device tool: run(command="bash benchmarks/gpu_check.sh", carry=["datasets/cifar10_train", ".whl"], timeout_s=540)
#
# Steps: DiT-B/2 (the seed's config) bf16 training throughput + MFU + peak memory at batch 128,
# eager and compiled; the tiny preset; sampling 35 NFE with and without CFG (5,000 samples timed,
# extrapolated to 50,000); the diffusers comparison at DiT-B/2 (when .whl is carried); a short
# real CIFAR-10 training run with the on-device loader. Figures go into benchmarks/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
JSON="$OUT/gpu_check.jsonl"
PEAK="${PEAK_TFLOPS:-989}"   # H200 SXM dense bf16 peak (spec sheet); MFU is relative to it
exec > >(tee -a "$LOG") 2>&1
step() { echo; echo "=== $* ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

step "train DiT-B/2 batch 128 bf16 eager"
python benchmarks/train_throughput.py --device cuda --batch_size 128 --steps 20 --windows 3 --warmup 5 \
    --peak_tflops "$PEAK" --json "$JSON"
step "train DiT-B/2 batch 128 bf16 compiled"
python benchmarks/train_throughput.py --device cuda --batch_size 128 --compile true --steps 20 --windows 3 \
    --warmup 5 --peak_tflops "$PEAK" --json "$JSON"
step "train DiT-B/2 batch 128 bf16 compiled, gradient checkpointing (memory)"
python benchmarks/train_throughput.py --device cuda --batch_size 128 --compile true --gradient_checkpointing true \
    --steps 10 --windows 2 --warmup 3 --peak_tflops "$PEAK" --json "$JSON"
step "train tiny preset (its fp32) and in bf16, eager"
python benchmarks/train_throughput.py --preset tiny --device cuda --steps 20 --windows 3 --warmup 5 \
    --peak_tflops "$PEAK" --json "$JSON"
python benchmarks/train_throughput.py --preset tiny --device cuda --mixed_precision bf16 --steps 20 --windows 3 \
    --warmup 5 --peak_tflops "$PEAK" --json "$JSON"

step "sample DiT-B/2, 35 Euler steps, bf16, compiled: 5,000 timed, extrapolated to 50,000"
python benchmarks/sample_throughput.py --device cuda --compile true --num_steps 35 --num_samples 5000 \
    --batch_size 1250 --extrapolate_to 50000 --json "$JSON"

if ls .whl/diffusers-*.whl >/dev/null 2>&1; then
    step "diffusers comparison at DiT-B/2, batch 128, bf16"
    pip install -q --no-index --find-links .whl diffusers && \
    python benchmarks/compare_diffusers.py --device cuda --hidden_size 768 --depth 12 --num_heads 12 \
        --batch_size 128 --warmup 3 --repeats 10 --json "$JSON"
else
    step "diffusers comparison skipped: no .whl/diffusers-*.whl carried"
fi

if [ -d datasets/cifar10_train ]; then
    step "real CIFAR-10 run: DiT-B/2, batch 128, bf16, compiled, on-device loader, 400 steps"
    python train_flow_matching.py --dataset imagefolder --data_dir datasets/cifar10_train --batch_size 128 \
        --compile true --data_loader device --train_steps 400 --log_every 100 --sample_every 0 \
        --save_every 100000 --warmup_steps 100 --lr 2e-4 --num_workers 8 \
        --checkpoint_dir /tmp/gpu_check_run --data_cache_dir /tmp/gpu_check_cache
    cp /tmp/gpu_check_run/metrics.jsonl "$OUT/train_metrics.jsonl"
else
    step "real CIFAR-10 run skipped: datasets/cifar10_train not carried"
fi
step "done"
