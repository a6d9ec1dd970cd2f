"""Shared pytest set-up: thread counts, one JIT cache, environment isolation, the `gpu` marker."""
from __future__ import annotations

import os

# One OpenMP thread per process: multi-rank tests start two processes on a 2-core machine, and spinning
# OpenMP threads fighting over cores make tiny steps 50x slower. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# One JIT cache for any DeepSpeed op built just in time (the trainer builds none on CPU: trainer.dist.skip_shm_comm_op).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_environ():
    """Undo any change a test (or code it runs in-process, e.g. launcher discovery) makes to os.environ,
    so that RANK/MASTER_PORT and the like never leak into later tests or the jobs they submit."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
