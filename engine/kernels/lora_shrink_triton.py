"""Shrink: ``h = x · Aᵀ`` per token's adapter, for every slice of a layer in one launch.

Reference: ``engine.kernels.lora.lora_shrink_reference``.

Grid ``(split_k, column blocks of S * R, tiles)``; tiles are the slowest axis, so the unused
tiles of static (graph) metadata start last and exit at once. A tile is up to ``block_m``
tokens of one slot (``LoRAMetadata.tiles``), so a prefill segment streams its adapter's A
once per tile and a decode batch gathers each slot's scattered tokens; a slot's A of all
slices is one ``[S * R, K]`` matrix, so x is read once for the whole fused layer. Rows of A
past the (slot, slice) rank are masked, never loaded; a block whose ranks are all 0 exits at
once.

A decode step has about one tile per adapter, too few programs to pull A at full bandwidth,
so K is split: each split writes its partial sums to its own plane of h, and the expand adds
the planes in a fixed order. No atomics, no zeroing launch, and the same result for a token
whatever else is in the batch at a given split. The K loop is software-pipelined
(``tl.range(num_stages=...)``: A and x stream through shared memory with ``cp.async``), and
``S`` and ``R`` are compile-time constants, so h rows are addressed without runtime strides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from engine.config import LaunchConfig
from engine.kernels.utils import cdiv, next_pow2, num_sms

if TYPE_CHECKING:
    from engine.lora.metadata import LoRAMetadata

SHRINK_BLOCK_K = 128
DEFAULT_LAUNCH = LaunchConfig()


# Triton compiles a variant per value class (== 1, divisible by 16) of each int argument;
# these only index, so one variant serves them all.
@triton.jit(do_not_specialize=["stride_hs", "stride_tiles"])
def _lora_shrink_kernel(
    x_ptr,  # [T, K]
    a_ptr,  # [L, S * R, K], contiguous in its last two dims
    h_ptr,  # [split_k, T, S * R] float32
    ranks_ptr,  # [L, S] int32
    sorted_ids_ptr,  # [T] int64
    tiles_ptr,  # [3, G] int64: slot, start, length
    K,
    k_per_split,  # a multiple of BLOCK_K
    stride_xt,
    stride_xk,
    stride_al,
    stride_hs,
    stride_tiles,
    NUM_SLICES: tl.constexpr,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_tile = tl.program_id(2)
    slot = tl.load(tiles_ptr + pid_tile)
    start = tl.load(tiles_ptr + stride_tiles + pid_tile)
    length = tl.load(tiles_ptr + 2 * stride_tiles + pid_tile)
    if (length == 0) | (slot < 0):  # a padding tile, or tokens without an adapter
        return

    SR: tl.constexpr = NUM_SLICES * R
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] rows of A = s * R + r
    col_rank = tl.load(
        ranks_ptr + slot * NUM_SLICES + cols // R, mask=cols < SR, other=0
    )  # [BN] rank of each column's slice
    col_ok = (cols % R) < col_rank
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < length
    toks = tl.load(sorted_ids_ptr + start + offs_m, mask=row_ok, other=0)  # [BM] int64
    if tl.max(col_ok.to(tl.int32), axis=0) == 0:
        return

    offs_k = tl.arange(0, BLOCK_K)
    k_lo = pid_k * k_per_split
    x_ptrs = x_ptr + toks[:, None] * stride_xt  # [BM, 1]
    a_ptrs = a_ptr + slot * stride_al + cols[None, :] * K  # [1, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(k_lo, k_lo + k_per_split, BLOCK_K, num_stages=NUM_STAGES):
        k = k0 + offs_k  # [BK]
        k_ok = k < K
        x = tl.load(
            x_ptrs + k[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        a = tl.load(
            a_ptrs + k[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0
        )  # [BK, BN]
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), a.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, a)

    h_ptrs = h_ptr + pid_k * stride_hs + toks[:, None] * SR + cols[None, :]
    tl.store(h_ptrs, acc, mask=row_ok[:, None] & (cols < SR)[None, :])


def shrink_config(
    x: torch.Tensor, sr: int, k: int, num_tiles: int, programs_per_sm: int
) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT_K). BLOCK_N covers a slot's S * R rows of A (up to 64), so
    A is read once per tile. K is split only on a GPU (``split_k_for``). Few distinct
    blocks: each is a compile."""
    block_n = _block_n(sr)
    block_k = SHRINK_BLOCK_K
    split_k = 1
    if x.is_cuda:
        split_k = split_k_for(sr, k, num_tiles, num_sms(x.device.index or 0), programs_per_sm)
    return block_n, block_k, split_k


