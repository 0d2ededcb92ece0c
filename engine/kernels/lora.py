"""Pure-torch references for the batched LoRA kernels (``lora_shrink_triton``,
``lora_expand_triton``), and the torch path of ``LoRALinear``.

``lora_shrink_reference`` and ``lora_expand_reference`` compute exactly what the Triton
kernels compute, rounding included, on the same stacked buffers:

- shrink: ``h[t, s * R + r] = sum_k x[t, k] * A[slot(t), s, r, k]`` for ``r < rank(slot, s)``,
  float32 (16-bit products are exact in float32, so only the summation order differs);
- expand: ``y[t, off_s + n] += sum_r h[t, s * R + r] * B[slot(t), off_s + n, r]``, with ``h``
  rounded to B's dtype when B is 16-bit (the kernel feeds the tensor cores), accumulated in
  float32 and rounded once into ``y``.

Tokens with slot ``-1`` are untouched. ``add_lora_reference`` is the simpler per-adapter loop
the engine uses on CPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine.lora.metadata import LoRAMetadata


def rank_mask(lora_ranks: torch.Tensor, max_rank: int) -> torch.Tensor:
    """[L, S, R] bool: which rank rows of each (slot, slice) hold an adapter's weights."""
    r = torch.arange(max_rank, device=lora_ranks.device)
    return r < lora_ranks.unsqueeze(-1)


def lora_shrink_reference(
    x: torch.Tensor,  # [T, K]
    lora_a: torch.Tensor,  # [L, S, R, K]
    lora_ranks: torch.Tensor,  # [L, S] int32
    lora: LoRAMetadata,
) -> torch.Tensor:
    """h: [T, S * R] float32; rows of tokens without an adapter are 0."""
    _num_loras, num_slices, max_rank, k = lora_a.shape
    mask = rank_mask(lora_ranks, max_rank)  # [L, S, R]
    h = torch.zeros(x.shape[0], num_slices * max_rank, dtype=torch.float32, device=x.device)
    for slot, idx in lora.groups:
        a = lora_a[slot].float() * mask[slot].unsqueeze(-1)  # [S, R, K]
        h[idx] = x.index_select(0, idx).float() @ a.reshape(-1, k).t()
    return h


def lora_expand_reference(
    y: torch.Tensor,  # [T, N], updated in place
    h: torch.Tensor,  # [T, S * R] float32
    lora_b: torch.Tensor,  # [L, N, R]
    lora_ranks: torch.Tensor,  # [L, S] int32
    slice_offsets: list[int],  # [S + 1]
    lora: LoRAMetadata,
) -> None:
    max_rank = lora_b.shape[2]
    mask = rank_mask(lora_ranks, max_rank)  # [L, S, R]
    wide = lora_b.dtype == torch.float32
    for slot, idx in lora.groups:
        hs = h.index_select(0, idx).float()  # [n, S * R]
        if not wide:
            hs = hs.to(lora_b.dtype).float()
        for s in range(len(slice_offsets) - 1):
            lo, hi = slice_offsets[s], slice_offsets[s + 1]
            hr = hs[:, s * max_rank : (s + 1) * max_rank] * mask[slot, s]  # [n, R]
            delta = hr @ lora_b[slot, lo:hi].float().t()  # [n, hi - lo]
            rows = y[idx, lo:hi].float() + delta
            y[idx, lo:hi] = rows.to(y.dtype)


def add_lora_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    out_slices: list[int],
    lora: LoRAMetadata,
    ranks: list[list[int]] | None = None,
) -> None:
    """Plain torch: for each adapter in the batch, y[tokens, slice] += x[tokens] @ A.T @ B.T.

    ``ranks[slot][slice]``: the adapter's rank there (0: the slice is not targeted), known
    on the host; each product then runs at that rank and untargeted slices are skipped, as
    PEFT runs only the modules an adapter has. None: every slice at the padded rank."""
    for slot, idx in lora.groups:
        # The whole step on one adapter (a single-adapter batch) needs no gather or scatter.
        whole = idx.shape[0] == x.shape[0]
        xs = x if whole else x.index_select(0, idx)  # [n, in]
        offset = 0
        for s, (a, b, n) in enumerate(zip(lora_a, lora_b, out_slices, strict=True)):
            r = a.shape[1] if ranks is None else ranks[slot][s]
            if r:
                # [n, in] @ [in, r] @ [r, out_slice]
                delta = (xs.to(a.dtype) @ a[slot, :r].t()) @ b[slot, :, :r].t()
                if whole:
                    y[:, offset : offset + n] += delta.to(y.dtype)
                else:
                    y[:, offset : offset + n].index_add_(0, idx, delta.to(y.dtype))
            offset += n
