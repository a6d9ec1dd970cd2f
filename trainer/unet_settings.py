"""Settings helpers shared by the objectives that train a diffusion.presets UNet on a Gaussian diffusion (iddpm, vdm,
classifier): the UNet configuration and the diffusion of a run, and the labels of a preview grid."""
from __future__ import annotations

from typing import Any

import torch

from diffusion.presets import PRESETS


def model_config_dict(cfg: Any) -> dict[str, Any]:
    """The UNet configuration of a run: its preset with the config's overrides (`diffusion.presets` dict)."""
    m = cfg.model
    o: dict[str, Any] = {"learn_sigma": cfg.diffusion.learn_sigma, "use_checkpoint": m.grad_checkpoint}
    for k in ("image_size", "num_classes", "dropout"):
        if getattr(m, k) is not None:
            o[k] = getattr(m, k)
    if o.get("num_classes") == 0:
        o["num_classes"] = None
    return PRESETS[m.size].replace(**o).to_dict()


def diffusion_kwargs(cfg: Any) -> dict[str, Any]:
    """`create_diffusion` keyword arguments of a run."""
    d = cfg.diffusion
    return dict(steps=d.steps, noise_schedule=d.noise_schedule, learn_sigma=d.learn_sigma, loss=d.loss,
                vlb_weight=d.vlb_weight)


def grid_labels(num_classes: int, n: int) -> torch.Tensor | None:
    """Labels of the preview grid: 8 per class for <= 10 classes (one row each), else one each of the first 64
    classes; `n` > 0 overrides the count (labels cycle through the classes)."""
    if not num_classes:
        return None
    per = 8 if num_classes <= 10 else 1
    labels = torch.arange(min(num_classes, 10 if num_classes <= 10 else 64)).repeat_interleave(per)
    if not n:
        return labels
    return labels[:n] if n <= len(labels) else torch.arange(n) % num_classes
