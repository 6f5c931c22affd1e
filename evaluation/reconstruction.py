"""Reconstruction metrics of a VQ-VAE: PSNR, and the quality and codebook use over a loader.

    psnr(mse)                                        # dB, images in [-1, 1]
    evaluate_reconstruction(vqvae, loader, device)   # {images, mse, psnr, perplexity, code_usage}

train_vqvae.py reports them on held-out images at the end of a run; the VQ-VAE objective logs
`psnr` of every training batch.
"""

import math
from typing import Dict, Iterable

import torch

from models.vqvae import VQVAE


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2) from their mean squared error."""
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


@torch.no_grad()
def evaluate_reconstruction(model: VQVAE, batches: Iterable, device) -> Dict[str, float]:
    """Reconstruction quality and codebook use over (x, y) batches, without updating the codebook.

    psnr is the mean over images of each image's PSNR (reconstructions clamped to [-1, 1]);
    perplexity and code_usage are measured on the histogram of all codes of all images.
    """
    counts = torch.zeros(model.codebook_size, dtype=torch.float64)
    sq_err, psnr_sum, n = 0.0, 0.0, 0
    for x, _ in batches:
        x = x.to(device).float()
        codes = model.codes(x)
        recon = model.decoder(model.quantizer.lookup(codes)).float().clamp(-1, 1)
        per_image = (recon - x).square().flatten(1).mean(1)
        sq_err += per_image.sum().item()
        psnr_sum += psnr(per_image).sum().item()
        n += x.shape[0]
        counts += torch.bincount(codes.flatten().cpu(), minlength=model.codebook_size).double()
    if n == 0:
        raise ValueError("no images to evaluate the VQ-VAE on")
    probs = counts / counts.sum()
    perplexity = math.exp(-(probs[probs > 0] * probs[probs > 0].log()).sum().item())
    return {"images": n, "mse": sq_err / n, "psnr": psnr_sum / n, "perplexity": perplexity,
            "code_usage": (counts > 0).double().mean().item()}
