"""The VDM route of `evaluations.nll`: exported VDM weights and the bound of a continuous-time (or T-step) model in
the shape `nll` expects of a diffusion (`num_timesteps`, `timestep_map`, `calc_bpd_loop`).

Per image, K times t_k = (u + k)/K (one uniform u per image) give a stratified estimate of the diffusion term:
the columns of `vb` are [L_recon, the K bins' shares of L_diffusion], so `nll`'s "decoder" is L_recon, its per-step
terms are the diffusion loss by bin of t (x axis: 1000 t at the bin's start) and prior + sum(vb) is the bound.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
import torch

from data.cli import UsageError
from diffusion.losses import NATS_TO_BITS
from diffusion.vdm import VDMNet, build_vdm, snr_curves, vdm_kwargs


def is_vdm(path: str) -> bool:
    """Whether the JSON beside exported weights `path` describes a VDM ({"diffusion": {"kind": "vdm"}})."""
    jpath = os.path.splitext(path)[0] + ".json"
    try:
        with open(jpath) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("diffusion"), dict) and meta["diffusion"].get("kind") == "vdm"


def load_vdm(path: str, device: str | torch.device = "cpu") -> tuple[VDMNet, dict[str, Any]]:
    """Exported VDM weights (trainer.export of a `--objective vdm` run) -> (VDMNet in eval mode, meta)."""
    from safetensors.torch import load_file
    with open(os.path.splitext(path)[0] + ".json") as f:
        meta = json.load(f)
    try:
        net = build_vdm(meta["model"], **vdm_kwargs(meta["diffusion"]))
        net.load_state_dict(load_file(path, device="cpu"), strict=True)
    except (KeyError, ValueError, RuntimeError, OSError) as e:
        raise UsageError(f"--model {path}: cannot load exported VDM weights ({str(e).splitlines()[0]})") from None
    return net.to(device).eval(), meta


class VDMBound:
    """The bound of a VDMNet as `nll` consumes it. t_samples K >= 1 times per image; steps 0 = continuous time."""

    def __init__(self, t_samples: int, steps: int = 0, chunk: int = 512) -> None:
        if t_samples < 1 or steps < 0:
            raise UsageError(f"--t-samples must be >= 1 (got {t_samples}) and --respace a number of steps >= 1")
        self.K, self.steps, self.chunk = t_samples, steps, chunk
        self.num_timesteps = t_samples + 1
        self.timestep_map = np.concatenate([[0], np.arange(t_samples) * 1000 // t_samples]).astype(np.int64)
        self.net: VDMNet | None = None

    @torch.no_grad()
    def calc_bpd_loop(self, model: VDMNet, x: torch.Tensor, *, clip_denoised: bool = True,
                      model_kwargs: dict | None = None, generator: torch.Generator | None = None) -> dict:
        """x [b, C, H, W] -> {"total_bpd" [b], "prior_bpd" [b], "vb" [b, K + 1] (L_recon, then each bin's share
        of L_diffusion)}, bits/dim. Noise and times come from the CPU `generator` (clip_denoised has no role)."""
        self.net = model
        b, K, dev = x.shape[0], self.K, x.device
        u = torch.rand(b, 1, generator=generator)
        t = ((u + torch.arange(K) / K) % 1.0).flatten().to(dev)            # [b K], image-major
        noise = torch.randn((b * K, *x.shape[1:]), generator=generator).to(dev)
        xs = x.repeat_interleave(K, 0)
        y = (model_kwargs or {}).get("y")
        ys = y.repeat_interleave(K, 0) if y is not None else None
        out = torch.cat([model.terms(xs[i:i + self.chunk], t[i:i + self.chunk], noise[i:i + self.chunk],
                                     ys[i:i + self.chunk] if ys is not None else None, self.steps)[0]
                         for i in range(0, b * K, self.chunk)]).double() * (NATS_TO_BITS / x[0].numel())
        out = out.view(b, K, 3)
        diff, prior, recon = out[..., 0] / K, out[..., 1].mean(1), out[..., 2].mean(1)
        order = torch.argsort(t.view(b, K).cpu(), dim=1).to(dev)           # bin k holds t in [k/K, (k+1)/K)
        vb = torch.cat([recon[:, None], torch.gather(diff, 1, order)], 1)
        return {"total_bpd": prior + vb.sum(1), "prior_bpd": prior, "vb": vb}

    def report(self) -> dict[str, Any]:
        """The VDM part of nll.json: the estimator and the schedule (its log SNR(t) and cosine/linear's)."""
        curves = snr_curves(self.net["schedule"], 101) if self.net is not None else {}
        sched = type(self.net["schedule"]).__name__ if self.net is not None else None
        return {"vdm": {"estimator": f"{self.steps}-step" if self.steps else "continuous-time",
                        "t_samples_per_image": self.K, "schedule": sched, "snr": curves}}


def markdown_lines(rep: dict[str, Any]) -> list[str]:
    v = rep["vdm"]
    s = v.get("snr") or {}
    return ["", f"VDM bound, {v['estimator']} diffusion loss, {v['t_samples_per_image']} stratified times per image "
                f"(the per-step rows are bins of t: t = step value / 1000). Schedule {v['schedule']}: gamma_min "
                f"{s.get('gamma_min', float('nan')):.3f}, gamma_max {s.get('gamma_max', float('nan')):.3f}; "
                f"log SNR(t) against cosine and linear in snr.png.", ""]


def snr_png(rep: dict[str, Any]) -> bytes:
    """snr.png: the model's log SNR(t) against cosine and linear with the same endpoints."""
    import matplotlib.pyplot as plt
    from diffusion.vdm import plot_snr
    fig = plot_snr(rep["vdm"]["snr"], f"noise schedule ({rep['vdm']['schedule']})")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
