"""The expand of a fused q/k/v layer, RoPE and the KV-cache write in one launch.

Unfused, a decode layer with adapters runs three kernels between its qkv GEMM and attention:
the expand adds each token's delta to q, k and v in place; the RoPE kernel rotates q and k in
place; the store kernel copies k and v into the paged cache. ``lora_expand_qkv_rope`` does
all three: it reads the GEMM's q/k/v once, adds the deltas, rotates q and k, writes q back
in place and writes k and v straight into the cache (attention reads them only from
there). Every token is covered, those without an adapter through their tiles of slot -1;
padding tokens (KV slot -1) write no cache.

The result is bit for bit what ``lora_expand``, ``apply_rotary_triton`` and
``store_kv_triton`` give one after the other: the sum is rounded to the model dtype as the
expand stores it, and RoPE goes through the model kernel's own arithmetic
(``elementwise_triton.rotate_pair``).

Grid ``(column blocks, tiles)``. A column block holds ``HEADS`` whole heads of one slice
(q, k or v) as two halves, first and second half of each head, so RoPE's pairs (d,
d + head_dim / 2) sit in one program; each half gets its own product with B.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from engine.config import LaunchConfig
from engine.kernels.elementwise_triton import INTERPRET, NO_FMA, rotate_pair, to_dtype
from engine.kernels.lora_expand_triton import (
    DEFAULT_LAUNCH,
    _b_block,
    _dot,
    _h_layout,
    _interpreted_bf16,
    _operands,
    expand_config,
)
from engine.kernels.utils import cdiv, next_pow2

if TYPE_CHECKING:
    from engine.lora.metadata import LoRAMetadata


@triton.jit(do_not_specialize=["stride_hs", "stride_tiles"])
def _lora_qkv_rope_kernel(
    h_ptr,  # [SPLIT_K, T, 3 * R] float32 partial sums, or [T, L * 3 * R] (per slot)
    b_ptr,  # [L, Q + 2 * KV, R] contiguous
    y_ptr,  # [T, Q + 2 * KV] the GEMM's q/k/v; q is rotated in place, k and v only read
    ranks_ptr,  # [L, 3] int32
    sorted_ids_ptr,  # [T] int64
    tiles_ptr,  # [3, G] int64: slot (-1: no adapter), start, length
    cos_ptr,  # [T, HEAD_DIM]
    sin_ptr,  # [T, HEAD_DIM]
    cache_ptr,  # [2, num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM] contiguous
    slot_mapping_ptr,  # [T] int64; negative: a padding token, no KV written
    stride_hs,
    stride_ht,
    stride_hl,
    stride_yt,
    stride_cos,
    stride_sin,
    stride_cache_kv,
    stride_tiles,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS: tl.constexpr,  # heads per column block (a power of two)
    BLOCK_HALF: tl.constexpr,  # HEAD_DIM // 2 rounded up to a power of two
    R: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ROUND_H: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    HALF = HEAD_DIM // 2
    Q_BLOCKS = (NUM_HEADS + HEADS - 1) // HEADS
    KV_BLOCKS = (NUM_KV_HEADS + HEADS - 1) // HEADS
    N = (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM
    pid_n = tl.program_id(0)
    pid_tile = tl.program_id(1)
    slot = tl.load(tiles_ptr + pid_tile)
    start = tl.load(tiles_ptr + stride_tiles + pid_tile)
    length = tl.load(tiles_ptr + 2 * stride_tiles + pid_tile)
    if length == 0:  # a padding tile of static (graph) metadata
        return
    # The slice (0 q, 1 k, 2 v) and the first head of this column block.
    is_k = (pid_n >= Q_BLOCKS) & (pid_n < Q_BLOCKS + KV_BLOCKS)
    is_v = pid_n >= Q_BLOCKS + KV_BLOCKS
    s = tl.where(is_v, 2, tl.where(is_k, 1, 0))
    head0 = (pid_n - tl.where(is_v, Q_BLOCKS + KV_BLOCKS, tl.where(is_k, Q_BLOCKS, 0))) * HEADS
    num_heads = tl.where(s == 0, NUM_HEADS, NUM_KV_HEADS)
    slice_lo = tl.where(s == 0, 0, (NUM_HEADS + (s - 1) * NUM_KV_HEADS) * HEAD_DIM)

    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < length
    toks = tl.load(sorted_ids_ptr + start + offs_m, mask=row_ok, other=0)  # [BM] int64
    j = tl.arange(0, HEADS * BLOCK_HALF)
    head = head0 + j // BLOCK_HALF
    d = j % BLOCK_HALF
    col_ok = (head < num_heads) & (d < HALF)
    in_slice = head * HEAD_DIM + d  # [W]: first-half columns inside the slice
    cols1 = slice_lo + in_slice  # ... and inside y and B
    cols2 = cols1 + HALF
    mask = row_ok[:, None] & col_ok[None, :]
    y_rows = y_ptr + toks[:, None] * stride_yt
    x1 = tl.load(y_rows + cols1[None, :], mask=mask, other=0.0)
    x2 = tl.load(y_rows + cols2[None, :], mask=mask, other=0.0)

    # No branch on the slot: a tile without adapter has rank 0, loads no weights and adds
    # exact zeros.
    has = slot >= 0
    slot_c = tl.maximum(slot, 0)
    rank = tl.where(has, tl.load(ranks_ptr + slot_c * 3 + s), 0)
    h_row = h_ptr + toks[:, None] * stride_ht + slot_c * stride_hl + s * R
    b_row = b_ptr + slot_c * N * R
    acc1 = tl.zeros((BLOCK_M, HEADS * BLOCK_HALF), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, HEADS * BLOCK_HALF), dtype=tl.float32)
    for rb in tl.static_range((R + BLOCK_R - 1) // BLOCK_R):
        h1, b1 = _operands(
            h_row,
            b_row + cols1[:, None] * R,
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
        b2 = _b_block(b_row + cols2[:, None] * R, rank, rb, col_ok, R, BLOCK_R)  # same h
        acc1 = _dot(acc1, h1, b1, DOT_FP32)
        acc2 = _dot(acc2, h1, b2, DOT_FP32)
    dtype = y_ptr.dtype.element_ty
    # As lora_expand leaves q/k/v: the delta added in float32, rounded once.
    x1 = (x1.to(tl.float32) + acc1).to(dtype).to(tl.float32)
    x2 = (x2.to(tl.float32) + acc2).to(dtype).to(tl.float32)
    if s < 2:  # RoPE on q and k, each token's cos/sin rounded to the dtype first
        c_rows = cos_ptr + toks[:, None] * stride_cos + d[None, :]
        s_rows = sin_ptr + toks[:, None] * stride_sin + d[None, :]
        cos1 = to_dtype(tl.load(c_rows, mask=mask, other=0.0).to(tl.float32), dtype, INTERPRET)
        cos2 = to_dtype(
            tl.load(c_rows + HALF, mask=mask, other=0.0).to(tl.float32), dtype, INTERPRET
        )
        sin1 = to_dtype(tl.load(s_rows, mask=mask, other=0.0).to(tl.float32), dtype, INTERPRET)
        sin2 = to_dtype(
            tl.load(s_rows + HALF, mask=mask, other=0.0).to(tl.float32), dtype, INTERPRET
        )
        o1, o2 = rotate_pair(
            x1,
            x2,
            cos1.to(tl.float32),
            cos2.to(tl.float32),
            sin1.to(tl.float32),
            sin2.to(tl.float32),
            dtype,
            INTERPRET,
        )
    else:
        o1 = x1.to(dtype)
        o2 = x2.to(dtype)
    if s == 0:  # q, in place
        tl.store(y_rows + cols1[None, :], o1, mask=mask)
        tl.store(y_rows + cols2[None, :], o2, mask=mask)
    else:  # k or v, into each token's cache slot: a row of [NUM_KV_HEADS, HEAD_DIM]
        kv_slot = tl.load(slot_mapping_ptr + toks, mask=row_ok, other=-1)  # [BM]
        ok = mask & (kv_slot >= 0)[:, None]
        dst = cache_ptr + (s - 1) * stride_cache_kv
        dst = dst + kv_slot.to(tl.int64)[:, None] * (NUM_KV_HEADS * HEAD_DIM) + in_slice[None, :]
        out_ty = cache_ptr.dtype.element_ty
        tl.store(dst, o1.to(out_ty), mask=ok)
        tl.store(dst + HALF, o2.to(out_ty), mask=ok)


def qkv_rope_heads(head_dim: int, num_heads: int) -> int:
    """Heads per column block: up to 256 columns per half (at head_dim 128, the expand's
    512-column decode block) and no more heads than q has, but at least 16 columns per
    half, the narrowest ``tl.dot`` takes (extra heads are masked)."""
    block_half = next_pow2(max(1, head_dim // 2))
    return max(16 // block_half, min(256 // block_half, next_pow2(num_heads)), 1)


def lora_expand_qkv_rope(
    y: torch.Tensor,  # [T, (H + 2 * Hkv) * Dh] the qkv GEMM's output; q rotated in place
    h: torch.Tensor,  # [split_k, T, 3 * R] float32 partial sums (lora_shrink), or per slot
    lora_b: torch.Tensor,  # [L, (H + 2 * Hkv) * Dh, R]
    lora_ranks: torch.Tensor,  # [L, 3] int32
    lora: LoRAMetadata,
    cos: torch.Tensor,  # [T, Dh]
    sin: torch.Tensor,  # [T, Dh]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, Dh]
    slot_mapping: torch.Tensor,  # [T] int64
    num_heads: int,
    *,
    h_per_slot: bool = False,
    num_warps: int | None = None,
    launch: LaunchConfig = DEFAULT_LAUNCH,
) -> None:
    """Add each token's q/k/v deltas to ``y``, rotate q and k (rotate-half RoPE), write q
    back into ``y`` and k, v into the cache at ``slot_mapping``. ``y``'s k and v columns are
    left as the GEMM wrote them. ``h_per_slot`` as for ``lora_expand``."""
    assert lora.tiles is not None
    assert lora.sorted_token_ids is not None
    num_tokens = y.shape[0]
    num_loras, n, max_rank = lora_b.shape
    _, _, _, num_kv_heads, head_dim = kv_cache.shape
    if n != (num_heads + 2 * num_kv_heads) * head_dim or y.shape[1] != n or head_dim % 2:
        raise ValueError(
            f"lora_expand_qkv_rope: y {tuple(y.shape)}, B {tuple(lora_b.shape)} and the cache "
            f"{tuple(kv_cache.shape)} do not make {num_heads} q heads of one even head_dim"
        )
    if not kv_cache.is_contiguous() or y.stride(1) != 1 or not lora_b.is_contiguous():
        raise ValueError("lora_expand_qkv_rope needs a contiguous cache and B, unit-stride y rows")
    if cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("lora_expand_qkv_rope needs unit-stride cos/sin rows")
    assert lora_ranks.shape[1] == 3, lora_ranks.shape
    split_k, stride_hs, stride_ht, stride_hl = _h_layout(
        h, num_tokens, num_loras, 3 * max_rank, h_per_slot
    )
    num_tiles = lora.tiles.shape[1]
    if num_tiles == 0 or num_tokens == 0:
        return
    heads = qkv_rope_heads(head_dim, num_heads)
    _, block_r, _ = expand_config(max_rank, lora.block_m, n, launch)
    grid = (cdiv(num_heads, heads) + 2 * cdiv(num_kv_heads, heads), num_tiles)
    _lora_qkv_rope_kernel[grid](
        h,
        lora_b,
        y,
        lora_ranks,
        lora.sorted_token_ids,
        lora.tiles,
        cos,
        sin,
        kv_cache,
        slot_mapping,
        stride_hs,
        stride_ht,
        stride_hl,
        y.stride(0),
        cos.stride(0),
        sin.stride(0),
        kv_cache.stride(0),
        lora.tiles.stride(0),
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HEADS=heads,
        BLOCK_HALF=next_pow2(head_dim // 2),
        R=max_rank,
        SPLIT_K=split_k,
        BLOCK_M=lora.block_m,
        BLOCK_R=block_r,
        ROUND_H=lora_b.dtype != torch.float32,
        DOT_FP32=lora_b.dtype == torch.float32 or _interpreted_bf16(y, lora_b.dtype),
        INTERPRET=INTERPRET,
        num_warps=launch.lora_expand_decode_num_warps if num_warps is None else num_warps,
        **NO_FMA,
    )
