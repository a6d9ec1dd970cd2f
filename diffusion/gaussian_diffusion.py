"""Gaussian diffusion (Ho et al. 2020; Nichol & Dhariwal 2021): forward process, posterior, reverse process with
learned or fixed variances, the simple / hybrid / vlb losses, bits/dim, and DDPM / DDIM sampling.

Tables are float64. Tensors are computed in float64 when the input is float64, otherwise in float32 (so bf16 or
fp16 model outputs never enter the loss arithmetic). The model is any callable `model(x_t, t, **model_kwargs)` whose
`t` holds integer timesteps of the ORIGINAL process (see `timestep_map`, the identity unless respaced).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .losses import NATS_TO_BITS, discretized_gaussian_log_likelihood, mean_flat, normal_kl

MEAN_TYPES = ("epsilon", "xstart", "v")
VAR_TYPES = ("learned_range", "fixed_small", "fixed_large")
LOSS_TYPES = ("simple", "hybrid", "vlb")
SAMPLE_METHODS = ("ddpm", "ddim")

Model = Callable[..., torch.Tensor]
CondFn = Callable[..., torch.Tensor]


def randn(shape: tuple[int, ...], *, device: torch.device | str | None, dtype: torch.dtype = torch.float32,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise; drawn on the generator's device and moved, so a CPU generator is reproducible anywhere."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def _progress(it: Any, progress: bool, desc: str) -> Any:
    if not progress:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are optional
        return it
    return tqdm(it, desc=desc)


def _final_sample(steps: Iterator[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Runs a progressive sampling loop to its end and returns the last step's sample."""
    final = None
    for final in steps:
        pass
    return final["sample"]


