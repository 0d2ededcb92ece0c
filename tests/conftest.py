"""Shared fixtures: tiny checkpoints built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.model.tiny import make_tiny_model


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
