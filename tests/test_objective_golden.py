"""Every built-in objective trains to the numbers it trained to before the trainer learned several networks per
objective: a fixed-seed 20-step run of each on one rank reproduces the recorded loss of every step and the final
weights bitwise (recorded at commit f79712a by `python tests/objective_golden.py --record`)."""
from __future__ import annotations

import json

import pytest

from objective_golden import GOLDEN, RUNS, golden_runs

pytestmark = pytest.mark.slow


def test_builtin_objectives_reproduce_their_recorded_trajectories_bitwise(tmp_path) -> None:
    want = json.load(open(GOLDEN))
    got = golden_runs(str(tmp_path))
    assert set(want) == set(got) == set(RUNS)
    for name in RUNS:
        assert len(got[name]["loss"]) == 20, name
        assert got[name]["loss"] == want[name]["loss"], name  # float32 as TensorBoard holds it, exactly
        assert got[name]["weights_sha256"] == want[name]["weights_sha256"], name
