"""Guidance: classifier-free (Ho & Salimans 2022) as a model wrapper, classifier guidance as a cond_fn."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F


class ClassifierFreeGuidance:
    """Wraps a class-conditional model trained with label dropout to the null label `num_classes`.

    Called as `(x [B,C,...], t [B], y [B]) -> output`: one batched forward over [x; x] with labels [y; null], then
    eps = (1 + w) eps(x, y) - w eps(x, null) on the first C channels; any further channels (the learned-variance v)
    are taken from the conditional half. w = guidance_scale: a float, or a tensor [B] of one scale per example
    (progressive distillation at sampled scales; the calls' batch must then be B). A float w = 0 is the plain
    conditional model (one forward). Other tensor kwargs whose first dimension is B are duplicated along with x.
    """

    def __init__(self, model: Callable[..., torch.Tensor], guidance_scale: float | torch.Tensor, num_classes: int):
        if isinstance(guidance_scale, torch.Tensor):
            if guidance_scale.ndim != 1 or not guidance_scale.is_floating_point() or \
                    not bool((guidance_scale >= 0).all()):
                raise ValueError(f"a per-example guidance_scale must be a 1-D float tensor >= 0, got "
                                 f"{guidance_scale.dtype} {tuple(guidance_scale.shape)}")
        elif not guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale!r}")
        else:
            guidance_scale = float(guidance_scale)
        if not (isinstance(num_classes, int) and num_classes >= 1):
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.model, self.guidance_scale, self.num_classes = model, guidance_scale, num_classes

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if y is None:
            raise ValueError("classifier-free guidance needs class labels y (model_kwargs={'y': labels})")
        if y.shape != (x.shape[0],):
            raise ValueError(f"shape mismatch: y {tuple(y.shape)} vs batch {x.shape[0]}")
        w = self.guidance_scale
        if isinstance(w, torch.Tensor):
            if w.shape != (x.shape[0],):
                raise ValueError(f"shape mismatch: guidance_scale {tuple(w.shape)} vs batch {x.shape[0]}")
            w = w.to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
        elif w == 0:
            return self.model(x, t, y=y, **kwargs)
        B, C = x.shape[0], x.shape[1]
        null = torch.full_like(y, self.num_classes)
        dup = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == B else v
               for k, v in kwargs.items()}
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null]), **dup)
        cond, uncond = out[:B], out[B:]
        eps = (1 + w) * cond[:, :C] - w * uncond[:, :C]
        return torch.cat([eps, cond[:, C:]], dim=1)


class EmbeddedGuidance:
    """Calls a guidance-distilled model (UNetModel guidance_embed) with the same scale w for every example:
    `(x [B,C,...], t [B], **kwargs) -> model(x, t, w=full([B], w), **kwargs)`, ONE forward per call (the
    guidance is in the weights). Classifier guidance (a cond_fn) composes with it as with any model."""

    def __init__(self, model: Callable[..., torch.Tensor], guidance_scale: float):
        if not guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale!r}")
        self.model, self.guidance_scale = model, float(guidance_scale)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.model(x, t, w=torch.full((x.shape[0],), self.guidance_scale, device=x.device), **kwargs)


def classifier_cond_fn(classifier: Callable[..., torch.Tensor], scale: float = 1.0) -> Callable[..., torch.Tensor]:
    """cond_fn(x, t, y, **_) -> scale * d/dx log softmax(classifier(x, t))[y], shape of x (Dhariwal & Nichol 2021).

    `classifier(x_t, t)` returns logits [B, num_classes]; the result feeds p_sample_loop / ddim_sample_loop."""

    def cond_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        if y is None:
            raise ValueError("classifier guidance needs class labels y (model_kwargs={'y': labels})")
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = classifier(x_in, t)
            log_probs = F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
            selected = log_probs[torch.arange(len(y), device=y.device), y]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale

    return cond_fn
