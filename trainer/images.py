"""Sample grids: [N, C, H, W] in [-1, 1] -> uint8 [rows*H, ncol*W, 3] image, also written as PNG."""
from __future__ import annotations

import os

import numpy as np
import torch

from data.fsio import atomic_write


def make_grid(x: torch.Tensor, ncol: int, pad: int = 1) -> np.ndarray:
    """x: [N, C, H, W] floats in [-1, 1] -> uint8 [rows*(H+pad)+pad, ncol*(W+pad)+pad, 3]."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    n, _, h, w = x.shape
    rows = (n + ncol - 1) // ncol
    grid = np.zeros((rows * (h + pad) + pad, ncol * (w + pad) + pad, 3), np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = \
            x[i].permute(1, 2, 0).numpy()
    return grid


def save_grid(x: torch.Tensor, path: str, ncol: int, upscale: int = 4) -> np.ndarray:
    """Write the grid as PNG (nearest-neighbour upscaled for viewing); return the un-scaled grid."""
    from PIL import Image
    grid = make_grid(x, ncol)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    big = grid.repeat(upscale, 0).repeat(upscale, 1)
    atomic_write(path, lambda tmp: Image.fromarray(big).save(tmp, format="PNG"))
    return grid
