"""Launch-size helpers the Triton kernels share (attention, LoRA, fused model ops)."""

from __future__ import annotations

import functools
import os

import torch


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): Triton block sizes must be powers of two."""
    return 1 << max(0, n - 1).bit_length()


@functools.cache
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the query is not free)."""
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


@functools.cache
def _has_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(t: torch.Tensor) -> bool:
    """Whether Triton kernels on ``t``'s device launch with programmatic dependent launch.

    On Hopper and newer GPUs a kernel launched with PDL may start while the kernel before
    it finishes: it loads what no earlier kernel of the step writes (tile metadata, adapter
    weights) and then waits (``gdc_wait``) before reading the previous kernel's output. In
    a CUDA graph this hides most of the gap between two kernels. ``LORASTREAM_PDL=0`` turns
    it off (read at each launch, so benchmarks can compare).
    """
    if not t.is_cuda or os.environ.get("LORASTREAM_PDL", "1") == "0":
        return False
    return _has_pdl(t.device.index if t.device.index is not None else torch.cuda.current_device())
