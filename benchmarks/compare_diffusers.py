"""Our DiT2D against diffusers' DiTTransformer2DModel, side by side in one process.

    pip install -r benchmarks/requirements.txt
    python benchmarks/compare_diffusers.py                      # CPU, bf16 autocast, 256/6/4/2, batch 32
    python benchmarks/compare_diffusers.py --device cuda --hidden_size 768 --depth 12 --num_heads 12 --batch_size 128
    python benchmarks/compare_diffusers.py --device cuda --hidden_size 768 --depth 12 --num_heads 12 --batch_size 1000 \
        --parts loop --compile     # whole batches sampled: midpoint 17 steps, CFG 1.5

Both models get the same width, depth, heads, patch size, image size, classes and batch, the same
precision (autocast), the same training step (flow_matching.flow_matching_loss: MSE to data - noise
with label dropout, then backward, then AdamW, fused on CUDA for both) and the same sampling
forward (one no-grad forward at the batch, as every ODE step makes); `loop` generates whole batches
(flow_matching.sample: midpoint, batched CFG, bf16 forwards) with each. diffusers is set up as a DiT:
out_channels = in_channels (no learned sigma), num_embeds_ada_norm = num_classes, timestep = 1000 t.
The two models are timed interleaved, alternating which goes first in each round, after warm-up
rounds; the medians and their ratio (ours / diffusers, in images/s) are printed.
"""

import argparse
import sys
import os
from statistics import median

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import flow_matching  # noqa: E402
from benchmarks.common import count_flops_per_image, machine, time_call, write_json  # noqa: E402
from configs.cli import ArgumentParser, make_config  # noqa: E402
from configs.flow_matching_config import FlowMatchingConfig  # noqa: E402
from models import precision  # noqa: E402
from models.dit_2d import dit_from_config  # noqa: E402
from utils.distributed import resolve_device  # noqa: E402

PRECISIONS = {"bf16": torch.bfloat16, "fp32": None}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, allow_abbrev=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden_size", type=int, default=256, help="transformer width")
    p.add_argument("--depth", type=int, default=6, help="transformer blocks")
    p.add_argument("--num_heads", type=int, default=4, help="attention heads")
    p.add_argument("--patch_size", type=int, default=2, help="patch side in pixels")
    p.add_argument("--image_size", type=int, default=32, help="image side in pixels")
    p.add_argument("--num_classes", type=int, default=10, help="classes (plus the null label)")
    p.add_argument("--batch_size", type=int, default=32, help="images per training step and per forward")
    p.add_argument("--precision", default="bf16", choices=sorted(PRECISIONS), help="autocast dtype of both models")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"), help="auto = cuda when available")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing (each: one step per model)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; medians are reported")
    p.add_argument("--parts", default="train,sample", help="comma-separated: train, sample, loop")
    p.add_argument("--loop_steps", type=int, default=17, help="loop: midpoint steps (2 NFE each)")
    p.add_argument("--loop_cfg_scale", type=float, default=1.5, help="loop: CFG scale (cond and uncond in one forward)")
    p.add_argument("--compile", action="store_true", help="torch.compile our model (diffusers stays eager)")
    p.add_argument("--cpu_bf16_matmul", default="auto", choices=("auto", "fp32", "native"),
                   help="our bf16 GEMM route on the CPU (models.precision.set_cpu_bf16_matmul)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--json", default=None, help="append the results as one JSON line to this file")
    return p


def build_diffusers(args):
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError:
        raise ValueError("diffusers is not installed: pip install -r benchmarks/requirements.txt") from None
    return DiTTransformer2DModel(
        num_attention_heads=args.num_heads, attention_head_dim=args.hidden_size // args.num_heads,
        in_channels=3, out_channels=3, num_layers=args.depth, sample_size=args.image_size,
        patch_size=args.patch_size, num_embeds_ada_norm=args.num_classes, norm_eps=1e-6)


