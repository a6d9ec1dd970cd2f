"""Small building blocks for the UNet: float32 group norm, sinusoidal timestep embedding, zero init."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def group_norm32(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """GroupNorm with its statistics and affine computed in float32 (stable under bf16/fp16).

    x: [B, C, H, W] (any memory format). Returns float32; the caller casts back once, after any fused
    scale/shift/activation, so that the low-precision rounding happens a single time.
    """
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.group_norm(x.float(), num_groups, w, b, eps)


class GroupNorm32(nn.GroupNorm):
    """nn.GroupNorm computed in float32; output in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm32(x, self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps (as in the Transformer / DDPM).

    t: [B] timesteps (integer or fractional). Returns [B, dim] float32: cos of the dim//2 frequencies
    exp(-ln(max_period) * k / (dim//2)), k = 0..dim//2-1, then sin; a zero column pads an odd dim.
    """
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(k * (-math.log(max_period) / half))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def zero_(module: nn.Module) -> nn.Module:
    """Set every parameter of `module` to zero (output layers of residual branches) and return it."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module
