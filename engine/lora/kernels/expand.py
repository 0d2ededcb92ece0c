"""Expand: ``y[:, slice] += h · Bᵀ`` per token's adapter, in place, all slices in one launch.

Reference: ``engine.lora.kernels.reference.lora_expand_reference``.

Grid ``(tiles, column blocks of the widest slice, slices)``. Each (token, output column) is
written by exactly one program, so no atomics. The rank loop stops at the (slot, slice)
rank read from ``lora_ranks``: a rank-8 adapter among rank-64 ones reads and multiplies 8
columns of B, and a slice the adapter skips (rank 0) costs one load.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.model.metadata import LoRAMetadata


# Triton compiles a variant per value class (== 1, divisible by 16) of each int argument;
# these only index, so one variant serves them all.
@triton.jit(do_not_specialize=["R", "stride_hs", "stride_ht", "num_slices", "split_k"])
def _lora_expand_kernel(
    h_ptr,  # [split_k, T, S * R] float32 partial sums
    b_ptr,  # [L, N, R]
    y_ptr,  # [T, N], updated in place
    ranks_ptr,  # [L, S] int32
    offsets_ptr,  # [S + 1] int32: first output column of each slice
    sorted_ids_ptr,  # [T] int64
    tiles_ptr,  # [3, G] int64: slot, start, length
    R,
    stride_hs,
    stride_ht,
    stride_bl,
    stride_bn,
    stride_yt,
    stride_yn,
    stride_tiles,
    num_slices,
    split_k,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ROUND_H: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid_tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    s = tl.program_id(2)
    length = tl.load(tiles_ptr + 2 * stride_tiles + pid_tile)
    if length == 0:  # a padding tile of static (graph) metadata
        return
    slot = tl.load(tiles_ptr + pid_tile)
    rank = tl.load(ranks_ptr + slot * num_slices + s)
    n_lo = tl.load(offsets_ptr + s) + pid_n * BLOCK_N
    n_hi = tl.load(offsets_ptr + s + 1)
    if rank == 0 or n_lo >= n_hi:
        return
    start = tl.load(tiles_ptr + stride_tiles + pid_tile)

    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < length
    toks = tl.load(sorted_ids_ptr + start + offs_m, mask=row_ok, other=0)  # [BM] int64
    cols = n_lo + tl.arange(0, BLOCK_N)  # [BN]
    col_ok = cols < n_hi
    offs_r = tl.arange(0, BLOCK_R)

    y_ptrs = y_ptr + toks[:, None] * stride_yt + cols[None, :] * stride_yn
    y_mask = row_ok[:, None] & col_ok[None, :]
    # Issued first, so its latency hides behind the B loads and the dot.
    y = tl.load(y_ptrs, mask=y_mask, other=0.0)

    h_ptrs = h_ptr + toks[:, None] * stride_ht + s * R  # [BM, 1]
    b_ptrs = b_ptr + slot * stride_bl + cols[None, :] * stride_bn  # [1, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        r = r0 + offs_r  # [BR]
        r_ok = r < rank
        b = tl.load(
            b_ptrs + r[:, None], mask=r_ok[:, None] & col_ok[None, :], other=0.0
        )  # [BR, BN]
        # Masked, not just zero-padded: h past the rank was never written. The split-K
        # planes are added in order, so the sum does not depend on timing.
        h_mask = row_ok[:, None] & r_ok[None, :]
        h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for sk in range(split_k):
            h += tl.load(h_ptrs + sk * stride_hs + r[None, :], mask=h_mask, other=0.0)
        if ROUND_H:  # a 16-bit B: h enters the product in B's dtype, as on tensor cores
            h = h.to(b.dtype)
        if DOT_FP32:
            acc += tl.dot(h.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(h, b)

    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=y_mask)


def _interpreted_bf16(t: torch.Tensor, dtype: torch.dtype) -> bool:
    # Triton's interpreter multiplies bfloat16 wrongly (numpy has no bfloat16): upcast there.
    # Exact either way, as bf16 products fit in float32.
    return not t.is_cuda and dtype == torch.bfloat16


def expand_config(max_rank: int, block_m: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_R). Few distinct blocks: each is a compile. Wide column blocks give
    long contiguous runs of each gathered y row (best on an H200 for 32-token tiles)."""
    block_r = 16 if max_rank <= 16 else 64
    block_n = 128 if block_m <= 16 else 256
    return block_n, block_r


def lora_expand(
    y: torch.Tensor,  # [T, N], updated in place
    h: torch.Tensor,  # [split_k, T, S * R] float32 partial sums, from lora_shrink
    lora_b: torch.Tensor,  # [L, N, R]
    lora_ranks: torch.Tensor,  # [L, S] int32
    slice_offsets: torch.Tensor,  # [S + 1] int32 on y's device
    out_slices: list[int],  # host copy of the slice widths (sizes the grid)
    lora: LoRAMetadata,
    *,
    block_n: int | None = None,
    num_warps: int = 4,
) -> None:
    """``block_n`` overrides the heuristic (tests, tuning)."""
    assert lora.tiles is not None
    assert lora.sorted_token_ids is not None
    _num_loras, n, max_rank = lora_b.shape
    num_slices = len(out_slices)
    assert y.shape[1] == n == sum(out_slices), (y.shape, lora_b.shape, out_slices)
    assert h.shape[2] == num_slices * max_rank
    assert h.stride(2) == 1
    assert lora_b.stride(2) == 1
    num_tiles = lora.tiles.shape[1]
    if num_tiles == 0:
        return
    auto_block_n, block_r = expand_config(max_rank, lora.block_m)
    block_n = auto_block_n if block_n is None else block_n
    grid = (num_tiles, triton.cdiv(max(out_slices), block_n), num_slices)
    _lora_expand_kernel[grid](
        h,
        lora_b,
        y,
        lora_ranks,
        slice_offsets,
        lora.sorted_token_ids,
        lora.tiles,
        max_rank,
        h.stride(0),
        h.stride(1),
        lora_b.stride(0),
        lora_b.stride(1),
        y.stride(0),
        y.stride(1),
        lora.tiles.stride(0),
        num_slices,
        h.shape[0],
        BLOCK_M=lora.block_m,
        BLOCK_N=block_n,
        BLOCK_R=block_r,
        ROUND_H=lora_b.dtype != torch.float32,
        DOT_FP32=lora_b.dtype == torch.float32 or _interpreted_bf16(y, lora_b.dtype),
        num_warps=num_warps,
    )
