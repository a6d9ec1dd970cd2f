"""Variational Diffusion Models (Kingma, Salimans, Poole & Ho 2021): continuous-time Gaussian diffusion written in
gamma(t) = -log SNR(t), with fixed or learned noise schedules.

Forward process, t in [0, 1]: z_t = alpha_t x + sigma_t eps with alpha_t^2 = sigmoid(-gamma(t)),
sigma_t^2 = sigmoid(gamma(t)) (variance preserving), gamma increasing from gamma(0) = gamma_min to gamma(1) = gamma_max.
The negative ELBO of an image x (nats) is L_prior + L_recon + L_diffusion with

    L_prior     = KL(q(z_1 | x) || N(0, I))
    L_recon     = -log p(x | z_0), a discretized Gaussian on the 256-level grid with mean z_0/alpha_0 and
                  standard deviation sigma_0/alpha_0 = exp(gamma_min / 2)
    L_diffusion = 0.5 E_{t ~ U(0,1)} [gamma'(t) ||eps - eps_hat(z_t; t)||^2]          (T = infinity)
                = 0.5 T E_{i ~ U{1..T}} [expm1(gamma(t_i) - gamma(t_i - 1/T)) ||eps - eps_hat(z_{t_i})||^2]   (T steps)

The network sees gamma(t), not t, so that with eps_hat a function of (z, gamma) the continuous loss is
0.5 * integral over gamma in [gamma_min, gamma_max] of E||eps - eps_hat||^2: it depends on the schedule only
through its endpoints (VDM eq. 18). The interior shape changes only the variance of the Monte-Carlo estimate; the
learned schedule's shape is therefore trained to minimise E[L_diffusion^2] (gradient 2 L dL/d(shape), applied by a
gradient hook on the shape tensors inside the schedule's forward: `GradScale`), its endpoints and the UNet to minimise
the bound itself.

Schedules: `learned` (VDM's monotone network: positive-weight linear term plus a 1024-unit sigmoid branch, rescaled
to the learned endpoints), `cosine` (Improved DDPM's alpha_bar = cos^2(phi(t)), phi linear in t) and `linear`
(DDPM's linear betas: -log alpha_bar quadratic in t), the fixed ones between the given endpoints.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .losses import NATS_TO_BITS, discretized_gaussian_log_likelihood

SCHEDULE_KINDS = ("learned", "cosine", "linear")
GAMMA_MIN, GAMMA_MAX = -13.3, 5.0          # VDM's endpoints (CIFAR-10); log SNR from 13.3 down to -5
COND_LO, COND_HI = -13.3, 5.0              # the UNet's input "timestep" is 1000 (gamma - COND_LO) / (COND_HI - COND_LO)
DDPM_BETA = (0.1, 20.0)                    # DDPM's 1e-4..0.02 at T = 1000 as continuous rates beta(t), t in [0, 1]


class Gamma(NamedTuple):
    """A schedule evaluated at t [N]: gamma(t), d gamma/dt [N], the endpoints gamma_min, gamma_max [1], and the
    tensors through which the learned shape (not the endpoints) enters (empty for fixed schedules; for inspection:
    the variance gradient is applied inside the schedule's forward, see `GradScale`)."""
    gamma: torch.Tensor
    dgamma: torch.Tensor
    gamma_min: torch.Tensor
    gamma_max: torch.Tensor
    shape: tuple[torch.Tensor, ...]


class GradScale:
    """Per-image factors k [B] that multiply the gradient reaching a learned schedule's shape in backward.

    The factor (2 L_diffusion, the VDM variance gradient) is known only after the forward, so a schedule `attach`es
    this object's hook to the shape tensors *inside* its forward, on the tensors gamma(t) is actually computed from,
    and the caller sets `k` before backward. Hooks on the schedule's returned tensors would not do: a wrapper may
    replace a module's outputs by new tensors (DeepSpeed ZeRO-3 passes every output tensor through an identity
    autograd function to fetch parameters before the module's backward), and a hook on a replaced tensor that
    nothing downstream uses never fires: the shape then silently got the plain loss gradient under ZeRO-3."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None

    def attach(self, v: torch.Tensor) -> None:
        """Scale the gradient of v [m B] (m copies of the B images, image-major blocks) by k, repeated m times."""
        if v.requires_grad:
            v.register_hook(self._scale)

    def _scale(self, grad: torch.Tensor) -> torch.Tensor:
        if self.k is None:
            raise RuntimeError("GradScale: backward reached the schedule's shape before k was set")
        return grad * self.k.repeat(grad.shape[0] // self.k.shape[0]).to(grad.dtype)


class FixedSchedule(nn.Module):
    """cosine or linear between fixed endpoints; no parameters. Closed forms and exact derivatives (float64 math
    inside, results in t's dtype)."""

    def __init__(self, kind: str, gamma_min: float = GAMMA_MIN, gamma_max: float = GAMMA_MAX) -> None:
        super().__init__()
        if kind not in ("cosine", "linear"):
            raise ValueError(f"unknown fixed schedule {kind!r}; allowed: cosine, linear")
        if not gamma_min < gamma_max:
            raise ValueError(f"gamma_min {gamma_min} must be below gamma_max {gamma_max}")
        self.kind, self.gmin, self.gmax = kind, float(gamma_min), float(gamma_max)

    def forward(self, t: torch.Tensor) -> Gamma:
        u = t.double()
        if self.kind == "cosine":
            # alpha^2 = cos^2(phi), sigma^2 = sin^2(phi): gamma = 2 log tan(phi), phi linear in t.
            p0, p1 = math.atan(math.exp(self.gmin / 2)), math.atan(math.exp(self.gmax / 2))
            phi = p0 + (p1 - p0) * u
            g, dg = 2 * torch.log(torch.tan(phi)), 4 * (p1 - p0) / torch.sin(2 * phi)
        else:
            # c = -log alpha^2 = softplus(gamma) = integral of beta; beta linear in t -> c quadratic in t.
            b0, b1 = DDPM_BETA
            q, dq = (b0 * u + 0.5 * (b1 - b0) * u ** 2) / (0.5 * (b0 + b1)), (b0 + (b1 - b0) * u) / (0.5 * (b0 + b1))
            c0, c1 = F.softplus(torch.tensor(self.gmin, dtype=torch.float64)), \
                F.softplus(torch.tensor(self.gmax, dtype=torch.float64))
            c = c0 + (c1 - c0) * q
            g, dg = torch.log(torch.expm1(c)), (c1 - c0) * dq / -torch.expm1(-c)
        ends = torch.tensor([self.gmin, self.gmax], dtype=t.dtype, device=t.device)
        return Gamma(g.to(t.dtype), dg.to(t.dtype), ends[:1], ends[1:], ())


class LearnedSchedule(nn.Module):
    """VDM's monotone network, normalised between learned endpoints:

        h(t) = |w1| t + (1/n) sum_k |w3_k| (2 sigmoid(|w2_k| (2t - 1) + b2_k) - 1)     (n = `hidden` units)
        gamma(t) = gamma_min + (gamma_max - gamma_min) (h(t) - h(0)) / (h(1) - h(0))

    with gamma_max = gamma_min + softplus(d): every parameter value gives an increasing gamma with gamma(0) =
    gamma_min and gamma(1) = gamma_max exactly. d gamma/dt is computed in closed form (no double backward)."""

    def __init__(self, gamma_min: float = GAMMA_MIN, gamma_max: float = GAMMA_MAX, hidden: int = 1024) -> None:
        super().__init__()
        if not gamma_min < gamma_max:
            raise ValueError(f"gamma_min {gamma_min} must be below gamma_max {gamma_max}")
        self.hidden = hidden
        self.gamma_min = nn.Parameter(torch.tensor([float(gamma_min)]))
        self.log_range = nn.Parameter(torch.tensor([math.log(math.expm1(gamma_max - gamma_min))]))  # softplus^-1
        self.w1 = nn.Parameter(torch.ones(1))
        self.w2 = nn.Parameter(torch.randn(hidden))
        self.b2 = nn.Parameter(torch.zeros(hidden))
        self.w3 = nn.Parameter(torch.randn(hidden))

    def _h(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h(t) and h'(t) for t [N] -> [N], [N]."""
        w1, w2, w3 = self.w1.abs() + 1e-4, self.w2.abs(), self.w3.abs() / self.hidden
        sig = torch.sigmoid(w2 * (2 * t[:, None] - 1) + self.b2)           # [N, n]
        h = w1 * t + (2 * sig - 1) @ w3
        dh = w1 + (4 * sig * (1 - sig) * w2) @ w3
        return h, dh

    def forward(self, t: torch.Tensor, grad_scale: GradScale | None = None) -> Gamma:
        """t [N] -> Gamma at t; with `grad_scale`, the gradient reaching the shape (s, ds) is multiplied by its
        per-image factors (the endpoints' gradient is not)."""
        dtype = t.dtype
        t = t.float()
        h, dh = self._h(torch.cat([t, t.new_tensor([0.0, 1.0])]))
        span = h[-1] - h[-2]
        s, ds = (h[:-2] - h[-2]) / span, dh[:-2] / span                     # shape in [0, 1] and its slope
        if grad_scale is not None:
            grad_scale.attach(s)
            grad_scale.attach(ds)
        g0 = self.gamma_min.float()
        width = F.softplus(self.log_range.float())
        return Gamma((g0 + width * s).to(dtype), (width * ds).to(dtype), g0, g0 + width, (s, ds))


def make_schedule(kind: str, gamma_min: float = GAMMA_MIN, gamma_max: float = GAMMA_MAX) -> nn.Module:
    if kind == "learned":
        return LearnedSchedule(gamma_min, gamma_max)
    if kind in ("cosine", "linear"):
        return FixedSchedule(kind, gamma_min, gamma_max)
    raise ValueError(f"unknown VDM schedule {kind!r}; allowed: {', '.join(SCHEDULE_KINDS)}")


# ------------------------------------------------------------------------------------------------ the bound

def alpha_sigma(gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha = sqrt(sigmoid(-gamma)), sigma = sqrt(sigmoid(gamma)), same shape as gamma."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


def prior_kl(x: torch.Tensor, gamma_max: torch.Tensor) -> torch.Tensor:
    """KL(q(z_1 | x) || N(0, I)) in nats per image [B] for x [B, ...]:
    0.5 sum(sigma_1^2 + alpha_1^2 x^2 - 1 - log sigma_1^2)."""
    var = torch.sigmoid(gamma_max)
    kl = 0.5 * (var + torch.sigmoid(-gamma_max) * x ** 2 - 1 - F.logsigmoid(gamma_max))
    return kl.flatten(1).sum(1)


def recon_nll(x: torch.Tensor, z0: torch.Tensor, gamma_min: torch.Tensor) -> torch.Tensor:
    """-log p(x | z_0) in nats per image [B]: discretized Gaussian with mean z_0/alpha_0 and standard deviation
    sigma_0/alpha_0 = exp(gamma_min/2), x on the 256-level grid of [-1, 1]."""
    alpha0 = torch.sigmoid(-gamma_min).sqrt()
    log_scale = (0.5 * gamma_min).expand_as(x)
    return -discretized_gaussian_log_likelihood(x, z0 / alpha0, log_scale).flatten(1).sum(1)


def low_discrepancy_t(n: int, generator: torch.Generator | None = None, device: Any = "cpu") -> torch.Tensor:
    """n times in [0, 1) that cover it evenly: (u + i/n) mod 1, i = 0..n-1, one uniform u (VDM's estimator)."""
    u = torch.rand(1, generator=generator, device=device)
    return torch.remainder(u + torch.arange(n, device=device) / n, 1.0)


def fourier_features(z: torch.Tensor, exponents: Sequence[int]) -> torch.Tensor:
    """[z, sin(2^n pi z), cos(2^n pi z) for each n]: [B, C, H, W] -> [B, C (1 + 2 len(exponents)), H, W]."""
    if not exponents:
        return z
    f = torch.tensor([2.0 ** n * math.pi for n in exponents], device=z.device, dtype=z.dtype)
    a = (z[:, :, None] * f[:, None, None]).flatten(1, 2)                  # [B, C k, H, W]
    return torch.cat([z, torch.sin(a), torch.cos(a)], 1)


class VDMNet(nn.ModuleDict):
    """{"unet": eps-predicting UNet (conditioned on gamma), "schedule": gamma(t)}.

    Called (as the training engine) with clean images and times, it returns the per-image terms of the bound:
    forward(x [B, C, H, W] in [-1, 1], t [B] in [0, 1], noise [B, C, H, W], y=None, steps=0, variance_grad=True)
    -> [B, 5] = (L_diffusion, L_prior, L_recon in nats, gamma_min, gamma_max); steps = 0 the continuous-time
    loss, T > 0 the T-step loss at t rounded up to the grid i/T. With variance_grad the schedule's shape receives
    the gradient of the mean of L_diffusion^2 instead of L_diffusion (the endpoints and the UNet are unaffected),
    scaled inside the schedule's forward (`GradScale`), so that it survives wrappers that replace module outputs.
    Everything runs inside this forward, so ZeRO-3 gathers each submodule's parameters when they are used."""

    def __init__(self, unet: nn.Module, schedule: nn.Module, fourier: Sequence[int] = ()) -> None:
        super().__init__({"unet": unet, "schedule": schedule})
        self.fourier = tuple(int(n) for n in fourier)

    def eps(self, z: torch.Tensor, gamma: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """eps_hat(z_t; gamma_t): z [B, C, H, W], gamma [B] -> [B, C, H, W]."""
        cond = 1000.0 * (gamma.float() - COND_LO) / (COND_HI - COND_LO)
        return self["unet"](fourier_features(z, self.fourier), cond, y)

    def terms(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, y: torch.Tensor | None = None,
              steps: int = 0, grad_scale: GradScale | None = None) -> tuple[torch.Tensor, Gamma]:
        """The bound's terms [B, 3] (L_diffusion, L_prior, L_recon; nats per image) and the schedule's values;
        `grad_scale` goes to a learned schedule (see `GradScale`)."""
        B = x.shape[0]
        kw = {} if grad_scale is None else {"grad_scale": grad_scale}
        if steps:
            ti = (torch.floor(t * steps) + 1).clamp(max=steps) / steps     # t rounded up to the grid i/T, i >= 1
            g = self["schedule"](torch.cat([ti, ti - 1.0 / steps]), **kw)
            gt, gs = g.gamma[:B], g.gamma[B:]
            weight = 0.5 * steps * torch.expm1(gt - gs)
        else:
            g = self["schedule"](t, **kw)
            gt, weight = g.gamma, 0.5 * g.dgamma
        a, s = alpha_sigma(gt.float().view(B, 1, 1, 1))
        z = a * x.float() + s * noise
        err = (noise - self.eps(z.to(x.dtype), gt, y).float()).pow(2).flatten(1).sum(1)
        diff = weight.float() * err
        a0, s0 = alpha_sigma(g.gamma_min.float())
        z0 = a0 * x.float() + s0 * noise
        prior = prior_kl(x.float(), g.gamma_max.float())
        recon = recon_nll(x.float(), z0, g.gamma_min.float())
        return torch.stack([diff, prior, recon], 1), g

    def forward(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, y: torch.Tensor | None = None,
                steps: int = 0, variance_grad: bool = True) -> torch.Tensor:
        learned = isinstance(self["schedule"], LearnedSchedule)
        scale = GradScale() if variance_grad and learned and torch.is_grad_enabled() else None
        out, g = self.terms(x, t, noise, y, steps, scale)
        if scale is not None:
            scale.k = 2 * out[:, 0].detach() * NATS_TO_BITS / x[0].numel()  # 2 L in bits/dim, per image [B]
        ends = torch.cat([g.gamma_min, g.gamma_max]).float().expand(x.shape[0], 2)
        return torch.cat([out, ends], 1)


def build_vdm(unet_config: dict[str, Any], schedule: str = "learned", gamma_min: float = GAMMA_MIN,
              gamma_max: float = GAMMA_MAX, fourier: Sequence[int] = ()) -> VDMNet:
    """A VDMNet from a `diffusion.presets` model config (learn_sigma must be False: eps only) and schedule options.
    Fourier features widen only the input convolution (C (1 + 2 len(fourier)) input channels)."""
    from .nn import CastConv2d
    from .presets import create_model_from_config
    cfg = dict(unet_config, learn_sigma=False)
    unet = create_model_from_config(cfg)
    if fourier:
        c, old = cfg.get("in_channels", 3), unet.conv_in
        unet.conv_in = CastConv2d(c * (1 + 2 * len(fourier)), old.out_channels, 3, padding=1)
    return VDMNet(unet, make_schedule(schedule, gamma_min, gamma_max), fourier)


def vdm_kwargs(d: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of build_vdm (besides the UNet) from an exported `diffusion` dict {"kind": "vdm", ...}."""
    return dict(schedule=d["schedule"], gamma_min=float(d["gamma_min"]), gamma_max=float(d["gamma_max"]),
                fourier=tuple(d.get("fourier", ())))


# ------------------------------------------------------------------------------------------------ sampling

@torch.no_grad()
def sample(net: VDMNet, noise: torch.Tensor, steps: int, *, y: torch.Tensor | None = None,
           generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """Ancestral sampling with `steps` equal steps of t from z_1 = noise [B, C, H, W] to z_0, then the decoder's
    mean z_0/alpha_0 rounded to the 256-level grid of [-1, 1]. Each step draws z_s ~ q(z_s | z_t, x = x_hat):
    z_s = alpha_s/alpha_t (z_t - sigma_t c eps_hat) + sigma_s sqrt(c) eps', c = -expm1(gamma_s - gamma_t)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    B, dev = noise.shape[0], noise.device
    z = noise.float()
    it = range(steps, 0, -1)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"VDM sampling ({steps} steps)", unit="step")
    for i in it:
        g = net["schedule"](torch.tensor([i / steps, (i - 1) / steps], device=dev))
        gt, gs = g.gamma[0].float(), g.gamma[1].float()
        c = -torch.expm1(gs - gt)
        (at, st), (as_, ss) = alpha_sigma(gt), alpha_sigma(gs)
        e = net.eps(z, gt.expand(B), y).float()
        eps = torch.randn(z.shape, generator=generator, device=generator.device if generator else dev).to(dev)
        z = as_ / at * (z - st * c * e) + ss * c.sqrt() * eps
    a0, _ = alpha_sigma(net["schedule"](torch.zeros(1, device=dev)).gamma_min.float())
    return ((z / a0).clamp(-1, 1) * 127.5 + 127.5).round() / 127.5 - 1


class AncestralSampler:
    """`sample` behind GaussianDiffusion's p_sample_loop interface (what evaluations.sample calls), `steps` equal
    steps of t; num_timesteps = steps (model forwards per image)."""

    def __init__(self, steps: int) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.num_timesteps = int(steps)

    @torch.no_grad()
    def p_sample_loop(self, model: VDMNet, shape: tuple[int, ...], *, noise: torch.Tensor | None = None,
                      model_kwargs: dict | None = None, device: Any = None, generator: torch.Generator | None = None,
                      cond_fn: Any = None, progress: bool = False, **_: Any) -> torch.Tensor:
        """[B, C, H, W] samples in [-1, 1] (on the 256-level grid); clip_denoised and the like do not apply."""
        if cond_fn is not None:
            raise ValueError("classifier guidance is not implemented for VDM sampling")
        if noise is None:
            noise = torch.randn(shape, generator=generator).to(device or "cpu")
        y = (model_kwargs or {}).get("y")
        return sample(model, noise, self.num_timesteps, y=y, generator=generator, progress=progress)


def snr_curves(schedule: nn.Module, n: int = 201) -> dict[str, Any]:
    """log SNR(t) = -gamma(t) on n points of [0, 1] for `schedule` and for cosine and linear with its endpoints."""
    p = next(schedule.parameters(), None)
    t = torch.linspace(0, 1, n, device=p.device if p is not None else "cpu")
    with torch.no_grad():
        g = schedule(t)
        lo, hi = float(g.gamma_min), float(g.gamma_max)
        out = {"t": t.cpu().tolist(), "model": (-g.gamma.double()).cpu().tolist(), "gamma_min": lo, "gamma_max": hi}
        for k in ("cosine", "linear"):
            out[k] = (-FixedSchedule(k, lo, hi)(t.double()).gamma).cpu().tolist()
    return out


def plot_snr(curves: dict[str, Any], title: str = "noise schedule") -> Any:
    """A matplotlib figure of log SNR(t) for the curves of `snr_curves` (the caller saves and closes it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(curves["t"], curves["model"], label="this model", lw=2)
    for k, style in (("cosine", "--"), ("linear", ":")):
        ax.plot(curves["t"], curves[k], style, label=f"{k} (same endpoints)")
    ax.set(xlabel="t", ylabel="log SNR(t) = -gamma(t)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
