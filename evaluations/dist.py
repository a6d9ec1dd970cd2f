"""Ranks for evaluation jobs: the trainer's launcher discovery plus a plain gloo process group.

`trainer.dist.discover()` reads torchrun/deepspeed variables, SLURM variables or mpi4py (under mpiexec) and exports
RANK/WORLD_SIZE/MASTER_*. Evaluation only needs barriers and a few small collectives, so it uses gloo on CPU
tensors whatever the device (no DeepSpeed import, and the same code on CPU and GPU nodes).
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from evaluations.io import UsageError


@dataclass(frozen=True)
class Ranks:
    rank: int
    local_rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(timeout_min: float = 60.0) -> Ranks:
    """Discover the launch and, with several ranks, initialise a gloo process group. Idempotent."""
    from trainer.dist import discover
    from trainer.errors import UsageError as TrainerUsageError
    try:
        launch = discover()
    except TrainerUsageError as e:
        raise UsageError(str(e)) from None
    if launch.world > 1 and not tdist.is_initialized():
        tdist.init_process_group("gloo", rank=launch.rank, world_size=launch.world,
                                 timeout=datetime.timedelta(minutes=timeout_min))
    return Ranks(launch.rank, launch.local_rank, launch.world)


def device_for(ranks: Ranks, requested: str | None = None) -> torch.device:
    """`requested`, else this rank's GPU (local rank) when CUDA is present, else CPU."""
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", ranks.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a CPU tensor over ranks (the tensor itself with one rank)."""
    if tdist.is_initialized():
        x = x.clone()
        tdist.all_reduce(x)
    return x


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's CPU tensor [n_r, ...] (n_r may differ) in rank order -> [sum n_r, ...]."""
    if not tdist.is_initialized():
        return x
    world = tdist.get_world_size()
    n = torch.tensor([x.shape[0]], dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    tdist.all_gather(sizes, n)
    top = int(max(s.item() for s in sizes))
    pad = torch.zeros((top, *x.shape[1:]), dtype=x.dtype)
    pad[:x.shape[0]] = x
    out = [torch.zeros_like(pad) for _ in range(world)]
    tdist.all_gather(out, pad)
    return torch.cat([o[:int(s.item())] for o, s in zip(out, sizes)])


def shutdown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()
