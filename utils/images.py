"""Conversions between model tensors (float NCHW in [-1, 1]) and images on disk (uint8 NHWC)."""

import os

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) float in [-1, 1] -> (N, H, W, C) uint8, rounding to the nearest level."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, nrow: int, padding: int = 2) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*H', nrow*W', C) image, row-major, `nrow` images a row."""
    n, h, w, c = images.shape
    rows = -(-n // nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = image
    return grid


def save_image(image: np.ndarray, path: str) -> None:
    """Save an (H, W, C) uint8 array (C = 1 or 3) as PNG, creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)


def save_grid(x: torch.Tensor, nrow: int, path: str) -> np.ndarray:
    """Model-space images (N, C, H, W) in [-1, 1] -> one PNG grid with `nrow` images a row;
    returns the grid (H', W', C) uint8."""
    grid = make_grid(to_uint8(x), nrow)
    save_image(grid, path)
    return grid
