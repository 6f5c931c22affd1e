#!/usr/bin/env bash
# One short GPU session's worth of figures, printed and, when $OUT is set, written there as
# gpu_check.log, gpu_check.jsonl, quality_fid.jsonl and the metrics of the runs.
#
#   here, once:  cp -r ../shared/data/cifar10/train datasets/cifar10_train   # ~46 MB of JPEGs
#                mkdir -p .fid && cp ~/.cache/fid_weights/fid_inception.pth .fid/   # bash evaluation/fid_weights.sh
#                pip download -d .whl diffusers                                # optional: the comparison
#   device tool: run(command="bash benchmarks/gpu_check.sh", carry=["datasets/cifar10_train", ".fid", ".whl"],
#                    timeout_s=600)
#
#   bash benchmarks/gpu_check.sh [quality] [speed]     # default: both, quality first
#
# quality: a recipe ($QUALITY_PRESET; default cifar10_qk_swiglu, the winner of the recipe
#   ablations in benchmarks/README.md; cifar10 is the brief's DiT-B/2) trained for $QUALITY_SECONDS
#   (default 300 s: with the FID it fits one 10-minute call; 480 s when the quality stage runs alone)
#   on one GPU, stopped by SIGTERM (the trainer saves a checkpoint and exits: the preemption path),
#   then FID of its EMA at 10,000 samples against the 50,000 CIFAR-10 train images with the preset's
#   sampler at 34 and 10 NFE (midpoint 17 and 5 steps; Euler 35 and 10 for cifar10), CFG 1.5.
# speed: DiT-B/2 (the seed's config) bf16 training throughput + MFU + peak memory at batch 128,
#   eager and compiled; the same compiled for cifar10_qk_swiglu (the recipe options' cost),
#   with --fp32_residual true, and with --objective meanflow (the MeanFlow step's cost: its JVP);
#   the tiny preset; sampling 35 NFE with and without CFG (5,000 samples timed, extrapolated to
#   50,000); the diffusers comparison at DiT-B/2 (when .whl is carried); a short
#   real CIFAR-10 training run with the on-device loader. Each speed step starts only while the
#   whole call is under $GPU_CHECK_BUDGET seconds (default 480), so one call fits the device's
#   10-minute limit; the skipped ones say so.
# Figures go into benchmarks/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
JSON="$OUT/gpu_check.jsonl"
PEAK="${PEAK_TFLOPS:-989}"   # H200 SXM dense bf16 peak (spec sheet); MFU is relative to it
BUDGET="${GPU_CHECK_BUDGET:-480}"
STAGES="${*:-quality speed}"
exec > >(tee -a "$LOG") 2>&1
step() { echo; echo "=== $* ($(date +%T), ${SECONDS} s in)"; }
# A speed step starts only inside the budget: `fits NAME || continue`-style guard.
fits() { if [ "$SECONDS" -ge "$BUDGET" ]; then echo "=== skipped (budget ${BUDGET} s spent): $*"; return 1; fi; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

quality() {
    local preset="${QUALITY_PRESET:-cifar10_qk_swiglu}" run=/tmp/gpu_check_quality steps="17 5"
    [ "$preset" = cifar10 ] && steps="35 10"
    if [ ! -d datasets/cifar10_train ] || [ ! -f .fid/fid_inception.pth ]; then
        step "quality skipped: carry datasets/cifar10_train and .fid/fid_inception.pth"; return
    fi
    step "quality: --preset $preset (DiT-B/2) for ${QUALITY_SECONDS:-300} s, compiled, then SIGTERM"
    rm -rf "$run"
    timeout -s TERM "${QUALITY_SECONDS:-300}" python train_flow_matching.py --preset "$preset" \
        --dataset imagefolder --data_dir datasets/cifar10_train --compile true --data_loader device \
        --sample_every 0 --save_every 100000 --log_every 500 --num_workers 8 \
        --checkpoint_dir "$run" --data_cache_dir /tmp/gpu_check_cache
    cp "$run/metrics.jsonl" "$OUT/quality_train_metrics.jsonl"
    local ckpt; ckpt=$(ls -t "$run"/*.pt | head -n1)   # the checkpoint SIGTERM wrote (or the final one)
    step "quality: FID of $ckpt, EMA, 10,000 samples vs the 50,000 train images, the preset's sampler at $steps steps, CFG 1.5"
    python evaluate_fid.py --checkpoint "$ckpt" --num_samples 10000 --batch_size 1000 \
        --ref_dataset imagefolder --ref_data_dir datasets/cifar10_train --inception_weights .fid/fid_inception.pth \
        --fid_cache_dir /tmp/gpu_check_cache/fid --output_jsonl "$OUT/quality_fid.jsonl" \
        ${QUALITY_FID_FLAGS:---num_steps_list $steps --cfg_scales 1.5}
}

speed() {
    if fits "train DiT-B/2 batch 128 bf16 eager"; then
        step "train DiT-B/2 batch 128 bf16 eager"
        python benchmarks/train_throughput.py --device cuda --batch_size 128 --steps 20 --windows 3 --warmup 5 \
            --peak_tflops "$PEAK" --json "$JSON"
    fi
    if fits "train DiT-B/2 batch 128 bf16 compiled"; then
        step "train DiT-B/2 batch 128 bf16 compiled"
        python benchmarks/train_throughput.py --device cuda --batch_size 128 --compile true --steps 20 --windows 3 \
            --warmup 5 --peak_tflops "$PEAK" --json "$JSON"
    fi
    if fits "train the winning preset (its speed cost), compiled"; then
        step "train DiT-B/2 batch 128 bf16 compiled, --preset cifar10_qk_swiglu (qk-norm, SwiGLU: their cost)"
        python benchmarks/train_throughput.py --device cuda --preset cifar10_qk_swiglu --batch_size 128 \
            --compile true --steps 20 --windows 3 --warmup 5 --peak_tflops "$PEAK" --json "$JSON"
    fi
    if fits "train DiT-B/2, fp32 residual stream (its speed cost), compiled"; then
        step "train DiT-B/2 batch 128 bf16 compiled, --fp32_residual true (the recipe option's speed cost)"
        python benchmarks/train_throughput.py --device cuda --batch_size 128 --compile true --fp32_residual true \
            --steps 20 --windows 3 --warmup 5 --peak_tflops "$PEAK" --json "$JSON"
    fi
    if fits "train DiT-B/2 MeanFlow (its step cost), compiled"; then
        step "train DiT-B/2 batch 128 bf16 compiled, --objective meanflow (the JVP on 25% of rows, eager, through the written-out attention)"
        python benchmarks/train_throughput.py --device cuda --batch_size 128 --compile true --objective meanflow \
            --steps 20 --windows 3 --warmup 5 --peak_tflops "$PEAK" --json "$JSON"
    fi
    if fits "train DiT-B/2 compiled, gradient checkpointing (memory)"; then
        step "train DiT-B/2 batch 128 bf16 compiled, gradient checkpointing (memory)"
        python benchmarks/train_throughput.py --device cuda --batch_size 128 --compile true --gradient_checkpointing true \
            --steps 10 --windows 2 --warmup 3 --peak_tflops "$PEAK" --json "$JSON"
    fi
    if fits "train tiny preset"; then
        step "train tiny preset (its fp32) and in bf16, eager"
        python benchmarks/train_throughput.py --preset tiny --device cuda --steps 20 --windows 3 --warmup 5 \
            --peak_tflops "$PEAK" --json "$JSON"
        python benchmarks/train_throughput.py --preset tiny --device cuda --mixed_precision bf16 --steps 20 --windows 3 \
            --warmup 5 --peak_tflops "$PEAK" --json "$JSON"
    fi
    if fits "sample DiT-B/2"; then
        step "sample DiT-B/2, 35 Euler steps, bf16, compiled: 5,000 timed, extrapolated to 50,000"
        python benchmarks/sample_throughput.py --device cuda --compile true --num_steps 35 --num_samples 5000 \
            --batch_size 1250 --extrapolate_to 50000 --json "$JSON"
    fi
    if ! ls .whl/diffusers-*.whl >/dev/null 2>&1; then
        step "diffusers comparison skipped: no .whl/diffusers-*.whl carried"
    elif fits "diffusers comparison"; then
        step "diffusers comparison at DiT-B/2, batch 128, bf16"
        pip install -q --no-index --find-links .whl diffusers && \
        python benchmarks/compare_diffusers.py --device cuda --hidden_size 768 --depth 12 --num_heads 12 \
            --batch_size 128 --warmup 3 --repeats 10 --json "$JSON"
    fi
    if [ ! -d datasets/cifar10_train ]; then
        step "real CIFAR-10 run skipped: datasets/cifar10_train not carried"
    elif fits "real CIFAR-10 run"; then
        step "real CIFAR-10 run: DiT-B/2, batch 128, bf16, compiled, on-device loader, 400 steps"
        python train_flow_matching.py --dataset imagefolder --data_dir datasets/cifar10_train --batch_size 128 \
            --compile true --data_loader device --train_steps 400 --log_every 100 --sample_every 0 \
            --save_every 100000 --warmup_steps 100 --lr 2e-4 --num_workers 8 \
            --checkpoint_dir /tmp/gpu_check_run --data_cache_dir /tmp/gpu_check_cache
        cp /tmp/gpu_check_run/metrics.jsonl "$OUT/train_metrics.jsonl"
    fi
}

for stage in $STAGES; do
    case "$stage" in
        quality|speed) "$stage" ;;
        *) echo "unknown stage $stage: use quality and/or speed"; exit 2 ;;
    esac
done
step "done"
