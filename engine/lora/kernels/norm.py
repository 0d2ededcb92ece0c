"""The expand of a one-slice layer (o_proj, down_proj) fused with the residual add and the
RMSNorm that follow it, in one launch.

Unfused, the attention output and the MLP output of a decode layer with adapters each take
two kernels: the expand adds each token's delta ``h · Bᵀ`` to the GEMM's output in place,
then the next norm reads it back with the residual stream, writes the new stream and the
normalized row. ``lora_expand_add_rms_norm`` reads the GEMM's output once, adds the delta in
registers and goes on to the add and the norm; the sum is never written back.

One program per token, over the whole row in column blocks: the norm needs the row's sum of
squares, and a token's delta is a rank-R product per column, so no tile of tokens is needed
(``tl.dot`` would need 16 tokens of one adapter). Tokens are processed in their own order;
a slot's B is read from L2 by each of its tokens. The first pass adds the delta and the
residual and writes the new residual stream; the second reads it back (from L1/L2) and
writes the normalized row.

Rounding is the unfused path's: the delta is added in float32 and rounded to the model dtype
(as the expand stores y), then the add and the norm round as
``engine.model.fused_kernels``'s RMSNorm does. The rank products are summed in another order
than ``tl.dot``'s, so an element can differ from the unfused path by one ulp of the model
dtype where the float32 sum straddles a rounding boundary.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from engine.kernel_utils import next_pow2
from engine.lora.kernels.expand import _rank_block
from engine.model.metadata import LoRAMetadata

# Bound on first use (lora_expand_add_rms_norm) from engine.model.fused_kernels: rounding
# to the model dtype as the model's kernels do.
_to: Any = None

# (BLOCK_N, num_warps): columns per pass and warps per token, for rank 16 (wider ranks take
# narrower blocks, B's block being BLOCK_N x rank). Read at call time, so benchmarks can
# switch it.
LAUNCH = (1024, 8)


@triton.jit
def _lora_expand_add_rms_norm_kernel(
    y_ptr,  # [T, D] the GEMM's output (row stride stride_yt), read only
    h_ptr,  # [T, L * R] every slot's x · Aᵀ in B's dtype (row stride stride_ht)
    b_ptr,  # [L, D, R] contiguous
    ranks_ptr,  # [L, 1] int32
    slots_ptr,  # [T] int64: each token's slot, -1 for none
    res_ptr,  # [T, D] the residual stream, read only
    w_ptr,  # [D] the norm's weight
    out_ptr,  # [T, D] the normalized row
    res_out_ptr,  # [T, D] the new residual stream
    stride_yt,
    stride_ht,
    stride_rt,
    stride_ot,
    stride_rot,
    eps,
    D: tl.constexpr,
    R: tl.constexpr,
    BLOCK_R: tl.constexpr,  # R rounded up to a power of two
    BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + t)
    has = slot >= 0
    slot_c = tl.maximum(slot, 0)
    rank = tl.where(has, tl.load(ranks_ptr + slot_c), 0)
    # Rank 0 (no adapter, padding) loads no weights; loads run to the rank rounded up to 8.
    r, r_ok, r_ld = _rank_block(rank, 0, R, BLOCK_R)
    h = tl.load(h_ptr + t * stride_ht + slot_c * R + r, mask=r_ld, other=0.0)
    h = tl.where(r_ok, h.to(tl.float32), 0.0)
    b_rows = b_ptr + slot_c * D * R
    y_dtype = y_ptr.dtype.element_ty
    res_dtype = res_out_ptr.dtype.element_ty
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c in tl.static_range(0, D, BLOCK_N):
        cols = c + tl.arange(0, BLOCK_N)
        ok = cols < D
        y = tl.load(y_ptr + t * stride_yt + cols, mask=ok, other=0.0)
        res = tl.load(res_ptr + t * stride_rt + cols, mask=ok, other=0.0)
        # B's rows to the rounded rank, so the loads stay vectors; what lies past the rank
        # (zero, or stale weights) is zeroed.
        b_mask = ok[:, None] & r_ld[None, :]
        b = tl.load(b_rows + cols[:, None] * R + r[None, :], mask=b_mask, other=0.0)
        b = tl.where(r_ok[None, :], b.to(tl.float32), 0.0)
        delta = tl.sum(b * h[None, :], axis=1)  # [BN]
        # As the expand leaves y: the delta added in float32, rounded once.
        x = _to(y.to(tl.float32) + delta, y_dtype, INTERPRET).to(tl.float32)
        # The residual stream is kept in the model dtype: round the sum as torch's `x + r`.
        s = _to(x + res.to(tl.float32), res_dtype, INTERPRET)
        tl.store(res_out_ptr + t * stride_rot + cols, s, mask=ok)
        s32 = s.to(tl.float32)
        sq += s32 * s32
    # Each thread reads back below what this program's threads stored above.
    tl.debug_barrier()
    rstd = tl.rsqrt(tl.sum(sq, axis=0) / D + eps)
    for c in tl.static_range(0, D, BLOCK_N):
        cols = c + tl.arange(0, BLOCK_N)
        ok = cols < D
        s32 = tl.load(res_out_ptr + t * stride_rot + cols, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        # The normalized row is rounded to the input dtype before the weight multiplies it
        # (in the output dtype), as transformers' LlamaRMSNorm does.
        normed = _to(s32 * rstd, y_dtype, INTERPRET).to(tl.float32)
        tl.store(
            out_ptr + t * stride_ot + cols,
            _to(w * normed, out_ptr.dtype.element_ty, INTERPRET),
            mask=ok,
        )


def lora_expand_add_rms_norm(
    y: torch.Tensor,  # [T, D] the GEMM's output, not written
    h: torch.Tensor,  # [T, L * R] every slot's x · Aᵀ in B's dtype (the stacked product's)
    lora_b: torch.Tensor,  # [L, D, R]
    lora_ranks: torch.Tensor,  # [L, 1] int32
    lora: LoRAMetadata,
    residual: torch.Tensor,  # [T, D]
    weight: torch.Tensor,  # [D]
    eps: float,
    *,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = residual + (y + each token's h · Bᵀ)``, then ``(weight * rms_norm(s), s)``:
    what ``lora_expand(y, h, ..., h_per_slot=True)`` followed by
    ``engine.model.ops.fused_add_rms_norm(y, residual, weight, eps)`` gives, in one launch
    (up to the order of the rank products' float32 sum). New tensors; the inputs are not
    written. Tokens without an adapter (slot -1, padding included) get the add and the
    norm alone. ``block_n`` and ``num_warps`` override ``LAUNCH`` (tests, tuning)."""
    num_tokens, dim = y.shape
    num_loras, n, max_rank = lora_b.shape
    if n != dim or lora_ranks.shape != (num_loras, 1):
        raise ValueError(
            f"lora_expand_add_rms_norm: y {tuple(y.shape)}, B {tuple(lora_b.shape)} and ranks "
            f"{tuple(lora_ranks.shape)} are not one slice of {dim} columns"
        )
    if h.shape != (num_tokens, num_loras * max_rank) or h.dtype != lora_b.dtype:
        raise ValueError(
            f"h {tuple(h.shape)} {h.dtype} is not every slot's x · Aᵀ for {num_tokens} tokens "
            f"in B's dtype {lora_b.dtype}"
        )
    if residual.shape != y.shape or residual.dtype != y.dtype or weight.shape != (dim,):
        raise ValueError(
            f"residual {tuple(residual.shape)} {residual.dtype} and weight {tuple(weight.shape)} "
            f"do not match y {tuple(y.shape)} {y.dtype}"
        )
    if (
        y.stride(1) != 1
        or h.stride(1) != 1
        or residual.stride(1) != 1
        or weight.stride(0) != 1
        or not lora_b.is_contiguous()
    ):
        raise ValueError("lora_expand_add_rms_norm needs unit-stride rows and a contiguous B")
    assert lora.token_slots.shape[0] >= num_tokens, (lora.token_slots.shape, num_tokens)
    out = torch.empty(y.shape, dtype=torch.promote_types(y.dtype, weight.dtype), device=y.device)
    res_out = torch.empty_like(residual)
    if num_tokens == 0:
        return out, res_out
    global _to
    from engine.model import fused_kernels

    helpers = fused_kernels._jit()
    _to = helpers["to"]
    block_r = next_pow2(max_rank)
    auto_n, auto_warps = LAUNCH
    # B's block is BLOCK_N x BLOCK_R: at most 16K values, as at rank 16.
    auto_n = min(auto_n, max(16, 16384 // block_r), max(16, next_pow2(dim)))
    _lora_expand_add_rms_norm_kernel[(num_tokens,)](
        y,
        h,
        lora_b,
        lora_ranks,
        lora.token_slots,
        residual,
        weight,
        out,
        res_out,
        y.stride(0),
        h.stride(0),
        residual.stride(0),
        out.stride(0),
        res_out.stride(0),
        float(eps),
        D=dim,
        R=max_rank,
        BLOCK_R=block_r,
        BLOCK_N=auto_n if block_n is None else block_n,
        INTERPRET=helpers["interpret"],
        num_warps=auto_warps if num_warps is None else num_warps,
        **helpers["no_fma"],
    )
    return out, res_out
