"""Ranks for evaluation jobs: the trainer's launcher discovery plus a plain gloo process group.

`trainer.dist.discover()` reads torchrun/deepspeed variables, SLURM variables or mpi4py (under mpiexec) and exports
RANK/WORLD_SIZE/MASTER_*. Evaluation only needs barriers and a few small collectives, so it uses gloo on CPU
tensors whatever the device (no DeepSpeed import, and the same code on CPU and GPU nodes). Rows are gathered with
`trainer.sync.gather_rows` (the project's one padded all-gather).
"""
from __future__ import annotations

import datetime
import gc
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class Ranks:
    rank: int
    local_rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(timeout_min: float = 60.0) -> Ranks:
    """Discover the launch and, with several ranks, initialise a gloo process group. Idempotent.

    A launch that cannot be understood (e.g. MASTER_PORT missing) raises `data.cli.UsageError`.
    """
    from trainer.dist import discover
    launch = discover()
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


def init(device: str | None = None, threads: int | None = None) -> tuple[Ranks, torch.device]:
    """`setup()`, this rank's device (`device_for`) and, when given, the number of torch CPU threads."""
    ranks = setup()
    if threads:
        torch.set_num_threads(threads)
    return ranks, device_for(ranks, device)


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a CPU tensor over ranks (the tensor itself with one rank)."""
    if tdist.is_initialized():
        x = x.clone()
        tdist.all_reduce(x)
    return x


def shutdown() -> None:
    """Destroy the process group (if any), then collect garbage so that gloo's objects are freed now, while the
    interpreter is whole: freed during its teardown they can abort a finished rank (SIGABRT, "terminate called
    without an active exception"). The CLIs also skip the teardown (data.cli.exit_without_teardown)."""
    if tdist.is_initialized():
        tdist.destroy_process_group()
        gc.collect()
