"""The mathematics of Improved DDPM: schedules, Gaussian diffusion, respacing, guidance, timestep samplers.

The network (diffusion.unet, diffusion.presets) is imported separately; this package never imports it.
"""
from __future__ import annotations

from .gaussian_diffusion import LOSS_TYPES, GaussianDiffusion
from .guidance import ClassifierFreeGuidance, EmbeddedGuidance, classifier_cond_fn
from .respace import SpacedDiffusion
from .schedules import SCHEDULES, get_named_beta_schedule, space_timesteps
from .timestep_samplers import LossSecondMomentResampler, UniformSampler, create_timestep_sampler

__all__ = [
    "GaussianDiffusion", "SpacedDiffusion", "ClassifierFreeGuidance", "EmbeddedGuidance", "classifier_cond_fn",
    "create_diffusion",
    "get_named_beta_schedule", "space_timesteps", "create_timestep_sampler", "UniformSampler",
    "LossSecondMomentResampler", "SCHEDULES", "LOSS_TYPES",
]


def create_diffusion(*, steps: int = 4000, noise_schedule: str = "cosine", learn_sigma: bool = True,
                     sigma_small: bool = False, loss: str = "hybrid", vlb_weight: float = 0.001,
                     predict_xstart: bool = False, timestep_respacing: str | list[int] = "",
                     model_mean_type: str | None = None, distilled_steps: int = 0) -> GaussianDiffusion:
    """The diffusion of Improved DDPM from the usual flags.

    learn_sigma -> "learned_range" variance (model outputs 2*C channels); else sigma_small -> beta~_t, else beta_t.
    loss in ("simple", "hybrid", "vlb"); vlb_weight is lambda in L_simple + lambda * L_vlb, with L_vlb estimated
    as T * L_t: 0.001 is the paper's hybrid loss (improved-diffusion's rescaled default at any T), 1/T gives
    mse + L_t, the original code's unscaled variant.
    timestep_respacing "" keeps all `steps` (a plain GaussianDiffusion), else a SpacedDiffusion (see
    space_timesteps: "250", "10,15,20", "ddim50").
    model_mean_type ("epsilon", "xstart", "v") overrides predict_xstart when given.
    distilled_steps K > 0: a progressively distilled student, whose process is its own K steps
    diffusion.distill.step_grid(steps, K); timestep_respacing must then be "", "K" or "ddimK" (the same steps).
    loss="simple" with learn_sigma is refused: the simple loss trains no variance (improved-diffusion's
    "simple" loss with learned sigmas adds the vb term, i.e. it is our "hybrid").
    """
    if loss not in LOSS_TYPES:
        raise ValueError(f"unknown loss {loss!r}; allowed: {', '.join(LOSS_TYPES)}")
    if loss == "simple" and learn_sigma:
        raise ValueError("loss 'simple' with learn_sigma trains no variance at all: use loss 'hybrid' (L_simple + "
                         "vlb_weight * L_vlb, what improved-diffusion trains for learned sigmas) or learn_sigma=False")
    betas = get_named_beta_schedule(noise_schedule, steps)
    mean_type = model_mean_type or ("xstart" if predict_xstart else "epsilon")
    kwargs = dict(betas=betas, model_mean_type=mean_type,
                  model_var_type="learned_range" if learn_sigma else ("fixed_small" if sigma_small else "fixed_large"),
                  loss_type=loss, vlb_weight=vlb_weight)
    if distilled_steps:
        from .distill import step_grid
        if timestep_respacing not in ("", None, str(distilled_steps), f"ddim{distilled_steps}"):
            raise ValueError(f"a distilled student samples in its own {distilled_steps} steps only (respacing "
                             f"'ddim{distilled_steps}'), got {timestep_respacing!r}")
        return SpacedDiffusion(step_grid(steps, distilled_steps), **kwargs)
    if timestep_respacing in ("", None):
        return GaussianDiffusion(**kwargs)
    return SpacedDiffusion(space_timesteps(steps, timestep_respacing), **kwargs)
