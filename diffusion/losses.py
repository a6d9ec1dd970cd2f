"""Likelihood pieces: Gaussian KL, the discretized Gaussian decoder, bits/dim helpers (all elementwise, nats)."""
from __future__ import annotations

import math

import torch

NATS_TO_BITS = 1.0 / math.log(2.0)
_LOG_MIN_PROB = math.log(1e-12)  # floor on a bin's log-probability, as in improved-diffusion (keeps losses finite)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: [B, ...] -> [B]."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats (arguments broadcast)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _log_cdf_diff(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Phi(hi) - Phi(lo)) for lo < hi, stable in both tails (uses Phi(b)-Phi(a) = Phi(-a)-Phi(-b) for a > 0)."""
    flip = lo > 0
    a = torch.where(flip, -hi, lo)  # lower end, mirrored into the left tail
    b = torch.where(flip, -lo, hi)
    log_b = torch.special.log_ndtr(b)
    log_a = torch.special.log_ndtr(a)
    # log(e^log_b - e^log_a) = log_b + log(1 - e^(log_a - log_b)); the clamp keeps equal ends finite.
    return log_b + torch.log(-torch.expm1((log_a - log_b).clamp(max=-1e-30)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) elementwise (nats) for x on the 256-level grid of [-1, 1] under N(means, exp(log_scales)^2)
    integrated over each value's bin of width 2/255; the end bins reach to -inf and +inf so the 256 bins sum to 1.
    The exact normal CDF is used (improved-diffusion used a tanh approximation). Floored at log(1e-12)."""
    if x.shape != means.shape or x.shape != log_scales.shape:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, means {tuple(means.shape)}, log_scales {tuple(log_scales.shape)}")
    inv_std = torch.exp(-log_scales)
    centered = x - means
    plus_in = inv_std * (centered + 1.0 / 255.0)
    min_in = inv_std * (centered - 1.0 / 255.0)
    log_cdf_plus = torch.special.log_ndtr(plus_in)  # first bin: P(X < x + 1/255)
    log_one_minus_cdf_min = torch.special.log_ndtr(-min_in)  # last bin: P(X > x - 1/255)
    log_mid = _log_cdf_diff(min_in, plus_in)
    log_probs = torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_mid))
    return log_probs.clamp(min=_LOG_MIN_PROB)
