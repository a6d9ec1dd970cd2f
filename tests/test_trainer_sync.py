"""The loss-aware sampler's all-gather over gloo and over `mpiexec` keeps every rank's state identical to one
sampler fed all ranks' losses in rank order (uneven per-rank batch sizes included), and the same-size form
gathers in rank order."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from diffusion.timestep_samplers import create_timestep_sampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T, STEPS = 20, 100

WORKER = r"""
import os, sys, torch
from safetensors.torch import save_file
from diffusion.timestep_samplers import create_timestep_sampler
kind, out = sys.argv[1], sys.argv[2]
if kind == "mpi":
    from mpi4py import MPI
    from trainer.sync import mpi_all_gather
    rank, gather = MPI.COMM_WORLD.rank, mpi_all_gather()
else:
    import torch.distributed as dist
    from trainer.sync import torch_all_gather
    dist.init_process_group("gloo")
    rank, gather = dist.get_rank(), torch_all_gather("cpu")
s = create_timestep_sampler("loss-second-moment", %(T)d)
for step in range(%(STEPS)d):
    g = torch.Generator().manual_seed(1000 * rank + step)
    n = 3 + rank
    s.update_with_local_losses(torch.randint(0, %(T)d, (n,), generator=g), torch.rand(n, generator=g, dtype=torch.float64), gather)
save_file({k: v.contiguous() for k, v in s.state_dict().items()}, f"{out}/rank{rank}.safetensors")
# the one-collective form the trainer uses (every rank passes the same number of rows)
y = gather(torch.full((2, 2), float(rank), dtype=torch.float64) + torch.arange(4.0, dtype=torch.float64).view(2, 2),
           same_size=True)
assert torch.equal(y, torch.cat([torch.full((2, 2), float(r), dtype=torch.float64) + torch.arange(4.0, dtype=torch.float64).view(2, 2)
                                 for r in range(2)])), y
if kind != "mpi":  # a gloo group left alive at interpreter exit can abort the process (SIGABRT)
    dist.barrier()
    dist.destroy_process_group()
""" % {"T": T, "STEPS": STEPS}


def reference(world: int) -> dict[str, torch.Tensor]:
    s = create_timestep_sampler("loss-second-moment", T)
    for step in range(STEPS):
        ts, ls = [], []
        for rank in range(world):
            g = torch.Generator().manual_seed(1000 * rank + step)
            n = 3 + rank
            ts.append(torch.randint(0, T, (n,), generator=g))
            ls.append(torch.rand(n, generator=g, dtype=torch.float64))
        s.update_with_all_losses(torch.cat(ts), torch.cat(ls))
    assert s.warmed_up()
    return s.state_dict()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(out, world: int) -> None:
    want = reference(world)
    for r in range(world):
        got = load_file(str(out / f"rank{r}.safetensors"))
        for k in want:
            assert torch.equal(got[k], want[k]), (r, k)


@pytest.mark.distributed
def test_sampler_sync_over_gloo(tmp_path) -> None:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, "torch", str(tmp_path)], cwd=ROOT,
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port), PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
             for r in range(2)]
    assert [p.wait(timeout=180) for p in procs] == [0, 0]
    check(tmp_path, 2)


@pytest.mark.distributed
def test_sampler_sync_over_mpiexec(tmp_path) -> None:
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        pytest.skip("no mpiexec next to the Python interpreter (the mpich wheel brings it)")
    r = subprocess.run([mpiexec, "-n", "2", sys.executable, "-c", WORKER, "mpi", str(tmp_path)], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    check(tmp_path, 2)
