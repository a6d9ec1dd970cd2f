"""Settings shared by the objectives that train a diffusion.presets UNet on a Gaussian diffusion (iddpm, vdm,
classifier): the UNet and diffusion sections of their options (`objective.NAME.model`, `objective.NAME.diffusion` in
config.json; the flags --model-size, --diffusion-steps, ...), the UNet configuration and diffusion of a run built from
them, and the labels of a preview grid."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diffusion.presets import PRESETS
from trainer.configlib import option


def _presets() -> list[str]:
    return list(PRESETS)


def _schedules() -> tuple[str, ...]:
    from diffusion import SCHEDULES
    return SCHEDULES


def _losses() -> tuple[str, ...]:
    from diffusion import LOSS_TYPES
    return LOSS_TYPES


@dataclass
class NetOverrides:
    """model (preset overrides)"""
    image_size: int | None = option(None, "override the preset's image side", unit="px", lower=1, frozen=True)
    num_classes: int | None = option(None, "override the preset's classes (0 = unconditional)", lower=0,
                                     frozen=True)
    dropout: float | None = option(None, "override the preset's dropout", lower=0.0, upper=1.0, upper_open=True)
    grad_checkpoint: bool = option(False, "gradient (activation) checkpointing inside the network")


@dataclass
class UNetSection(NetOverrides):
    """model (a diffusion.presets UNet plus overrides)"""
    size: str = option("tiny16", "UNet preset of diffusion.presets", choices=_presets, frozen=True,
                       flag="--model-size")


@dataclass
class ProcessSection:
    """diffusion process"""
    steps: int = option(4000, "diffusion steps T", lower=1, frozen=True, flag="--diffusion-steps")
    noise_schedule: str = option("cosine", "beta schedule", choices=_schedules, frozen=True)


@dataclass
class DiffusionSection(ProcessSection):
    """diffusion process and loss"""
    loss: str = option("hybrid", "training loss (hybrid = L_simple + vlb_weight * L_vlb)", choices=_losses,
                       frozen=True)
    vlb_weight: float = option(0.001, "lambda of the hybrid loss", lower=0.0, frozen=True)
    learn_sigma: bool = option(True, "learn the reverse-process variance (output 2C channels)", frozen=True)


def preset_overrides(m: NetOverrides) -> dict[str, Any]:
    """The keyword arguments a section's overrides give a preset's `replace` / `get_classifier_config`: gradient
    checkpointing, and image_size / num_classes / dropout where set."""
    o: dict[str, Any] = {"use_checkpoint": m.grad_checkpoint}
    for k in ("image_size", "num_classes", "dropout"):
        if getattr(m, k) is not None:
            o[k] = getattr(m, k)
    return o


def model_config_dict(m: UNetSection, learn_sigma: bool) -> dict[str, Any]:
    """The UNet configuration of a run: its preset with the section's overrides (`diffusion.presets` dict)."""
    o: dict[str, Any] = {"learn_sigma": learn_sigma, **preset_overrides(m)}
    if o.get("num_classes") == 0:
        o["num_classes"] = None
    return PRESETS[m.size].replace(**o).to_dict()


def diffusion_kwargs(d: DiffusionSection) -> dict[str, Any]:
    """`create_diffusion` keyword arguments of a run."""
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
