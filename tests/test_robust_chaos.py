"""Issue 15, the chaos test in small: one rank of a 2-rank run is killed (kill -9) while a checkpoint is being
written; the survivor ends by itself (exit 69), the job resumes and ends with the weights, EMA and sampler state of
an uninterrupted run. benchmarks/chaos.py runs the full version (10 kills) and writes benchmarks/results/chaos.md."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchmarks.chaos import ENV, ROOT, chaos

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_kill_during_save_then_resume_equals_uninterrupted_run(tmp_path) -> None:
    data = tmp_path / "digits"
    subprocess.run([sys.executable, "-m", "data.prepare", "digits", "--out-dir", str(data), "--size", "16",
                    "--no-progress"], cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    res = chaos(str(data / "train-manifest.json"), str(tmp_path), kills=1, seed=1, total=9, save_every=3,
                in_save=(0,))
    row = res["rows"][0]
    assert row["during_save"] and sorted(row["exit_codes"]) == [-9, 69], row
    assert row["next_resume"] <= row["killed_after_step"] and row["survivor_ended_s"] < 60
    assert res["max_abs_diff"] <= 1e-6, res
    assert not any(d.endswith(".tmp") for d in os.listdir(tmp_path / "run" / "checkpoints"))
