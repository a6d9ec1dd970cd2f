"""Exponential moving averages of the fp32 master weights, sharded like the masters, for several rates at once.

    ema <- rate * ema + (1 - rate) * theta        (after every optimizer step)

`theta` is the fp32 master copy of the weights at every ZeRO stage and precision. Each rank averages only the
piece of the masters it owns (`local_master_shards`), in place and with no communication per step:

- ZeRO-3 (any precision): this rank's partition of every parameter (`safe_get_local_fp32_param`);
- ZeRO-1/2 and bf16 at any stage: this rank's fragments of DeepSpeed's flat fp32 partitions (`_hp_mapping`);
- fp32 at ZeRO 0 (and fp16 at ZeRO 0, whose masters are not mapped to names): rank 0 owns every parameter whole.

Full tensors exist only when asked for (`EMA.full_state_dict`, a collective at checkpoint and sample time).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Shard:
    """This rank's piece of one parameter: flat elements [start, start + numel) of parameter `name` (`shape`)."""
    name: str
    shape: torch.Size
    start: int
    master: torch.Tensor  # 1-D live view of the master weights, `numel` elements (fp32, or fp16 in the fallback)

    @property
    def numel(self) -> int:
        return self.master.numel()


def local_master_shards(engine, rank: int, world: int) -> tuple[list[Shard], bool]:
    """(this rank's shards of the fp32 masters, whether the shards are spread over ranks).

    Call after `engine.load_checkpoint` (DeepSpeed re-links its fp32 fragments on load). When the second value
    is False, rank 0 holds every parameter whole and the other ranks hold nothing."""
    named = [(k, p) for k, p in engine.module.named_parameters() if p.requires_grad]
    if any(hasattr(p, "ds_id") for _, p in named):  # ZeRO-3: rank r owns [r * ps, (r + 1) * ps) of each param
        from deepspeed.utils import safe_get_local_fp32_param
        shards = []
        for k, p in named:
            part = safe_get_local_fp32_param(p)
            ps = part.numel()  # padded partition size
            n = max(0, min(ps, p.ds_numel - rank * ps))
            if n:
                shards.append(Shard(k, torch.Size(p.ds_shape), rank * ps, part.narrow(0, 0, n)))
        return shards, world > 1
    if any(hasattr(p, "_hp_mapping") for _, p in named):  # ZeRO-1/2, BF16_Optimizer: flat fp32 fragments
        shards = []
        for k, p in named:
            m = getattr(p, "_hp_mapping", None)
            if m is not None and m.lp_fragment_address.numel > 0:
                shards.append(Shard(k, p.shape, int(m.lp_fragment_address.start), m.get_hp_fragment()))
        return shards, world > 1
    if rank != 0:
        return [], False
    return [Shard(k, p.shape, 0, p.detach().view(-1)) for k, p in named], False


def param_shapes(module: torch.nn.Module) -> list[tuple[str, torch.Size]]:
    """(name, full shape) of every trainable parameter in model order (ZeRO-3 partitioned ones included)."""
    return [(k, torch.Size(p.ds_shape) if hasattr(p, "ds_shape") else p.shape)
            for k, p in module.named_parameters() if p.requires_grad]


PHEMA_PREFIX = "phema_"  # profile name of a power-function EMA: phema_<sigma_rel>


def power_gamma(profile: str) -> float | None:
    """The exponent of a power-function profile name (`phema_0.05` -> gamma for sigma_rel 0.05), else None."""
    if not profile.startswith(PHEMA_PREFIX):
        return None
    from trainer.phema import sigma_rel_to_gamma
    return sigma_rel_to_gamma(float(profile[len(PHEMA_PREFIX):]))


