"""One optimizer step of the run, as an objective's `train_step` sees it.

    for _ in range(step.accum):                      # the default step (trainer.objective.Objective.train_step)
        batch = step.batch()
        loss, metrics = objective.loss(step.net("model"), batch, step.generator)
        step.backward("model", loss)
        step.step("model")
        step.record(loss, metrics)

A network's `step` is DeepSpeed's `engine.step()`: it applies the optimizer once per `accum` calls (the
accumulation boundary), so an objective that steps a network calls `backward` and `step` on it `accum` times in one
run step, and a network the objective does not step keeps its optimizer state. Gradient clipping, loss scaling and
the ZeRO reduction are the engine's. A non-finite loss handed to `backward` marks the whole step non-finite on every
rank (the objective's synced state is then left unchanged and the run's --nonfinite-patience counts it).
"""
from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from trainer.networks import CastNet

if TYPE_CHECKING:
    from trainer.loop import Trainer

Net = Callable[..., torch.Tensor]


class Step:
    """`index`: optimizer steps the run has taken before this one (0 first); `accum`: micro-batches per optimizer
    step; `micro`: images per micro-batch on this rank; `generator`: every random draw of this step on this rank
    (seeded from (seed, rank, step), so a resumed run draws the same numbers)."""

    def __init__(self, trainer: "Trainer", generator: torch.Generator, log_now: bool) -> None:
        self._t, self.generator, self._log_now = trainer, generator, log_now
        self.index, self.accum, self.micro = trainer.step, trainer.accum, trainer.micro
        self.finite = True
        self.wait = 0.0  # seconds spent waiting for data

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch of this rank on the run's device: (x [B, C, H, W] in [-1, 1], y [B] int64)."""
        t0 = time.perf_counter()
        x, y = next(self._t.batches)
        self.wait += time.perf_counter() - t0
        return x.to(self._t.device, non_blocking=True), y.to(self._t.device)

    def net(self, name: str) -> Net:
        """Network `name` as a function: inputs cast to the run's precision, outputs back in fp32."""
        return self._t.nets[name]

    def module(self, name: str) -> Net:
        """Trained network `name`'s plain module as a function (inputs cast, outputs in fp32), without DeepSpeed's
        engine around it. DeepSpeed hooks an engine's outputs so that any backward through them opens that engine's
        backward; a backward that is not the engine's own (`torch.autograd.grad` for an input gradient such as R1's,
        or another network's loss, e.g. a generator's through the discriminator) must not pass through the engine's
        outputs: use this (ZeRO 0-2), together with `no_grad_for(name)` for another network's loss."""
        return CastNet(self._t.engines[name].module, self._t.dtype)

    def engine(self, name: str):
        """The DeepSpeed engine of trained network `name` (to inspect it; training goes through backward/step)."""
        return self._t.engines[name]

    def backward(self, name: str, loss: torch.Tensor) -> None:
        """Backpropagate the mean of `loss` (per-sample [B] or a scalar) into network `name`'s gradients."""
        mean = loss.mean() if loss.ndim else loss
        self._t.engines[name].backward(mean)
        self.finite &= bool(torch.isfinite(mean.detach()))

    def step(self, name: str) -> None:
        """`engine.step()` of network `name` (the optimizer moves at the accumulation boundary)."""
        if self._log_now:
            self._t.fp32_grad_norm(name)
        self._t.engines[name].step()

    def record(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor]) -> None:
        """Per-sample `loss` [B] (logged as train/loss) and named per-sample metrics (NaN = not counted)."""
        self._t.metrics.add({"loss": loss.detach(), **metrics})

    @contextlib.contextmanager
    def no_grad_for(self, name: str) -> Iterator[None]:
        """Network `name`'s parameters take no gradient inside the block (e.g. the discriminator while the generator
        learns through it): its accumulated gradients and optimizer state stay as they are."""
        params = [p for p in self._t.engines[name].module.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)