class Contender:
    """One model with its optimizer, a training step and a sampling forward."""

    def __init__(self, name, module, velocity, config, device, autocast_dtype):
        self.name, self.module, self.velocity = name, module, velocity
        self.config, self.device, self.autocast_dtype = config, device, autocast_dtype
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=device.type == "cuda")
        self.generator = torch.Generator(device=device)
        self.times = {"train": [], "sample": [], "loop": []}

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def train_step(self, x, y):
        self.module.train()
        self.generator.manual_seed(0)
        with self.autocast():
            loss = flow_matching.flow_matching_loss(
                self.velocity, x, y, num_classes=self.config.num_classes,
                class_dropout_prob=self.config.class_dropout_prob, generator=self.generator)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def sample_forward(self, x, y):
        self.module.eval()
        t = torch.full((x.shape[0],), 0.5, device=x.device)
        with self.autocast():
            self.velocity(x, t, y)

    def sample_loop(self, x, y, num_steps: int, cfg_scale: float):
        """A whole batch generated: midpoint ODE from noise x with batched CFG, the autocast
        forward and fp32 state of flow_matching.sample; for diffusers' DiT this is the ten-line
        loop a researcher writes."""
        self.module.eval()
        flow_matching.sample(self.velocity, x, y, flow_matching.SamplingSettings("midpoint", num_steps, cfg_scale),
                             num_classes=self.config.num_classes, autocast_dtype=self.autocast_dtype)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    try:
        if not parts or set(parts) - {"train", "sample", "loop"}:
            raise ValueError(f"--parts {args.parts!r}: use any of train, sample, loop, comma-separated")
        if args.warmup < 0 or args.repeats < 1:
            raise ValueError(f"--warmup must be >= 0 and --repeats >= 1, got {args.warmup}, {args.repeats}")
        config = make_config(FlowMatchingConfig, dict(
            hidden_size=args.hidden_size, depth=args.depth, num_heads=args.num_heads,
            patch_size=args.patch_size, image_size=args.image_size, num_classes=args.num_classes,
            batch_size=args.batch_size))
        device = resolve_device(args.device)
        theirs_module = build_diffusers(args).to(device)
    except ValueError as err:
        parser.error(str(err))
    precision.set_cpu_bf16_matmul(args.cpu_bf16_matmul)
    if args.threads:
        torch.set_num_threads(args.threads)
    autocast_dtype = PRECISIONS[args.precision]
    torch.manual_seed(0)
    ours_module = dit_from_config(config).to(device)
    ours_call = torch.compile(ours_module) if args.compile else ours_module
    contenders = [
        Contender("ours", ours_module, ours_call, config, device, autocast_dtype),
        Contender("diffusers", theirs_module,
                  lambda x, t, y: theirs_module(x, 1000 * t, y, return_dict=False)[0],
                  config, device, autocast_dtype),
    ]
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=gen) * 2 - 1).to(device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=gen).to(device)

    params = {c.name: sum(p.numel() for p in c.module.parameters()) for c in contenders}
    print(f"machine: {machine(device)}")
    print(f"shape: hidden {args.hidden_size}, depth {args.depth}, heads {args.num_heads}, patch "
          f"{args.patch_size}, {args.image_size}x{args.image_size}, batch {args.batch_size}, {args.precision} "
          f"autocast; params ours {params['ours'] / 1e6:.2f}M, diffusers {params['diffusers'] / 1e6:.2f}M; "
          f"our CPU bf16 matmul: {args.cpu_bf16_matmul}; compile ours: {args.compile}")
    print(f"counted FLOPs per image (ours): train {count_flops_per_image(config, True) / 1e9:.2f} G, "
          f"forward {count_flops_per_image(config, False) / 1e9:.2f} G")

    result = {"machine": machine(device), "args": vars(args), "params": params}
    for part in parts:
        for round_ in range(args.warmup + args.repeats):
            order = contenders if round_ % 2 == 0 else contenders[::-1]
            for c in order:
                if part == "loop":
                    fn = lambda x, y: c.sample_loop(x, y, args.loop_steps, args.loop_cfg_scale)  # noqa: E731
                else:
                    fn = c.train_step if part == "train" else c.sample_forward
                seconds = time_call(lambda: fn(x, y), device)
                if round_ >= args.warmup:
                    c.times[part].append(seconds)
                print(f"  {part} round {round_ + 1}/{args.warmup + args.repeats} "
                      f"{'(warm-up) ' if round_ < args.warmup else ''}{c.name}: {seconds:.3f}s", flush=True)
        rate = {c.name: args.batch_size / median(c.times[part]) for c in contenders}
        ratio = rate["ours"] / rate["diffusers"]
        label = {"train": "training step", "sample": "sampling forward",
                 "loop": f"sampling loop (midpoint {args.loop_steps} steps = {2 * args.loop_steps} NFE, CFG "
                         f"{args.loop_cfg_scale:g})"}[part]
        print(f"{label}: ours {rate['ours']:.2f} images/s, diffusers {rate['diffusers']:.2f} images/s "
              f"(medians of {args.repeats}); ratio ours/diffusers = {ratio:.2f}x")
        result[part] = {"images_per_s": rate, "ratio": ratio,
                        "seconds": {c.name: c.times[part] for c in contenders}}
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