class GaussianDiffusion:
    """A T-step Gaussian diffusion given its betas [T] (float64, 0 < beta <= 1).

    model_mean_type: "epsilon" (the network predicts the noise), "xstart" (x_0) or "v" (Salimans & Ho 2022:
    v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, so x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v).
    model_var_type: "learned_range" (the network outputs 2*C channels: mean part, then v in [-1, 1] with
    log Sigma = (v+1)/2 log beta_t + (1-v)/2 log beta~_t), "fixed_small" (beta~_t) or "fixed_large" (beta_t).
    loss_type: "simple" (MSE), "hybrid" (MSE + vlb_weight*T*L_t, the mean stop-gradiented inside L_t), "vlb" (T*L_t).
    The MSE is on the predicted quantity for epsilon / xstart; for v it is the x-space error weighted by the
    truncated SNR, max(abar/(1-abar), 1) |x_0 - x_0_hat|^2 (the "truncated SNR" weighting of Salimans & Ho 2022).
    """

    def __init__(self, *, betas: np.ndarray, model_mean_type: str = "epsilon", model_var_type: str = "learned_range",
                 loss_type: str = "hybrid", vlb_weight: float = 0.001):
        for name, value, allowed in (("model_mean_type", model_mean_type, MEAN_TYPES),
                                     ("model_var_type", model_var_type, VAR_TYPES), ("loss", loss_type, LOSS_TYPES)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a non-empty 1-D array with 0 < beta <= 1")
        if not (vlb_weight >= 0 and math.isfinite(vlb_weight)):
            raise ValueError(f"vlb_weight must be a finite number >= 0, got {vlb_weight!r}")
        self.model_mean_type, self.model_var_type, self.loss_type = model_mean_type, model_var_type, loss_type
        self.vlb_weight = float(vlb_weight)
        self.betas = betas
        self.num_timesteps = T = len(betas)
        self.timestep_map = np.arange(T, dtype=np.int64)  # index in this process -> timestep given to the model

        alphas = 1.0 - betas
        self.alphas_cumprod = ac = np.cumprod(alphas)
        self.alphas_cumprod_prev = acp = np.append(1.0, ac[:-1])
        self.alphas_cumprod_next = np.append(ac[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1.0)
        self.truncated_snr = np.maximum(ac / (1.0 - ac), 1.0)  # max(SNR_t, 1), the v-loss weight of |x_0 error|^2
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t); beta~_0 = 0, so its log is clipped to beta~_1.
        self.posterior_variance = pv = betas * (1.0 - acp) / (1.0 - ac)
        self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:]) if T > 1 else np.maximum(pv, 1e-20))
        self.posterior_mean_coef1 = betas * np.sqrt(acp) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - acp) * np.sqrt(alphas) / (1.0 - ac)
        self._tables: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    # ----------------------------------------------------------------------------------------------- helpers
    def _table(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (name, device, dtype)
        if key not in self._tables:
            self._tables[key] = torch.as_tensor(getattr(self, name), dtype=dtype, device=device)
        return self._tables[key]

    def _extract(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] broadcast to like's rank: [B] -> [B, 1, 1, ...], in like's dtype."""
        v = self._table(name, t.device, like.dtype)[t]
        return v.reshape(v.shape + (1,) * (like.ndim - 1))

    @staticmethod
    def _compute_dtype(x: torch.Tensor) -> torch.dtype:
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def _check_t(self, t: torch.Tensor, x: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"t must be an integer tensor of timesteps, got {type(t).__name__} "
                             f"{getattr(t, 'dtype', '')}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"shape mismatch: t has shape {tuple(t.shape)}, expected ({x.shape[0]},) for x of shape "
                             f"{tuple(x.shape)}")
        if t.numel() and bool(((t < 0) | (t >= self.num_timesteps)).any()):
            raise ValueError(f"t out of range: timesteps must lie in [0, {self.num_timesteps - 1}], got "
                             f"min {int(t.min())}, max {int(t.max())}")

    def map_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Indices of this process -> timesteps of the original process (what the model and cond_fn receive)."""
        return self._table("timestep_map", t.device, torch.int64)[t.long()]

    def _model(self, model: Model, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None) -> torch.Tensor:
        return model(x, self.map_timesteps(t), **(model_kwargs or {}))

    # ------------------------------------------------------------------------------------- forward process
    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_t | x_0): mean [B,...], variance and log variance [B,1,...]."""
        self._check_t(t, x_start)
        x = x_start.to(self._compute_dtype(x_start))
        mean = self._extract("sqrt_alphas_cumprod", t, x) * x
        var = 1.0 - self._extract("alphas_cumprod", t, x)
        return mean, var, torch.log(var)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, *, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise; x_start [B,...], t [B] -> [B,...] in x_start's dtype."""
        self._check_t(t, x_start)
        if noise is None:
            noise = randn(tuple(x_start.shape), device=x_start.device, dtype=x_start.dtype, generator=generator)
        elif noise.shape != x_start.shape:
            raise ValueError(f"shape mismatch: noise {tuple(noise.shape)} vs x_start {tuple(x_start.shape)}")
        return self._q_sample(x_start, t, noise)

    def _q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        x = x_start.to(self._compute_dtype(x_start))  # never bf16/fp16 tables
        return (self._extract("sqrt_alphas_cumprod", t, x) * x
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x) * noise.to(x.dtype)).to(x_start.dtype)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | x_t, x_0): mean [B,...], variance [B,1,...], log variance clipped at t=0 [B,1,...]."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"shape mismatch: x_start {tuple(x_start.shape)} vs x_t {tuple(x_t.shape)}")
        self._check_t(t, x_t)
        return self._q_posterior(x_start, x_t, t)

    def _q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dt = self._compute_dtype(x_t)
        x_start, x_t = x_start.to(dt), x_t.to(dt)
        mean = self._extract("posterior_mean_coef1", t, x_t) * x_start + self._extract("posterior_mean_coef2", t, x_t) * x_t
        return mean, self._extract("posterior_variance", t, x_t), self._extract("posterior_log_variance_clipped", t, x_t)

    # ------------------------------------------------------------------------------------- reverse process
    def _predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps

    def _predict_xstart_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._extract("sqrt_alphas_cumprod", t, x_t) * x_t - self._extract("sqrt_one_minus_alphas_cumprod", t, x_t) * v

    def _predict_xstart(self, x_t: torch.Tensor, t: torch.Tensor, mean_out: torch.Tensor) -> torch.Tensor:
        """x_0 from the mean part of the model output, by model_mean_type (unclipped)."""
        if self.model_mean_type == "epsilon":
            return self._predict_xstart_from_eps(x_t, t, mean_out)
        if self.model_mean_type == "v":
            return self._predict_xstart_from_v(x_t, t, mean_out)
        return mean_out

    def _predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        return ((self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t))

    def _split_output(self, out: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        C = x.shape[1]
        want = 2 * C if self.model_var_type == "learned_range" else C
        if out.shape != (x.shape[0], want) + tuple(x.shape[2:]):
            raise ValueError(f"shape mismatch: model output {tuple(out.shape)}, expected "
                             f"{(x.shape[0], want) + tuple(x.shape[2:])} ({self.model_var_type} variance: "
                             f"{'2*C channels: mean part then v' if want == 2 * C else 'C channels'})")
        out = out.to(self._compute_dtype(x))
        return (out[:, :C], out[:, C:]) if want == 2 * C else (out, None)

    def p_mean_variance(self, model: Model, x: torch.Tensor, t: torch.Tensor, *, clip_denoised: bool = True,
                        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        model_kwargs: dict | None = None, model_output: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t): dict mean [B,...], variance, log_variance ([B,...] learned, else [B,1,...]),
        pred_xstart [B,...] (clipped to [-1,1] if clip_denoised), model_output (raw). `model_output` skips the
        forward call."""
        self._check_t(t, x)
        return self._p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                     model_kwargs=model_kwargs, model_output=model_output)

    def _p_mean_variance(self, model: Model, x: torch.Tensor, t: torch.Tensor, *, clip_denoised: bool,
                         denoised_fn: Callable | None, model_kwargs: dict | None,
                         model_output: torch.Tensor | None = None, variance: bool = True) -> dict[str, torch.Tensor]:
        """p_mean_variance without the range check of t (a device sync); variance=False leaves out "variance"
        (an exp over [B,...] for a learned variance, needed only by classifier guidance)."""
        if model_output is None:
            model_output = self._model(model, x, t, model_kwargs)
        mean_out, var_out = self._split_output(model_output, x)
        out = self._output_to_dist(mean_out, var_out, x.to(mean_out.dtype), t, clip_denoised=clip_denoised,
                                   denoised_fn=denoised_fn, variance=variance)
        out["model_output"] = model_output
        return out

    def _output_to_dist(self, mean_out: torch.Tensor, var_out: torch.Tensor | None, x: torch.Tensor, t: torch.Tensor,
                        *, clip_denoised: bool, denoised_fn: Callable | None = None, variance: bool = True
                        ) -> dict[str, torch.Tensor]:
        """The reverse-process Gaussian from the split model output (mean part, variance part or None);
        variance=False: without the "variance" entry (log_variance is always there)."""
        out: dict[str, torch.Tensor] = {}
        if self.model_var_type == "learned_range":
            min_log = self._extract("posterior_log_variance_clipped", t, x)
            max_log = self._extract("log_betas", t, x)
            frac = (var_out + 1.0) / 2.0
            out["log_variance"] = log_variance = min_log + frac * (max_log - min_log)  # frac*max + (1-frac)*min
            if variance:
                out["variance"] = torch.exp(log_variance)
        elif self.model_var_type == "fixed_small":
            out["variance"] = self._extract("posterior_variance", t, x)
            out["log_variance"] = self._extract("posterior_log_variance_clipped", t, x)
        else:  # fixed_large: beta_t, except beta~_1 at t=0 so that the decoder has a sensible variance
            out["variance"] = v = self._extract("_large_variance", t, x)
            out["log_variance"] = v.log()
        out["pred_xstart"] = pred_xstart = self._denoised_xstart(x, t, mean_out, clip_denoised, denoised_fn)
        out["mean"], _, _ = self._q_posterior(pred_xstart, x, t)
        return out

    def _denoised_xstart(self, x: torch.Tensor, t: torch.Tensor, mean_out: torch.Tensor, clip_denoised: bool,
                         denoised_fn: Callable | None) -> torch.Tensor:
        """x_0 [B,...] from the mean part of the model output, through denoised_fn and the [-1, 1] clip."""
        pred_xstart = self._predict_xstart(x, t, mean_out)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        return pred_xstart.clamp(-1, 1) if clip_denoised else pred_xstart

    @property
    def log_betas(self) -> np.ndarray:
        return np.log(self.betas)

    @property
    def _large_variance(self) -> np.ndarray:
        return np.append(self.posterior_variance[1], self.betas[1:]) if self.num_timesteps > 1 else self.betas

    # ------------------------------------------------------------------------------------------ guidance
    def condition_mean(self, cond_fn: CondFn, out: dict, x: torch.Tensor, t: torch.Tensor, *,
                       model_kwargs: dict | None = None) -> torch.Tensor:
        """Classifier guidance for DDPM (Dhariwal & Nichol 2021, alg. 1): mean + Sigma * grad log p(y|x_t)."""
        with torch.enable_grad():
            grad = cond_fn(x, self.map_timesteps(t), **(model_kwargs or {}))
        return out["mean"] + out["variance"] * grad.to(out["mean"].dtype)

    def condition_score(self, cond_fn: CondFn, out: dict, x: torch.Tensor, t: torch.Tensor, *,
                        model_kwargs: dict | None = None) -> dict[str, torch.Tensor]:
        """Classifier guidance for DDIM (alg. 2): eps - sqrt(1 - abar_t) * grad; returns out with eps, pred_xstart, mean."""
        xc = x.to(out["pred_xstart"].dtype)
        with torch.enable_grad():
            grad = cond_fn(x, self.map_timesteps(t), **(model_kwargs or {})).to(xc.dtype)
        eps = self._predict_eps_from_xstart(xc, t, out["pred_xstart"])
        eps = eps - self._extract("sqrt_one_minus_alphas_cumprod", t, xc) * grad
        new = dict(out)
        new["eps"] = eps
        new["pred_xstart"] = self._predict_xstart_from_eps(xc, t, eps)
        new["mean"], _, _ = self._q_posterior(new["pred_xstart"], xc, t)
        return new

    # ------------------------------------------------------------------------------------------ single steps
    def p_sample(self, model: Model, x: torch.Tensor, t: torch.Tensor, *, clip_denoised: bool = True,
                 denoised_fn: Callable | None = None, cond_fn: CondFn | None = None, model_kwargs: dict | None = None,
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One ancestral step x_t -> x_{t-1} (no noise where t == 0): dict sample, pred_xstart, in x's dtype."""
        self._check_t(t, x)
        return self._p_sample(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
                              model_kwargs=model_kwargs, generator=generator)

    def _p_sample(self, model: Model, x: torch.Tensor, t: torch.Tensor, *, clip_denoised: bool,
                  denoised_fn: Callable | None, cond_fn: CondFn | None, model_kwargs: dict | None,
                  generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """p_sample without the range check of t (the sampling loop's t are valid by construction)."""
        out = self._p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                    model_kwargs=model_kwargs, variance=cond_fn is not None)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        noise = randn(tuple(x.shape), device=x.device, dtype=out["mean"].dtype, generator=generator)
        nonzero = (t != 0).to(noise.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample.to(x.dtype), "pred_xstart": out["pred_xstart"].to(x.dtype)}

    def ddim_sample(self, model: Model, x: torch.Tensor, t: torch.Tensor, *, clip_denoised: bool = True,
                    denoised_fn: Callable | None = None, cond_fn: CondFn | None = None,
                    model_kwargs: dict | None = None, eta: float = 0.0,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One DDIM step x_t -> x_{t-1} (Song et al. eq. 12); eta=0 deterministic, eta=1 the DDPM posterior variance."""
        self._check_t(t, x)
        return self._ddim_sample(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
                                 model_kwargs=model_kwargs, eta=eta, generator=generator)

    def _ddim_sample(self, model: Model, x: torch.Tensor, t: torch.Tensor, *, clip_denoised: bool,
                     denoised_fn: Callable | None, cond_fn: CondFn | None, model_kwargs: dict | None, eta: float,
                     generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """ddim_sample without the range check of t. Only x_0 is taken from the model output: the learned variance
        and the posterior mean of p_mean_variance are not computed (DDIM uses neither)."""
        mean_out, _ = self._split_output(self._model(model, x, t, model_kwargs), x)
        xc = x.to(mean_out.dtype)
        out = {"pred_xstart": self._denoised_xstart(xc, t, mean_out, clip_denoised, denoised_fn)}
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        else:  # epsilon consistent with the (clipped) x_0, as in improved-diffusion
            out["eps"] = self._predict_eps_from_xstart(x.to(out["pred_xstart"].dtype), t, out["pred_xstart"])
        eps, x0 = out["eps"], out["pred_xstart"]
        ab_prev = self._extract("alphas_cumprod_prev", t, eps)
        if eta == 0:  # sigma = 0: the same arithmetic as below without the zero terms
            return {"sample": (x0 * torch.sqrt(ab_prev) + torch.sqrt((1 - ab_prev).clamp(min=0)) * eps).to(x.dtype),
                    "pred_xstart": x0.to(x.dtype)}
        ab = self._extract("alphas_cumprod", t, eps)
        sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
        mean = x0 * torch.sqrt(ab_prev) + torch.sqrt((1 - ab_prev - sigma ** 2).clamp(min=0)) * eps
        if eta > 0:
            nonzero = (t != 0).to(eps.dtype).reshape(-1, *([1] * (x.ndim - 1)))
            mean = mean + nonzero * sigma * randn(tuple(x.shape), device=x.device, dtype=eps.dtype,
                                                  generator=generator)
        return {"sample": mean.to(x.dtype), "pred_xstart": x0.to(x.dtype)}

    def ddim_reverse_sample(self, model: Model, x: torch.Tensor, t: torch.Tensor, *, clip_denoised: bool = False,
                            denoised_fn: Callable | None = None, model_kwargs: dict | None = None
                            ) -> dict[str, torch.Tensor]:
        """Inverse of the eta = 0 ddim_sample step at index t: x at noise level abar_{t-1} -> x_t at abar_t.

        The sampling step needs eps(x_t, t), unknown before x_t exists; it is approximated by the model at (x, t).
        The step is then the exact inverse whenever the model's epsilon does not change between the two levels."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        xc = x.to(out["pred_xstart"].dtype)
        eps = self._predict_eps_from_xstart(xc, t, out["pred_xstart"])
        ab = self._extract("alphas_cumprod", t, eps)
        ab_prev = self._extract("alphas_cumprod_prev", t, eps)
        x0 = (xc - torch.sqrt(1 - ab_prev) * eps) / torch.sqrt(ab_prev)
        sample = x0 * torch.sqrt(ab) + torch.sqrt(1 - ab) * eps
        return {"sample": sample.to(x.dtype), "pred_xstart": x0.to(x.dtype)}

    # ---------------------------------------------------------------------------------------- sampling loops
    def _init_noise(self, shape: tuple[int, ...], noise: torch.Tensor | None, device: Any,
                    generator: torch.Generator | None) -> torch.Tensor:
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"shape mismatch: noise {tuple(noise.shape)} vs shape {tuple(shape)}")
            return noise.to(device) if device is not None else noise
        if device is None:
            device = generator.device if generator is not None else "cpu"
        return randn(tuple(shape), device=device, dtype=torch.float32, generator=generator)

    def sample_loop_progressive(self, model: Model, shape: tuple[int, ...], *, method: str = "ddpm",
                                noise: torch.Tensor | None = None, clip_denoised: bool = True,
                                denoised_fn: Callable | None = None, cond_fn: CondFn | None = None,
                                model_kwargs: dict | None = None, device: Any = None, progress: bool = False,
                                eta: float = 0.0, generator: torch.Generator | None = None
                                ) -> Iterator[dict[str, torch.Tensor]]:
        """The one sampling loop: yields the step's dict (sample, pred_xstart [shape]) after every step, t = T-1 .. 0.

        method: "ddpm" (ancestral steps, p_sample) or "ddim" (ddim_sample with `eta`: 0 deterministic, 1 the DDPM
        posterior variance; respace with "ddimN" for the DDIM paper's schedule). x_T is `noise` [shape] (moved to
        `device` if given) or float32 N(0, I) drawn from `generator`. The model runs under no_grad;
        cond_fn(x, t, **model_kwargs) -> grad log p(y | x_t) [shape] is called with grad enabled. Arguments are
        checked when the first step is taken.
        """
        if method not in SAMPLE_METHODS:
            raise ValueError(f"unknown sampling method {method!r}; allowed: {', '.join(SAMPLE_METHODS)}")
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta!r}")
        if method == "ddpm" and eta != 0:
            raise ValueError(f"eta={eta!r} is a DDIM setting; use method='ddim' (ddim_sample_loop)")
        # t is built here, in range: the steps skip the range check (one device sync per step on a GPU)
        step = functools.partial(self._ddim_sample, eta=eta) if method == "ddim" else self._p_sample
        x = self._init_noise(shape, noise, device, generator)
        for i in _progress(range(self.num_timesteps - 1, -1, -1), progress, method.upper()):
            t = torch.full((shape[0],), i, device=x.device, dtype=torch.int64)
            with torch.no_grad():
                out = step(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
                           model_kwargs=model_kwargs, generator=generator)
            yield out
            x = out["sample"]

    def p_sample_loop_progressive(self, model: Model, shape: tuple[int, ...], **kwargs: Any
                                  ) -> Iterator[dict[str, torch.Tensor]]:
        """sample_loop_progressive(model, shape, method="ddpm", **kwargs): p_sample's dict after every step."""
        return self.sample_loop_progressive(model, shape, method="ddpm", **kwargs)

    def p_sample_loop(self, model: Model, shape: tuple[int, ...], **kwargs: Any) -> torch.Tensor:
        """Ancestral sampling from x_T ~ N(0, I) (or `noise`) to x_0 [shape]; keyword arguments (noise, clip_denoised,
        denoised_fn, cond_fn, model_kwargs, device, progress, generator) as in sample_loop_progressive."""
        return _final_sample(self.sample_loop_progressive(model, shape, method="ddpm", **kwargs))

    def ddim_sample_loop_progressive(self, model: Model, shape: tuple[int, ...], **kwargs: Any
                                     ) -> Iterator[dict[str, torch.Tensor]]:
        """sample_loop_progressive(model, shape, method="ddim", **kwargs): ddim_sample's dict after every step."""
        return self.sample_loop_progressive(model, shape, method="ddim", **kwargs)

    def ddim_sample_loop(self, model: Model, shape: tuple[int, ...], **kwargs: Any) -> torch.Tensor:
        """DDIM sampling over this process's steps to x_0 [shape]; keyword arguments as p_sample_loop plus eta
        (default 0), see sample_loop_progressive."""
        return _final_sample(self.sample_loop_progressive(model, shape, method="ddim", **kwargs))

    def ddim_reverse_sample_loop(self, model: Model, x_start: torch.Tensor, *, clip_denoised: bool = False,
                                 denoised_fn: Callable | None = None, model_kwargs: dict | None = None,
                                 progress: bool = False) -> torch.Tensor:
        """DDIM inversion: the x_{T-1} [B,...] that ddim_sample_loop(eta=0, noise=x_{T-1}) maps back to about x_start.

        Unlike improved-diffusion (which treats x_start as x_0 and ends at abar = 0), this walks the exact noise
        levels ddim_sample_loop visits, 1 -> abar_0 -> ... -> abar_{T-1}, so it round-trips exactly for a model whose
        output does not depend on x, and up to the step size otherwise."""
        x = x_start
        for i in _progress(range(self.num_timesteps), progress, "DDIM inversion"):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.int64)
            with torch.no_grad():
                x = self.ddim_reverse_sample(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                             model_kwargs=model_kwargs)["sample"]
        return x

    # ------------------------------------------------------------------------------------------ losses, bpd
    def vb_terms_bpd(self, model: Model, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *,
                     clip_denoised: bool = True, model_kwargs: dict | None = None,
                     model_output: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """L_t in bits/dim [B]: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, -log p(x_0|x_1) at t = 0
        (x_start must lie on the 256-level grid of [-1, 1]). Returns dict output [B], pred_xstart [B,...]."""
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs,
                                   model_output=model_output)
        return {"output": self._vb_from_dist(x_start, x_t, t, out), "pred_xstart": out["pred_xstart"]}

    def _vb_from_dist(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, out: dict) -> torch.Tensor:
        true_mean, _, true_log_var = self._q_posterior(x_start, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) * NATS_TO_BITS
        first = t == 0
        if not bool(first.any()):
            return kl
        # the decoder term only where t == 0 (rare in training; the normal CDFs cost ~10x the KL)
        idx = first.nonzero().squeeze(1)
        mean, log_var = out["mean"][idx], out["log_variance"].expand_as(out["mean"])[idx]
        nll = -mean_flat(discretized_gaussian_log_likelihood(x_start[idx].to(mean.dtype), mean, 0.5 * log_var))
        nll_full = torch.zeros_like(kl).index_put((idx,), nll * NATS_TO_BITS)
        return torch.where(first, nll_full, kl)

    def training_losses(self, model: Model, x_start: torch.Tensor, t: torch.Tensor, *,
                        model_kwargs: dict | None = None, noise: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per-sample losses [B] for x_start [B,C,...] in [-1,1] at timesteps t [B] (indices of this process).

        mse: mean over dims of (target - prediction)^2, target = noise (epsilon) or x_0 (xstart); for v the
        x-space error times max(SNR_t, 1) (the v-space error itself would weigh it by SNR_t + 1).
        vb: L_t in bits/dim (unscaled; see vb_terms_bpd). For "hybrid" the mean part is detached inside vb, so L_t
        trains only the variance channels; for "simple", and "hybrid" with a fixed variance (nothing for L_t to
        train, as in improved-diffusion), vb is a detached diagnostic and loss = mse.
        loss: simple -> mse; hybrid -> mse + vlb_weight * T * vb (learned variance) or mse (fixed); vlb -> T * vb.
        Multiply by the sampler's weights.
        """
        self._check_t(t, x_start)  # the one range check (a device sync) of the step
        if noise is None:
            noise = randn(tuple(x_start.shape), device=x_start.device, dtype=x_start.dtype, generator=generator)
        elif noise.shape != x_start.shape:
            raise ValueError(f"shape mismatch: noise {tuple(noise.shape)} vs x_start {tuple(x_start.shape)}")
        x_t = self._q_sample(x_start, t, noise)
        model_output = self._model(model, x_t, t, model_kwargs)
        mean_out, var_out = self._split_output(model_output, x_start)
        xc = x_t.to(mean_out.dtype)
        T = self.num_timesteps
        # vb trains something only if the variance is learned (hybrid) or always (vlb); otherwise a diagnostic
        vb_trains = self.loss_type == "vlb" or (self.loss_type == "hybrid" and self.model_var_type == "learned_range")
        if self.loss_type == "vlb":
            vb = self._vb_from_dist(x_start, xc, t, self._output_to_dist(mean_out, var_out, xc, t, clip_denoised=False))
        elif vb_trains:  # hybrid: stop-gradient on the mean part
            dist = self._output_to_dist(mean_out.detach(), var_out, xc, t, clip_denoised=False)
            vb = self._vb_from_dist(x_start, xc, t, dist)
        else:
            with torch.no_grad():
                dist = self._output_to_dist(mean_out, var_out, xc, t, clip_denoised=False)
                vb = self._vb_from_dist(x_start, xc, t, dist)
        if self.model_mean_type == "v":  # truncated-SNR weighted x-space error
            err = x_start.to(mean_out.dtype) - self._predict_xstart_from_v(xc, t, mean_out)
            mse = self._extract("truncated_snr", t, err).flatten() * mean_flat(err ** 2)
        else:
            target = noise if self.model_mean_type == "epsilon" else x_start
            mse = mean_flat((target.to(mean_out.dtype) - mean_out) ** 2)
        if not vb_trains:  # simple, or hybrid with a fixed variance: the gradient-free vb is not part of the loss
            loss = mse
        elif self.loss_type == "hybrid":
            loss = mse + self.vlb_weight * T * vb
        else:
            loss = T * vb
        return {"loss": loss, "mse": mse, "vb": vb}

    def prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits/dim [B]; not trained, only reported (near 0 for a good schedule)."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.int64)
        mean, _, log_var = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean))) * NATS_TO_BITS

    def calc_bpd_loop(self, model: Model, x_start: torch.Tensor, *, clip_denoised: bool = True,
                      model_kwargs: dict | None = None, progress: bool = False,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The full variational bound in bits/dim for x_start [B,...] on the 256-level grid of [-1,1].

        Returns total_bpd [B] (= prior_bpd + sum_t vb), prior_bpd [B], vb [B,T], xstart_mse [B,T], mse [B,T]
        (epsilon MSE), one model call per timestep of this process. Column t of the [B,T] tensors is timestep t
        (ascending); improved-diffusion's calc_bpd_loop returns them in the loop's order, t = T-1 first
        (`.flip(1)` gives that order)."""
        B, T = x_start.shape[0], self.num_timesteps
        vb, xstart_mse, mse = [], [], []
        for i in _progress(range(T - 1, -1, -1), progress, "bpd"):
            t = torch.full((B,), i, device=x_start.device, dtype=torch.int64)
            noise = randn(tuple(x_start.shape), device=x_start.device, dtype=x_start.dtype, generator=generator)
            x_t = self.q_sample(x_start, t, noise=noise)
            with torch.no_grad():
                out = self.vb_terms_bpd(model, x_start, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
            xs = x_start.to(out["pred_xstart"].dtype)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - xs) ** 2))
            eps = self._predict_eps_from_xstart(x_t.to(xs.dtype), t, out["pred_xstart"])  # from the clipped x_0
            mse.append(mean_flat((eps - noise.to(xs.dtype)) ** 2))
        vb_t = torch.stack(vb[::-1], dim=1)
        prior = self.prior_bpd(x_start)
        return {"total_bpd": vb_t.sum(dim=1) + prior, "prior_bpd": prior, "vb": vb_t,
                "xstart_mse": torch.stack(xstart_mse[::-1], dim=1), "mse": torch.stack(mse[::-1], dim=1)}
