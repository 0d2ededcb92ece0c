"""Expand: ``y[:, slice] += h · Bᵀ`` per token's adapter, in place, all slices in one launch;
or, with ``accumulate=False``, ``y[:, slice] = h · Bᵀ`` (0 for tokens without an adapter),
for a GEMM that then accumulates the base product onto it.

Reference: ``engine.kernels.lora.lora_expand_reference``.

Grid ``(column blocks of all slices, tiles)``. A column block lies inside one slice (each
slice is cut into its own blocks), so each (token, output column) is written by exactly one
program and no atomics are needed. Tiles are the slowest axis: the unused tiles of static
(graph) metadata sit at the end and their programs start last and exit at once.

h is either the shrink kernel's split-K planes or, for small steps, the extra columns of the
base GEMM over A stored under W (``h_per_slot``: every slot's ``x · Aᵀ``, of which each token
reads its own slot's); the rest of the kernel is the same.

Decode is bound by B and by the read-modify-write of y, so a program moves a wide block
(``BLOCK_N`` up to 1024 columns) in one go, every load issued before the first is used: the
y rows, B's rows and the split-K planes of h are all in flight together. The rank blocks are
unrolled (``R`` is a compile-time constant) and masked at the (slot, slice) rank read from
``lora_ranks``: a rank-8 adapter among rank-64 ones reads 8 columns of B, and a slice the
adapter skips (rank 0) costs one load.

``lora_expand_silu_and_mul`` is the expand of a [gate, up] layer fused with the SiLU·mul
that follows it: it reads the base output, adds both slices' deltas in registers and writes
only the activation, covering the tokens without an adapter through their tiles of slot -1.
The two kernels share ``_operands`` and ``_dot``, so the fused one rounds exactly as the
expand followed by the model's SiLU kernel does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from engine.config import LaunchConfig
from engine.kernels.elementwise_triton import INTERPRET, NO_FMA, silu_mul
from engine.kernels.utils import cdiv, next_pow2

if TYPE_CHECKING:
    from engine.lora.metadata import LoRAMetadata

DEFAULT_LAUNCH = LaunchConfig()


@triton.jit
def _rank_block(rank, rb: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr):
    """Rank block ``rb``: its columns r [BR], ``r < rank``, and the columns to load."""
    # Loads run to the rank rounded up to 8 (16 bytes of a bf16 row, inside the sector that
    # is fetched anyway), so they stay vectors; what lies past the rank (stale weights,
    # unwritten h) is zeroed by the callers, never used.
    rank_ld = tl.multiple_of(tl.cdiv(rank, 8) * 8, 8) if R % 8 == 0 else rank
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    return r, r < rank, r < rank_ld


@triton.jit
def _b_block(b_ptrs, rank, rb: tl.constexpr, col_ok, R: tl.constexpr, BLOCK_R: tl.constexpr):
    """B [BN, BR] of rank block ``rb`` at ``b_ptrs`` ([BN, 1]: the slot's B rows of these
    columns), zero past the rank."""
    r, r_ok, r_ld = _rank_block(rank, rb, R, BLOCK_R)
    b = tl.load(b_ptrs + r[None, :], mask=col_ok[:, None] & r_ld[None, :], other=0.0)
    return tl.where(r_ok[None, :], b, tl.zeros_like(b))


@triton.jit
def _operands(
    h_ptrs,  # [BM, 1]: each token's h row at this slice
    b_ptrs,  # [BN, 1]: the slot's B rows of these columns
    rank,
    rb: tl.constexpr,
    row_ok,
    col_ok,
    stride_hs,
    R: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ROUND_H: tl.constexpr,
):
    """Rank block ``rb`` of one slice for a tile: (h [BM, BR], B [BN, BR]), zero past the
    rank, h summed over the split-K planes and rounded as it enters the product."""
    r, r_ok, r_ld = _rank_block(rank, rb, R, BLOCK_R)
    b = _b_block(b_ptrs, rank, rb, col_ok, R, BLOCK_R)
    # The split-K planes are added in order, so the sum does not depend on timing.
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for sk in tl.static_range(SPLIT_K):
        h += tl.load(
            h_ptrs + sk * stride_hs + r[None, :],
            mask=row_ok[:, None] & r_ld[None, :],
            other=0.0,
        )
    h = tl.where(r_ok[None, :], h, 0.0)
    if ROUND_H:  # a 16-bit B: h enters the product in B's dtype, as on tensor cores
        h = h.to(b.dtype)
    return h, b


@triton.jit
def _dot(acc, h, b, DOT_FP32: tl.constexpr):
    """acc + h · bᵀ in float32."""
    if DOT_FP32:
        return acc + tl.dot(h.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
    return acc + tl.dot(h, tl.trans(b))


# Triton compiles a variant per value class (== 1, divisible by 16) of each int argument;
# these only index, so one variant serves them all.
@triton.jit(do_not_specialize=["stride_hs", "stride_tiles"])
def _lora_expand_kernel(
    h_ptr,  # [SPLIT_K, T, S * R] float32 partial sums, or [T, L * S * R] (per slot)
    b_ptr,  # [L, N, R] contiguous
    y_ptr,  # [T, N], updated in place
    ranks_ptr,  # [L, S] int32
    offsets_ptr,  # [S + 1] int32: first output column of each slice
    sorted_ids_ptr,  # [T] int64
    tiles_ptr,  # [3, G] int64: slot, start, length
    N,
    stride_hs,
    stride_ht,
    stride_hl,
    stride_yt,
    stride_yn,
    stride_tiles,
    NUM_SLICES: tl.constexpr,
    R: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ALIGNED: tl.constexpr,  # slice offsets and y's row stride are multiples of 8
    ROUND_H: tl.constexpr,
    DOT_FP32: tl.constexpr,
    STORE: tl.constexpr,  # write the delta (zeros without an adapter) instead of adding it
):
    pid_n = tl.program_id(0)
    pid_tile = tl.program_id(1)
    # The tile and the slice layout do not depend on each other: their loads go together.
    slot = tl.load(tiles_ptr + pid_tile)
    start = tl.load(tiles_ptr + stride_tiles + pid_tile)
    length = tl.load(tiles_ptr + 2 * stride_tiles + pid_tile)
    s = 0
    n_lo = 0
    n_hi = 0
    first = 0  # first column block of slice i
    for i in tl.static_range(NUM_SLICES):
        lo_i = tl.load(offsets_ptr + i)
        hi_i = tl.load(offsets_ptr + i + 1)
        num_blocks = tl.cdiv(hi_i - lo_i, BLOCK_N)
        here = (pid_n >= first) & (pid_n < first + num_blocks)
        s = tl.where(here, i, s)
        n_lo = tl.where(here, lo_i + (pid_n - first) * BLOCK_N, n_lo)
        n_hi = tl.where(here, hi_i, n_hi)
        first += num_blocks
    if ALIGNED:  # lets y move in 16-byte vectors
        n_lo = tl.multiple_of(n_lo, 8)
        n_hi = tl.multiple_of(n_hi, 8)
    if length == 0:  # a padding tile of static metadata
        return
    if not STORE:  # noqa: SIM102 (STORE is a compile-time constant, slot a runtime value)
        if slot < 0:  # tokens without an adapter: y stays as it is
            return
    # Token ids are issued before the rank is tested, so the two loads overlap.
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < length
    toks = tl.load(sorted_ids_ptr + start + offs_m, mask=row_ok, other=0)  # [BM] int64
    rank = tl.load(ranks_ptr + slot * NUM_SLICES + s, mask=slot >= 0, other=0)
    cols = n_lo + tl.arange(0, BLOCK_N)  # [BN]
    col_ok = cols < n_hi
    y_ptrs = y_ptr + toks[:, None] * stride_yt + cols[None, :] * stride_yn
    y_mask = row_ok[:, None] & col_ok[None, :]
    if rank == 0:  # no adapter, or one that skips this slice
        if STORE:
            zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            tl.store(y_ptrs, zeros.to(y_ptr.dtype.element_ty), mask=y_mask)
        return

    if not STORE:
        y = tl.load(y_ptrs, mask=y_mask, other=0.0)
    h_ptrs = h_ptr + toks[:, None] * stride_ht + slot * stride_hl + s * R
    b_ptrs = b_ptr + slot * N * R + cols[:, None] * R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for rb in tl.static_range((R + BLOCK_R - 1) // BLOCK_R):
        h, b = _operands(
            h_ptrs,
            b_ptrs,
            rank,
            rb,
            row_ok,
            col_ok,
            stride_hs,
            R,
            SPLIT_K,
            BLOCK_M,
            BLOCK_R,
            ROUND_H,
        )
        acc = _dot(acc, h, b, DOT_FP32)
    if STORE:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=y_mask)


def _interpreted_bf16(t: torch.Tensor, dtype: torch.dtype) -> bool:
    # Triton's interpreter multiplies bfloat16 wrongly (numpy has no bfloat16): upcast there.
    # Exact either way, as bf16 products fit in float32.
    return not t.is_cuda and dtype == torch.bfloat16


def expand_config(
    max_rank: int, block_m: int, num_cols: int, launch: LaunchConfig = DEFAULT_LAUNCH
) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_R, num_warps) for slices ``num_cols`` wide at most. Few distinct
    blocks: each is a compile. A wide block keeps many loads in flight per program: decode
    tiles of 16 take ``launch``'s settings, prefill tiles of 32 256 columns and 4 warps."""
    block_r = 16 if max_rank <= 16 else 64
    if block_m <= 16:
        block_n, num_warps = launch.lora_expand_decode_block_n, launch.lora_expand_decode_num_warps
    else:
        block_n, num_warps = 256, 4
    # B's block is BLOCK_N x BLOCK_R: at most 8K elements, so ranks above 16 take narrower
    # blocks (not tuned yet).
    block_n = min(block_n, 8192 // block_r, max(16, next_pow2(num_cols)))
    return block_n, block_r, num_warps


def _h_layout(
    h: torch.Tensor, num_tokens: int, num_loras: int, sr: int, per_slot: bool
) -> tuple[int, int, int, int]:
    """(split_k, plane stride, token stride, slot stride) of the expand's h: the shrink's
    ``[split_k, T, S * R]`` planes, or ``[T, L * S * R]`` per slot."""
    if per_slot:
        assert h.shape == (num_tokens, num_loras * sr), (h.shape, num_tokens, num_loras, sr)
        assert h.stride(1) == 1
        return 1, 0, h.stride(0), sr
    assert h.shape[1:] == (num_tokens, sr), (h.shape, num_tokens, sr)
    assert h.stride(2) == 1
    assert h.stride(1) == sr
    return h.shape[0], h.stride(0), sr, 0


def lora_expand(
    y: torch.Tensor,  # [T, N], updated in place
    h: torch.Tensor,  # [split_k, T, S * R] float32 partial sums (lora_shrink), or per slot
    lora_b: torch.Tensor,  # [L, N, R]
    lora_ranks: torch.Tensor,  # [L, S] int32
    slice_offsets: torch.Tensor,  # [S + 1] int32 on y's device
    out_slices: list[int],  # host copy of the slice widths (sizes the grid)
    lora: LoRAMetadata,
    *,
    accumulate: bool = True,
    h_per_slot: bool = False,
    block_n: int | None = None,
    num_warps: int | None = None,
    launch: LaunchConfig = DEFAULT_LAUNCH,
) -> None:
    """``accumulate=False`` writes the delta itself, in y's dtype: every row of y the
    metadata covers, 0 where a token has no adapter or its adapter skips the slice, so y
    may start uninitialised. ``h_per_slot``: h is ``[T, L * S * R]``, every slot's
    ``x · Aᵀ`` (the columns a GEMM over A stacked under W adds), and each token reads its
    own slot's. ``block_n`` and ``num_warps`` override the heuristic and ``launch`` (tests,
    tuning)."""
    assert lora.tiles is not None
    assert lora.sorted_token_ids is not None
    num_loras, n, max_rank = lora_b.shape
    num_slices = len(out_slices)
    assert y.shape[1] == n == sum(out_slices), (y.shape, lora_b.shape, out_slices)
    split_k, stride_hs, stride_ht, stride_hl = _h_layout(
        h, y.shape[0], num_loras, num_slices * max_rank, h_per_slot
    )
    assert lora_b.is_contiguous()
    num_tiles = lora.tiles.shape[1]
    if num_tiles == 0:
        return
    auto_block_n, block_r, auto_warps = expand_config(
        max_rank, lora.block_m, max(out_slices), launch
    )
    block_n = auto_block_n if block_n is None else block_n
    num_warps = auto_warps if num_warps is None else num_warps
    offsets = [0]
    for width in out_slices:
        offsets.append(offsets[-1] + width)
    aligned = all(o % 8 == 0 for o in offsets) and y.stride(0) % 8 == 0 and y.stride(1) == 1
    grid = (sum(cdiv(width, block_n) for width in out_slices), num_tiles)
    _lora_expand_kernel[grid](
        h,
        lora_b,
        y,
        lora_ranks,
        slice_offsets,
        lora.sorted_token_ids,
        lora.tiles,
        n,
        stride_hs,
        stride_ht,
        stride_hl,
        y.stride(0),
        y.stride(1),
        lora.tiles.stride(0),
        NUM_SLICES=num_slices,
        R=max_rank,
        SPLIT_K=split_k,
        BLOCK_M=lora.block_m,
        BLOCK_N=block_n,
        BLOCK_R=block_r,
        ALIGNED=aligned,
        ROUND_H=lora_b.dtype != torch.float32,
        DOT_FP32=lora_b.dtype == torch.float32 or _interpreted_bf16(y, lora_b.dtype),
        STORE=not accumulate,
        num_warps=num_warps,
    )


# ----------------------------------------------------------------------------- expand + SiLU
# The activation is the model's own (``elementwise_triton.silu_mul``), so it rounds as the
# SiLU-and-mul kernel does.


@triton.jit(do_not_specialize=["stride_hs", "stride_tiles"])
def _lora_expand_silu_kernel(
    h_ptr,  # [SPLIT_K, T, 2 * R] float32 partial sums (gate slice, then up), or per slot
    b_ptr,  # [L, 2 * inter, R] contiguous
    y_ptr,  # [T, 2 * inter] the base gate_up output, read only
    out_ptr,  # [T, inter]
    ranks_ptr,  # [L, 2] int32
    sorted_ids_ptr,  # [T] int64
    tiles_ptr,  # [3, G] int64: slot (-1: no adapter), start, length
    inter,
    stride_hs,
    stride_ht,
    stride_hl,
    stride_yt,
    stride_ot,
    stride_tiles,
    R: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ALIGNED: tl.constexpr,  # inter and the row strides are multiples of 8
    ROUND_H: tl.constexpr,
    DOT_FP32: tl.constexpr,
    EXACT_SILU: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # Program (n, tile): columns [n * BLOCK_N, (n + 1) * BLOCK_N) of gate and of up for the
    # tile's tokens. Every token is in one tile, so every row of out is written.
    pid_n = tl.program_id(0)
    pid_tile = tl.program_id(1)
    slot = tl.load(tiles_ptr + pid_tile)
    start = tl.load(tiles_ptr + stride_tiles + pid_tile)
    length = tl.load(tiles_ptr + 2 * stride_tiles + pid_tile)
    if length == 0:  # a padding tile of static (graph) metadata
        return
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < length
    toks = tl.load(sorted_ids_ptr + start + offs_m, mask=row_ok, other=0)  # [BM] int64
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    col_ok = cols < inter
    up_off = inter
    if ALIGNED:  # lets y move in 16-byte vectors
        up_off = tl.multiple_of(up_off, 8)
    mask = row_ok[:, None] & col_ok[None, :]
    g_ptrs = y_ptr + toks[:, None] * stride_yt + cols[None, :]
    gate = tl.load(g_ptrs, mask=mask, other=0.0)
    up = tl.load(g_ptrs + up_off, mask=mask, other=0.0)
    # No branch on the slot: a tile without adapter has rank 0, so it loads no weights and
    # adds exact zeros. Both slices' operands are loaded before either product.
    has = slot >= 0
    slot_c = tl.maximum(slot, 0)
    rank_g = tl.where(has, tl.load(ranks_ptr + slot_c * 2), 0)
    rank_u = tl.where(has, tl.load(ranks_ptr + slot_c * 2 + 1), 0)
    h_row = h_ptr + toks[:, None] * stride_ht + slot_c * stride_hl
    b_row = b_ptr + slot_c * (2 * inter) * R + cols[:, None] * R
    d_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    d_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for rb in tl.static_range((R + BLOCK_R - 1) // BLOCK_R):
        hg, bg = _operands(
            h_row,
            b_row,
            rank_g,
            rb,
            row_ok,
            col_ok,
            stride_hs,
            R,
            SPLIT_K,
            BLOCK_M,
            BLOCK_R,
            ROUND_H,
        )
        hu, bu = _operands(
            h_row + R,
            b_row + up_off * R,
            rank_u,
            rb,
            row_ok,
            col_ok,
            stride_hs,
            R,
            SPLIT_K,
            BLOCK_M,
            BLOCK_R,
            ROUND_H,
        )
        d_gate = _dot(d_gate, hg, bg, DOT_FP32)
        d_up = _dot(d_up, hu, bu, DOT_FP32)
    # As lora_expand would leave gate_up: the delta added in float32, rounded once.
    gate = (gate.to(tl.float32) + d_gate).to(y_ptr.dtype.element_ty)
    up = (up.to(tl.float32) + d_up).to(y_ptr.dtype.element_ty)
    out = silu_mul(
        gate.to(tl.float32), up.to(tl.float32), out_ptr.dtype.element_ty, EXACT_SILU, INTERPRET
    )
    tl.store(out_ptr + toks[:, None] * stride_ot + cols[None, :], out, mask=mask)


def lora_expand_silu_and_mul(
    y: torch.Tensor,  # [T, 2 * I] base gate_up output (not written)
    h: torch.Tensor,  # [split_k, T, 2 * R] float32 partial sums (lora_shrink), or per slot
    lora_b: torch.Tensor,  # [L, 2 * I, R]
    lora_ranks: torch.Tensor,  # [L, 2] int32
    lora: LoRAMetadata,
    *,
    h_per_slot: bool = False,
    block_n: int | None = None,
    num_warps: int | None = None,
    exact_silu: bool = False,
    launch: LaunchConfig = DEFAULT_LAUNCH,
) -> torch.Tensor:
    """``silu(gate) * up`` of ``y`` after ``lora_expand`` would have added the adapters'
    deltas to it, in one launch: -> out [T, I]. Bit for bit what ``lora_expand`` followed
    by ``silu_and_mul_triton`` gives, without writing the [T, 2 * I] sum back and reading it
    again. Every token gets the activation, those without an adapter too (tiles of slot -1).
    ``h_per_slot`` as for ``lora_expand``; y may have any row stride; ``exact_silu`` as
    ``silu_and_mul_triton``'s ``exact``.
    """
    assert lora.tiles is not None
    assert lora.sorted_token_ids is not None
    num_tokens, width = y.shape
    num_loras, n, max_rank = lora_b.shape
    assert n == width, (y.shape, lora_b.shape)
    assert width % 2 == 0, y.shape
    split_k, stride_hs, stride_ht, stride_hl = _h_layout(
        h, num_tokens, num_loras, 2 * max_rank, h_per_slot
    )
    assert lora_b.is_contiguous()
    assert y.stride(1) == 1
    assert lora_ranks.shape[1] == 2, lora_ranks.shape  # gate and up
    inter = width // 2
    out = torch.empty(num_tokens, inter, dtype=y.dtype, device=y.device)
    num_tiles = lora.tiles.shape[1]
    if num_tiles == 0 or num_tokens == 0:
        return out
    # Two slices per program, 128 columns of each at most on prefill tiles (8 warps), the
    # decode settings of ``launch`` on decode tiles: a narrower block keeps both slices'
    # operands in registers. Ranks above 16 keep 64 columns (B's block is BLOCK_N x BLOCK_R
    # per slice).
    auto_block_n, block_r, _ = expand_config(max_rank, lora.block_m, inter, launch)
    if lora.block_m <= 16:
        cap, auto_warps = launch.lora_silu_decode_block_n, launch.lora_silu_decode_num_warps
    else:
        cap, auto_warps = 128, 8
    cap = cap if block_r <= 16 else min(cap, 64)
    block_n = max(16, min(auto_block_n, cap)) if block_n is None else block_n
    num_warps = auto_warps if num_warps is None else num_warps
    aligned = inter % 8 == 0 and y.stride(0) % 8 == 0 and out.stride(0) % 8 == 0
    grid = (cdiv(inter, block_n), num_tiles)
    _lora_expand_silu_kernel[grid](
        h,
        lora_b,
        y,
        out,
        lora_ranks,
        lora.sorted_token_ids,
        lora.tiles,
        inter,
        stride_hs,
        stride_ht,
        stride_hl,
        y.stride(0),
        out.stride(0),
        lora.tiles.stride(0),
        R=max_rank,
        SPLIT_K=split_k,
        BLOCK_M=lora.block_m,
        BLOCK_N=block_n,
        BLOCK_R=block_r,
        ALIGNED=aligned,
        ROUND_H=lora_b.dtype != torch.float32,
        DOT_FP32=lora_b.dtype == torch.float32 or _interpreted_bf16(y, lora_b.dtype),
        EXACT_SILU=exact_silu,
        INTERPRET=INTERPRET,
        num_warps=num_warps,
        **NO_FMA,
    )
    return out
