"""The one padded all-gather: every rank's rows `[n_r, ...]` concatenated in rank order, over torch.distributed
(NCCL or gloo) or over MPI (mpi4py, no pickling).

`n_r` may differ between ranks: the row counts are gathered first, rows are padded to the largest count and the
padding is dropped after the gather. `same_size=True` promises that every rank passes the same shape and skips
the count exchange (one collective instead of two). Results are CPU tensors of the input's dtype.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

AllGather = Callable[..., torch.Tensor]  # (x: Tensor[n_r, ...], same_size: bool = False) -> Tensor[sum n_r, ...]


def gather_rows(x: torch.Tensor, *, device: torch.device | str = "cpu", group=None,
                same_size: bool = False) -> torch.Tensor:
    """All-gather over torch.distributed (the tensor itself, on CPU, without a process group or with one rank)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return x.detach().cpu()
    world = dist.get_world_size(group)
    x = x.detach().to(device).contiguous()
    if same_size:
        out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=device)
        gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch >= 2.12
        gather_single(out, x, group=group)
        return out.cpu()
    n = torch.tensor([x.shape[0]], device=device, dtype=torch.int64)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n, group=group)
    sizes = [int(c.item()) for c in counts]
    pad = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=device)
    pad[: x.shape[0]] = x
    out = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(out, pad, group=group)
    return torch.cat([o[:s] for o, s in zip(out, sizes)]).cpu()


def torch_all_gather(device: torch.device | str = "cpu", group=None) -> AllGather:
    """`gather(x, same_size=False)` over the torch.distributed group (NCCL needs `device` = this rank's GPU)."""
    return lambda x, same_size=False: gather_rows(x, device=device, group=group, same_size=same_size)


def mpi_all_gather(comm=None) -> AllGather:
    """`gather(x, same_size=False)` over MPI (`Allgather` / `Allgatherv` on float64 buffers; results float64)."""
    from mpi4py import MPI
    comm = comm or MPI.COMM_WORLD

    def gather(x: torch.Tensor, same_size: bool = False) -> torch.Tensor:
        a = np.ascontiguousarray(x.detach().cpu().to(torch.float64).numpy())
        row = a.shape[1:]
        if same_size:
            out = np.empty(comm.size * a.size, dtype=np.float64)
            comm.Allgather(a.ravel(), out)
            return torch.from_numpy(out.reshape(-1, *row))
        counts = np.array(comm.allgather(a.size), dtype=np.int64)
        out = np.empty(int(counts.sum()), dtype=np.float64)
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
        comm.Allgatherv(a.ravel(), [out, counts, displs, MPI.DOUBLE])
        return torch.from_numpy(out.reshape(-1, *row))
    return gather
