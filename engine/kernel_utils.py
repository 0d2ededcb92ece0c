"""Launch-size helpers the Triton kernels share (attention, LoRA, fused model ops)."""

from __future__ import annotations

import functools

import torch


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host-side sizes. Not ``triton.cdiv``: that is a JIT function, and a
    host call of it goes through Triton's dispatch (about 5 us each)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): Triton block sizes must be powers of two."""
    return 1 << max(0, n - 1).bit_length()


@functools.cache
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the query is not free)."""
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)
