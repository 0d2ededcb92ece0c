"""Batched multi-LoRA kernels (Triton) beside their torch references.

``add_lora`` = ``lora_shrink`` (x · Aᵀ -> h, float32 partial sums over split K, all slices of
a layer in one launch)
then ``lora_expand`` (y[:, slice] += h · Bᵀ in place, one launch), over a batch whose tokens
use different adapters, as ``LoRAMetadata`` tiles them. No host sync: every launch parameter
comes from host-side shapes and the metadata's ``block_m``.

This package imports no Triton itself: Triton decides when a kernel module is imported
whether to interpret it (``TRITON_INTERPRET=1``, for CPU tests), and a CPU-only install need
not have Triton at all. The kernel modules are ``shrink`` and ``expand``.
"""

from __future__ import annotations

import torch

from engine.lora.kernels.reference import (
    add_lora_reference,
    lora_expand_reference,
    lora_shrink_reference,
)
from engine.model.metadata import LoRAMetadata


def add_lora(
    y: torch.Tensor,  # [T, N], updated in place
    x: torch.Tensor,  # [T, K]
    lora_a: torch.Tensor,  # [L, S, R, K]
    lora_b: torch.Tensor,  # [L, N, R]
    lora_ranks: torch.Tensor,  # [L, S] int32
    slice_offsets: torch.Tensor,  # [S + 1] int32
    out_slices: list[int],
    lora: LoRAMetadata,
) -> None:
    """y[t, slice s] += x[t] · A[slot(t), s]ᵀ · B[slot(t), s]ᵀ for every token with a slot."""
    from engine.lora.kernels.expand import lora_expand
    from engine.lora.kernels.shrink import lora_shrink

    h = lora_shrink(x, lora_a, lora_ranks, lora)  # [split_k, T, S * R] float32
    lora_expand(y, h, lora_b, lora_ranks, slice_offsets, out_slices, lora)


__all__ = ["add_lora", "add_lora_reference", "lora_expand_reference", "lora_shrink_reference"]
