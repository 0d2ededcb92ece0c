"""Shared fixtures: tiny checkpoints built once per test session.

Without a CUDA device the Triton kernels run in Triton's interpreter, on CPU tensors. Triton
reads ``TRITON_INTERPRET`` when a kernel module is imported, so it is set here, before any
test module imports one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engine.testing.tiny import make_tiny_model  # imports no Triton kernel module

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """``@pytest.mark.slow`` tests run first, so that in a parallel run (scripts/test.sh) the
    longest files start early and the test processes finish together; ``@pytest.mark.gpu``
    tests are skipped without a CUDA device."""
    items.sort(key=lambda item: "slow" not in item.keywords)  # stable: files stay in order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama (untied, 2 shards + index) with 4 PEFT adapters under ``adapters/``."""
    return make_tiny_model(
        tmp_path_factory.mktemp("tiny-llama"), num_adapters=4, arch="llama", seed=0
    )


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2 (q/k/v bias, tied embeddings, one file) with 3 PEFT adapters."""
    return make_tiny_model(
        tmp_path_factory.mktemp("tiny-qwen2"), num_adapters=3, arch="qwen2", seed=1
    )
