"""A diffusion over a subset of the original timesteps (respaced sampling, e.g. 50 or 250 steps of 4000)."""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from .gaussian_diffusion import GaussianDiffusion


class SpacedDiffusion(GaussianDiffusion):
    """GaussianDiffusion keeping only `use_timesteps` of the process given by `betas`.

    The kept steps' betas are recomputed from the kept alpha-bars, beta'_i = 1 - abar[k_i] / abar[k_{i-1}], so the
    marginals q(x_t | x_0) at kept steps are unchanged and a learned variance interpolates between the right
    beta'_i and posterior variance. The model still receives the ORIGINAL timesteps k_i (`timestep_map`).
    """

    def __init__(self, use_timesteps: Iterable[int], *, betas: np.ndarray, **kwargs: Any):
        base = GaussianDiffusion(betas=betas, **kwargs)
        keep = sorted(set(int(k) for k in use_timesteps))
        if not keep or keep[0] < 0 or keep[-1] >= base.num_timesteps:
            raise ValueError(f"use_timesteps must be a non-empty subset of [0, {base.num_timesteps - 1}]")
        ab = base.alphas_cumprod[keep]
        new_betas = 1.0 - ab / np.append(1.0, ab[:-1])
        self.original_num_steps = base.num_timesteps
        self.use_timesteps = set(keep)
        super().__init__(betas=new_betas, **kwargs)
        self.timestep_map = np.array(keep, dtype=np.int64)
