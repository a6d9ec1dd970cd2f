"""What is trained: the objective interface and its registry.

An objective is the only part of the trainer that knows what is trained. The loop (`trainer.loop`) owns DeepSpeed,
accumulation, EMA, checkpoints, resume, preemption, logging; it asks the objective to

- `build_model()`: the network DeepSpeed trains (one `nn.Module`; wrap several in a `ModuleDict`), built
  identically on every rank (the loop seeds torch first);
- `loss(net, batch, generator)`: per-sample losses `[B]` (their mean is backpropagated) and named per-sample
  metrics `{name: [B]}` (NaN = "not counted", e.g. a timestep quartile the sample is not in), from one micro-batch
  `(x [B, C, H, W] in [-1, 1], y [B] int64)`; every random draw comes from `generator` (seeded from
  (seed, rank, step), so a resumed run draws the same numbers);
- `sync_rows()` / `apply_synced(rows)`: state kept identical on every rank (e.g. the loss-aware timestep sampler's
  loss history) travels as float64 rows `[n, k]` in the loop's one all-gather per step; `apply_synced` receives every
  rank's rows in rank order, or nothing on a step with a non-finite loss anywhere;
- `state_dict()` / `load_state_dict()`: that state, checkpointed (identical on every rank: saved once);
- `export_config()`: the JSON next to exported weights (`model` config for `diffusion.presets`, `diffusion` kwargs);
- `preview(model, device, seed)`: a sample grid `(images [N, C, H, W] in [-1, 1], columns)` from a copy of the
  network holding EMA weights, or None.

`--objective NAME` picks a registered objective; `--objective package.module:Class` or `--objective
path/to/file.py:Class` imports one from elsewhere. An objective may declare its own settings as an `Options`
dataclass of `trainer.configlib.option` fields: they get their own `--help` section and live under
`objective.NAME` in `config.json`.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any, Callable

import torch

from data.cli import UsageError

Batch = tuple[torch.Tensor, torch.Tensor]
Net = Callable[..., torch.Tensor]  # the engine as a function: inputs cast to its dtype, outputs back in fp32


class Objective:
    """Base class: override `build_model`, `loss` and `export_config`; the rest has stateless defaults."""

    Options: type | None = None  # a dataclass of configlib options, or None
    console: tuple[str, ...] = ()  # metric names printed on the console line after the loss

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.options = cfg.objective.options

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def loss(self, net: Net, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def export_config(self) -> dict[str, Any]:
        raise NotImplementedError

    def zero3_leaf_modules(self) -> list[type]:
        """Module classes DeepSpeed's ZeRO-3 should gather as one unit (fewer, larger parameter fetches)."""
        return []

    def sync_rows(self) -> torch.Tensor:
        """This rank's rows since the last call, float64 [n, k] (n the same on every rank)."""
        return torch.zeros(0, 2, dtype=torch.float64)

    def apply_synced(self, rows: torch.Tensor) -> None:
        """Every rank's rows from `sync_rows`, concatenated in rank order."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"objective {type(self).__name__} keeps no state, got {sorted(state)}")

    def preview(self, model: torch.nn.Module, device: torch.device, seed: int) -> tuple[torch.Tensor, int] | None:
        return None

    def figures(self, model: torch.nn.Module) -> dict[str, Any]:
        """Matplotlib figures {tag: figure} of the EMA network, written to TensorBoard with each preview grid."""
        return {}


OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator: make `--objective NAME` train this class."""
    def add(cls: type[Objective]) -> type[Objective]:
        if name in OBJECTIVES and OBJECTIVES[name] is not cls:
            raise ValueError(f"objective {name!r} is registered twice ({OBJECTIVES[name].__name__}, {cls.__name__})")
        OBJECTIVES[name] = cls
        return cls
    return add


def load_builtin_objectives() -> None:
    """Import the objectives that ship with the trainer (each registers itself)."""
    importlib.import_module("trainer.iddpm")
    importlib.import_module("trainer.vdm")
    importlib.import_module("trainer.classifier")
    importlib.import_module("trainer.distill")


def _import(module: str):
    """An importable module name, or the path of a .py file (imported once under its own path)."""
    if not module.endswith(".py"):
        return importlib.import_module(module)
    path = os.path.abspath(module)
    key = "iddpm_objective_" + path.replace(os.sep, "_").replace(".", "_")
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, path)
        if spec is None or spec.loader is None or not os.path.isfile(path):
            raise ImportError(f"no such file {path}")
        sys.modules[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[key])
    return sys.modules[key]


def get_objective(name: str) -> type[Objective]:
    """`NAME` (registered), `package.module:Class` or `path/to/file.py:Class` (imported) -> the objective class;
    UsageError otherwise."""
    load_builtin_objectives()
    if ":" in name:
        module, attr = name.rsplit(":", 1)
        try:
            cls = getattr(_import(module), attr)
        except (ImportError, AttributeError, OSError) as e:
            raise UsageError(f"objective.name (--objective) {name!r}: cannot import it ({e})") from None
        if not (isinstance(cls, type) and issubclass(cls, Objective)):
            raise UsageError(f"objective.name (--objective) {name!r} is not a trainer.objective.Objective")
        return cls
    if name not in OBJECTIVES:
        raise UsageError(f"objective.name (--objective) {name!r} is not one of {', '.join(OBJECTIVES)} "
                         f"(or give package.module:Class or path/to/file.py:Class)")
    return OBJECTIVES[name]
