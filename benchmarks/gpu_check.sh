#!/usr/bin/env bash
# One GPU job's worth of figures (one H200, <= ~9 minutes a call), printed, with one table at the end,
# and, when $OUT is set (the device tool's result folder), written there: gpu_check.log,
# gpu_check.jsonl, the profiles' kernel tables, speedrun rows and training metrics.
#
#   here, once per kind of call:  bash benchmarks/gpu_prepare.sh speed      # lays out .gpu/, checks 64 MiB
#   device tool:  run(command="bash benchmarks/gpu_check.sh speed", carry=[".gpu"], timeout_s=600)
#   here:         bash benchmarks/gpu_prepare.sh speedrun
#   device tool:  run(command="bash benchmarks/gpu_check.sh speedrun", carry=[".gpu"], timeout_s=600)
#   second call:  GPU_CHECK_BUDGET=420 bash benchmarks/gpu_check.sh extra   # what the first job left out
#   on another card than the H200 of 2026-12-04 (an H100, say): ... gpu_check.sh baseline extra, so
#   that extra's rows meet the rows they are compared with on the same card
#   CPU smoke:    SMOKE=1 bash benchmarks/gpu_check.sh speed speedrun    # every stage at toy sizes (tests/test_gpu_check.py)
#
# speed: DiT-B/2 bf16 training at batch 128 (benchmarks/train_throughput.py: images/s, MFU, memory),
#   eager, compiled (whole model) and compiled per block, each with a torch.profiler window (kernel
#   time vs wall, launches) and a host-sync check; sampling at 34 NFE with CFG 1.5 (midpoint 17),
#   batch 1000, eager and compiled; our training step against diffusers' DiT; then the `extra` stage
#   while time is left.
# extra (also a stage of its own, for a second call; gpu_prepare.sh speed lays out its inputs): the
#   candidate kernels for attention and the GELU at the model's shapes (kernel_choices.py), the
#   training step with attention on flash instead of PyTorch's pick (cuDNN on Hopper), whole
#   sampling batches against the plain diffusers loop, compiled sampling at batches 64 and 250 (which
#   batch generation should default to), a few steps of train_flow_matching.py under torchrun (NCCL)
#   on the carried CIFAR-10, CUDA-graph sampling, the speedrun preset's step, the fp32 residual
#   stream's step, the MeanFlow step (eager), Muon's and fp16's steps and a few steps of VQ-VAE,
#   latent flow and generation (paths no GPU has run yet), and max-autotune-no-cudagraphs training
#   and sampling.
# baseline: the rows extra's figures are read against, each again on this card: DiT-B/2 training
#   compiled per block (the default) and compiled sampling at batch 1000.
# speedrun: benchmarks/speedrun.py: $SPEEDRUN_PRESET (default cifar10_speedrun) trained for
#   $SPEEDRUN_BUDGET seconds (default 240) from process start, then FID of 10,000 samples against the
#   50,000 CIFAR-10 train images on the GPU, with midpoint and ab2 at 17 and 5 steps (34, 10, 17, 5 NFE).
# Each step starts only while the call is under $GPU_CHECK_BUDGET seconds (default 300); the skipped
# ones say so. Inputs come from .gpu/ (gpu_prepare.sh): the CIFAR-10 train tarball, wheels
# (diffusers for speed, torch-fidelity for speedrun) and the compact FID Inception weights.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT="${OUT:-/tmp/gpu_check}"
# The job's working files (unpacked data, wheels, run folders, FID statistics) go under SCRATCH: give
# two calls at once (a test beside a mutation run) a SCRATCH each, or they delete each other's run folders.
SCRATCH="${SCRATCH:-/tmp/gpu_check_scratch}"
mkdir -p "$OUT" "$SCRATCH"
LOG="$OUT/gpu_check.log"
JSON="$OUT/gpu_check.jsonl"
# MFU is relative to the card's dense bf16 peak, which train_throughput.py looks up by the card's name
# (benchmarks/common.py PEAK_HALF_TFLOPS); PEAK_TFLOPS overrides it, e.g. for a card not in that table.
PEAK="${PEAK_TFLOPS:-}"
BUDGET="${GPU_CHECK_BUDGET:-300}"
STAGES="${*:-speed}"
SMOKE="${SMOKE:-0}"
GPU_DIR="${GPU_DIR:-.gpu}"
exec > >(tee -a "$LOG") 2>&1
step() { echo; echo "=== $* ($(date +%T), ${SECONDS} s in)"; }
fits() { if [ "$SECONDS" -ge "$BUDGET" ]; then echo "=== skipped (budget ${BUDGET} s spent): $*"; return 1; fi; }

