"""All-gather of the loss-aware sampler's (t, loss) rows, over torch.distributed or over MPI.

Both return `Tensor[world * B, 2]` float64 with every rank's rows in rank order (the contract of
`TimestepSampler.update_with_local_losses`). B may differ between ranks: rows are padded to the
largest B and the padding is dropped after the gather (sizes are gathered first). `same_size=True` promises
that every rank passes the same B and skips the size exchange (one collective instead of two).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

AllGather = Callable[[torch.Tensor], torch.Tensor]


def torch_all_gather(device: torch.device | str = "cpu", group=None) -> AllGather:
    """All-gather over the default torch.distributed group (NCCL or gloo); one size exchange + one gather."""
    def gather(x: torch.Tensor, same_size: bool = False) -> torch.Tensor:
        x = x.to(device=device, dtype=torch.float64).reshape(-1, 2)
        world = dist.get_world_size(group)
        if world == 1:
            return x.cpu()
        if same_size:
            out = torch.empty(world * x.shape[0], 2, dtype=torch.float64, device=device)
            gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch >= 2.12
            gather_single(out, x.contiguous(), group=group)
            return out.cpu()
        n = torch.tensor([x.shape[0]], device=device, dtype=torch.int64)
        ns = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(ns, n, group=group)
        sizes = [int(v.item()) for v in ns]
        m = max(sizes)
        pad = torch.zeros(m, 2, dtype=torch.float64, device=device)
        pad[: x.shape[0]] = x
        out = [torch.empty_like(pad) for _ in range(world)]
        dist.all_gather(out, pad, group=group)
        return torch.cat([o[:s] for o, s in zip(out, sizes)]).cpu()
    return gather


def mpi_all_gather(comm=None) -> AllGather:
    """All-gather over MPI (mpi4py `Allgatherv` on float64 buffers, no pickling)."""
    from mpi4py import MPI
    comm = comm or MPI.COMM_WORLD

    def gather(x: torch.Tensor, same_size: bool = False) -> torch.Tensor:
        a = np.ascontiguousarray(x.detach().cpu().to(torch.float64).reshape(-1, 2).numpy())
        if same_size:
            out = np.empty(comm.size * a.size, dtype=np.float64)
            comm.Allgather(a.ravel(), out)
            return torch.from_numpy(out.reshape(-1, 2))
        counts = np.array(comm.allgather(a.size), dtype=np.int64)
        out = np.empty(int(counts.sum()), dtype=np.float64)
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
        comm.Allgatherv(a.ravel(), [out, counts, displs, MPI.DOUBLE])
        return torch.from_numpy(out.reshape(-1, 2))
    return gather
