"""Paged attention over a block-structured KV cache.

Each layer owns one cache tensor ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
(K at index 0, V at index 1). A step first writes its new K/V at ``attn.slot_mapping``,
then every sequence attends over its whole context, gathered through its block table.

``PagedAttention.forward`` is the one call the model makes; it goes through two
module-level functions, ``store_kv`` and ``paged_attention``. On CUDA tensors they run the
Triton kernels below; elsewhere (and when Triton is missing) the plain-torch references.
Tests compare the kernels with the references (on CPU under ``TRITON_INTERPRET=1``).

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

import functools
import importlib.util
import os
from typing import Any

import torch
from torch import nn

from engine.kernel_utils import next_pow2, num_sms
from engine.model.metadata import AttentionMetadata

# Triton is imported on first use only (``_jit``): it decides at import and decoration time
# whether to interpret kernels, and the CPU tests turn the interpreter on after the engine's
# modules are imported. CPU-only installs need not have it.
HAS_TRITON = importlib.util.find_spec("triton") is not None
tl: Any = None  # triton.language, bound by _jit(); the kernel bodies read it at compile time


def store_kv_reference(
    kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write this step's K/V into the cache.

    kv_cache: [2, num_blocks, block_size, Hkv, Dh]; k, v: [T, Hkv, Dh]; slot_mapping: [T]
    (block_id * block_size + offset; a negative slot is a padding token and is skipped).
    """
    # A flat [num_blocks * block_size] view turns a slot into a plain row index.
    flat = kv_cache.view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1])  # [2, slots, Hkv, Dh]
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def paged_attention_reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached context.

    q: [T, H, Dh]; kv_cache: [2, num_blocks, block_size, Hkv, Dh] -> out [T, H, Dh].
    Sequence i's queries are the last ``query_len`` of its ``seq_len`` positions. With GQA,
    query head h reads kv head ``h // (H // Hkv)`` (the layout transformers uses).
    Scores and softmax are float32 whatever the model dtype.
    """
    _, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    qsl, seq_lens = attn.query_start_loc_cpu, attn.seq_lens_cpu
    for i, seq_len in enumerate(seq_lens):
        start, end = qsl[i], qsl[i + 1]
        q_len = end - start
        if q_len == 0:
            continue
        num_blocks = -(-seq_len // block_size)
        blocks = attn.block_tables[i, :num_blocks].long()  # [nb]
        k_ctx = kv_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]  # [S, Hkv, Dh]
        v_ctx = kv_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]  # [S, Hkv, Dh]

        # Heads grouped by the kv head they share: [Hkv, G, q_len, Dh] vs [Hkv, 1, S, Dh].
        qi = q[start:end].float().view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        ki = k_ctx.float().permute(1, 0, 2).unsqueeze(1)
        vi = v_ctx.float().permute(1, 0, 2).unsqueeze(1)
        scores = (qi @ ki.transpose(-1, -2)) * scale  # [Hkv, G, q_len, S]

        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]  # [q_len, 1]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]  # [1, S]
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            # transformers' window: a query sees the last `sliding_window` positions, itself included.
            allowed &= k_pos > q_pos - sliding_window
        scores.masked_fill_(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        o = probs @ vi  # [Hkv, G, q_len, Dh]
        out[start:end] = o.permute(2, 0, 1, 3).reshape(q_len, num_heads, head_dim).to(q.dtype)
    return out


# ----------------------------------------------------------------------------- Triton kernels


def num_kv_splits(num_seqs: int, num_kv_heads: int, max_query_len: int, num_sms: int) -> int:
    """How many programs share one query block's context (a power of two, 1 to 16).

    Only decode steps split, and only when ``num_seqs * num_kv_heads`` programs would leave
    the chip idle. The answer depends on the batch's shape alone, never on context lengths,
    so a CUDA graph captured for a batch size launches what eager mode would.
    """
    programs = num_seqs * num_kv_heads
    if max_query_len != 1 or programs >= num_sms:
        return 1
    splits = 1
    while splits < 16 and programs * splits < 2 * num_sms:
        splits *= 2
    return splits


def attention_blocks(group: int, max_query_len: int) -> tuple[int, int, int]:
    """(BLOCK_Q query tokens, BLOCK_M rows = BLOCK_Q * group padded to a power of two,
    BLOCK_N context tokens per tile) for a batch whose longest query is ``max_query_len``.

    A decode program holds one token's ``group`` heads in 16 rows (the smallest tile
    ``tl.dot`` takes); prefill programs hold 64 rows. Both read the context 64 tokens at a
    time (``DECODE_LAUNCH`` says why for decode).
    """
    rows = 16 if max_query_len == 1 else 64
    rows = max(rows, next_pow2(group))
    block_q = max(1, rows // group)
    return block_q, next_pow2(block_q * group), DECODE_LAUNCH[0] if max_query_len == 1 else 64


# Decode steps' (BLOCK_N, num_warps, num_stages). On an H200 (llama-3.1-8b layer, 256
# sequences, pages scattered; scripts/gpu_attention.py) 64-token tiles, 2 warps and 2
# stages took 108.6 us at 192 tokens of context and 307 us at 1024, against 127.4 and 414 us
# for the 32-token tiles, 4 warps and 3 stages used before. Read at each launch; benchmarks
# may assign it.
DECODE_LAUNCH = (64, 2, 2)


def launch_config(max_query_len: int) -> tuple[int, int]:
    """(num_warps, num_stages) of the attention kernel."""
    if max_query_len == 1:
        return DECODE_LAUNCH[1], DECODE_LAUNCH[2]
    return 4, 3


# The kernels, as plain functions: ``_jit()`` decorates them on first use (see there).


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
        s = tl.dot(q, k, input_precision="ieee") if IEEE else tl.dot(q, k)
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


@functools.cache
def _jit() -> dict[str, Any]:
    """The kernels, decorated on first use rather than at import: Triton decides when it
    decorates whether to interpret (``TRITON_INTERPRET=1``, the CPU tests), and tests set
    that after the engine's modules are imported."""
    import triton
    import triton.language

    globals()["tl"] = triton.language
    globals()["_find_seq"] = triton.jit(_find_seq)  # called by name from the attention kernel
    return {
        "store_kv": triton.jit(_store_kv_kernel),
        # The batch size changes every step: specializing on it would compile again and again.
        "attention": triton.jit(do_not_specialize=["num_seqs"])(_paged_attention_kernel),
        "merge": triton.jit(_merge_splits_kernel),
    }


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
    _jit()["store_kv"][(num_tokens,)](
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
) -> torch.Tensor:
    """``paged_attention_reference`` as Triton kernels; reads only device tensors of ``attn``
    (and the host int ``max_query_len``), so it can be captured in a CUDA graph.

    q: [T, H, Dh]; kv_cache: [2, num_blocks, block_size, Hkv, Dh] -> out [T, H, Dh].
    ``num_splits`` overrides ``num_kv_splits``; ``block_n``, ``num_warps`` and
    ``num_stages`` override the launch heuristic (tests, ``scripts/gpu_attention.py``).
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
        # heads before positions: scripts/gpu_attention.py times both.
        raise ValueError("paged_attention_triton needs unit-stride q and cache rows, K and V alike")
    block_q, block_m, auto_block_n = attention_blocks(group, attn.max_query_len)
    block_n = auto_block_n if block_n is None else block_n
    warps, stages = launch_config(attn.max_query_len)
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
    _jit()["attention"][grid](
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
        IEEE=q.dtype == torch.float32,
        DECODE=decode,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        _jit()["merge"][(num_tokens, num_heads)](
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


# ----------------------------------------------------------------------------- dispatch

# LORASTREAM_ATTENTION=reference forces the torch references on every device (debugging).
_FORCE_REFERENCE = os.environ.get("LORASTREAM_ATTENTION", "") == "reference"


def _use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and t.is_cuda and not _FORCE_REFERENCE


def store_kv(
    kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    if _use_triton(kv_cache):
        store_kv_triton(kv_cache, k, v, slot_mapping)
    else:
        store_kv_reference(kv_cache, k, v, slot_mapping)


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    if _use_triton(q):
        return paged_attention_triton(q, kv_cache, attn, scale, sliding_window)
    return paged_attention_reference(q, kv_cache, attn, scale, sliding_window)


class PagedAttention(nn.Module):
    """Stores K/V of the new tokens, then attends; holds no weights, only the bound cache."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}"
            )
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        # Bound by the model runner (LlamaForCausalLM.bind_kv_caches); not a buffer, so it never
        # appears in state_dict and is never moved or cast with the module.
        self.kv_cache: torch.Tensor | None = None

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: AttentionMetadata
    ) -> torch.Tensor:
        # q: [T, H, Dh]; k, v: [T, Hkv, Dh] -> [T, H * Dh]
        store_kv(self.cache(), k, v, attn.slot_mapping)
        return self.attend(q, attn)

    def attend(self, q: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        """Attention alone, for a step whose K/V something else already wrote into the
        cache: q [T, H, Dh] -> [T, H * Dh]."""
        out = paged_attention(q, self.cache(), attn, self.scale, self.sliding_window)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def cache(self) -> torch.Tensor:
        if self.kv_cache is None:
            raise RuntimeError("no KV cache bound: call bind_kv_caches() before running the model")
        return self.kv_cache


__all__: list[str] = [
    "HAS_TRITON",
    "PagedAttention",
    "attention_blocks",
    "num_kv_splits",
    "paged_attention",
    "paged_attention_reference",
    "paged_attention_triton",
    "store_kv",
    "store_kv_reference",
    "store_kv_triton",
]
