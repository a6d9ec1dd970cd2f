"""Launch discovery and process-group set-up for every launcher.

`deepspeed` launcher: RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* are already set.
`srun`: SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS give the ranks; MASTER_ADDR/MASTER_PORT come from the environment
(the sbatch script sets them). `mpiexec`: ranks come from mpi4py, rank 0's address and a free port are broadcast.
No launcher: one rank on 127.0.0.1 and a free port. CPU uses gloo, CUDA uses NCCL (DeepSpeed's accelerator choice).

Every collective (and the first rendezvous) has a timeout (`--collective-timeout`). DeepSpeed's own groups do not
inherit it (a gloo all-reduce of its gradient clipping waited forever on a stopped peer), so a `Watchdog` thread
also ends the rank when no step finished for that long. When a collective fails (a peer died: gloo's "Connection
reset by peer") or the watchdog fires (a peer hung), `lost_rank_message` names the ranks whose processes are gone on
this host (every rank's host and PID are exchanged once after start-up).
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from data.cli import UsageError
from data.runlock import identity, process_alive

PEERS: list[dict] = []  # every rank's {host, pid, start}, filled by `exchange_identities`


@dataclass(frozen=True)
class Launch:
    rank: int
    local_rank: int
    world: int
    launcher: str  # deepspeed/torchrun | slurm | mpi | none


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _under_mpi() -> bool:
    return any(k in os.environ for k in ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS"))


def discover() -> Launch:
    """Work out rank/local rank/world from the environment and export RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launch = Launch(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), "deepspeed/torchrun")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and not _under_mpi():
        launch = Launch(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]), "slurm")
        if launch.world > 1 and not ("MASTER_ADDR" in env and "MASTER_PORT" in env):
            raise UsageError("under srun with several tasks, export MASTER_ADDR (first node's address) and MASTER_PORT")
    elif _under_mpi():
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        addr, port = None, None
        if comm.rank == 0:
            addr = env.get("MASTER_ADDR") or ("127.0.0.1" if comm.size == 1 else socket.gethostbyname(socket.gethostname()))
            port = env.get("MASTER_PORT") or str(_free_port())
        addr, port = comm.bcast((addr, port), root=0)
        env["MASTER_ADDR"], env["MASTER_PORT"] = addr, port
        launch = Launch(comm.rank, local, comm.size, "mpi")
    else:
        launch = Launch(0, 0, 1, "none")
    env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"] = str(launch.rank), str(launch.local_rank), str(launch.world)
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        if launch.world > 1:
            raise UsageError("MASTER_PORT is not set for a multi-rank run; export MASTER_ADDR and MASTER_PORT")
        env["MASTER_PORT"] = str(_free_port())
    return launch


def skip_shm_comm_op() -> None:
    """Keep DeepSpeed from building its CPU shared-memory all-reduce op (`deepspeed_shm_comm`).

    On CPU, every `deepspeed.init_distributed` (one rank or many) JIT-compiles or loads that op under a lock file in
    the torch extensions cache (`~/.cache/torch_extensions`, often a home shared by all nodes). The op only serves
    DeepSpeed-Inference's tensor-parallel all-reduce, which training never calls. A rank killed while it holds the
    lock (preemption, kill -9, a launcher's timeout) leaves the file behind, and every later launch then waits on
    it forever without a word. Marked incompatible, the op is never built: no lock, no C++ compiler needed on CPU
    nodes, and no minute of compilation on a node's first run. Call before DeepSpeed initialises its backend. On
    other accelerators DeepSpeed has no such op and this does nothing (reading DeepSpeed's table of compatible ops
    would probe every op's build there)."""
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().device_name() == "cpu":
        import deepspeed.ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init(launch: Launch, timeout_s: float = 300.0) -> "torch.device":
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, NCCL on CUDA), every collective bounded by
    `timeout_s`; return this rank's device."""
    import torch
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    if acc.device_name() == "cuda":
        torch.cuda.set_device(launch.local_rank)
        device = torch.device("cuda", launch.local_rank)
    else:
        device = torch.device("cpu")
    skip_shm_comm_op()
    deepspeed.init_distributed(dist_init_required=True, auto_mpi_discovery=False,
                               dist_backend=acc.communication_backend_name(), timeout=timedelta(seconds=timeout_s))
    exchange_identities(launch.world)
    return device


