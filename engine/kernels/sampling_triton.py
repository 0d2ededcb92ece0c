"""The sampler's Triton kernels; their torch counterparts are in ``engine.sampling``.

Top-p's edge by search (``edge_by_search``; the reference is ``top_p.edge_by_sort``): rows
whose ``TOP_P_CANDIDATES`` largest logits do not reach p find their edge by a search over
the float32 values of the row, on the device without a host sync.

Seeded rows' exponential noise in one launch (``seeded_exponential_``). A seeded request
draws its noise from its own seed (``(seed, output position)``, so its tokens depend neither
on the batch nor on preemption); one ``torch.Generator`` per row (the path off CUDA) costs a
launch per row. Here one kernel writes every seeded row: Philox (``tl.rand``) keyed by the
row's seed, counting over the vocabulary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.utils import cdiv

PIVOTS = 8
"""Thresholds weighed per pass of the search (a power of two, for ``tl.arange``): the
interval shrinks 9-fold a pass, so 11 passes cover the 32 bits. Each pass reads the row
once and compares every token with every pivot, so more pivots trade passes for compute;
8 in blocks of ``EDGE_BLOCK`` tokens was the fastest measured (docs/benchmark-log.md). One
program walks its row serially, so smaller blocks are slower."""

EDGE_BLOCK = 1024
"""Tokens of a row each step of a search pass reads."""


@triton.jit
def _key(x):
    """float32 -> int64 that orders as the floats do (-inf lowest, NaN aside)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _value(key):
    bits = key.to(tl.int32)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
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
    _edge_kernel[(n,)](
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


# ----------------------------------------------------------------------------- noise

NOISE_BLOCK = 1024


@triton.jit
def _seeded_exponential_kernel(
    q_ptr,  # [N, V] float32, rows written in place
    stride_row,
    rows_ptr,  # [S] int64: the seeded rows
    seeds_ptr,  # [S] int64: their seeds
    V,
    BLOCK: tl.constexpr,
):
    s = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row = tl.load(rows_ptr + s)
    seed = tl.load(seeds_ptr + s)
    u = tl.rand(seed, offs)  # uniform in [0, 1), one Philox stream per seed
    q = -tl.log(1.0 - u)  # Exp(1): 1 - u lies in (0, 1]
    tl.store(q_ptr + row * stride_row + offs, q, mask=offs < V)


def seeded_exponential_(q: torch.Tensor, rows: torch.Tensor, seeds: torch.Tensor) -> None:
    """Fill rows ``rows`` [S] of ``q`` [N, V] (float32, unit stride) with Exp(1) noise drawn
    from ``seeds`` [S] (int64), one launch, no host sync."""
    num, v = rows.shape[0], q.shape[1]
    if num == 0:
        return
    if q.dtype != torch.float32 or q.stride(1) != 1:
        raise ValueError("seeded_exponential_ needs float32 rows of unit stride")
    _seeded_exponential_kernel[(num, cdiv(v, NOISE_BLOCK))](
        q, q.stride(0), rows, seeds, v, BLOCK=NOISE_BLOCK
    )
