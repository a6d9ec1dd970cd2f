"""What is trained: the objective interface and its registry.

An objective is the only part of the trainer that knows what is trained. The loop (`trainer.loop`) owns DeepSpeed,
accumulation, EMA, checkpoints, resume, preemption, logging, for whatever networks the objective declares; it asks
the objective for

- `networks()`: `{name: trainer.networks.Network}`, built identically on every rank (the loop seeds torch first):
  each trained one with its own optimizer settings, EMA on or off, exported or not; frozen ones (a teacher, an
  autoencoder) declared frozen. The default is one trained network, "model", from `build_model()`;
- `train_step(step)`: one optimizer step of the run (`trainer.step.Step`: its micro-batches, the networks as
  functions, backward and step per network, metrics). The default runs `accum` micro-batches of
  `loss(net, batch, generator)` -> backward -> step on "model": override `loss` for a one-network objective, or
  `train_step` to alternate networks, add backward passes (a gradient penalty) or run MCMC before the loss;
- `loss(net, batch, generator)`: per-sample losses `[B]` (their mean is backpropagated) and named per-sample
  metrics `{name: [B]}` (NaN = "not counted", e.g. a timestep quartile the sample is not in), from one micro-batch
  `(x [B, C, H, W] in [-1, 1], y [B] int64)`; every random draw comes from `generator` (seeded from
  (seed, rank, step), so a resumed run draws the same numbers);
- `sync_rows()` / `apply_synced(rows)`: state kept identical on every rank (e.g. the loss-aware timestep sampler's
  loss history) travels as float64 rows `[n, k]` in the loop's one all-gather per step; `apply_synced` receives every
  rank's rows in rank order, or nothing on a step with a non-finite loss anywhere;
- `state_dict()` / `load_state_dict()`: that state, checkpointed (identical on every rank: saved once);
- `export_config()`: the JSON next to exported weights (`model` config for `diffusion.presets`, `diffusion` kwargs),
  under the top-level `kind` the objective names (how the file is sampled);
- `preview(model, device, seed)`: a sample grid `(images [N, C, H, W] in [-1, 1], columns)` from a copy of the
  network `preview_network` holding EMA weights, or None;
- `validate(cfg)` (before any process starts) and `check_data(cfg, shape)` (once the data's image shape is known):
  one `UsageError` line for settings or data this objective cannot train on.

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
from typing import TYPE_CHECKING, Any, Callable

import torch

from data.cli import UsageError
from trainer.networks import DEFAULT, Network

if TYPE_CHECKING:
    from trainer.step import Step

Batch = tuple[torch.Tensor, torch.Tensor]
Net = Callable[..., torch.Tensor]  # the engine as a function: inputs cast to its dtype, outputs back in fp32


class Objective:
    """Base class. One network: override `build_model`, `loss` and `export_config`. Several: override `networks`,
    `train_step` and `export_config`. The rest has stateless defaults."""

    Options: type | None = None  # a dataclass of configlib options, or None
    console: tuple[str, ...] = ()  # metric names printed on the console line after the loss
    kind: str | None = None  # how an exported file is sampled (the top-level "kind" of its JSON); None: the name
    preview_network: str = DEFAULT  # the network whose EMA weights `preview` gets

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.options = cfg.objective.options
        self.nets: dict[str, Net] = {}  # every network as a function, set by the loop once they are on the device

    @classmethod
    def validate(cls, cfg: Any) -> None:
        """Settings this objective cannot train with: raise UsageError (one line). Runs before any process group."""

    @classmethod
    def check_data(cls, cfg: Any, shape: tuple[int, ...]) -> None:
        """The training images' shape (H, W), known before any process group: raise UsageError (one line) when this
        objective cannot train on them."""

    def networks(self) -> dict[str, Network]:
        """{name: Network}; default: one trained network "model" from `build_model()`, with EMA, exported."""
        return {DEFAULT: Network(self.build_model())}

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def train_step(self, step: "Step") -> None:
        """One optimizer step: `step.accum` micro-batches, each loss -> backward -> step of "model"."""
        for _ in range(step.accum):
            batch = step.batch()
            loss, metrics = self.loss(step.net(DEFAULT), batch, step.generator)
            step.backward(DEFAULT, loss)
            step.step(DEFAULT)
            step.record(loss, metrics)

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
        """A sample grid from `model`, a copy of network `preview_network` holding EMA weights; None: no grid."""
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