def exchange_identities(world: int) -> None:
    """Collective: learn every rank's host, PID and process start time (for naming a dead rank later)."""
    import torch.distributed as dist
    me = identity()
    table: list = [None] * world
    dist.all_gather_object(table, {k: me[k] for k in ("host", "pid", "start")})
    PEERS[:] = table


def is_comm_failure(e: BaseException) -> bool:
    """A failed or timed-out collective (peer died or hung), as opposed to a bug in this rank's own code."""
    import torch.distributed as dist
    text = str(e).lower()
    return isinstance(e, (dist.DistError, ConnectionError, TimeoutError)) or isinstance(e, RuntimeError) and any(
        k in text for k in ("connection reset", "connection closed", "connection refused", "broken pipe", "gloo",
                            "nccl", "timed out", "timeout", "socket", "peer"))


def end_hung_peers(rank: int) -> list[int]:
    """After a timeout: SIGKILL the other ranks of this job still running on this host (hung or stopped: they would
    keep the job alive, e.g. under srun --kill-on-bad-exit=0). Ranks on other hosts are left to their launcher."""
    import signal
    here, ended = socket.gethostname(), []
    for r, p in enumerate(PEERS):
        if r != rank and p["host"] == here and process_alive(p["pid"], p["start"]):
            try:
                os.kill(p["pid"], signal.SIGKILL)
                ended.append(r)
            except OSError:
                pass
    return ended


def lost_rank_message(rank: int, step: int, error: BaseException, timeout_s: float) -> str:
    """One line: which rank(s) died (their process is gone on this host) or that a collective hung."""
    here = socket.gethostname()
    gone = [r for r, p in enumerate(PEERS)
            if r != rank and p["host"] == here and not process_alive(p["pid"], p["start"])]
    remote = sorted({p["host"] for p in PEERS if p["host"] != here})
    first = " ".join(str(error).split())[:160]
    if gone:
        who = ", ".join(f"rank {r} (PID {PEERS[r]['pid']} on {here})" for r in gone)
        what = f"{who} died"
    elif isinstance(error, TimeoutError) or "timed out" in first.lower() or "timeout" in first.lower():
        what = f"a collective made no progress for {timeout_s:.0f} s (--collective-timeout): a rank hung or died"
        hung = end_hung_peers(rank)
        if hung:
            what += f"; ended the hung rank(s) {', '.join(map(str, hung))} on {here}"
    else:
        what = "a rank died or hung"
    if not gone and remote:
        what += f" (ranks on {', '.join(remote)} not checked from here)"
    return (f"rank {rank} stopping at step {step}: {what} [{type(error).__name__}: {first}]; the job ends here; "
            f"re-run the same command to resume from the newest intact checkpoint")



class Watchdog:
    """Ends this rank with one line and `code` when `beat()` was not called for `timeout_s` seconds (a collective
    that waits on a hung or dead peer, or this rank stuck on its own). `step()` gives the step for the line."""

    def __init__(self, rank: int, timeout_s: float, step, code: int) -> None:
        self.rank, self.timeout_s, self.step, self.code = rank, timeout_s, step, code
        self.last, self.stop = time.monotonic(), threading.Event()
        self.thread: threading.Thread | None = None

    def beat(self) -> None:
        """Progress was made (a step, a save, a preview); starts the watch at the first call."""
        self.last = time.monotonic()
        if self.thread is None:
            self.thread = threading.Thread(target=self._watch, daemon=True, name="watchdog")
            self.thread.start()

    def _watch(self) -> None:
        while not self.stop.wait(min(5.0, self.timeout_s / 4)):
            idle = time.monotonic() - self.last
            if idle > self.timeout_s:
                err = TimeoutError(f"no step, save or preview finished for {idle:.0f} s")
                print(f"trainer: {lost_rank_message(self.rank, self.step(), err, self.timeout_s)}", file=sys.stderr,
                      flush=True)
                os._exit(self.code)
