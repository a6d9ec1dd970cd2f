"""Noise schedules and timestep respacing (float64 numpy; no torch)."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

SCHEDULES = ("linear", "cosine")


def betas_for_alpha_bar(num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> np.ndarray:
    """betas[i] = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta); alpha_bar maps [0,1] -> (0,1]. [T] float64."""
    t = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    ab = np.array([alpha_bar(float(s)) for s in t], dtype=np.float64)
    return np.minimum(1.0 - ab[1:] / ab[:-1], max_beta)


def cosine_alpha_bar(t: float, s: float = 0.008) -> float:
    """The cosine schedule's f(t)/f(0) shape before normalisation: cos^2((t + s)/(1 + s) * pi/2), t in [0, 1]."""
    return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """Betas [T] float64 for `name` in ("linear", "cosine").

    linear: DDPM's 1e-4..0.02 at T=1000, scaled by 1000/T so any T gives the same continuous-time process.
    cosine: Nichol & Dhariwal eq. 17 with s=0.008, betas clipped at 0.999 (the last step would otherwise be 1).
    """
    if not isinstance(num_timesteps, (int, np.integer)) or isinstance(num_timesteps, bool) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    if name == "linear":
        scale = 1000.0 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(num_timesteps, cosine_alpha_bar)
    raise ValueError(f"unknown noise schedule {name!r}; allowed: {', '.join(SCHEDULES)}")


def space_timesteps(num_timesteps: int, spec: str | list[int] | tuple[int, ...]) -> set[int]:
    """Timesteps of the original T-step process to keep.

    spec: "250" (250 evenly spaced steps), "10,15,20" or [10, 15, 20] (the process is cut into 3 equal sections,
    keeping 10, 15 and 20 evenly spaced steps in them), "ddim50" (range(0, T, stride) with exactly 50 steps, as in
    the DDIM paper). Each section keeps its first and (up to float rounding) last step, at the indices
    improved-diffusion keeps: round() of a running sum of the stride (size - 1) / (count - 1). Impossible specs
    raise ValueError.
    """
    T = num_timesteps
    if not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {T!r}")
    if isinstance(spec, str):
        spec = spec.strip()
        if spec.startswith("ddim"):
            try:
                n = int(spec[len("ddim"):])
            except ValueError:
                raise ValueError(f"bad respacing {spec!r}: expected 'ddimN' with N an integer, e.g. 'ddim50'") from None
            for stride in range(1, T + 1):
                if len(range(0, T, stride)) == n:
                    return set(range(0, T, stride))
            counts = sorted({len(range(0, T, stride)) for stride in range(1, T + 1)})
            lower = max((c for c in counts if c < n), default=None)
            higher = min((c for c in counts if c > n), default=None)
            near = ", ".join(f"ddim{c}" for c in (lower, higher) if c is not None)
            raise ValueError(f"cannot keep exactly {n} steps of {T} with a fixed stride ('ddim{n}'); nearest "
                             f"achievable: {near}")
        try:
            counts = [int(x) for x in spec.split(",")]
        except ValueError:
            raise ValueError(f"bad respacing {spec!r}: expected 'N', 'N1,N2,...' or 'ddimN'") from None
    else:
        counts = [int(x) for x in spec]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"bad respacing {spec!r}: every section count must be a positive integer")
    if len(counts) > T:
        raise ValueError(f"bad respacing {spec!r}: {len(counts)} sections but only {T} timesteps")
    size_per, extra = divmod(T, len(counts))
    kept: set[int] = set()
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"cannot keep {count} steps in a section of {size} timesteps (respacing {spec!r}, T={T})")
        # improved-diffusion's rule, kept to the last bit: the fractional index is a running float64 sum of the
        # stride (not j * stride), rounded half to even. The two differ by one step at some exact .5 ties.
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        idx = 0.0
        for _ in range(count):
            kept.add(start + round(idx))
            idx += stride
        start += size
    return kept
