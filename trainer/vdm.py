"""The Variational Diffusion Model objective (Kingma et al. 2021): the negative ELBO in bits/dim, with a learned
(or fixed) noise schedule gamma(t) = -log SNR(t) trained jointly with the UNet.

One micro-batch: t from the low-discrepancy sampler ((u + i/B) mod 1), z_t = alpha_t x + sigma_t eps, loss per
image = (L_diffusion + L_prior + L_recon) / (D ln 2) (diffusion.vdm). The model is `diffusion.vdm.VDMNet`, a
ModuleDict {unet, schedule} whose forward computes the whole bound, so that DeepSpeed (any ZeRO stage) sees one
module and one backward: the UNet and the schedule's endpoints get the gradient of the bound, the schedule's
interior shape that of E[L_diffusion^2] (the variance of the estimate; the bound itself does not depend on it), by
a gradient hook inside the schedule's forward (`diffusion.vdm.GradScale`). No state beyond the weights.

ZeRO stages agree. Until 2026-12 the hook sat on the tensors the schedule returned. ZeRO-3 replaces every module
output by a new tensor (an identity autograd function that gathers the parameters before the module's backward), so
the hooked tensors were off the loss's path, the hook never fired, and under ZeRO-3 alone the shape got the plain
loss gradient: its step-1 gradients ~100% off, the weights 4e-3 (2 lr) apart after one step and 9e-3 after six, grad
norm 8.5447 vs 8.5473 (ZeRO-0/1/2 were right). Now (tiny16, 2 ranks, fp32, batch 8, lr 2e-3, digits) the step-1
gradients of ZeRO-0, 2 and 3 are bitwise equal (2 micro-batches per rank: <= 6e-8 relative), the weights after one
step differ by <= 6e-8 (an ulp; Adam's first update is lr g/(|g| + eps), about +-lr) and the grad norms of six steps
by <= 2e-6 relative. The weights then drift to 2.5e-5 (ZeRO-1/2) and 5e-5 (ZeRO-3) apart after six steps, as the
iddpm objective's do with the same flags (ZeRO-3 vs 0: 2.6e-6 after two steps, 1.7e-5 after six). That is rounding,
amplified: the stages round differently (clip coefficient c/(n + 1e-6) vs 1/((n + 1e-6)/c), Adam over one flat
buffer), so the gradients differ by ~2e-7 relative from step 2 or 3 on, and Adam multiplies the absolute rounding error
of the few gradient elements with |g| ~ eps = 1e-8 (5 decades below the median) by up to lr/eps = 2e5: single
elements jump once (a UNet weight by 3.8e-6 at step 3, constant after) and the schedule's 1024-unit branch collects
such jumps (b2: 12 elements above 1e-7 at step 3, 70 at step 6, max 2.5e-5). tests/test_vdm_train.py compares ZeRO-0
and ZeRO-3 after one step (1e-6) and their grad norms (1e-5).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from data.cli import UsageError
from diffusion.losses import NATS_TO_BITS
from diffusion.vdm import GAMMA_MAX, GAMMA_MIN, SCHEDULE_KINDS, build_vdm, low_discrepancy_t, plot_snr, sample, \
    snr_curves, vdm_kwargs
from trainer.configlib import option
from trainer.unet_settings import UNetSection, grid_labels, model_config_dict
from trainer.objective import Batch, Net, Objective, register_objective


def parse_fourier(text: str) -> tuple[int, ...]:
    """"6,7" -> (6, 7); "" -> (). UsageError naming --fourier otherwise."""
    try:
        out = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise UsageError(f"objective.vdm.fourier (--fourier) {text!r}: give comma-separated integer exponents n "
                         f"of the features sin/cos(2^n pi x), e.g. 6,7, or an empty string for none") from None
    if any(not 0 <= n <= 12 for n in out):
        raise UsageError(f"objective.vdm.fourier (--fourier) {text!r}: exponents must lie in 0..12")
    return out


@dataclass
class VdmOptions:
    model: UNetSection = field(default_factory=UNetSection)
    schedule: str = option("learned", "noise schedule gamma(t) = -log SNR(t): learned (VDM's monotone network with "
                           "learned endpoints), or cosine / linear fixed between --gamma-min and --gamma-max",
                           choices=lambda: SCHEDULE_KINDS, frozen=True)
    gamma_min: float = option(GAMMA_MIN, "gamma at t=0 (the learned schedule's initial value)", frozen=True)
    gamma_max: float = option(GAMMA_MAX, "gamma at t=1 (the learned schedule's initial value)", frozen=True)
    fourier: str = option("", "exponents n of the Fourier features sin/cos(2^n pi x) added to the UNet's input, "
                          "e.g. 6,7 (empty: none)", frozen=True)
    loss_steps: int = option(0, "0: continuous-time diffusion loss; T > 0: the T-step discrete-time loss",
                             lower=0, frozen=True)
    variance_grad: bool = option(True, "train the learned schedule's shape to minimise the variance of the loss "
                                 "estimate (VDM); off: to minimise the loss like every other parameter")


@register_objective("vdm")
class VariationalDiffusion(Objective):
    """The VDM bound in bits/dim; metrics: its three terms, the endpoints, the diffusion term by quarter of t."""

    Options = VdmOptions
    console = ("diff_bpd", "recon_bpd", "gamma_min", "gamma_max")
    kind = "vdm"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        o = self.options
        if not o.gamma_min < o.gamma_max:
            raise UsageError(f"objective.vdm.gamma_min (--gamma-min) {o.gamma_min} must be below "
                             f"objective.vdm.gamma_max (--gamma-max) {o.gamma_max}")
        self.model_cfg = model_config_dict(o.model, learn_sigma=False)
        self.num_classes = self.model_cfg.get("num_classes") or 0
        self.vdm_cfg = {"kind": "vdm", "schedule": o.schedule, "gamma_min": o.gamma_min, "gamma_max": o.gamma_max,
                        "fourier": list(parse_fourier(o.fourier)), "loss_steps": o.loss_steps}

    def build_model(self) -> torch.nn.Module:
        return build_vdm(self.model_cfg, **vdm_kwargs(self.vdm_cfg))

    def zero3_leaf_modules(self) -> list[type]:
        from diffusion.unet import UNetBlock
        return [UNetBlock]

    def export_config(self) -> dict[str, Any]:
        return {"model": self.model_cfg, "diffusion": dict(self.vdm_cfg)}

    def loss(self, net: Net, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        B = x.shape[0]
        t = low_discrepancy_t(B, generator, x.device)
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        kw = {"y": y} if self.num_classes else {}
        out = net(x, t, noise=noise, steps=self.options.loss_steps, variance_grad=self.options.variance_grad, **kw)
        bpd = out[:, :3] * (NATS_TO_BITS / x[0].numel())                    # [B, 3] bits/dim
        diff = bpd[:, 0].detach()
        metrics = {"diff_bpd": diff, "prior_bpd": bpd[:, 1].detach(), "recon_bpd": bpd[:, 2].detach(),
                   "gamma_min": out[:, 3].detach(), "gamma_max": out[:, 4].detach()}
        quartile = (t * 4).long().clamp(max=3)
        for q in range(4):  # the diffusion term by quarter of t (NaN: the sample is in another quarter)
            metrics[f"diff_q{q}"] = torch.where(quartile == q, diff, torch.full_like(diff, math.nan))
        return bpd.sum(1), metrics

    def preview(self, model: torch.nn.Module, device: torch.device, seed: int) -> tuple[torch.Tensor, int]:
        """Ancestral samples in `log.sample_respacing` steps (a number; else 50) at fixed noise and labels."""
        log = self.cfg.log
        labels = grid_labels(self.num_classes, log.sample_grid)
        n = len(labels) if labels is not None else (log.sample_grid or 64)
        steps = int(log.sample_respacing) if str(log.sample_respacing).isdigit() else 50
        g = torch.Generator(device=device).manual_seed(seed)
        size = self.model_cfg["image_size"]
        noise = torch.randn(n, self.model_cfg.get("in_channels", 3), size, size, generator=g, device=device)
        x = sample(model, noise, steps, y=labels.to(device) if labels is not None else None, generator=g)
        ncol = 8 if labels is not None and self.num_classes <= 10 else int(math.ceil(math.sqrt(n)))
        return x, ncol

    def figures(self, model: torch.nn.Module) -> dict[str, Any]:
        """TensorBoard: log SNR(t) of the schedule against cosine and linear with the same endpoints."""
        return {"schedule/log_snr": plot_snr(snr_curves(model["schedule"]))}
