"""What the trainer optimizes for each model: the loss, the sample grid, evaluation and checkpoint extras."""

from typing import Dict

import torch

import flow_matching
from data.images import save_grid
from evaluation import fid

# The training grid shows at most this many classes (rows), so a 1000-class run stays readable.
MAX_GRID_CLASSES = 16


class FlowMatchingObjective:
    """Flow-matching MSE for training; an EMA class grid (a row per class) and FID for monitoring."""

    kind = "flow_matching"

    def __init__(self, config, device: torch.device, autocast_dtype=None, rank: int = 0, world_size: int = 1):
        self.config, self.device, self.autocast_dtype = config, device, autocast_dtype
        self.rank, self.world_size = rank, world_size
        self.eval_every = config.fid_every
        if config.fid_every and rank == 0:
            # Before the first step: a missing weights file or reference set fails now, not hours in.
            self.fid_extractor = fid.InceptionFeatures(config.inception_weights).to(device).eval()
            ref = fid.ImageSet("imagefolder" if config.fid_ref_dir else config.dataset,
                               config.fid_ref_dir or config.data_dir, config.image_size, config.in_channels,
                               num_images=config.fid_ref_num_images)
            self.fid_reference, n, path, cached = fid.reference_statistics(
                ref, self.fid_extractor, config.fid_cache_dir, device, config.fid_batch_size,
                config.num_workers, progress=True)
            print(f"FID reference: {ref.describe(n)}; statistics {'read from' if cached else 'written to'} {path}")

    def loss(self, model, batch, generator):
        x, y = batch
        c = self.config
        loss = flow_matching.flow_matching_loss(
            model, x, y, num_classes=c.num_classes, class_dropout_prob=c.class_dropout_prob,
            time_sampling=c.time_sampling, logit_normal_mean=c.logit_normal_mean,
            logit_normal_std=c.logit_normal_std, generator=generator)
        return loss, {}

    def grid_labels(self):
        """Labels of the monitoring grid, row-major: a row per class (8 rows unconditional)."""
        c = self.config
        rows = min(c.num_classes, MAX_GRID_CLASSES) if c.num_classes else 8
        return torch.arange(rows).repeat_interleave(c.grid_samples_per_class)

    @torch.no_grad()
    def sample(self, ema, path: str) -> None:
        c = self.config
        y = self.grid_labels()
        noise = flow_matching.per_sample_noise(c.seed, range(len(y)), (c.in_channels, c.image_size, c.image_size),
                                               self.device)
        images, _ = flow_matching.sample(
            ema, noise, y.to(self.device) if c.num_classes else None, num_classes=c.num_classes,
            num_steps=c.num_sampling_steps, sampler=c.sampler,
            cfg_scale=c.cfg_scale if c.num_classes else 1.0, autocast_dtype=self.autocast_dtype)
        save_grid(images, c.grid_samples_per_class, path)

    @torch.no_grad()
    def evaluate(self, ema) -> Dict[str, float]:
        """FID of fid_num_samples EMA samples; every rank samples its share, rank 0 scores them.

        The same labels and noise every time, so successive FIDs differ only by the weights.
        Returns the metrics on rank 0 and {} on the other ranks.
        """
        c = self.config
        cfg_scale = c.cfg_scale if c.num_classes else 1.0
        images, nfe = flow_matching.generate_images(
            ema, fid.balanced_labels(c.fid_num_samples, c.num_classes),
            shape=(c.in_channels, c.image_size, c.image_size), num_classes=c.num_classes, seed=c.seed,
            num_steps=c.num_sampling_steps, sampler=c.sampler, cfg_scale=cfg_scale,
            batch_size=c.fid_batch_size, autocast_dtype=self.autocast_dtype, device=self.device,
            rank=self.rank, world_size=self.world_size)
        if self.rank != 0:
            return {}
        stats = fid.image_statistics(images, self.fid_extractor, self.device, c.fid_batch_size)
        return {"fid": fid.frechet_distance(stats, self.fid_reference), "fid_num_samples": len(images),
                "fid_nfe": nfe, "fid_cfg_scale": cfg_scale}

    def checkpoint_extras(self):
        return {}
