"""What the trainer optimizes for each model: the loss, the sample grid and checkpoint extras."""

import torch

import flow_matching
from data.images import save_grid

# The training grid shows at most this many classes (rows), so a 1000-class run stays readable.
MAX_GRID_CLASSES = 16


class FlowMatchingObjective:
    """Flow-matching MSE for training; an EMA class grid (a row per class) for monitoring."""

    kind = "flow_matching"

    def __init__(self, config, device: torch.device, autocast_dtype=None):
        self.config, self.device, self.autocast_dtype = config, device, autocast_dtype

    def loss(self, model, batch, draws):
        x, y = batch
        c = self.config
        loss = flow_matching.flow_matching_loss(
            model, x, y, num_classes=c.num_classes, class_dropout_prob=c.class_dropout_prob,
            time_sampling=c.time_sampling, logit_normal_mean=c.logit_normal_mean,
            logit_normal_std=c.logit_normal_std, generator=draws.generator, rows=draws.rows,
            num_rows=draws.total)
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

    def checkpoint_extras(self):
        return {}
