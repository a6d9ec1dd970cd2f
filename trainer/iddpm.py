"""The Improved-DDPM objective (Nichol & Dhariwal 2021): a UNet trained with the simple, hybrid or vlb loss at
timesteps from a uniform or loss-aware (importance) sampler, with label dropout for classifier-free guidance."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from data.cli import UsageError
from diffusion import ClassifierFreeGuidance, create_diffusion, create_timestep_sampler
from diffusion.presets import create_model_from_config
from diffusion.timestep_samplers import SAMPLERS
from trainer.configlib import option
from trainer.objective import Batch, Net, Objective, register_objective
from trainer.unet_settings import DiffusionSection, UNetSection, diffusion_kwargs, grid_labels, model_config_dict


@dataclass
class IddpmOptions:
    model: UNetSection = field(default_factory=UNetSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    timestep_sampler: str = option("uniform", "timestep sampler (loss-second-moment: importance sampling of "
                                   "L_vlb by the loss history)", choices=lambda: SAMPLERS, frozen=True)
    label_dropout: float = option(0.0, "probability of the null label (classifier-free guidance training)",
                                  lower=0.0, upper=1.0, upper_open=True)


@register_objective("iddpm")
class ImprovedDDPM(Objective):
    """x_t = q_sample(x_0, t), t from the timestep sampler; loss = the diffusion's per-sample training loss times
    the sampler's importance weight. Synced state: the sampler's (t, loss) history."""

    Options = IddpmOptions
    console = ("mse", "vb")
    kind = "ddpm"

    @classmethod
    def validate(cls, cfg: Any) -> None:
        d = cfg.objective.options.diffusion
        if d.loss == "simple" and d.learn_sigma:
            raise UsageError("objective.iddpm.diffusion.loss (--loss) simple with learned sigmas trains no variance: "
                             "use --loss hybrid (what improved-diffusion trains for learned sigmas) or "
                             "--no-learn-sigma")

    @classmethod
    def check_data(cls, cfg: Any, shape: tuple[int, ...]) -> None:
        """The UNet's side must be the data's (a convolutional UNet would train on any size and be exported with the
        wrong one)."""
        o = cfg.objective.options
        side = model_config_dict(o.model, o.diffusion.learn_sigma)["image_size"]
        if shape != (side, side):
            raise UsageError(f"--data {cfg.data.source} holds {shape[0]}x{shape[1]} images but the model is {side} px;"
                             f" pass --data-image-size {side} to resize them when read, or --image-size {shape[0]} for "
                             f"a model of their size")

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        o = self.options
        self.model_cfg = model_config_dict(o.model, o.diffusion.learn_sigma)
        self.num_classes = self.model_cfg.get("num_classes") or 0
        self.diffusion_kw = diffusion_kwargs(o.diffusion)
        self.diffusion = create_diffusion(**self.diffusion_kw)
        self.sampler = create_timestep_sampler(self.options.timestep_sampler, self.diffusion.num_timesteps)
        self._rows: list[torch.Tensor] = []

    def build_model(self) -> torch.nn.Module:
        return create_model_from_config(self.model_cfg)

    def zero3_leaf_modules(self) -> list[type]:
        from diffusion.unet import UNetBlock  # a residual or resampling block with its attention
        return [UNetBlock]

    def export_config(self) -> dict[str, Any]:
        return {"model": self.model_cfg, "diffusion": self.diffusion_kw}

    def loss(self, net: Net, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        t, w = self.sampler.sample(x.shape[0], x.device, generator=generator)
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        kw = {}
        if self.num_classes:
            if self.options.label_dropout > 0:
                drop = torch.rand(y.shape, generator=generator, device=x.device) < self.options.label_dropout
                y = torch.where(drop, torch.full_like(y, self.num_classes), y)
            kw["y"] = y
        losses = self.diffusion.training_losses(net, x, t, model_kwargs=kw, noise=noise)
        plain = losses["loss"].detach()
        self._rows.append(torch.stack([t.detach().double().cpu(), plain.double().cpu()], 1))
        metrics = {"loss": plain, "mse": losses["mse"].detach(), "vb": losses["vb"].detach()}
        quartile = (t * 4 // self.diffusion.num_timesteps).clamp(max=3)
        for q in range(4):  # the loss by quarter of the timestep range (NaN: the sample is in another quarter)
            metrics[f"loss_q{q}"] = torch.where(quartile == q, plain, torch.full_like(plain, math.nan))
        return losses["loss"] * w, metrics

    def sync_rows(self) -> torch.Tensor:
        rows = torch.cat(self._rows) if self._rows else torch.zeros(0, 2, dtype=torch.float64)
        self._rows = []
        return rows

    def apply_synced(self, rows: torch.Tensor) -> None:
        self.sampler.update_with_all_losses(rows[:, 0].round().long(), rows[:, 1])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.sampler.load_state_dict(state)

    def preview(self, model: torch.nn.Module, device: torch.device, seed: int) -> tuple[torch.Tensor, int]:
        """Respaced DDPM samples at fixed noise and labels (classifier-free guided when asked)."""
        log = self.cfg.log
        labels = grid_labels(self.num_classes, log.sample_grid)
        n = len(labels) if labels is not None else (log.sample_grid or 64)
        sampler = create_diffusion(**self.diffusion_kw, timestep_respacing=log.sample_respacing)
        net = ClassifierFreeGuidance(model, log.sample_guidance, self.num_classes) \
            if log.sample_guidance > 0 and self.num_classes else model
        g = torch.Generator(device=device).manual_seed(seed)
        size = self.model_cfg["image_size"]
        noise = torch.randn(n, self.model_cfg.get("in_channels", 3), size, size, generator=g, device=device)
        kw = {"y": labels.to(device)} if labels is not None else {}
        with torch.no_grad():
            x = sampler.p_sample_loop(net, noise.shape, noise=noise, model_kwargs=kw, device=device, generator=g)
        ncol = 8 if labels is not None and self.num_classes <= 10 else int(math.ceil(math.sqrt(n)))
        return x, ncol
