"""Paged attention as Triton kernels; the references are in ``engine.kernels.attention``.
Tests compare the two (on CPU under ``TRITON_INTERPRET=1``).

The attention kernel is one kernel for chunked prefill and decode, FlashAttention-style
(online softmax in float32, exp2): a program owns ``BLOCK_Q`` query tokens of one sequence
times the ``GROUP`` query heads that share one KV head (GQA), and walks that sequence's
context in tiles of ``BLOCK_N`` tokens, looking each token's page up in the block table.
Programs are laid out over the flattened tokens without any host-side per-sequence work:
``T // BLOCK_Q + num_seqs`` programs always cover every sequence's query blocks, and each
program finds its sequence by binary search over ``query_start_loc``. So the launch depends
only on ``T`` and ``num_seqs`` and the kernel can be captured in a CUDA graph. A decode
batch (one query token per sequence) skips the search: program ``i`` is sequence ``i``.
When few programs would run (small decode batches) the context is split over
``num_splits`` programs per query block whose partial softmax states a second kernel merges.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from engine.config import LaunchConfig
from engine.kernels.attention import attention_blocks, num_kv_splits
from engine.kernels.utils import next_pow2, num_sms

if TYPE_CHECKING:
    from engine.model.metadata import AttentionMetadata

DEFAULT_LAUNCH = LaunchConfig()


def launch_config(max_query_len: int, launch: LaunchConfig) -> tuple[int, int]:
    """(num_warps, num_stages) of the attention kernel."""
    if max_query_len == 1:
        return launch.attention_decode_num_warps, launch.attention_decode_num_stages
    return 4, 3


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cache_kv,
    stride_cache_slot,
    HEAD_DIM: tl.constexpr,
    ROW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per token: its [Hkv, Dh] K and V rows go to cache slot `slot`.
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding token of a CUDA-graph batch
        return
    offs = tl.arange(0, BLOCK)
    ok = offs < ROW
    h = offs // HEAD_DIM
    d = offs % HEAD_DIM
    k = tl.load(k_ptr + t.to(tl.int64) * stride_kt + h * stride_kh + d, mask=ok)
    v = tl.load(v_ptr + t.to(tl.int64) * stride_vt + h * stride_vh + d, mask=ok)
    dst = cache_ptr + slot * stride_cache_slot + offs
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + stride_cache_kv, v.to(cache_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _find_seq(qsl_ptr, pid, num_seqs, BLOCK_Q: tl.constexpr):
    # Sequence i owns programs [qsl[i] // BLOCK_Q + i, qsl[i + 1] // BLOCK_Q + i + 1),
    # at least ceil(q_len / BLOCK_Q) of them; find the last i whose first program <= pid.
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        if first <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# The batch size changes every step: specializing on it would compile again and again.
@triton.jit(do_not_specialize=["num_seqs"])
def _paged_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    qsl_ptr,
    num_seqs,
    num_heads,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cache_block,
    stride_cache_pos,
    stride_cache_head,
    stride_bt,
    GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    IEEE: tl.constexpr,
    DECODE: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE:
        # At most one query token per sequence: program pid is sequence pid, no search.
        seq = pid
        blk = 0
        q_begin = tl.load(qsl_ptr + seq)
        q_len = tl.load(qsl_ptr + seq + 1) - q_begin
    else:
        seq = _find_seq(qsl_ptr, pid, num_seqs, BLOCK_Q)
        q_begin = tl.load(qsl_ptr + seq)
        q_len = tl.load(qsl_ptr + seq + 1) - q_begin
        blk = pid - (q_begin // BLOCK_Q + seq)
    seq_len = tl.load(seq_lens_ptr + seq)
    if blk * BLOCK_Q >= q_len:
        return
    ctx = seq_len - q_len  # tokens cached before this step's queries

    # Row r of the tile: query token blk * BLOCK_Q + r // GROUP, head kvh * GROUP + r % GROUP.
    rows = tl.arange(0, BLOCK_M)
    q_idx = blk * BLOCK_Q + rows // GROUP
    head = kvh * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (q_idx < q_len)
    q_pos = ctx + q_idx  # [M] absolute positions
    tok = (q_begin + q_idx).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [M, D]

    # Context this block needs: up to its last query (causal), from the window's start.
    kv_end = ctx + tl.minimum(q_len, (blk + 1) * BLOCK_Q)
    kv_begin = 0
    if WINDOW > 0:
        kv_begin = tl.maximum(ctx + blk * BLOCK_Q - WINDOW + 1, 0)
    t_begin = kv_begin // BLOCK_N
    t_end = (kv_end + BLOCK_N - 1) // BLOCK_N
    per_split = (t_end - t_begin + NUM_SPLITS - 1) // NUM_SPLITS
    t0 = t_begin + split * per_split
    t1 = tl.minimum(t0 + per_split, t_end)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for t in range(t0, t1):
        kpos = t * BLOCK_N + tl.arange(0, BLOCK_N)  # [N]
        k_ok = kpos < kv_end
        page = tl.load(bt_row + kpos // PAGE, mask=k_ok, other=0).to(tl.int64)
        off = page * stride_cache_block + (kpos % PAGE) * stride_cache_pos
        off += kvh * stride_cache_head  # [N]
        k = tl.load(
            k_cache_ptr + off[None, :] + d[:, None],
            mask=k_ok[None, :] & d_ok[:, None],
            other=0.0,
        )  # [D, N]
        v = tl.load(
            v_cache_ptr + off[:, None] + d[None, :],
            mask=k_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # [N, D]
        if IEEE:
            s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = s * scale_log2  # [M, N], log2 units
        ok = kpos[None, :] <= q_pos[:, None]
        if WINDOW > 0:
            ok = ok & (kpos[None, :] > q_pos[:, None] - WINDOW)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no allowed key yet keeps m = -inf; exp2 must not see -inf - -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )
    else:
        # Partial state per (token, head, split): acc [BLOCK_D] and (m, l), all float32.
        part = (tok * num_heads + head) * NUM_SPLITS + split  # [M]
        tl.store(
            part_acc_ptr + part[:, None] * BLOCK_D + d[None, :],
            acc,
            mask=row_ok[:, None],
        )
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    part_acc_ptr,
    part_ml_ptr,
    out_ptr,
    num_heads,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    part = (t * num_heads + h) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)  # [S]
    m = tl.load(part_ml_ptr + part * 2)
    l_part = tl.load(part_ml_ptr + part * 2 + 1)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)  # [S]; 0 for a split that saw no key
    total = tl.sum(w * l_part, 0)
    d = tl.arange(0, BLOCK_D)
    acc = tl.load(part_acc_ptr + part[:, None] * BLOCK_D + d[None, :])  # [S, D]
    out = tl.sum(acc * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(
        out_ptr + t * stride_ot + h * stride_oh + d,
        out.to(out_ptr.dtype.element_ty),
        mask=d < HEAD_DIM,
    )


def store_kv_triton(
    kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """``store_kv_reference`` as one Triton launch (negative slots are skipped)."""
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    num_kv_heads, head_dim = kv_cache.shape[-2], kv_cache.shape[-1]
    if not kv_cache.is_contiguous() or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("store_kv_triton needs a contiguous cache and unit-stride K/V rows")
    row = num_kv_heads * head_dim
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        kv_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(2),
        HEAD_DIM=head_dim,
        ROW=row,
        BLOCK=next_pow2(row),
    )


def paged_attention_triton(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
    *,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    launch: LaunchConfig = DEFAULT_LAUNCH,
) -> torch.Tensor:
    """``paged_attention_reference`` as Triton kernels; reads only device tensors of ``attn``
    (and the host int ``max_query_len``), so it can be captured in a CUDA graph.

    q: [T, H, Dh]; kv_cache: [2, num_blocks, block_size, Hkv, Dh] -> out [T, H, Dh].
    ``num_splits`` overrides ``num_kv_splits``; ``block_n``, ``num_warps`` and
    ``num_stages`` override the launch heuristic and ``launch``'s decode settings (tests,
    ``benchmarks/gpu_attention.py``).
    """
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    num_seqs = attn.seq_lens.shape[0]
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    if q.stride(-1) != 1 or kv_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        # Any layout of the cache's other dims works (the kernel takes their strides), e.g.
        # heads before positions: benchmarks/gpu_attention.py times both.
        raise ValueError("paged_attention_triton needs unit-stride q and cache rows, K and V alike")
    block_q, block_m, auto_block_n = attention_blocks(
        group, attn.max_query_len, launch.attention_decode_block_n
    )
    block_n = auto_block_n if block_n is None else block_n
    warps, stages = launch_config(attn.max_query_len, launch)
    num_warps = warps if num_warps is None else num_warps
    num_stages = stages if num_stages is None else num_stages
    if num_splits is None:
        sms = num_sms(q.device.index or 0) if q.is_cuda else 132
        num_splits = num_kv_splits(num_seqs, num_kv_heads, attn.max_query_len, sms)
    if num_splits > 1 and attn.max_query_len != 1:
        raise ValueError("the context is split only for decode batches (max_query_len == 1)")
    block_d = max(16, next_pow2(head_dim))
    if num_splits > 1:
        part_acc = torch.empty(
            num_tokens * num_heads * num_splits * block_d, dtype=torch.float32, device=q.device
        )
        part_ml = torch.empty(
            num_tokens * num_heads * num_splits * 2, dtype=torch.float32, device=q.device
        )
    else:
        part_acc = part_ml = out  # unused
    # Decode: one program per sequence (and KV head); otherwise programs over the flattened
    # query blocks, each finding its sequence by binary search.
    decode = attn.max_query_len == 1
    pid_count = num_seqs if decode else num_tokens // block_q + num_seqs
    grid = (pid_count, num_kv_heads, num_splits)
    _paged_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        part_acc,
        part_ml,
        attn.block_tables,
        attn.seq_lens,
        attn.query_start_loc,
        num_seqs,
        num_heads,
        scale * 1.4426950408889634,  # log2(e): the kernel uses exp2
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        attn.block_tables.stride(0),
        GROUP=group,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        PAGE=block_size,
        BLOCK_N=block_n,
        WINDOW=sliding_window or 0,
        NUM_SPLITS=num_splits,
        # Triton's interpreter multiplies bfloat16 wrongly (numpy has no bfloat16): float32
        # products there, exact for bfloat16 inputs.
        IEEE=q.dtype == torch.float32 or (not q.is_cuda and q.dtype == torch.bfloat16),
        DECODE=decode,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            part_acc,
            part_ml,
            out,
            num_heads,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            NUM_SPLITS=num_splits,
        )
    return out
