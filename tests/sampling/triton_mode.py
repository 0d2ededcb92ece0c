"""Where the sampling kernels' tests run: on CPU under ``TRITON_INTERPRET=1`` (set on import,
before Triton is imported), with ``LORASTREAM_TEST_CUDA=1`` compiled on the GPU. Import this
module before ``engine.sampling`` kernels."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("LORASTREAM_TEST_CUDA") else "1")

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cpu" if INTERPRET or not CUDA else "cuda"
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not (INTERPRET or CUDA),
    reason="the kernel needs triton, and a CUDA device or the interpreter",
)


def fresh(jit: Any) -> None:
    """Forget a module's kernels decorated earlier in this process under the other setting."""
    if jit.cache_info().currsize:
        jit.cache_clear()
