"""`FlowMatchingConfig`: the flow-matching run, whose defaults are the seed's CIFAR-10 run (DiT-B/2).

Presets are applied before command-line flags: `cifar10` (the defaults), `tiny` (a CPU-sized
run that finishes in a few minutes on 2 cores and still shows a falling loss), `proxy16` (the
quality benchmark's proxy run, benchmarks/quality.py), and the recipe the ablations chose:
`cifar10_qk_swiglu` (DiT-B/2) with its proxy twin `proxy16_qk_swiglu`, and `cifar10_speedrun`
(that recipe with a schedule for benchmarks/speedrun.py's fixed-time GPU run).
"""

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Literal, Optional, Set

import torch

from configs.cli import field_choices, parse_config
from configs.train_config import TrainConfig
from utils.validation import check_fid_sample_count, check_guidance_interval, mlp_inner_width

# Fields that fix the network: resume and --init_from refuse a config that differs from the
# checkpoint's on them (generation rebuilds from the checkpoint's own config). dit_from_config must
# read each one (tests/test_architecture_options.py checks that each changes the built model; the
# latent_* fields only with a VQ-VAE, through input_shape, which tests/test_latent_flow.py covers).
ARCHITECTURE_FIELDS = ("image_size", "in_channels", "num_classes", "patch_size", "hidden_size",
                       "depth", "num_heads", "mlp_ratio", "latent_size", "latent_channels", "qk_norm",
                       "mlp", "positions", "time_embed_scale", "objective")


