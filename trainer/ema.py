"""Exponential moving averages of the weights, kept in fp32 on one rank, for several rates at once.

    ema <- rate * ema + (1 - rate) * theta        (after every optimizer step)

`theta` is the fp32 master copy of the weights at every ZeRO stage and precision (see `full_params`):
the module parameters themselves in fp32 at ZeRO 0-2, gathered with `GatheredParameters` at ZeRO-3, and
DeepSpeed's fp32 master partitions (`safe_get_full_fp32_param`) in bf16/fp16. Collective: all ranks call it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class EMA:
    """fp32 shadow copies `shadow[rate][name]` of a model's parameters (names as in `named_parameters`)."""

    def __init__(self, rates: list[str], initial: dict[str, torch.Tensor]):
        self.rates = list(rates)
        self.shadow: dict[str, dict[str, torch.Tensor]] = {
            r: {k: v.detach().to(torch.float32).clone() for k, v in initial.items()} for r in self.rates}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]) -> None:
        """One EMA step toward `params` (any float dtype; compared in fp32)."""
        names = list(self.shadow[self.rates[0]])
        src = [params[k].detach().to(device=self.shadow[self.rates[0]][k].device, dtype=torch.float32) for k in names]
        for r in self.rates:
            dst = [self.shadow[r][k] for k in names]
            torch._foreach_lerp_(dst, src, 1.0 - float(r))  # dst += (1 - rate) * (src - dst)

    def state_dict(self, rate: str) -> dict[str, torch.Tensor]:
        return self.shadow[rate]

    def load(self, rate: str, tensors: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow[rate]) ^ set(tensors)
        if missing:
            raise ValueError(f"EMA {rate}: parameter names differ from the model: {sorted(missing)[:5]}")
        for k, v in tensors.items():
            self.shadow[rate][k].copy_(v)


@contextlib.contextmanager
def full_params(engine, precision: str, zero_stage: int) -> Iterator[dict[str, torch.Tensor]]:
    """Yield {name: full fp32-or-model-dtype tensor} on every rank (collective under ZeRO / low precision)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    named = list(engine.module.named_parameters())
    if precision != "fp32":
        out = {}
        for k, p in named:
            t = safe_get_full_fp32_param(p)  # fp32 master (gathered from its partitions)
            if t is None:  # fp16 at ZeRO-0 keeps masters inside FP16_Optimizer: fall back to the weights
                t = p.detach().float()
            out[k] = t
        yield out
    elif zero_stage == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            yield {k: p.detach() for k, p in named}
    else:
        yield {k: p.detach() for k, p in named}
