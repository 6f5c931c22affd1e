"""What the trainer optimizes for each model: the loss, the sample grid and checkpoint extras.
Evaluation during training (FID) is built by the script from evaluation/ and handed to the Trainer."""

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

import flow_matching
from utils.images import save_grid
from models.dit_2d import input_shape
from evaluation.reconstruction import psnr

# The training grid shows at most this many classes (rows), so a 1000-class run stays readable.
MAX_GRID_CLASSES = 16


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under torch.compile and DDP wrappers: MeanFlow's JVP runs on it (forward-mode AD
    goes through neither; its output is a target, so no gradient needs DDP's all-reduce)."""
    while hasattr(model, "_orig_mod") or isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


class FlowMatchingObjective:
    """The flow-matching MSE (or, with --objective meanflow, MeanFlow's loss) for training; an EMA
    class grid (a row per class) for monitoring, sampled with the config's settings (solver, steps,
    CFG scale and interval, time shift).

    With a `latent_space` (models.vqvae.LatentSpace) the model works on normalized VQ-VAE
    latents: grids are decoded to pixels and the checkpoint stores the normalization.
    """

    kind = "flow_matching"
    probe_ema = True  # samples come from the EMA: the log compares its loss with the raw weights
    split_invariant = True  # a step is the same whatever its micro-batch split (its draws are the global batch's)

    def __init__(self, config, device: torch.device, autocast_dtype=None, latent_space=None):
        self.config, self.device, self.autocast_dtype = config, device, autocast_dtype
        self.latent_space = latent_space
        self.sampling = flow_matching.SamplingSettings.from_config(dataclasses.asdict(config))
        self.times = flow_matching.TimeDistribution(config.time_sampling, config.logit_normal_mean,
                                                    config.logit_normal_std)

    def loss(self, model, batch, draws):
        x, y = batch
        c = self.config
        if c.objective == "meanflow":
            loss, mse = flow_matching.meanflow_loss(
                model, x, y, num_classes=c.num_classes, class_dropout_prob=c.class_dropout_prob,
                ratio=c.meanflow_ratio, times=self.times, guidance_scale=c.meanflow_guidance_scale,
                guidance_mix=c.meanflow_guidance_mix, adaptive_p=c.meanflow_adaptive_p,
                adaptive_c=c.meanflow_adaptive_c, tangent=c.meanflow_tangent, jvp_model=unwrap(model), generator=draws.generator,
                rows=draws.rows, num_rows=draws.total, noise=draws.normal(x.shape[1:], x.dtype))
            return loss, {"mse": mse}
        return self.velocity_loss(model, batch, draws), {}

    def velocity_loss(self, model, batch, draws) -> torch.Tensor:
        """The flow-matching MSE of the model's instantaneous velocity (a MeanFlow model's at r = t)."""
        x, y = batch
        c = self.config
        return flow_matching.flow_matching_loss(
            model, x, y, num_classes=c.num_classes, class_dropout_prob=c.class_dropout_prob, times=self.times,
            generator=draws.generator, rows=draws.rows, num_rows=draws.total, noise=draws.normal(x.shape[1:], x.dtype))

    def probe_loss(self, model, batch, draws) -> torch.Tensor:
        """The error the log compares between the EMA and the raw weights: the flow-matching loss for
        either objective, a fixed target. MeanFlow's own unweighted `mse` is not one: its target
        holds the model's du/dt, which grows as the model learns how u changes with t, so that `mse`
        can rise while the model improves (docs/meanflow.md); its weighted loss is ~1 whatever the error."""
        return self.velocity_loss(model, batch, draws)

    def grid_labels(self):
        """Labels of the monitoring grid, row-major: a row per class (8 rows unconditional)."""
        c = self.config
        rows = min(c.num_classes, MAX_GRID_CLASSES) if c.num_classes else 8
        return torch.arange(rows).repeat_interleave(c.grid_samples_per_class)

    @torch.no_grad()
    def sample(self, ema, path: str) -> np.ndarray:
        c = self.config
        y = self.grid_labels()
        noise = flow_matching.per_sample_noise(c.seed, range(len(y)), input_shape(c), self.device)
        images, _ = flow_matching.sample(ema, noise, y.to(self.device) if c.num_classes else None, self.sampling,
                                         num_classes=c.num_classes, autocast_dtype=self.autocast_dtype)
        if self.latent_space is not None:
            images = self.latent_space.decode(images)
        return save_grid(images, c.grid_samples_per_class, path)

    def checkpoint_extras(self):
        return {"latent": self.latent_space.state()} if self.latent_space is not None else {}

    def check_resume(self, ckpt, path: str) -> None:
        """A latent run resumes only in the latent space it was trained in (a pixel vs latent mix-up
        already fails the trainer's architecture check: latent_size differs)."""
        if self.latent_space is not None:
            self.latent_space.check_resumes(ckpt, path)


class VQVAEObjective:
    """Reconstruction MSE + commitment loss; a grid of originals over their reconstructions.

    The grid is drawn with the trained weights (`model`), not the weight EMA the trainer passes:
    the codebook buffers follow the live encoder (see models/vqvae.py), so those are the weights
    that encode and decode.
    """

    kind = "vqvae"
    probe_ema = False  # the trained weights encode and decode (above); the weight EMA is unused
    split_invariant = False  # the codebook moves once per forward: the micro-batch split changes the run

    def __init__(self, config, model, grid_images: torch.Tensor):
        self.config, self.model, self.grid_images = config, model, grid_images

    def loss(self, model, batch, draws):
        x, _ = batch
        recon, stats = model(x, generator=draws.generator)
        mse = F.mse_loss(recon.float(), x.float())
        loss = mse + self.config.commitment_weight * stats["commitment"]
        return loss, {"mse": mse.detach(), "psnr": psnr(mse.detach()), "commitment": stats["commitment"].detach(),
                      "perplexity": stats["perplexity"], "code_usage": stats["code_usage"]}

    @torch.no_grad()
    def sample(self, ema, path: str) -> np.ndarray:
        device = next(self.model.parameters()).device
        x = self.grid_images.to(device)
        recon = self.model.decode(self.model.encode(x))
        return save_grid(torch.cat([x, recon.float()]), len(x), path)

    def checkpoint_extras(self):
        return {}

    def check_resume(self, ckpt, path: str) -> None:
        """Nothing beyond the architecture and optimizer fields the trainer checks."""