@dataclass
class FlowMatchingConfig(TrainConfig):
    """Train a class-conditional DiT2D with flow matching (t=0 noise, t=1 data)."""
    # Data
    dataset: Literal["cifar10", "imagefolder"] = field(default="cifar10", metadata={"help": "cifar10 (torchvision, downloaded when missing) or imagefolder (a class per subfolder)"})
    data_dir: str = field(default="datasets/cifar10", metadata={"help": "CIFAR-10 download folder, or the ImageFolder root"})
    image_size: int = field(default=32, metadata={"help": "images are resized and center-cropped to this size"})
    in_channels: int = field(default=3, metadata={"help": "3 = RGB, 1 = grayscale"})
    num_classes: Optional[int] = field(default=None, metadata={"help": "classes; none = from the dataset (10 for CIFAR-10); 0 = unconditional"})
    hflip: bool = field(default=True, metadata={"help": "random horizontal flips"})
    data_loader: Literal["auto", "device", "workers"] = field(default="auto", metadata={"help": "device = decode the dataset once into a uint8 tensor on the training device (cached in --data_cache_dir; flips on the device); workers = a DataLoader with --num_workers decoding every epoch; auto = device when it takes <= 1/4 of the free GPU memory (CUDA) or RAM (CPU), else workers. Both give the same batches"})
    data_cache_dir: str = field(default="data_cache", metadata={"help": "where decoded datasets and VQ-VAE latents are cached, keyed by their sources (never inside --data_dir)"})
    # Speed (TrainConfig's fields, with this model's defaults)
    compile: Optional[bool] = field(default=None, metadata={"help": "torch.compile the model (see --compile_mode); none (the default) = on where it was measured faster: flow-matching training on CUDA (DiT-B/2 on an H200: 1.33x the eager step), off on the CPU and for MeanFlow (its JVP runs eager; not measured compiled); the config saved with the run holds the choice"})
    compile_mode: Literal["default", "max-autotune-no-cudagraphs", "blocks"] = field(default="blocks", metadata={"help": "with --compile: blocks = each transformer block compiled in place (regional: one block's compile serves all of them; on an H200 the same step time as the whole model, 12 s of compiling instead of 47 s), or torch.compile's mode for the whole model"})
    # Latent flow matching (a VQ-VAE from train_vqvae.py)
    vqvae_checkpoint: Optional[str] = field(default=None, metadata={"help": "train on the latents of this VQ-VAE checkpoint (e.g. checkpoints/vqvae.pt); none = pixel space"})
    latent_size: Optional[int] = field(default=None, metadata={"help": "latent side the DiT sees; train_flow_matching.py fills it from the VQ-VAE, leave unset"})
    latent_channels: Optional[int] = field(default=None, metadata={"help": "latent channels the DiT sees; train_flow_matching.py fills it from the VQ-VAE, leave unset"})
    # Model (DiT2D)
    patch_size: int = field(default=2, metadata={"help": "patch side in pixels"})
    hidden_size: int = field(default=768, metadata={"help": "transformer width"})
    depth: int = field(default=12, metadata={"help": "transformer blocks"})
    num_heads: int = field(default=12, metadata={"help": "attention heads"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "MLP hidden size / width"})
    qk_norm: bool = field(default=False, metadata={"help": "RMS-normalize queries and keys per head (learned gain) before attention (SD3, ViT-22B): bounds the attention logits"})
    mlp: Literal["gelu", "swiglu"] = field(default="gelu", metadata={"help": "feed-forward branch: gelu = DiT's Linear-GELU-Linear; swiglu = SiLU-gated (LLaMA), inner width 2/3 * mlp_ratio * width so the parameter count stays"})
    positions: Literal["sincos", "rope", "sincos_rope"] = field(default="sincos", metadata={"help": "token positions: sincos = DiT's fixed 2D table added to the tokens; rope = 2D rotary positions in attention (rows rotate half of each head, columns the other half); sincos_rope = both (LightningDiT)"})
    time_embed_scale: float = field(default=1000.0, metadata={"help": "the timestep embedders see sin-cos features of S * t for t in [0, 1] (and of S * (r - t) for MeanFlow): 1000 = DiT's (diffusion's step numbers; fast in t); 1 = SiT's (t as is: smooth in t, which MeanFlow's du/dt target differentiates; the default of --objective meanflow, docs/meanflow.md)"})
    fp32_residual: bool = field(default=False, metadata={"help": "keep the residual stream in fp32 under bf16/fp16 autocast (DiT, SiT); false = the stream in the autocast dtype (half the memory traffic; adaLN-Zero updates below half a bf16 ulp of the stream are rounded away)"})
    class_dropout_prob: float = field(default=0.1, metadata={"help": "probability a label is replaced by the null label (trains CFG)"})
    # Objective
    objective: Literal["flow_matching", "meanflow"] = field(default="flow_matching", metadata={"help": "flow_matching = regress the velocity v(x_t, t); meanflow = regress the average velocity u(x_t, t, r) (Geng et al. 2025) for 1-2 step sampling (--sampler meanflow); the DiT then also embeds r - t"})
    init_from: Optional[str] = field(default=None, metadata={"help": "start from the trained (raw) weights of this flow-matching or MeanFlow checkpoint, with a fresh optimizer, step 0 and an EMA that starts equal to them and ramps up as in a fresh run (the checkpoint's EMA is not used) (e.g. turn a flow-matching run into a MeanFlow one); --resume of a run takes precedence"})
    meanflow_ratio: float = field(default=0.25, metadata={"help": "MeanFlow: share of samples with r != t (the rest learn the instantaneous velocity, r = t)"})
    meanflow_adaptive_p: float = field(default=1.0, metadata={"help": "MeanFlow: adaptive loss weight 1 / (||error||^2 + c)^p per sample; 0 = plain MSE"})
    meanflow_adaptive_c: float = field(default=1e-3, metadata={"help": "MeanFlow: the constant c of the adaptive weight"})
    meanflow_tangent: Literal["conditional", "predicted"] = field(default="conditional", metadata={"help": "MeanFlow: the JVP's tangent along x in the target's du/dt: conditional = the sampled velocity data - noise (the paper); predicted = the model's own velocity u(x_t, t, t) (Improved MeanFlow, Geng et al. 2025b: du/dt along the trajectory the sampler follows)"})
    meanflow_guidance_scale: float = field(default=1.0, metadata={"help": "MeanFlow guided target: v_g = w * v + k * u(x, t, t | y) + (1 - w - k) * u(x, t, t | null) for kept labels, i.e. CFG at scale w / (1 - k) learned into the model (sample it at --cfg_scale 1); w = 1, k = 0 = unguided"})
    meanflow_guidance_mix: float = field(default=0.5, metadata={"help": "MeanFlow guided target: the mixing ratio k (see --meanflow_guidance_scale); the default w = 1, k = 0.5 learns CFG scale 2"})
    # Flow matching
    time_sampling: Literal["uniform", "logit_normal"] = field(default="uniform", metadata={"help": "training distribution of t"})
    logit_normal_mean: float = field(default=0.0, metadata={"help": "mean of logit(t) for logit_normal"})
    logit_normal_std: float = field(default=1.0, metadata={"help": "std of logit(t) for logit_normal"})
    # Sampling (training grids and the default of generate_flow_matching.py)
    num_sampling_steps: int = field(default=50, metadata={"help": "ODE solver steps"})
    sampler: Literal["euler", "heun", "midpoint", "ab2", "meanflow"] = field(default="euler", metadata={"help": "ODE solver: euler (1 NFE a step), heun and midpoint (second order, 2 NFE a step), ab2 (second-order Adams-Bashforth, 1 NFE a step); meanflow = jumps with a MeanFlow model's average velocity (the default with --objective meanflow)"})
    cfg_scale: float = field(default=3.0, metadata={"help": "classifier-free guidance scale; 1 = no guidance"})
    guidance_interval_start: float = field(default=0.0, metadata={"help": "guidance applies only while guidance_interval_start <= t <= guidance_interval_end (Kynkaanniemi et al. 2024; t=0 noise); outside it the conditional velocity alone"})
    guidance_interval_end: float = field(default=1.0, metadata={"help": "end of the guidance interval (see guidance_interval_start); 0, 1 = guidance on every step"})
    time_shift: float = field(default=1.0, metadata={"help": "sampling time grid t(u) = u / (s - (s - 1) u) for u uniform in [0, 1]: s = 1 uniform, s > 1 more steps near noise (t = 0), s < 1 more near data; endpoints stay 0 and 1"})
    grid_samples_per_class: int = field(default=8, metadata={"help": "columns of the training sample grid (a row per class)"})
    # FID during training (evaluate_fid.py scores a finished checkpoint)
    fid_every: int = field(default=0, metadata={"help": "steps between FIDs of the EMA model (sampled with the settings above), logged to metrics.jsonl; 0 disables; needs requirements-eval.txt"})
    fid_num_samples: int = field(default=10_000, metadata={"help": "samples per FID during training (a full FID uses 50,000: evaluate_fid.py)"})
    fid_cfg_scale: Optional[float] = field(default=None, metadata={"help": "guidance scale of the FID samples; none = --cfg_scale (a visual setting: the lowest FID is often at a smaller scale; evaluate_fid.py --cfg_scales sweeps it)"})
    fid_batch_size: int = field(default=256, metadata={"help": "samples per forward pass (per rank) and images per Inception pass for FID"})
    fid_ref_dir: Optional[str] = field(default=None, metadata={"help": "reference ImageFolder for FID; none = the training data (--dataset, --data_dir)"})
    fid_ref_num_images: int = field(default=0, metadata={"help": "reference images for FID: a fixed random subset of this many; 0 = all"})
    fid_cache_dir: str = field(default="data_cache/fid", metadata={"help": "where FID reference statistics are cached"})
    inception_weights: Optional[str] = field(default=None, metadata={"help": "local FID Inception weights file; none = torch-fidelity downloads them"})

    def validate(self) -> None:
        super().validate()
        for name in ("image_size", "patch_size", "hidden_size", "depth",
                     "num_heads", "num_sampling_steps", "grid_samples_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"--in_channels must be 3 (RGB) or 1 (grayscale), got {self.in_channels}")
        if self.vqvae_checkpoint is None:
            if self.latent_size is not None or self.latent_channels is not None:
                raise ValueError("--latent_size / --latent_channels are filled from --vqvae_checkpoint; "
                                 "drop them or pass --vqvae_checkpoint PATH")
            if self.image_size % self.patch_size:
                raise ValueError(f"--image_size {self.image_size} is not divisible by --patch_size {self.patch_size}; "
                                 f"pick a --patch_size that divides it")
        elif not os.path.isfile(self.vqvae_checkpoint):
            raise ValueError(f"--vqvae_checkpoint {self.vqvae_checkpoint} does not exist; train one with "
                             f"train_vqvae.py (it writes checkpoints/vqvae.pt) or pass its path")
        if self.latent_size is not None and self.latent_size % self.patch_size:
            raise ValueError(f"--latent_size {self.latent_size} is not divisible by --patch_size {self.patch_size}; "
                             f"pick a --patch_size that divides it")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"--hidden_size {self.hidden_size} is not divisible by --num_heads {self.num_heads}; "
                             f"pick a --num_heads that divides it")
        if self.hidden_size % 4:
            raise ValueError(f"--hidden_size {self.hidden_size} must be divisible by 4: the 2D sin-cos positions "
                             f"give a quarter of the channels to each of sin and cos of rows and of columns")
        mlp_inner_width(self.hidden_size, self.mlp_ratio, self.mlp)
        if not self.time_embed_scale > 0:
            raise ValueError(f"--time_embed_scale must be > 0 (1000 = DiT's, 1 = t as is), got {self.time_embed_scale}")
        if self.positions != "sincos" and (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"--positions {self.positions} rotates pairs of each head's channels by rows and by "
                             f"columns: the head dimension --hidden_size / --num_heads = "
                             f"{self.hidden_size // self.num_heads} must be divisible by 4")
        if self.num_classes is not None and self.num_classes < 0:
            raise ValueError(f"--num_classes must be >= 0 (0 = unconditional), got {self.num_classes}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"--class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        if (self.objective == "meanflow" and self.class_dropout_prob == 0 and self.num_classes != 0
                and (self.meanflow_guidance_scale != 1 or self.meanflow_guidance_mix != 0)):
            raise ValueError(f"--class_dropout_prob 0 trains no null-label velocity, but MeanFlow's guided target "
                             f"(--meanflow_guidance_scale {self.meanflow_guidance_scale}, --meanflow_guidance_mix "
                             f"{self.meanflow_guidance_mix}) is built from it; pass --meanflow_guidance_scale 1 "
                             f"--meanflow_guidance_mix 0 (no guidance) or a --class_dropout_prob > 0")
        if self.class_dropout_prob == 0 and self.cfg_scale != 1 and self.num_classes != 0:
            raise ValueError(f"--class_dropout_prob 0 trains no null-label velocity, so --cfg_scale "
                             f"{self.cfg_scale} would guide with an untrained one; pass --cfg_scale 1 "
                             f"or a --class_dropout_prob > 0")
        data_dir, cache = os.path.abspath(self.data_dir), os.path.abspath(self.data_cache_dir)
        if os.path.commonpath([data_dir, cache]) == data_dir:
            raise ValueError(f"--data_cache_dir {self.data_cache_dir} lies inside --data_dir {self.data_dir}, "
                             f"which may be read-only; put the cache elsewhere (default: data_cache)")
        check_guidance_interval(self.guidance_interval_start, self.guidance_interval_end,
                                "--guidance_interval_start A / --guidance_interval_end B")
        if self.time_shift <= 0:
            raise ValueError(f"--time_shift must be > 0 (1 = a uniform grid), got {self.time_shift}")
        if self.sampler == "meanflow" and self.objective != "meanflow":
            ode_samplers = ", ".join(s for s in field_choices(type(self), "sampler") if s != "meanflow")
            raise ValueError("--sampler meanflow needs a MeanFlow model (--objective meanflow); a flow-matching "
                             f"model samples with --sampler {ode_samplers}")
        if not 0.0 <= self.meanflow_ratio <= 1.0:
            raise ValueError(f"--meanflow_ratio must be in [0, 1], got {self.meanflow_ratio}")
        if self.meanflow_adaptive_p < 0 or self.meanflow_adaptive_c <= 0:
            raise ValueError(f"--meanflow_adaptive_p must be >= 0 and --meanflow_adaptive_c > 0, got "
                             f"{self.meanflow_adaptive_p}, {self.meanflow_adaptive_c}")
        if not self.meanflow_guidance_mix < 1.0:
            raise ValueError(f"--meanflow_guidance_mix must be < 1 (the learned scale is w / (1 - k)), got "
                             f"{self.meanflow_guidance_mix}")
        if self.init_from is not None and not os.path.isfile(self.init_from):
            raise ValueError(f"--init_from {self.init_from} does not exist; pass a flow-matching or MeanFlow "
                             f"checkpoint (e.g. checkpoints/flow_matching_final.pt)")
        if self.logit_normal_std <= 0:
            raise ValueError(f"--logit_normal_std must be > 0, got {self.logit_normal_std}")
        self._validate_fid()

    def _validate_fid(self) -> None:
        if self.fid_every < 0:
            raise ValueError(f"--fid_every must be >= 0 (0 disables), got {self.fid_every}")
        check_fid_sample_count(self.fid_num_samples, "--fid_num_samples")
        if self.fid_batch_size < 1:
            raise ValueError(f"--fid_batch_size must be >= 1, got {self.fid_batch_size}")
        if self.fid_ref_num_images < 0 or self.fid_ref_num_images == 1:
            raise ValueError(f"--fid_ref_num_images must be 0 (all) or >= 2, got {self.fid_ref_num_images}")
        if not self.fid_every:
            return
        if importlib.util.find_spec("torch_fidelity") is None:
            raise ValueError("--fid_every needs torch-fidelity: pip install -r requirements-eval.txt "
                             "(or pass --fid_every 0)")
        if self.inception_weights is not None and not os.path.isfile(self.inception_weights):
            raise ValueError(f"--inception_weights {self.inception_weights} is not a file; pass a local "
                             f"copy of the FID Inception weights, or none to download them")


PRESETS = {
    "cifar10": {},
    "tiny": dict(hidden_size=128, depth=4, num_heads=4, batch_size=32, lr=1e-3, muon_lr=6e-3, warmup_steps=20,
                 train_steps=300, ema_decay=0.99, mixed_precision="no", num_workers=2,
                 log_every=25, save_every=100, sample_every=100, num_sampling_steps=10,
                 grid_samples_per_class=4),
    # The quality benchmark's proxy (benchmarks/quality.py): CIFAR-10 at 16x16 (64 tokens) so that
    # a DiT of width 192 / depth 6 trains 1,000 steps of batch 64 in ~10 min on 2 CPU cores.
    "proxy16": dict(image_size=16, hidden_size=192, depth=6, num_heads=3, batch_size=64, lr=1e-3,
                    warmup_steps=100, train_steps=1000, ema_decay=0.999, mixed_precision="no",
                    data_loader="device", num_workers=2, log_every=100, save_every=1000,
                    sample_every=1000, num_sampling_steps=20, cfg_scale=1.5),
}
# The recipe that won the ablations of benchmarks/README.md#recipe-ablations on the proxy: qk-norm
# and a SwiGLU MLP (the original DiT otherwise: 2D rotary positions on top measured no better, so
# they are left out), sampled with the midpoint solver at CFG 1.5. At DiT-B/2 on CIFAR-10 (the
# cifar10 preset's fields kept: width, depth, heads, batch, LR, steps) it samples with 17 midpoint
# steps = 34 NFE, inside the <= 35 NFE target; the proxy twin samples at 5 steps = 10 NFE, the
# budget where the measured gain over Euler is largest.
WINNER = dict(qk_norm=True, mlp="swiglu", sampler="midpoint", cfg_scale=1.5)
PRESETS["cifar10_qk_swiglu"] = dict(WINNER, num_sampling_steps=17)
PRESETS["proxy16_qk_swiglu"] = dict(PRESETS["proxy16"], **WINNER, num_sampling_steps=5)
# The fixed-wall-budget run of benchmarks/speedrun.py (~4 minutes of one H200, from process start):
# the winning DiT-B/2 recipe, trained to be sampled early. A first guess, to be confirmed on the GPU
# and on the proxy: a 5x higher LR than cifar10's (qk-norm keeps the attention logits bounded) with a
# short warmup and a cosine decay to a 0.1 floor over 4,000 steps (what the budget leaves at the
# ~2,700 images/s measured for compiled DiT-B/2 on an H200, after start-up, decoding and
# compiling); the blocks compiled one by one (12 s of compiling instead of 47 s, the same step
# time: benchmarks/README.md#gpu-speed); sampled as cifar10_qk_swiglu (17 midpoint steps = 34 NFE,
# CFG 1.5). Time sampling and EMA stay the defaults: the proxy found no gain beyond its spread in
# logit-normal t or a shorter EMA. Every field stays a flag.
PRESETS["cifar10_speedrun"] = dict(
    PRESETS["cifar10_qk_swiglu"], batch_size=128, lr=5e-4, warmup_steps=200, lr_schedule="cosine",
    min_lr_ratio=0.1, train_steps=4000, compile=True, compile_mode="blocks",
    data_loader="device", mixed_precision="bf16", log_every=500, save_every=100_000)


# A MeanFlow run's sampling defaults (its grids, and generate_flow_matching.py on its checkpoint),
# over the preset's unless given as flags: one average-velocity jump (the point of the objective),
# and no CFG on top of the guidance its training target already holds.
MEANFLOW_SAMPLING = {"sampler": "meanflow", "num_sampling_steps": 1, "cfg_scale": 1.0}
# ... and its time embedding: t and r - t as they are (SiT's), not DiT's 1000 t, whose fast wiggles in
# t MeanFlow's du/dt target reads as steep slopes (docs/meanflow.md; measured on the CPU proxy). Not
# with --init_from, whose checkpoint fixes the network (a flow-matching run's default is DiT's).
MEANFLOW_MODEL = {"time_embed_scale": 1.0}


def resolve_flow_matching_fields(values: Dict[str, Any], given: Set[str]) -> None:
    """The fields that follow from others, filled in before the config is validated: a MeanFlow
    run's sampling and (without --init_from) time-embedding defaults (over the preset's, unless given as
    flags), and --compile none's choice (on for flow-matching training on CUDA), so the config saved
    with the run says what ran."""
    if values["objective"] == "meanflow":
        defaults = {**MEANFLOW_SAMPLING, **(MEANFLOW_MODEL if values["init_from"] is None else {})}
        values.update({k: v for k, v in defaults.items() if k not in given})
    if values["compile"] is None:
        cuda = values["device"] == "cuda" or (values["device"] == "auto" and torch.cuda.is_available())
        values["compile"] = cuda and values["objective"] == "flow_matching"


def parse_flow_matching_config(argv=None, description: str = "") -> FlowMatchingConfig:
    return parse_config(FlowMatchingConfig, PRESETS, argv, description=description, default_preset="cifar10",
                        resolve=resolve_flow_matching_fields)
