"""Top-k then top-p without sorting the vocabulary.

A full sort of 256 rows of a 128 256-token vocabulary took 2.4 ms of the 4.2 ms that top-p
sampling cost per step on an H200 (``scripts/gpu_sampler.py``), against 0.13 ms for greedy.
The sort is not needed: top-p keeps every token at or above the *edge*, the smallest logit
whose tokens above it hold less than ``p`` of the mass. So:

1. the ``TOP_P_CANDIDATES`` largest logits of each row (``topk``, already sorted), and the
   row's log-sum-exp over what top-k keeps;
2. the candidates' cumulative mass gives the edge of every row whose candidates reach
   ``p``: a trained model's rows, which put their mass on few tokens;
3. the other rows (a flat distribution) find their edge by a search over the float32 values
   of the row (``_edge_kernel``: each pass weighs ``PIVOTS`` thresholds at once), run on
   the device without a host sync. Off CUDA the sort finds it instead.

The kept set is the one Hugging Face's ``TopPLogitsWarper`` keeps (the smallest set of most
likely tokens whose mass reaches ``p``, at least one), except at an exact tie at the edge:
every token equal to the edge is kept, as top-k keeps every token equal to the k-th.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

TOP_P_CANDIDATES = 1024
"""Largest logits per row whose mass decides the edge without the search. ``topk`` of 1024
over 256 x 128 256 float32 logits took 0.52 ms on an H200; tests set it small so that rows
need the fallback."""

PIVOTS = 8
"""Thresholds weighed per pass of the search (a power of two, for ``tl.arange``): the
interval shrinks 9-fold a pass, so 11 passes cover the 32 bits. Each pass reads the row
once and compares every token with every pivot, so more pivots trade passes for compute.
On an H200 (256 flat rows of 128 256 logits) 8 pivots in blocks of 1 024 tokens took
2.41 ms; 4 pivots 2.51 ms, 16 pivots 3.00 ms at best; smaller blocks were slower (one
program per row walks its row serially). The full sort path took 3.57 ms."""

EDGE_BLOCK = 1024
"""Tokens of a row each step of a search pass reads."""

tl: Any = None  # bound by _jit(): Triton is imported on first use (see fused_kernels)
_key: Any = None
_value: Any = None


def _key_fn(x):
    """float32 -> int64 that orders as the floats do (-inf lowest, NaN aside)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)


def _value_fn(key):
    bits = key.to(tl.int32)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


def _edge_kernel(
    logits_ptr,  # [N, V] float32
    stride_row,
    lse_ptr,  # [N] float32: log-sum-exp of the row (over what top-k keeps)
    hi_ptr,  # [N] float32: the edge is at most this (the smallest candidate)
    need_ptr,  # [N] bool: rows whose candidates did not reach p
    p_ptr,  # [N] float32
    edge_ptr,  # [N] float32, written for rows in need only
    V,
    BLOCK: tl.constexpr,
    NUM_PIVOTS: tl.constexpr,
):
    """The largest value t of the row with mass(logits >= t) >= p, by a search over the
    order-preserving integer keys of float32: each pass sums the mass above NUM_PIVOTS keys
    spread over [lo, hi] and keeps the interval between the last that holds p and the next."""
    row = tl.program_id(0)
    if tl.load(need_ptr + row) != 0:
        base = logits_ptr + row.to(tl.int64) * stride_row
        lse = tl.load(lse_ptr + row)
        p = tl.load(p_ptr + row)
        lo = _key(tl.full([1], float("-inf"), tl.float32))  # mass(>= -inf) is all of it
        hi = _key(tl.load(hi_ptr + row + tl.zeros([1], tl.int32)))
        j = tl.arange(0, NUM_PIVOTS).to(tl.int64) + 1
        while tl.max(lo, axis=0) < tl.max(hi, axis=0):
            step = (hi - lo + NUM_PIVOTS) // (NUM_PIVOTS + 1)  # [1], >= 1
            pivots = tl.minimum(lo + j * step, hi)  # [P], ascending, in (lo, hi]
            # Summed across the block once per pass, not once per block.
            acc = tl.zeros([BLOCK, NUM_PIVOTS], dtype=tl.float32)
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                x = tl.load(base + offs, mask=offs < V, other=float("-inf"))
                k = _key(x)
                e = tl.exp(x - lse)
                acc += tl.where(k[:, None] >= pivots[None, :], e[:, None], 0.0)
            mass = tl.sum(acc, axis=0)
            holds = mass >= p
            # The interval left: from the last pivot that holds p (or lo) to just below the
            # first that does not (or hi).
            new_lo = tl.max(tl.where(holds, pivots, lo), axis=0)
            new_hi = tl.min(tl.where(holds, hi + 1, pivots), axis=0) - 1
            lo = tl.zeros([1], tl.int64) + new_lo
            hi = tl.minimum(hi, tl.zeros([1], tl.int64) + new_hi)
        tl.store(edge_ptr + row + tl.zeros([1], tl.int32), _value(lo))