def _block_n(sr: int) -> int:
    return min(64, max(16, next_pow2(sr)))


def split_k_for(sr: int, k: int, num_tiles: int, sms: int, programs_per_sm: int = 3) -> int:
    """How many ways the shrink splits K over ``num_tiles`` tiles on ``sms`` multiprocessors:
    only when the tiles alone would not give every SM a few programs (a decode step has
    about one tile per adapter); splitting a 4096-token prefill was slower. The expand is
    compiled per split (it adds the split planes in an unrolled loop)."""
    programs = max(1, num_tiles * cdiv(sr, _block_n(sr)))
    # The largest power of two that keeps about ``programs_per_sm`` programs per SM: with 3
    # on 132 SMs, 8 for a decode graph's 47 tiles, 2 for a prefill's 128.
    want = programs_per_sm * sms // programs
    if want < 2:
        return 1
    max_split = max(1, k // (2 * SHRINK_BLOCK_K))  # keep at least 2 K steps per program
    return min(1 << (want.bit_length() - 1), max_split, 32)


def lora_shrink(
    x: torch.Tensor,  # [T, K]
    lora_a: torch.Tensor,  # [L, S, R, K]
    lora_ranks: torch.Tensor,  # [L, S] int32
    lora: LoRAMetadata,
    *,
    split_k: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    launch: LaunchConfig = DEFAULT_LAUNCH,
) -> torch.Tensor:
    """h: [split_k, T, S * R] float32 partial sums (their sum is x · Aᵀ). Rows of tokens
    without an adapter, and columns of a (slot, slice) whose rank is 0, are left unwritten:
    ``lora_expand`` reads neither.

    ``split_k``, ``block_k``, ``num_warps`` and ``num_stages`` override the heuristic and
    ``launch`` (tests, tuning)."""
    assert lora.tiles is not None
    assert lora.sorted_token_ids is not None
    num_tokens, k = x.shape
    _num_loras, num_slices, max_rank, k_a = lora_a.shape
    assert k == k_a, (x.shape, lora_a.shape)
    assert lora_a.stride(1) == max_rank * k
    assert lora_a.stride(2) == k
    assert lora_a.stride(3) == 1
    sr = num_slices * max_rank
    num_tiles = lora.tiles.shape[1]
    block_n, auto_block_k, auto_split = shrink_config(
        x, sr, k, num_tiles, launch.lora_shrink_programs_per_sm
    )
    block_k = auto_block_k if block_k is None else block_k
    num_warps = launch.lora_shrink_num_warps if num_warps is None else num_warps
    num_stages = launch.lora_shrink_num_stages if num_stages is None else num_stages
    split_k = auto_split if split_k is None else split_k
    h = torch.empty(split_k, num_tokens, sr, dtype=torch.float32, device=x.device)
    if num_tiles == 0:
        return h
    dot_fp32 = (
        x.dtype != lora_a.dtype
        or lora_a.dtype == torch.float32
        # Triton's interpreter multiplies bfloat16 wrongly (numpy has no bfloat16); the
        # upcast is exact, as bf16 products fit in float32.
        or (not x.is_cuda and lora_a.dtype == torch.bfloat16)
    )
    k_per_split = cdiv(k, block_k * split_k) * block_k
    # Tiles are the slowest axis: the unused tiles of static metadata start last.
    grid = (split_k, cdiv(sr, block_n), num_tiles)
    _lora_shrink_kernel[grid](
        x,
        lora_a,
        h,
        lora_ranks,
        lora.sorted_token_ids,
        lora.tiles,
        k,
        k_per_split,
        x.stride(0),
        x.stride(1),
        lora_a.stride(0),
        h.stride(0),
        lora.tiles.stride(0),
        NUM_SLICES=num_slices,
        R=max_rank,
        BLOCK_M=lora.block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        NUM_STAGES=num_stages,
        DOT_FP32=dot_fp32,
        num_warps=num_warps,
    )
    return h
