"""The trainer's evaluation hook for flow models: FID of the EMA every --fid_every steps.

Built by train_flow_matching.py and handed to the Trainer (an objective holds losses only). The
Inception network and the reference statistics are loaded when it is built, before the first
step, so a missing weights file or reference folder fails at once rather than hours into a run.
"""

import dataclasses
from typing import Callable, Dict, Optional

import torch

import flow_matching
from evaluation import fid
from evaluation.sampling import generate_images
from models.dit_2d import input_shape
from utils.distributed import wait_for_all_ranks


class PeriodicFID:
    """`every` steps, FID of config.fid_num_samples EMA samples (the config's solver, steps,
    guidance interval and time shift, at --fid_cfg_scale) against the training data or
    --fid_ref_dir. Every rank samples its share; rank 0 scores them. The same labels and noise
    every time, so successive FIDs differ only by the weights. `decode` maps a latent run's samples
    to pixels."""

    def __init__(self, config, device: torch.device, autocast_dtype=None, rank: int = 0, world_size: int = 1,
                 decode=None):
        self.config, self.device, self.autocast_dtype = config, device, autocast_dtype
        self.rank, self.world_size, self.decode = rank, world_size, decode
        self.every = config.fid_every
        self.sampling = flow_matching.SamplingSettings.from_config(
            dataclasses.asdict(config), cfg_scale=config.fid_cfg_scale, cfg_flag="--fid_cfg_scale")
        ref = fid.ImageSet("imagefolder" if config.fid_ref_dir else config.dataset,
                           config.fid_ref_dir or config.data_dir, config.image_size, config.in_channels,
                           num_images=config.fid_ref_num_images)
        # Every rank samples its share of these labels.
        self.labels, mix = fid.reference_labels(config.fid_num_samples, config.num_classes, ref)
        if rank == 0:
            self.extractor = fid.InceptionFeatures(config.inception_weights).to(device).eval()
            self.reference, n, path, cached = fid.reference_statistics(
                ref, self.extractor, config.fid_cache_dir, device, config.fid_batch_size,
                config.num_workers, progress=True)
            print(f"FID reference: {ref.describe(n)}; statistics {'read from' if cached else 'written to'} {path}; "
                  f"labels: {mix}")
        wait_for_all_ranks()  # the other ranks wait out rank 0's reference statistics here

    @torch.no_grad()
    def __call__(self, ema, stop: Optional[Callable[[], bool]] = None) -> Dict[str, float]:
        """The metrics on rank 0, {} on the other ranks; SamplingStopped when `stop` (asked on every
        rank between batches) returns True."""
        c = self.config
        images, nfe = generate_images(
            ema, self.labels, self.sampling, shape=input_shape(c), num_classes=c.num_classes, seed=c.seed,
            batch_size=c.fid_batch_size, autocast_dtype=self.autocast_dtype, device=self.device, rank=self.rank,
            world_size=self.world_size, decode=self.decode, stop=stop)
        if self.rank != 0:
            return {}
        stats = fid.image_statistics(images, self.extractor, self.device, c.fid_batch_size)
        return {"fid": fid.frechet_distance(stats, self.reference), "fid_num_samples": len(images),
                "fid_nfe": nfe, "fid_cfg_scale": self.sampling.cfg_scale}
