"""The packages import and the markers are registered."""
import importlib

import pytest


@pytest.mark.parametrize("name", ["diffusion", "data", "trainer", "evaluations"])
def test_packages_import(name: str) -> None:
    assert importlib.import_module(name).__name__ == name


def test_markers_registered(pytestconfig: pytest.Config) -> None:
    markers = " ".join(pytestconfig.getini("markers"))
    for m in ("slow", "distributed", "slurm", "gpu"):
        assert f"{m}:" in markers
