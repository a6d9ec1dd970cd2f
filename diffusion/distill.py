"""Progressive distillation (Salimans & Ho 2022): the step grid of an N-step sampler and the student's target.

A student of K steps samples at `step_grid(T, K)`; its teacher of N = 2K steps at `step_grid(T, N)`, whose every
second step is the student's (step_grid(T, 2K)[1::2] == step_grid(T, K)). One student step from teacher index
2j+1 (timestep step_grid(T, K)[j]) replaces the teacher's two deterministic DDIM steps 2j+1 -> 2j -> 2j-1 (the last
one ending at x_0). The target is the x_0 that a single DDIM step would need to land where the two teacher steps
land (the paper's algorithm 2):

    x~ = (z'' - (sigma''/sigma_t) z_t) / (alpha'' - (sigma''/sigma_t) alpha_t),  alpha = sqrt(abar), sigma = sqrt(1-abar)
"""
from __future__ import annotations

from typing import Callable

import torch

from .gaussian_diffusion import GaussianDiffusion


def step_grid(num_timesteps: int, steps: int) -> list[int]:
    """The `steps` timesteps (ascending) of a T-step process that a `steps`-step sampler visits:
    round((i + 1) T / steps) - 1 for i < steps (halves rounded up), always ending at T - 1 (pure noise)."""
    T, K = int(num_timesteps), int(steps)
    if not 1 <= K <= T:
        raise ValueError(f"cannot sample {K} steps of a {T}-step process: need 1 <= steps <= {T}")
    return [(2 * (i + 1) * T + K) // (2 * K) - 1 for i in range(K)]


def is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and n >= 1 and n & (n - 1) == 0


def teacher_ddim_target(teacher: Callable[..., torch.Tensor], teacher_diffusion: GaussianDiffusion,
                        x_t: torch.Tensor, index: torch.Tensor, *, substeps: int = 2, clip: bool = True,
                        model_kwargs: dict | None = None) -> torch.Tensor:
    """The student's x_0 target [B, C, ...] for x_t [B, C, ...] at teacher indices `index` [B] (int64).

    Runs `substeps` deterministic DDIM steps (eta 0) of `teacher` on `teacher_diffusion` (its own N-step process,
    e.g. create_diffusion(..., distilled_steps=N)) from index i down to i - substeps + 1, x_0 predictions clipped
    to [-1, 1] if `clip`, then solves one DDIM step from abar_i to the level reached for its x_0. Needs
    index >= substeps - 1. Computed in float64 for float64 input, else float32; the teacher runs under no_grad.
    """
    D, C = teacher_diffusion, x_t.shape[1]
    dt = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    x_t = x_t.to(dt)
    if bool((index < substeps - 1).any()):
        raise ValueError(f"teacher indices must be >= {substeps - 1} for {substeps} steps")
    z, i = x_t, index
    with torch.no_grad():
        for _ in range(substeps):
            out = teacher(z, D.map_timesteps(i), **(model_kwargs or {}))[:, :C].to(dt)
            x0 = D._predict_xstart(z, i, out)
            if clip:
                x0 = x0.clamp(-1, 1)
            ab, ab_prev = D._extract("alphas_cumprod", i, z), D._extract("alphas_cumprod_prev", i, z)
            z = ab_prev.sqrt() * x0 + ((1 - ab_prev) / (1 - ab)).sqrt() * (z - ab.sqrt() * x0)
            i = i - 1
    top = index
    ab_t = D._extract("alphas_cumprod", top, z)
    ab_end = D._extract("alphas_cumprod_prev", top - substeps + 1, z)
    ratio = ((1 - ab_end) / (1 - ab_t)).sqrt()
    return (z - ratio * x_t) / (ab_end.sqrt() - ratio * ab_t.sqrt())