class EMA:
    """fp32 EMAs of this rank's master shards, `shadow[profile][i]` for `shards[i]`.

    A profile is a classic rate (`"0.9999"`: ema <- r ema + (1 - r) theta every step) or a power-function EMA
    (`"phema_0.05"`, EDM2: r = (1 - 1/t)^(gamma + 1) at step t, gamma set by the relative std 0.05).
    `names`: every parameter (name, full shape) in model order, identical on all ranks (`param_shapes`); `device`:
    where the assembling all-reduce runs (the engine's device, for NCCL)."""

    def __init__(self, rates: list[str], shards: list[Shard], sharded: bool, names: list[tuple[str, torch.Size]],
                 device: torch.device | str = "cpu"):
        self.rates = list(rates)
        self.gammas = {r: power_gamma(r) for r in self.rates}
        self.shards = shards
        self.sharded = sharded
        self.names = list(names)
        self.device = device
        self.offsets: dict[str, int] = {}  # flat offset of each parameter in the assembled model
        self.total = 0
        for k, shape in self.names:
            self.offsets[k] = self.total
            self.total += shape.numel()
        self.shadow: dict[str, list[torch.Tensor]] = {
            r: [s.master.detach().to(torch.float32).clone() for s in shards] for r in self.rates}

    @torch.no_grad()
    def check_coverage(self) -> None:
        """Collective when sharded: the ranks' shards must add up to every parameter element exactly once in count
        (the all-reduce in `full_state_dict` would double-count overlapping shards). Raises RuntimeError."""
        owned = torch.tensor([float(sum(s.numel for s in self.shards))], dtype=torch.float64, device=self.device)
        if self.sharded:
            dist.all_reduce(owned)
        elif not self.shards:
            return  # not rank 0 of a replicated run
        if int(owned.item()) != self.total:
            raise RuntimeError(f"EMA shards cover {int(owned.item())} parameter elements over all ranks, the model has "
                               f"{self.total}: this DeepSpeed optimizer's fp32 master layout is not supported")

    def _masters(self) -> list[torch.Tensor]:
        return [s.master.detach() if s.master.dtype == torch.float32 else s.master.detach().float() for s in self.shards]

    def rate(self, profile: str, step: int) -> float:
        """The averaging rate of `profile` at optimizer step `step` (1 for the first step taken)."""
        gamma = self.gammas[profile]
        if gamma is None:
            return float(profile)
        if step < 1:
            raise ValueError(f"EMA profile {profile} needs the 1-based optimizer step, got {step}")
        return (1.0 - 1.0 / step) ** (gamma + 1.0)

    @torch.no_grad()
    def update(self, step: int = 0) -> None:
        """One EMA step toward the current masters after optimizer step `step` (1-based; needed by power-function
        profiles only). Local: no communication."""
        if not self.shards:
            return
        src = self._masters()
        for r in self.rates:
            torch._foreach_lerp_(self.shadow[r], src, 1.0 - self.rate(r, step))  # ema += (1 - rate) (theta - ema)

    @torch.no_grad()
    def full_state_dict(self, rate: str) -> dict[str, torch.Tensor] | None:
        """{name: full fp32 CPU tensor} on rank 0 (None elsewhere). Collective (one all-reduce of the whole model)
        when the EMA is sharded: call it on every rank."""
        return self._assemble(self.shadow[rate])

    @torch.no_grad()
    def full_masters(self) -> dict[str, torch.Tensor] | None:
        """The current fp32 masters as {name: full CPU tensor} on rank 0 (None elsewhere); collective when sharded."""
        return self._assemble(self._masters())

    def _assemble(self, pieces: list[torch.Tensor]) -> dict[str, torch.Tensor] | None:
        if not self.sharded and not self.shards:
            return None  # not rank 0 of a replicated run
        flat = torch.zeros(self.total, dtype=torch.float32, device=self.device)
        for s, t in zip(self.shards, pieces):
            o = self.offsets[s.name] + s.start
            flat[o:o + s.numel].copy_(t.to(flat.device, torch.float32))
        if self.sharded:
            dist.all_reduce(flat)  # every element is owned by exactly one rank: the sum assembles the whole
            if dist.get_rank() != 0:
                return None
        flat = flat.cpu()
        return {k: flat[self.offsets[k]:self.offsets[k] + shape.numel()].view(shape).clone() for k, shape in self.names}

    @torch.no_grad()
    def load(self, rate: str, tensors: dict[str, torch.Tensor]) -> None:
        """Set this rank's shards of rate `rate` from full tensors {name: tensor} (every rank reads the file)."""
        missing = {s.name for s in self.shards} - set(tensors)
        if missing:
            raise ValueError(f"EMA {rate}: parameters missing from the saved EMA: {sorted(missing)[:5]}")
        for s, dst in zip(self.shards, self.shadow[rate]):
            src = tensors[s.name]
            if src.shape != s.shape:
                raise ValueError(f"EMA {rate}: {s.name} has shape {tuple(src.shape)}, the model {tuple(s.shape)}")
            dst.copy_(src.reshape(-1)[s.start:s.start + s.numel])
