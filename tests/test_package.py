"""The packages import, the markers are registered, the CLIs' way out."""
import importlib
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
