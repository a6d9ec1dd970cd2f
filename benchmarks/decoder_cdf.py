"""The t = 0 decoder term -log p(x_0 | x_1) in bits/dim with the exact normal CDF (ours) and with the tanh
approximation improved-diffusion uses, Phi(x) ~ 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), on real held-out
images through a trained model: how much the total bits/dim of the two codes differ by the decoder alone.

    python -m benchmarks.decoder_cdf --model model.safetensors --data DIGITS/val-manifest.json --out RESULT.json

Same x_1 = q_sample(x_0, t=0) noise for both (seeded); the model's mean and variance at t = 0 (learned or fixed);
bins of width 2/255 on [-1, 1] with open end bins, probabilities floored at 1e-12, as both codes do.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import torch

from diffusion.losses import NATS_TO_BITS, discretized_gaussian_log_likelihood


def approx_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def approx_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """The discretized Gaussian log-likelihood (nats) with the tanh CDF, written from the formula above."""
    inv = torch.exp(-log_scales)
    c = x - means
    cdf_plus, cdf_min = approx_cdf(inv * (c + 1 / 255)), approx_cdf(inv * (c - 1 / 255))
    log_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_plus, torch.where(x > 0.999, log_one_minus_min, log_delta))


def measure(model_path: str, data: str, num_images: int, batch_size: int, seed: int) -> dict:
    from data.stream import EvalStream
    from evaluations.io import load_model
    model, diffusion, meta = load_model(model_path, "cpu")
    g = torch.Generator().manual_seed(seed)
    exact, approx, n = [], [], 0
    for x, y, _ in EvalStream(data, batch_size):
        x = x[: num_images - n]
        t = torch.zeros(x.shape[0], dtype=torch.int64)
        x_t = diffusion.q_sample(x, t, noise=torch.randn(x.shape, generator=g))
        kw = {"y": y[: x.shape[0]]} if meta["model"].get("num_classes") else {}
        with torch.no_grad():
            out = diffusion.p_mean_variance(model, x_t, t, clip_denoised=True, model_kwargs=kw)
        log_scales = 0.5 * out["log_variance"].expand_as(x)
        for fn, acc in ((discretized_gaussian_log_likelihood, exact), (approx_log_likelihood, approx)):
            acc.append((-fn(x, out["mean"], log_scales)).flatten(1).mean(1) * NATS_TO_BITS)
        n += x.shape[0]
        if n >= num_images:
            break
    e, a = torch.cat(exact).double().numpy(), torch.cat(approx).double().numpy()
    return {"model": model_path, "data": data, "images": int(n), "seed": seed,
            "decoder_bpd_exact": float(e.mean()), "decoder_bpd_tanh": float(a.mean()),
            "difference_bpd_mean": float((a - e).mean()), "difference_bpd_max_abs": float(np.abs(a - e).max())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decoder_cdf", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="exported model (.safetensors with its .json)")
    p.add_argument("--data", required=True, help="held-out images (manifest, pattern or list)")
    p.add_argument("--num-images", type=int, default=359)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON result (default: print only)")
    a = p.parse_args(argv)
    r = measure(a.model, a.data, a.num_images, a.batch_size, a.seed)
    text = json.dumps(r, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
