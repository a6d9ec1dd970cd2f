"""Starting trainer ranks from tests: a clean environment, free ports, srun-style rank variables, waiting with a
time limit (the whole process group is killed when it runs out)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict({k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "OMPI_", "RANK", "WORLD_SIZE",
                                                                     "LOCAL_RANK", "MASTER_"))},
           OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONWARNINGS="ignore::FutureWarning")


def prepare_digits(out_dir: str) -> str:
    """The 16 px digits shards in `out_dir` (data.prepare digits); returns the train manifest's path."""
    subprocess.run([sys.executable, "-m", "data.prepare", "digits", "--out-dir", out_dir, "--size", "16",
                    "--no-progress"], cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    return os.path.join(out_dir, "train-manifest.json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(args: list[str], log: str, world: int) -> list[subprocess.Popen]:
    """`python -m trainer.main ARGS` as `world` ranks (srun's variables; one rank: no launcher), each in its own
    session, output to LOG.<rank>."""
    port, procs = str(free_port()), []
    for r in range(world):
        env = dict(ENV, SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_NTASKS=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port) if world > 1 else ENV
        procs.append(subprocess.Popen([sys.executable, "-m", "trainer.main", *args], cwd=ROOT, env=env,
                                      stdout=open(f"{log}.{r}", "w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return procs


def kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def wait(procs: list[subprocess.Popen], timeout: float = 600) -> list[int]:
    """Exit codes of every rank; all killed after `timeout` seconds."""
    try:
        return [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        kill(procs)
        raise


def output(log: str, rank: int = 0) -> str:
    with open(f"{log}.{rank}") as f:
        return f.read()
