"""Issue 15: a rank that dies or hangs ends the job in bounded time with one line naming it (exit 69).

Two CPU ranks started with torchrun-style variables (no supervising launcher, the hardest case: nothing else ends
the survivor). benchmarks/chaos_ranks.py measures the same for the deepspeed launcher, mpiexec and srun."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from trainer.iddpm import ImprovedDDPM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict({k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "OMPI_", "RANK", "WORLD_SIZE",
                                                                     "LOCAL_RANK", "MASTER_"))},
           OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
ARGS = ["--model-size", "tiny16", "--diffusion-steps", "50", "--global-batch", "8", "--ema", "0.9", "--log-every", "1",
        "--total-steps", "1000", "--save-every", "2", "--collective-timeout", "8"]
pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("digits")
    subprocess.run([sys.executable, "-m", "data.prepare", "digits", "--out-dir", str(out), "--size", "16",
                    "--no-progress"], cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    return str(out / "train-manifest.json")


@pytest.fixture
def ranks():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], log: str, started: list, port: int, **extra_env: str) -> list[subprocess.Popen]:
    for r in range(2):
        env = dict(ENV, **extra_env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        started.append(subprocess.Popen([sys.executable, "-m", "trainer.main", *args], cwd=ROOT, env=env,
                                        stdout=open(f"{log}.{r}", "w"), stderr=subprocess.STDOUT))
    return started[-2:]


def wait_for(text: str, log: str, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while text not in open(log).read():
        assert time.time() < deadline and all(p.poll() is None for p in procs), open(log).read()[-3000:]
        time.sleep(0.05)


def test_dead_rank_and_hung_rank_end_the_job_with_one_line(digits, tmp_path, ranks) -> None:
    run, log = str(tmp_path / "run"), str(tmp_path / "log")
    args = [*ARGS, "--data", digits, "--run-dir", run]
    r0, r1 = start(args, log, ranks, free_port())
    wait_for("step 3/", f"{log}.0", [r0, r1])
    t0 = time.time()
    r1.kill()
    r1.wait()
    assert r0.wait(timeout=60) == 69
    dead = time.time() - t0
    line = [ln for ln in open(f"{log}.0").read().splitlines() if ln.startswith("trainer: rank 0 stopping")]
    assert len(line) == 1 and f"rank 1 (PID {r1.pid} on " in line[0] and "died" in line[0], open(f"{log}.0").read()
    assert "re-run the same command to resume" in line[0] and dead < 30, (dead, line)

    r0, r1 = start(args, log + "b", ranks, free_port())  # resumes; then rank 1 hangs (stopped)
    wait_for("step 7/", f"{log}b.0", [r0, r1])
    assert "resuming at step" in open(f"{log}b.0").read()
    t0 = time.time()
    r1.send_signal(signal.SIGSTOP)
    assert r0.wait(timeout=60) == 69
    hung = time.time() - t0
    text = open(f"{log}b.0").read()
    assert "no progress for 8 s (--collective-timeout): a rank hung or died" in text and 8 <= hung < 30, (hung, text)
    assert "ended the hung rank(s) 1 on" in text and r1.wait(timeout=10) == -signal.SIGKILL  # not left stopped


class FailingSave(ImprovedDDPM):
    """Improved DDPM on a rank whose torch.save fails (ENOSPC) for files of the checkpoint of $FAIL_SAVE_STEP when
    $RANK is $FAIL_SAVE_RANK: a disk that fills up under one rank's writes only (DeepSpeed's ZeRO-2 optimizer
    shards are written by every rank)."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        import errno
        import torch
        if os.environ.get("RANK") != os.environ.get("FAIL_SAVE_RANK"):
            return
        save, step = torch.save, f"step_{int(os.environ['FAIL_SAVE_STEP']):08d}"

        def failing_save(obj, f, *args, **kwargs):
            if step in str(f):
                raise OSError(errno.ENOSPC, "No space left on device", str(f))
            return save(obj, f, *args, **kwargs)
        torch.save = failing_save


def test_a_save_failing_on_one_rank_stops_both_and_keeps_latest(digits, tmp_path, ranks) -> None:
    """ZeRO-2 on two ranks, rank 1's writes of the step-4 checkpoint fail: both ranks exit 74, rank 0 says in one
    line that rank 1 could not write, step 2 stays latest and no .tmp folder is left; the re-run resumes at 2."""
    run, log = str(tmp_path / "run"), str(tmp_path / "log")
    args = [*ARGS[:ARGS.index("--total-steps")], "--total-steps", "6", "--save-every", "2", "--zero-stage", "2",
            "--objective", "tests/test_robust_ranks.py:FailingSave", "--data", digits, "--run-dir", run]
    procs = start(args, log, ranks, free_port(), FAIL_SAVE_RANK="1", FAIL_SAVE_STEP="4")
    assert [p.wait(timeout=300) for p in procs] == [74, 74], open(f"{log}.0").read()[-3000:]
    err = [ln for ln in open(f"{log}.0").read().splitlines() if ln.startswith("trainer:") and "not saved" in ln]
    assert len(err) == 1 and "checkpoint of step 4 not saved: rank 1 could not write" in err[0], err
    ck = os.path.join(run, "checkpoints")
    assert open(os.path.join(ck, "latest")).read().strip() == "step_00000002"
    assert sorted(os.listdir(ck)) == ["latest", "step_00000002"]
    procs = start(args, log + "b", ranks, free_port())
    assert [p.wait(timeout=300) for p in procs] == [0, 0], open(f"{log}b.0").read()[-3000:]
    assert "resuming at step 2" in open(f"{log}b.0").read()
