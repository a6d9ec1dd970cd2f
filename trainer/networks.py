"""The networks an objective declares, and how the trainer names their files.

An objective returns `{name: Network}` from `networks()`. Each TRAINED network gets its own DeepSpeed engine (ZeRO
stage, precision, gradient clipping and warm-up from the run; learning rate, Adam betas and weight decay from the
run unless the network sets its own), its own EMAs when `ema` is on, its own checkpoint entries, and goes into the
exported file when `export` is on. A FROZEN network (a teacher, an autoencoder) is moved to the run's device and
precision, never optimized, never checkpointed; the file its weights came from (`source`) is recorded with its
sha256 in the run's config.json, and a resume with a different file is refused.

Checkpoint names of network N (the network "model", the only one of one-network objectives, keeps the names every
earlier run has): DeepSpeed state `ds/` or `ds_N/`, fp32 weights `model.safetensors` or `N.safetensors`, EMA rate R
`ema_R.safetensors` or `N.ema_R.safetensors`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from data.cli import UsageError
from data.fsio import sha256_file

DEFAULT = "model"  # the one network of a one-network objective
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
RESERVED = ("objective", "rng", "rank", "ema", "config", "meta", "ds", "phema")


@dataclass
class Network:
    """One network of an objective. `lr`, `betas`, `weight_decay`: None = the run's (--lr, --adam-betas,
    --weight-decay). `double_backward`: its loss differentiates input gradients (an R1 penalty): ZeRO-3 is refused."""
    module: torch.nn.Module
    lr: float | None = None
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    ema: bool = True
    export: bool = True
    frozen: bool = False
    source: str | None = None  # frozen: the weights file (sha256 recorded; a changed file is refused on resume)
    double_backward: bool = False


def frozen(module: torch.nn.Module, source: str | None) -> Network:
    """A frozen network loaded from `source` (never trained, checkpointed or exported)."""
    return Network(module, ema=False, export=False, frozen=True, source=source)


def check_networks(nets: dict[str, Network], zero_stage: int) -> None:
    """Names, at least one trained network, frozen ones without optimizer settings, ZeRO-3 and double backward;
    UsageError (one line) or TypeError (a bug in the objective)."""
    if not nets or not isinstance(nets, dict):
        raise TypeError("Objective.networks() must return a non-empty dict {name: Network}")
    for name, n in nets.items():
        if not NAME_RE.match(name) or name in RESERVED:
            raise TypeError(f"network name {name!r}: use lower-case letters, digits and _ (not {', '.join(RESERVED)})")
        if not isinstance(n, Network) or not isinstance(n.module, torch.nn.Module):
            raise TypeError(f"network {name!r}: expected a trainer.networks.Network holding an nn.Module")
        if n.frozen and (n.ema or n.export or n.lr is not None):
            raise TypeError(f"frozen network {name!r} has no EMA, export or optimizer settings")
        if n.double_backward and zero_stage == 3 and not n.frozen:
            raise UsageError(f"network {name!r} is trained with a gradient penalty (double backward), which DeepSpeed "
                             f"ZeRO-3's partitioned parameters do not support; use --zero-stage 0, 1 or 2")
    if all(n.frozen for n in nets.values()):
        raise TypeError("Objective.networks(): every network is frozen, nothing to train")


def weights_file(net: str, ema: str | None = None) -> str:
    """Checkpoint file of network `net`: its fp32 weights (ema None) or its EMA `ema`."""
    if net == DEFAULT:
        return "model.safetensors" if ema is None else f"ema_{ema}.safetensors"
    return f"{net}.safetensors" if ema is None else f"{net}.ema_{ema}.safetensors"


def deepspeed_dir(net: str) -> str:
    """Checkpoint subfolder of network `net`'s DeepSpeed state."""
    return "ds" if net == DEFAULT else f"ds_{net}"


def frozen_record(nets: dict[str, Network]) -> dict[str, dict[str, Any]]:
    """{name: {"source": absolute path, "sha256": hex}} of the frozen networks loaded from a file."""
    out = {}
    for name, n in nets.items():
        if n.frozen and n.source:
            path = os.path.abspath(n.source)
            out[name] = {"source": path, "sha256": sha256_file(path)}
    return out


def frozen_mismatch(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """One line naming the first frozen network whose file differs from the one the run started with, or None."""
    for name in sorted(set(saved) | set(now)):
        a, b = saved.get(name), now.get(name)
        if a is None or b is None:
            return f"frozen network {name!r} {'was not' if a is None else 'is no longer'} part of this run"
        if a.get("sha256") != b["sha256"]:
            return (f"frozen network {name!r}: {b['source']} (sha256 {b['sha256'][:12]}) is not the file this run "
                    f"started with ({a.get('source')}, sha256 {str(a.get('sha256'))[:12]}); restore that file or "
                    f"start a new --run-dir")
    return None


class CastNet:
    """A network as the objectives call it: the first input cast to the run's dtype, a floating output back in fp32.
    `fn`: a trained network's DeepSpeed engine, its plain module (trainer.step.Step.module) or a frozen module."""

    def __init__(self, fn: Callable[..., Any], dtype: torch.dtype) -> None:
        self.fn, self.dtype = fn, dtype

    def __call__(self, x: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        out = self.fn(x.to(self.dtype), *args, **kw)
        return out.float() if isinstance(out, torch.Tensor) and out.is_floating_point() else out


def prepare_frozen(n: Network, device: torch.device, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """Move a frozen network to the run's device and precision, in eval mode with no gradients; its function."""
    n.module.to(device=device, dtype=dtype).eval()
    for p in n.module.parameters():
        p.requires_grad_(False)
    return CastNet(n.module, dtype)