# Sizes: the real job, or the CPU smoke form (toy model, every stage and flag, compile switched off:
# tests/test_speed.py covers the compiled graph on the CPU).
if [ "$SMOKE" = 1 ]; then
    DEV=cpu; export TORCH_COMPILE_DISABLE=1
    MODEL="--preset tiny --hidden_size 32 --depth 2 --num_heads 2 --image_size 8"; BATCH=4
    STEPS="--steps 1 --windows 1 --warmup 1"
    RECIPE_MODEL="$MODEL --qk_norm true --mlp swiglu"
    SAMPLE="$MODEL --num_samples 4 --batch_sizes 4 --sampler midpoint --num_steps 1"
    DIFF="--hidden_size 32 --depth 1 --num_heads 2 --batch_size 4 --warmup 0 --repeats 1 --loop_steps 1"; LOOP=""
    TORCHRUN="--preset tiny --image_size 8 --batch_size 4 --train_steps 2 --log_every 1 --device cpu"
    SPEEDRUN="--hidden_size 32 --depth 2 --num_heads 2 --image_size 8 --batch_size 4 --train_steps 100000
              --num_samples 8 --sample_batch_size 8 --num_workers 0 --device cpu --samplers midpoint ab2 --num_steps_list 2"
    SPEEDRUN_BUDGET="${SPEEDRUN_BUDGET:-15}"; SPEEDRUN_PRESET="${SPEEDRUN_PRESET:-tiny}"
    VQ="--preset tiny --image_size 8 --batch_size 4 --train_steps 2 --log_every 1 --num_workers 0 --eval_images 4 --device cpu"
    LATENT="--preset tiny --image_size 8 --batch_size 4 --train_steps 2 --log_every 1 --num_workers 0 --device cpu"
    GEN="--num_samples 4 --batch_size 4 --num_steps 2 --device cpu"
    KERNELS="$MODEL --batch_size 4 --sample_batch 4 --iters 1 --repeats 1"; SAMPLE_BATCHES="--batch_sizes 3"
    ATTENTION=math   # the CPU's default is its flash kernel: math is the restriction the smoke test can see
    PEAK="${PEAK:-1}"   # a CPU has no peak in the table: a nominal one, so that the MFU path runs
else
    DEV=cuda
    MODEL=""; BATCH=128; STEPS="--steps 15 --windows 3 --warmup 5"
    RECIPE_MODEL="--preset cifar10_speedrun"
    SAMPLE="--num_samples 1000 --batch_sizes 1000 --sampler midpoint --num_steps 17 --cfg_scale 1.5"
    DIFF="--hidden_size 768 --depth 12 --num_heads 12 --batch_size 128 --warmup 3 --repeats 10"
    LOOP="--batch_size 1000 --warmup 1 --repeats 2"
    TORCHRUN="--batch_size 128 --train_steps 30 --log_every 10 --warmup_steps 10 --num_workers 8"
    # The checkpoint scored with midpoint and ab2 at 17 and 5 steps (34, 10, 17 and 5 NFE): FID against
    # NFE, and the two second-order solvers at DiT-B/2 scale (on the 16px proxy they tie at equal NFE).
    SPEEDRUN="--num_samples 10000 --num_workers 12 --samplers midpoint ab2 --num_steps_list 17 5"
    SPEEDRUN_BUDGET="${SPEEDRUN_BUDGET:-240}"
    VQ="--batch_size 128 --train_steps 100 --log_every 50 --num_workers 8 --eval_images 1000"
    LATENT="--batch_size 128 --train_steps 100 --log_every 50 --num_workers 8 --compile true --compile_mode blocks"
    GEN="--num_samples 1000 --batch_size 500"
    KERNELS=""; SAMPLE_BATCHES="--batch_sizes 64 250"
    ATTENTION=flash
fi
PEAK_FLAG="${PEAK:+--peak_tflops $PEAK}"   # for every training and sampling row's MFU