@functools.cache
def _jit() -> Any:
    import triton
    import triton.language

    globals()["tl"] = triton.language
    globals()["_key"] = triton.jit(_key_fn)
    globals()["_value"] = triton.jit(_value_fn)
    return triton.jit(_edge_kernel)


def edge_by_search(
    logits: torch.Tensor,
    lse: torch.Tensor,
    hi: torch.Tensor,
    need: torch.Tensor,
    top_p: torch.Tensor,
    edge: torch.Tensor,
) -> None:
    """Write into ``edge`` [N] the edge of each row where ``need`` [N] (Triton; on the
    device, no host sync). logits [N, V] float32; lse, hi, top_p [N] float32."""
    n, v = logits.shape
    if n == 0:
        return
    if logits.stride(1) != 1:
        raise ValueError("edge_by_search needs unit-stride rows")
    _jit()[(n,)](
        logits,
        logits.stride(0),
        lse,
        hi,
        need,
        top_p,
        edge,
        v,
        BLOCK=EDGE_BLOCK,
        NUM_PIVOTS=PIVOTS,
        num_warps=8,
    )


def edge_by_sort(logits: torch.Tensor, lse: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The same edges by a full sort of the rows (the reference; the path off CUDA)."""
    ordered = logits.sort(dim=-1, descending=True).values  # [N, V]
    return _edge_of_sorted(ordered, lse, top_p)[0]


def _edge_of_sorted(
    ordered: torch.Tensor, lse: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(edge [N], reached [N]) over descending values: the last value whose tokens above it
    hold less than p, and whether these values' mass reaches p at all."""
    probs = (ordered - lse.unsqueeze(1)).exp()
    cum = probs.cumsum(dim=-1)
    above = F.pad(cum[:, :-1], (1, 0))  # mass strictly before each position
    kept = (above < top_p.unsqueeze(1)).sum(dim=-1, keepdim=True)  # a prefix, at least 1
    edge = ordered.gather(1, (kept - 1).clamp(min=0)).squeeze(1)
    return edge, cum[:, -1] >= top_p


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor
) -> torch.Tensor:
    """Mask to -inf what top-k, then top-p (on the top-k renormalised distribution), remove;
    ``top_k`` [N] (V where off) must be at most ``TOP_P_CANDIDATES`` where on."""
    v = logits.shape[1]
    vals = logits.topk(min(v, TOP_P_CANDIDATES), dim=-1).values  # [N, C], descending
    neg_inf = logits.new_full((), float("-inf"))
    if top_k is not None:
        kth = vals.gather(1, (top_k.clamp(max=vals.shape[1]) - 1).unsqueeze(1))  # [N, 1]
        kth = torch.where((top_k < v).unsqueeze(1), kth, neg_inf)
        logits = logits.masked_fill(logits < kth, float("-inf"))
        vals = vals.masked_fill(vals < kth, float("-inf"))
    lse = logits.logsumexp(dim=-1)  # [N]
    edge, reached = _edge_of_sorted(vals, lse, top_p)
    need = ~reached & (top_p < 1.0)
    if logits.is_cuda:
        edge_by_search(logits, lse, vals[:, -1].contiguous(), need, top_p, edge)
    elif bool(need.any()):  # off the GPU a host check costs nothing
        edge[need] = edge_by_sort(logits[need], lse[need], top_p[need])
    edge = torch.where(top_p < 1.0, edge, neg_inf)
    return logits.masked_fill(logits < edge.unsqueeze(1), float("-inf"))
