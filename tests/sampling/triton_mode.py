"""Where the sampling kernels' tests run: on CPU under Triton's interpreter
(``TRITON_INTERPRET=1``, set in tests/conftest.py), compiled on a CUDA device."""

from __future__ import annotations

import importlib.util

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="the kernel needs triton"
)
