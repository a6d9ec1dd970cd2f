"""The `classifier` objective: a noise-aware classifier for classifier guidance (Dhariwal & Nichol 2021).

Cross-entropy of EncoderClassifier(x_t, t) against the clean label, with x_t = q_sample(x_0, t) at t uniform in
[0, t_max), t_max = ceil(max_t * T) of the run's diffusion (the `diffusion` section: steps and schedule; the sampler
checks that a guided model uses the same process). Logs loss and accuracy overall and by quarter of [0, t_max).

    python -m trainer.main --objective classifier --classifier-size tiny16 --data train-manifest.json \
        --run-dir runs/clf --diffusion-steps 1000 --noise-schedule cosine --total-steps 2000

Its model section's image_size / num_classes / dropout / grad_checkpoint override the classifier preset; its
diffusion section (steps, noise schedule) is the process the classifier is trained for. Export (trainer.export)
writes the classifier's config with "kind": "encoder_classifier" and the diffusion it was trained for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from data.cli import UsageError
from diffusion import create_diffusion
from diffusion.classifier import CLASSIFIER_PRESETS, get_classifier_config
from trainer.configlib import option
from trainer.unet_settings import NetOverrides, ProcessSection, preset_overrides
from trainer.objective import Batch, Net, Objective, register_objective


@dataclass
class ClassifierOptions:
    model: NetOverrides = field(default_factory=NetOverrides)
    diffusion: ProcessSection = field(default_factory=ProcessSection)
    classifier_size: str = option("tiny16", "classifier preset of diffusion.classifier (adm64: ADM's ImageNet 64x64 "
                                  "classifier)", choices=lambda: CLASSIFIER_PRESETS, frozen=True)
    max_t: float = option(1.0, "train on t < ceil(max_t * T) only (1 = every timestep)", unit="fraction of T",
                          lower=0.0, upper=1.0, lower_open=True, frozen=True)


def classifier_config_dict(m: NetOverrides, preset: str) -> dict[str, Any]:
    """The classifier configuration of a run: its preset with the model section's overrides."""
    o = preset_overrides(m)
    if o.get("num_classes") == 0:
        raise UsageError("objective.classifier.model.num_classes (--num-classes) 0: a classifier needs classes (>= 2)")
    return get_classifier_config(preset, **o).to_dict()


@register_objective("classifier")
class NoisyClassifier(Objective):
    """Per-sample cross-entropy of the classifier on q_sample(x_0, t); metrics acc, loss_q*/acc_q* (NaN outside
    the quarter). Stateless apart from the weights."""

    Options = ClassifierOptions
    console = ("acc",)
    kind = "classifier"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        o = self.options
        self.model_cfg = classifier_config_dict(o.model, o.classifier_size)
        self.num_classes = self.model_cfg["num_classes"]
        self.diffusion_kw = {"steps": o.diffusion.steps, "noise_schedule": o.diffusion.noise_schedule}
        self.diffusion = create_diffusion(**self.diffusion_kw)
        self.t_max = max(1, math.ceil(self.options.max_t * self.diffusion.num_timesteps))

    def build_model(self) -> torch.nn.Module:
        from diffusion.classifier import create_classifier_from_config
        return create_classifier_from_config(self.model_cfg)

    def zero3_leaf_modules(self) -> list[type]:
        from diffusion.unet import UNetBlock
        return [UNetBlock]

    def export_config(self) -> dict[str, Any]:
        return {"model": self.model_cfg, "diffusion": self.diffusion_kw}

    def loss(self, net: Net, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise UsageError(f"data labels lie in [{int(y.min())}, {int(y.max())}] but the classifier has "
                             f"{self.num_classes} classes (unlabelled data, or set --num-classes)")
        t = torch.randint(self.t_max, (x.shape[0],), generator=generator, device=x.device)
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        logits = net(self.diffusion.q_sample(x, t, noise=noise), t)
        losses = F.cross_entropy(logits, y, reduction="none")
        plain = losses.detach()
        acc = (logits.detach().argmax(-1) == y).float()
        metrics = {"acc": acc}
        quartile = (t * 4 // self.t_max).clamp(max=3)
        nan = torch.full_like(plain, math.nan)
        for q in range(4):  # by quarter of the trained range (NaN: the sample is in another quarter)
            metrics[f"loss_q{q}"] = torch.where(quartile == q, plain, nan)
            metrics[f"acc_q{q}"] = torch.where(quartile == q, acc, nan)
        return losses, metrics
