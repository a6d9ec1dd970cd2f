"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2).

During training a few power-function EMAs are tracked and snapshotted now and then; afterwards an EMA of any
other width, ending at any snapshotted time, is reconstructed as a linear combination of the snapshots:

    python -m trainer.phema RUN_DIR --sigma-rel 0.05,0.10 --out-dir DIR [--at-step N]

Time t counts optimizer steps (t = 1, 2, ...). A power EMA with exponent gamma > -1 updates

    theta_hat_t = beta_t theta_hat_{t-1} + (1 - beta_t) theta_t,   beta_t = (1 - 1/t)^(gamma + 1),

so theta_hat_1 = theta_1, and theta_hat_t = sum_k w_k theta_k with w_k = prod_{j>k} beta_j (1 - beta_k). The
product telescopes, prod_{j=k+1..t} ((j-1)/j)^(gamma+1) = (k/t)^(gamma+1), hence

    w_k = (k^(gamma+1) - (k-1)^(gamma+1)) / t^(gamma+1) = integral over [k-1, k] of p_t(tau) dtau,
    p_t(tau) = (gamma + 1) tau^gamma / t^(gamma+1) on [0, t]:

the discrete weights are exactly the continuous profile's mass on each step, and theta_hat_t is the integral of
p_t against the piecewise-constant trajectory theta(tau) = theta_ceil(tau). The reconstruction below works with
the continuous profiles and is therefore exact up to its L2 fit error (and the snapshots' fp16/bf16 rounding).

The profile's width is sigma_rel = std(tau) / t = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3))). Over gamma in
(-1, inf) it rises from 0 (gamma -> -1: all mass at tau = 0) to SIGMA_REL_MAX = phi^(-5/2) ~ 0.30028 at
gamma = 1/phi - 1 ~ -0.382 (phi the golden ratio; u = gamma + 1 solves u^2 + u = 1 there) and falls back to 0
as gamma -> inf. gamma = 0, the plain running mean, has sigma_rel = sqrt(1/12) ~ 0.28868. A sigma_rel in
(0, SIGMA_REL_MAX] maps to the largest root of the cubic, the branch gamma >= -0.382 (profiles between
sqrt(1/12) and SIGMA_REL_MAX have -0.382 <= gamma < 0 and weigh early steps more than late ones).

Snapshots (written by the trainer's tracker with `write_snapshot`, read here with `read_snapshots`):

    RUN_DIR/phema/snapshot_{step:08d}.safetensors
        "{sigma_rel}/{name}"  fp16 or bf16 (fp32 allowed), the full model state dict per tracked sigma_rel,
                              sigma_rel spelled as given (e.g. "0.05"); non-float buffers kept as they are
        metadata: {"step": "1200", "sigma_rels": "0.05,0.10", "dtype": "bf16", "buffers": "name1,name2"}

Buffers: only parameters are averaged. The trainer's EMAs (checkpoint files and snapshots alike) carry the live
module's buffers at save time, so a reconstruction takes every buffer from the latest snapshot it uses (as edm2's
reconstruct_phema does), whatever its dtype. Snapshots written before the "buffers" entry existed (2026-12-08)
do not say which tensors are buffers: there, float buffers are combined like parameters (the coefficients sum to
1, so a buffer that never changed comes out as it was, to float32 rounding).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from typing import Iterable, Sequence

import numpy as np
import torch

from data.cli import ArgumentParser, UsageError, flag, run_cli

PHEMA_DIR = "phema"  # RUN_DIR/phema/
SNAPSHOT_RE = re.compile(r"^snapshot_(\d{8,})\.safetensors$")
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_PHI = (1.0 + math.sqrt(5.0)) / 2.0
SIGMA_REL_MAX = _PHI ** -2.5  # ~0.300283, the widest power profile (gamma = 1/phi - 1)
GAMMA_AT_SIGMA_REL_MAX = 1.0 / _PHI - 1.0  # ~ -0.381966


# ------------------------------------------------------------------------------------------------ profiles


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation std(tau) / t of the power profile with exponent `gamma` (> -1)."""
    g = float(gamma)
    if not g > -1.0:
        raise UsageError(f"power EMA exponent gamma={g} must be > -1")
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def check_sigma_rel(sigma_rel: float | str) -> float:
    """`sigma_rel` as a float in (0, SIGMA_REL_MAX]; anything else is a UsageError."""
    try:
        s = float(sigma_rel)
    except (TypeError, ValueError):
        raise UsageError(f"sigma_rel {sigma_rel!r} is not a number; use e.g. 0.05") from None
    if not 0.0 < s <= SIGMA_REL_MAX:
        raise UsageError(f"sigma_rel {sigma_rel} is out of range: a power EMA has 0 < sigma_rel <= {SIGMA_REL_MAX:.5f} "
                         f"(EDM2 uses 0.01-0.2; sqrt(1/12) ~ 0.2887 is the plain running mean)")
    return s


def sigma_rel_to_gamma(sigma_rel: float | str) -> float:
    """Exponent gamma of the power EMA of width `sigma_rel` in (0, SIGMA_REL_MAX]: the largest real root of
    sigma_rel^2 (gamma+2)^2 (gamma+3) = gamma+1.

    With u = gamma + 1, f(u) = u / ((u+1)^2 (u+2)) = sigma_rel^2 is strictly decreasing on [1/phi, inf), where
    the largest root lies; f(1/sigma_rel) < sigma_rel^2 brackets it. Bisection (a fixed 200 halvings, stopping once
    the bracket no longer shrinks) ends on adjacent doubles around the root and is safe at the double root at
    SIGMA_REL_MAX, where Newton and the companion-matrix eigenvalues of np.roots lose half the digits. There the
    root itself is ill-conditioned (sigma_rel^2 - f(u) is quadratic in u - u*): an error of one ulp in sigma_rel^2
    moves it by ~sqrt(eps), so both this and edm2's solver return gamma ~2e-8 from 1/phi - 1 at SIGMA_REL_MAX.
    """
    s2 = check_sigma_rel(sigma_rel) ** 2
    lo, hi = 1.0 / _PHI, 1.0 / math.sqrt(s2)  # f(lo) >= s2 > f(hi)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if mid / ((mid + 1.0) ** 2 * (mid + 2.0)) >= s2:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi) - 1.0


def power_beta(gamma: float, t: int | np.ndarray) -> float | np.ndarray:
    """EMA decay beta_t = (1 - 1/t)^(gamma + 1) at step `t` >= 1 (scalar or array of steps); beta_1 = 0."""
    t_arr = np.asarray(t, dtype=np.float64)
    if np.any(t_arr < 1):
        raise ValueError(f"power EMA steps start at t = 1, got {t}")
    beta = (1.0 - 1.0 / t_arr) ** (float(gamma) + 1.0)
    return float(beta) if beta.ndim == 0 else beta


def profile_dot(t_a: float | np.ndarray, gamma_a: float | np.ndarray,
                t_b: float | np.ndarray, gamma_b: float | np.ndarray) -> np.ndarray:
    """L2 inner product <p_a, p_b> of power profiles (times in steps, broadcast), in 1/steps:

        (ga+1)(gb+1) m^(ga+gb+1) / ((ga+gb+1) ta^(ga+1) tb^(gb+1)),   m = min(ta, tb)
      = (ga+1)(gb+1) / (ga+gb+1) * (m/ta)^(ga+1) * (m/tb)^(gb+1) / m

    (the second form never overflows: both ratios are <= 1, where t^(gamma+1) alone overflows float64 for
    gamma ~ 100 and t ~ 1e6). Needs ga + gb + 1 > 0, true for every profile of finite L2 norm (gamma > -1/2).
    """
    ta, ga, tb, gb = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    m = np.minimum(ta, tb)
    return (ga + 1.0) * (gb + 1.0) / (ga + gb + 1.0) * (m / ta) ** (ga + 1.0) * (m / tb) ** (gb + 1.0) / m


def solve_coefficients(ts: Sequence[float], gammas: Sequence[float], target_t: float, target_gamma: float,
                       rcond: float | None = None, normalize: bool = True) -> np.ndarray:
    """Coefficients x [N] with sum_i x_i p_{t_i, gamma_i} closest in L2 to p_{target_t, target_gamma}.

    x is the float64 least-squares solution of the Gram system A x = b, A_ij = <p_i, p_j>, b_i = <p_i, p_r>.
    A is badly conditioned (neighbouring snapshots' profiles are nearly parallel); A and b are first scaled by
    D = diag(A)^(-1/2) (each profile normalised to unit L2 norm, which removes the 1/t and gamma scales), then
    solved by SVD (np.linalg.lstsq) with singular values below rcond * largest dropped (default: numpy's
    N * machine epsilon): the minimum-norm solution among the equally good fits. Finally (unless `normalize` is
    False) x is divided by its sum
    (as edm2's solve_posthoc_coefficients does): every profile integrates to 1, and so must their combination,
    or each reconstructed weight is scaled by sum(x). The least-squares x alone sums to 0.993-1.0002 on the
    digits run; weights are large next to their drift over training, so that scale error dominated (the tracked
    sigma_rel 0.10 rebuilt at step 120 of a tiny16 run without its own last snapshot profile, against the fp32
    tracked EMA: relative L2 error 4.3e-2 without the division, 7.2e-4 with it; tests/test_phema.py).
    """
    t = np.asarray(ts, dtype=np.float64).reshape(-1)
    g = np.asarray(gammas, dtype=np.float64).reshape(-1)
    if t.shape != g.shape or t.size == 0:
        raise ValueError(f"need as many snapshot times as exponents (>= 1), got {t.size} and {g.size}")
    A = profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_dot(t, g, float(target_t), float(target_gamma))
    d = 1.0 / np.sqrt(np.diag(A))
    y = np.linalg.lstsq(A * d[:, None] * d[None, :], b * d, rcond=rcond)[0]
    x = y * d
    return x / x.sum() if normalize else x


def fit_error(ts: Sequence[float], gammas: Sequence[float], target_t: float, target_gamma: float,
              x: np.ndarray) -> float:
    """Relative L2 error ||sum_i x_i p_i - p_r|| / ||p_r|| of a reconstruction, from the same inner products:
    ||r||^2 = x^T A x - 2 x^T b + <p_r, p_r>. The difference of O(1) terms cancels, so values below ~1e-7
    (sqrt of the float64 epsilon) are round-off."""
    t = np.asarray(ts, dtype=np.float64).reshape(-1)
    g = np.asarray(gammas, dtype=np.float64).reshape(-1)
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    A = profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_dot(t, g, float(target_t), float(target_gamma))
    rr = float(profile_dot(target_t, target_gamma, target_t, target_gamma))
    return math.sqrt(max(float(x @ A @ x - 2.0 * x @ b + rr), 0.0) / rr)


# ------------------------------------------------------------------------------------------------ snapshots


def snapshot_dir(run_dir: str) -> str:
    """RUN_DIR/phema, the folder of a run's snapshots."""
    return os.path.join(run_dir, PHEMA_DIR)


def snapshot_path(run_dir: str, step: int) -> str:
    """RUN_DIR/phema/snapshot_{step:08d}.safetensors."""
    return os.path.join(snapshot_dir(run_dir), f"snapshot_{int(step):08d}.safetensors")


def _dtype_name(dtype: torch.dtype | str) -> str:
    for name, d in DTYPES.items():
        if dtype in (name, d):
            return name
    raise ValueError(f"snapshot dtype {dtype!r} is not one of {', '.join(DTYPES)} (or their torch dtypes)")


def write_snapshot(run_dir: str, step: int, states: dict[str, dict[str, torch.Tensor]],
                   dtype: torch.dtype | str = "bf16", buffers: Iterable[str] = ()) -> int:
    """Write the power EMAs of one step atomically to `snapshot_path(run_dir, step)`; return the file's bytes.

    `states` maps each tracked sigma_rel, spelled as it should appear in the file (e.g. "0.05"), to the full model
    state dict (same names for every sigma_rel, on any device). Floating tensors are stored in `dtype` ("bf16",
    "fp16" or "fp32"), others (integer buffers) as they are. `buffers`: the names that are the module's buffers,
    not parameters (recorded; a reconstruction takes them from its latest snapshot instead of averaging them).
    """
    from data.fsio import atomic_save_safetensors
    name = _dtype_name(dtype)
    if int(step) < 1:
        raise ValueError(f"snapshot step must be >= 1 (steps count optimizer updates), got {step}")
    if not states:
        raise ValueError("write_snapshot needs at least one sigma_rel")
    names = None
    flat: dict[str, torch.Tensor] = {}
    for s, sd in states.items():
        if "/" in s or "," in s or s != s.strip():
            raise ValueError(f"sigma_rel key {s!r} must be a plain number such as '0.05'")
        check_sigma_rel(s)
        if names is None:
            names = sorted(sd)
        elif sorted(sd) != names:
            raise ValueError(f"sigma_rel {s}: its state dict names differ from those of {next(iter(states))}")
        for k, v in sd.items():  # cast where the tensor lives (one at a time), then a fresh CPU copy: tied
            v = v.detach()       # weights must not share storage in safetensors
            flat[f"{s}/{k}"] = (v.to(DTYPES[name]) if v.is_floating_point() else v).to("cpu", copy=True)
    buffers = sorted(buffers)
    if any("," in b or b not in names for b in buffers):
        raise ValueError(f"buffers {buffers[:3]}...: every buffer must be a state dict name without commas")
    path = snapshot_path(run_dir, step)
    atomic_save_safetensors(path, flat, metadata={"step": str(int(step)), "sigma_rels": ",".join(states),
                                                  "dtype": name, "buffers": ",".join(buffers)})
    return os.path.getsize(path)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One snapshot file, header only: tensors are read on demand (`load`, or safe_open on `path`)."""
    path: str
    step: int
    sigma_rels: tuple[str, ...]  # as spelled in the file
    dtype: str  # "bf16", "fp16" or "fp32"
    names: tuple[str, ...]  # state dict names, the same for every sigma_rel
    buffers: tuple[str, ...] | None = None  # the names that are buffers; None: not recorded (older snapshots)

    @property
    def gammas(self) -> tuple[float, ...]:
        return tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)

    def load(self, sigma_rel: str) -> dict[str, torch.Tensor]:
        """The stored state dict of one tracked sigma_rel (tensors in the file's dtype, on CPU)."""
        from safetensors import safe_open
        if sigma_rel not in self.sigma_rels:
            raise KeyError(f"{self.path} tracks sigma_rel {','.join(self.sigma_rels)}, not {sigma_rel}")
        with safe_open(self.path, framework="pt") as f:
            return {n: f.get_tensor(f"{sigma_rel}/{n}") for n in self.names}


def read_snapshot(path: str) -> Snapshot:
    """The header of one snapshot file, checked against the format; a bad file is a one-line UsageError."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            meta, keys = f.metadata() or {}, list(f.keys())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for truncated or foreign files
        raise UsageError(f"{path}: not a readable safetensors file ({e}); delete it or rewrite the snapshot") from None
    missing = [k for k in ("step", "sigma_rels", "dtype") if k not in meta]
    if missing:
        raise UsageError(f"{path}: metadata lacks {', '.join(missing)}; not a post-hoc EMA snapshot")
    m = SNAPSHOT_RE.match(os.path.basename(path))
    if not meta["step"].isdigit() or (m is not None and int(m.group(1)) != int(meta["step"])):
        raise UsageError(f"{path}: metadata step {meta['step']!r} does not match the file name")
    sigmas = tuple(meta["sigma_rels"].split(","))
    try:
        for s in sigmas:
            check_sigma_rel(s)
    except UsageError as e:
        raise UsageError(f"{path}: {e}") from None
    if meta["dtype"] not in DTYPES:
        raise UsageError(f"{path}: dtype {meta['dtype']!r} is not one of {', '.join(DTYPES)}")
    names = sorted(k.split("/", 1)[1] for k in keys if k.startswith(sigmas[0] + "/"))
    if len(keys) != len(sigmas) * len(names) or not all(f"{s}/{n}" in keys for s in sigmas for n in names):
        raise UsageError(f"{path}: the tensors are not one full state dict per sigma_rel {meta['sigma_rels']}")
    buffers = tuple(b for b in meta["buffers"].split(",") if b) if "buffers" in meta else None
    if buffers is not None and not set(buffers) <= set(names):
        raise UsageError(f"{path}: metadata names buffers that are not in the state dict")
    return Snapshot(path=path, step=int(meta["step"]), sigma_rels=sigmas, dtype=meta["dtype"], names=tuple(names),
                    buffers=buffers)


def read_snapshots(run_dir: str) -> list[Snapshot]:
    """Every snapshot of a run (headers only), sorted by step; [] where RUN_DIR/phema has none."""
    folder = snapshot_dir(run_dir)
    files = sorted(n for n in os.listdir(folder) if SNAPSHOT_RE.match(n)) if os.path.isdir(folder) else []
    return sorted((read_snapshot(os.path.join(folder, n)) for n in files), key=lambda s: s.step)


# ------------------------------------------------------------------------------------------------ reconstruction


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one target profile is built: coefficient x[j] multiplies snapshot `profiles[j]` = (index, sigma_rel)."""
    sigma_rel: str
    gamma: float
    step: int
    profiles: tuple[tuple[int, str], ...]
    x: np.ndarray  # [N] float64, summing to 1
    fit_error: float  # relative L2 error of the profile
    lsq_sum: float = 1.0  # sum of the least-squares coefficients before they were normalised (a fit diagnostic)


def plan(snapshots: Sequence[Snapshot], sigma_rels: Iterable[float | str], at_step: int | None = None) -> list[Plan]:
    """Coefficients for each target sigma_rel at `at_step` (default: the last snapshot's step), from the
    snapshots with step <= at_step. Bad input (no snapshots, at_step outside the snapshots) is a UsageError."""
    targets = [(str(s), sigma_rel_to_gamma(s)) for s in sigma_rels]
    if not snapshots:
        raise UsageError("no post-hoc EMA snapshots (phema/snapshot_*.safetensors); "
                         "train with post-hoc EMA tracking on (--phema)")
    first, last = snapshots[0].step, snapshots[-1].step
    t_r = last if at_step is None else int(at_step)
    if not first <= t_r <= last:
        raise UsageError(f"at step {t_r} (--at-step) is outside the snapshots' steps {first}..{last}; "
                         f"pick a step in that range")
    names = snapshots[0].names
    profiles, ts, gs = [], [], []
    for i, snap in enumerate(snapshots):
        if snap.step > t_r:
            continue
        if snap.names != names:
            raise UsageError(f"{snap.path} holds other state dict names than {snapshots[0].path}; "
                             f"snapshots of different models cannot be combined")
        for s, g in zip(snap.sigma_rels, snap.gammas):
            profiles.append((i, s))
            ts.append(snap.step)
            gs.append(g)
    out = []
    for s, g in targets:
        raw = solve_coefficients(ts, gs, t_r, g, normalize=False)
        x = raw / raw.sum()
        out.append(Plan(sigma_rel=s, gamma=g, step=t_r, profiles=tuple(profiles), x=x,
                        fit_error=fit_error(ts, gs, t_r, g, x), lsq_sum=float(raw.sum())))
    return out


def combine(snapshots: Sequence[Snapshot], plans: Sequence[Plan], progress: bool = False
            ) -> dict[str, dict[str, torch.Tensor]]:
    """sum_j x_j theta_hat_j for every plan -> {sigma_rel: fp32 state dict}.

    Tensor by tensor: each is read from every snapshot once (for all plans) and summed in float64, so the peak
    memory is the fp32 outputs plus one float64 tensor per plan. Buffers (as the latest snapshot used records
    them) and non-float tensors are copied from the latest snapshot used (see the module docstring).
    """
    from contextlib import ExitStack
    from safetensors import safe_open
    if not plans:
        return {}
    profiles = plans[0].profiles
    if any(p.profiles != profiles for p in plans):
        raise ValueError("plans must share their snapshots (make them with one call of plan())")
    used = sorted({i for i, _ in profiles})
    names = snapshots[used[0]].names
    latest = snapshots[used[-1]]
    copied = set(latest.buffers or ())
    out: dict[str, dict[str, torch.Tensor]] = {p.sigma_rel: {} for p in plans}
    with ExitStack() as stack:
        files = {i: stack.enter_context(safe_open(snapshots[i].path, framework="pt")) for i in used}
        it: Iterable[str] = names
        if progress:
            from tqdm import tqdm
            it = tqdm(names, desc="post-hoc EMA", unit="tensor")
        for n in it:
            if n in copied:  # a buffer: the latest snapshot's, in fp32 when floating
                v = files[used[-1]].get_tensor(f"{latest.sigma_rels[0]}/{n}")
                for p in plans:
                    out[p.sigma_rel][n] = v.float() if v.is_floating_point() else v
                continue
            acc: list[torch.Tensor | None] = [None] * len(plans)
            for j, (i, s) in enumerate(profiles):
                v = files[i].get_tensor(f"{s}/{n}")
                if not v.is_floating_point():
                    for p in plans:
                        out[p.sigma_rel][n] = v
                    continue
                v = v.double()
                for k, p in enumerate(plans):
                    acc[k] = v * p.x[j] if acc[k] is None else acc[k].add_(v, alpha=float(p.x[j]))
            for k, p in enumerate(plans):
                if acc[k] is not None:
                    out[p.sigma_rel][n] = acc[k].float()
    return out


def reconstruct(run_dir: str, sigma_rels: Iterable[float | str], at_step: int | None = None,
                progress: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Post-hoc EMA weights of `run_dir` for each sigma_rel at `at_step` (default: the last snapshot's step),
    from the snapshots with step <= at_step -> {str(sigma_rel): fp32 state dict}."""
    snaps = read_snapshots(run_dir)
    return combine(snaps, plan(snaps, sigma_rels, at_step), progress=progress)


# ------------------------------------------------------------------------------------------------ CLI


def parse_sigma_rels(text: str) -> list[str]:
    """"0.05,0.10" -> ["0.05", "0.10"] (checked, duplicates by value dropped, spelling kept)."""
    out: list[str] = []
    for s in (p.strip() for p in text.split(",")):
        if not s:
            raise UsageError(f"--sigma-rel {text!r}: empty entry; give comma-separated numbers such as 0.05,0.10")
        v = check_sigma_rel(s)
        if all(float(o) != v for o in out):
            out.append(s)
    return out


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, "trainer.phema", argv)


def run_meta(run_dir: str) -> dict:
    """The latest checkpoint's meta.json of a run (model config, diffusion kwargs, step): what an export needs.
    UsageError when the run or its checkpoint is missing."""
    import json
    from trainer.checkpoint import latest_checkpoint
    if not os.path.isdir(run_dir):
        raise UsageError(f"run folder {run_dir} does not exist")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise UsageError(f"no checkpoint in {run_dir} (expected checkpoints/latest naming a folder with meta.json); "
                         f"the export needs the run's model and diffusion config")
    with open(os.path.join(ckpt, "meta.json")) as f:
        meta = json.load(f)
    if not isinstance(meta.get("model"), dict) or not isinstance(meta.get("diffusion"), dict):
        raise UsageError(f"{ckpt}/meta.json lacks the 'model' or 'diffusion' config")
    return meta


def _main(argv: Sequence[str] | None) -> int:
    from trainer.export import export_extra, save_exported
    p = ArgumentParser(prog="trainer.phema",
                       description="Reconstruct post-hoc EMA weights (EDM2) of a run from its phema/ snapshots and "
                                   "export them as safetensors + JSON.")
    p.add_argument("run_dir", help="training run folder (with phema/ snapshots and checkpoints/latest)")
    p.add_argument("--sigma-rel", required=True,
                   help=f"comma-separated EMA widths sigma_rel = std/age of the averaging profile, each in "
                        f"(0, {SIGMA_REL_MAX:.4f}], e.g. 0.05,0.10")
    p.add_argument("--out-dir", required=True, help="folder for phema_<sigma_rel>.safetensors and .json")
    p.add_argument("--at-step", type=int, default=None,
                   help="optimizer step the EMA ends at (default: the last snapshot's step); snapshots after it "
                        "are not used")
    flag(p, "--progress", False, "show a progress bar over the tensors (on stderr)")
    a = p.parse_args(argv)
    sigmas = parse_sigma_rels(a.sigma_rel)
    meta = run_meta(a.run_dir)
    snaps = read_snapshots(a.run_dir)
    plans = plan(snaps, sigmas, a.at_step)
    states = combine(snaps, plans, progress=a.progress)
    n_used = len({i for i, _ in plans[0].profiles})
    print(f"post-hoc EMA at step {plans[0].step} from {n_used} snapshots "
          f"(steps {snaps[0].step}..{max(s.step for s in snaps if s.step <= plans[0].step)}, "
          f"{len(plans[0].profiles)} profiles)")
    print(f"{'sigma_rel':>9} {'gamma':>9} {'lsq_sum':>9} {'|x|_1':>9} {'fit_err':>9}  file")
    for pl in plans:
        path = os.path.join(a.out_dir, f"phema_{pl.sigma_rel}.safetensors")
        save_exported(path, states[pl.sigma_rel], meta["model"], meta["diffusion"], step=pl.step,
                      ema=f"phema_{pl.sigma_rel}", extra=export_extra(meta))
        print(f"{pl.sigma_rel:>9} {pl.gamma:9.3f} {pl.lsq_sum:9.5f} {np.abs(pl.x).sum():9.3f} "
              f"{pl.fit_error:9.2e}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
