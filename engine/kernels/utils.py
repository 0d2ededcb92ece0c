"""Helpers the Triton kernels and their callers share: launch sizes (attention, LoRA, fused
model ops), and host memory that a copy to the device can leave behind without waiting."""

from __future__ import annotations

import functools

import torch


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host-side sizes. Not ``triton.cdiv``: that is a JIT function, and a
    host call of it goes through Triton's dispatch, which costs microseconds a call."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): Triton block sizes must be powers of two."""
    return 1 << max(0, n - 1).bit_length()


@functools.cache
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the query is not free)."""
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def pinned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (on the host) in pinned memory when ``device`` is CUDA, else ``t`` itself.

    A copy to the device from pageable memory first waits for everything queued on the
    stream (under async scheduling, the step still running); from pinned memory it queues
    behind it and the host goes on."""
    return t.pin_memory() if device.type == "cuda" else t
