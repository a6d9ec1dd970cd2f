"""A diffusion over a subset of the original timesteps (respaced sampling, e.g. 50 or 250 steps of 4000)."""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch

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

    def training_losses(self, model: Any, x_start: torch.Tensor, t: torch.Tensor, **kwargs: Any
                        ) -> dict[str, torch.Tensor]:
        """As GaussianDiffusion's (hybrid: mse + vlb_weight * T' * L_t with T' this process's steps), except for
        vlb_weight = 1/T of the original T: that is improved-diffusion's loss without rescale_learned_sigmas
        (trainer.convert maps it so), whose respaced loss is mse + L_t, where ours would be mse + (T'/T) L_t.
        Refused rather than silently different."""
        if self.loss_type == "hybrid" and self.num_timesteps != self.original_num_steps and \
                math.isclose(self.vlb_weight * self.original_num_steps, 1.0, rel_tol=1e-9):
            raise ValueError(f"vlb_weight 1/{self.original_num_steps} (improved-diffusion without "
                             f"rescale_learned_sigmas) on a process respaced to {self.num_timesteps} steps: the "
                             f"original loss there is mse + L_t, ours would weigh L_t by {self.num_timesteps}/"
                             f"{self.original_num_steps}; compute training losses on the full process "
                             f"(timestep_respacing '')")
        return super().training_losses(model, x_start, t, **kwargs)
