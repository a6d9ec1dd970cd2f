"""The packages import, the markers are registered, the CLIs' way out."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("name", ["diffusion", "data", "trainer", "evaluations"])
def test_packages_import(name: str) -> None:
    assert importlib.import_module(name).__name__ == name


def test_markers_registered(pytestconfig: pytest.Config) -> None:
    markers = " ".join(pytestconfig.getini("markers"))
    for m in ("slow", "distributed", "slurm", "gpu"):
        assert f"{m}:" in markers


@pytest.mark.parametrize("body, code, err", [("return 3", 3, ""), ("die('bad flag', 'prog')", 2, "prog: error: bad flag\n")])
def test_exit_without_teardown_ends_with_mains_code_and_no_teardown(body: str, code: int, err: str) -> None:
    """The multi-rank CLIs end through data.cli.exit_without_teardown: main's exit code (die's 2 and its one line
    too), printed output flushed, and no interpreter teardown (an atexit handler never runs)."""
    script = ("import atexit\nfrom data.cli import die, exit_without_teardown\n"
              "atexit.register(lambda: print('teardown ran'))\n"
              f"def main():\n    print('work done', end='')\n    {body}\nexit_without_teardown(main)\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (code, "work done", err)


@pytest.mark.distributed
@pytest.mark.parametrize("rank1_code, want_rc, rank0_finishes", [(0, 0, True), (2, 2, False)])
def test_exit_without_teardown_under_mpiexec(tmp_path: Path, rank1_code: int, want_rc: int,
                                             rank0_finishes: bool) -> None:
    """Under MPICH's mpiexec a rank that ends early does not take the others down when it succeeded (it finalizes
    MPI: without that the launcher killed rank 0 before it wrote its results, and still exited 0), and does when it
    failed (the launcher stops the job with the failing rank's code)."""
    done = tmp_path / "rank0.done"
    script = ("import sys, time\nfrom mpi4py import MPI\nfrom data.cli import exit_without_teardown\n"
              "def main():\n    MPI.COMM_WORLD.Barrier()\n"
              f"    if MPI.COMM_WORLD.Get_rank() == 1:\n        return {rank1_code}\n"
              f"    time.sleep(2)\n    open({str(done)!r}, 'w').write('written after rank 1 ended')\n    return 0\n"
              "exit_without_teardown(main)\n")
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    r = subprocess.run([mpiexec, "-n", "2", sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == want_rc, r.stderr
    assert done.exists() == rank0_finishes, r.stderr