step "machine"
[ "$DEV" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# Carried wheels install into a private folder (the machine's own packages stay as they are).
if ls "$GPU_DIR"/*.whl >/dev/null 2>&1; then
    python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SCRATCH/site" \
        "$GPU_DIR"/*.whl && export PYTHONPATH="$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}"
fi
DATA=""
if [ -f "$GPU_DIR/cifar10_train.tar.gz" ]; then
    rm -rf "$SCRATCH/data" && mkdir -p "$SCRATCH/data" && tar xzf "$GPU_DIR/cifar10_train.tar.gz" -C "$SCRATCH/data" && DATA="$SCRATCH/data/train"
    echo "data: $(find "$DATA" -name '*.jpg' | wc -l) images in $DATA"
fi

train() {  # train_throughput.py with the job's sizes; $1 = a name for the profile table, $2 = the model flags, then flags
    local name=$1 model=$2; shift 2
    python benchmarks/train_throughput.py --device "$DEV" $model --batch_size "$BATCH" $STEPS $PEAK_FLAG \
        --profile "$OUT/profile_train_$name.txt" --sync_debug true --json "$JSON" "$@"
}

with_diffusers() {   # true when diffusers imports; else says that $1 is skipped
    python -c "import diffusers" >/dev/null 2>&1 && return 0
    step "$1 skipped: carry a diffusers wheel in $GPU_DIR (gpu_prepare.sh speed)"; return 1
}

speed() {   # the most needed figures first: the budget guard cuts from the end
    fits "train eager" && { step "train DiT-B/2 batch $BATCH bf16, eager"; train eager "$MODEL" --compile false; }
    fits "train compiled" && { step "train, --compile true --compile_mode default (whole model)"
        train compiled "$MODEL" --compile true --compile_mode default; }
    fits "train compiled per block" && { step "train, --compile true --compile_mode blocks (regional)"
        train blocks "$MODEL" --compile true --compile_mode blocks; }
    fits "sample" && { step "sample: midpoint 17 (34 NFE), CFG 1.5, bf16, batch 1000: eager and compiled"
        python benchmarks/sample_throughput.py --device "$DEV" $SAMPLE $PEAK_FLAG --cfg_modes guided \
            --compile_modes none default --extrapolate_to 50000 --profile "$OUT/profile_sample.txt" --json "$JSON"; }
    with_diffusers "diffusers: training step" && fits "diffusers: training step" && {
        step "ours (compiled) vs diffusers' DiT (eager): training step, batch $BATCH"
        python benchmarks/compare_diffusers.py --device "$DEV" $DIFF --parts train --compile --json "$JSON"; }
    extra
}

extra() {   # what the first H200 job (2026-12-04) left unmeasured, most wanted first
    fits "kernel choices" && { step "kernel choices: SDPA backends, GELU after the GEMM vs in its epilogue (< 1 min)"
        python benchmarks/kernel_choices.py --device "$DEV" $KERNELS --json "$JSON"; }
    # PyTorch picks cuDNN's attention on Hopper; in the H200 profile its backward took 4x its forward.
    fits "train, SDPA $ATTENTION" && { step "train, compiled per block, attention restricted to SDPA's $ATTENTION kernel"
        train attention "$MODEL" --compile true --compile_mode blocks --sdpa_backend "$ATTENTION"; }
    with_diffusers "diffusers: sampling loop" && fits "diffusers: sampling loop" && {
        step "ours (compiled) vs the plain diffusers loop: whole batches, 34 NFE, CFG 1.5"
        python benchmarks/compare_diffusers.py --device "$DEV" $DIFF --parts loop --compile $LOOP --json "$JSON"; }
    fits "sample batch sizes" && { step "sample as above, compiled, at smaller batches (generate's default is 64)"
        python benchmarks/sample_throughput.py --device "$DEV" $SAMPLE $PEAK_FLAG $SAMPLE_BATCHES --cfg_modes guided \
            --compile_modes default --json "$JSON"; }
    torchrun_steps
    sample_graphs
    fits "train the speedrun preset" && { step "train, --preset cifar10_speedrun's model (qk-norm, SwiGLU), compiled per block"
        train speedrun_preset "$RECIPE_MODEL" --compile true --compile_mode blocks; }
    fits "train fp32 residual" && { step "train, --fp32_residual true (the stream in fp32, as DiT and SiT), compiled per block"
        train fp32_residual "$MODEL" --compile true --compile_mode blocks --fp32_residual true; }
    fits "MeanFlow step" && { step "train, --objective meanflow (eager: its JVP runs on the uncompiled model)"
        train meanflow "$MODEL" --objective meanflow --compile false; }
    fits "Muon step" && { step "train, --optimizer muon (Newton-Schulz in bf16 on CUDA), compiled per block"
        train muon "$MODEL" --compile true --compile_mode blocks --optimizer muon; }
    fits "fp16 step" && { step "train, --mixed_precision fp16 (GradScaler), compiled per block"
        train fp16 "$MODEL" --compile true --compile_mode blocks --mixed_precision fp16; }
    latent_steps
    # Last: autotuning every GEMM shape takes minutes of compiling.
    fits "train max-autotune" && { step "train, --compile_mode max-autotune-no-cudagraphs (Triton GEMMs, fused epilogues)"
        train autotune "$MODEL" --compile true --compile_mode max-autotune-no-cudagraphs; }
    fits "sample max-autotune" && { step "sample as above, compiled with max-autotune-no-cudagraphs"
        python benchmarks/sample_throughput.py --device "$DEV" $SAMPLE $PEAK_FLAG --cfg_modes guided \
            --compile_modes max-autotune-no-cudagraphs --extrapolate_to 50000 --json "$JSON"; }
}

baseline() {   # extra's reference rows on this card (the speed stage measures them and more)
    fits "train compiled per block" && { step "baseline: train, --compile true --compile_mode blocks"
        train blocks "$MODEL" --compile true --compile_mode blocks; }
    fits "sample compiled" && { step "baseline: sample, midpoint 17 (34 NFE), CFG 1.5, bf16, batch 1000, compiled"
        python benchmarks/sample_throughput.py --device "$DEV" $SAMPLE $PEAK_FLAG --cfg_modes guided \
            --compile_modes default --extrapolate_to 50000 --json "$JSON"; }
}

torchrun_steps() {
    if [ -z "$DATA" ]; then
        step "torchrun skipped: no $GPU_DIR/cifar10_train.tar.gz"
    elif fits "torchrun"; then
        step "torchrun --nproc_per_node 1 train_flow_matching.py ($([ "$DEV" = cuda ] && echo NCCL || echo gloo)), a few steps on CIFAR-10"
        rm -rf "$SCRATCH/torchrun"
        torchrun --standalone --nproc_per_node 1 train_flow_matching.py --dataset imagefolder --data_dir "$DATA" \
            $TORCHRUN --data_loader workers --sample_every 0 --save_every 100000 \
            --checkpoint_dir "$SCRATCH/torchrun" && ls "$SCRATCH/torchrun"
    fi
}

latent_steps() {   # train_vqvae.py, the flow model on its latents, generation decoding them
    if [ -z "$DATA" ]; then
        step "VQ-VAE and latent flow skipped: no $GPU_DIR/cifar10_train.tar.gz"
    elif fits "VQ-VAE and latent flow"; then
        step "train_vqvae.py, then train_flow_matching.py on its latents, then generate_flow_matching.py"
        local dir="$SCRATCH/latent"; rm -rf "$dir"
        python train_vqvae.py --dataset imagefolder --data_dir "$DATA" $VQ --sample_every 0 --save_every 100000 \
            --checkpoint_dir "$dir/vq" --sample_dir "$dir/vq_samples" &&
        python train_flow_matching.py --dataset imagefolder --data_dir "$DATA" --vqvae_checkpoint "$dir/vq/vqvae.pt" \
            $LATENT --sample_every 0 --save_every 100000 --data_cache_dir "$dir/cache" \
            --checkpoint_dir "$dir/fm" --sample_dir "$dir/fm_samples" &&
        python generate_flow_matching.py --checkpoint "$dir/fm/flow_matching_final.pt" $GEN --save_npz \
            --output_dir "$dir/gen" && ls "$dir/gen"
    fi
}

sample_graphs() {
    fits "sample with CUDA graphs" && { step "sample as above, compiled with CUDA graphs (reduce-overhead)"
        python benchmarks/sample_throughput.py --device "$DEV" $SAMPLE $PEAK_FLAG --cfg_modes guided \
            --compile_modes reduce-overhead --extrapolate_to 50000 --json "$JSON"; }
}

speedrun() {
    if [ -z "$DATA" ]; then step "speedrun skipped: no $GPU_DIR/cifar10_train.tar.gz"; return; fi
    # The smoke form scores with the full FID Inception when the test suite has it (CI builds it).
    local weights="$GPU_DIR/fid_inception_fp16.pth"
    [ "$SMOKE" = 1 ] && weights="${FID_INCEPTION_WEIGHTS:-}"
    if [ ! -f "$weights" ]; then step "speedrun skipped: no FID Inception weights ($weights; gpu_prepare.sh speedrun)"; return; fi
    step "speedrun: --preset ${SPEEDRUN_PRESET:-cifar10_speedrun}, ${SPEEDRUN_BUDGET} s from process start, then FID"
    rm -rf "$SCRATCH/speedrun"
    python benchmarks/speedrun.py --budget_s "$SPEEDRUN_BUDGET" --preset "${SPEEDRUN_PRESET:-cifar10_speedrun}" \
        --data_dir "$DATA" --inception_weights "$weights" --runs_dir "$SCRATCH/speedrun" \
        --fid_cache_dir "$SCRATCH/fid" --results "$OUT/speedrun.jsonl" $SPEEDRUN ${SPEEDRUN_FLAGS:-}
    cp "$SCRATCH"/speedrun/*/checkpoints/metrics.jsonl "$OUT/speedrun_metrics.jsonl" 2>/dev/null
}

for stage in $STAGES; do
    case "$stage" in
        speed|speedrun|extra|baseline) "$stage" ;;
        torchrun) torchrun_steps ;;
        sample_graphs) sample_graphs ;;
        latent) latent_steps ;;
        *) echo "unknown stage $stage: use speed, extra, baseline, speedrun, torchrun, sample_graphs, latent"; exit 2 ;;
    esac
done
step "table"
python benchmarks/gpu_table.py "$JSON" "$OUT/speedrun.jsonl"
