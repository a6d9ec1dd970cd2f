"""Shared pytest set-up: marker handling and common fixtures."""
from __future__ import annotations

import os

import pytest
import torch

# One JIT cache for DeepSpeed's CPU ops across all tests (the first build takes about a minute).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
