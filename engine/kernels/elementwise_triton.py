"""Triton kernels for the Llama model's elementwise work: RMSNorm (with the residual add
fused in), SiLU-and-mul and RoPE. Their torch references are in ``engine.kernels.elementwise``;
tests compare the two.

Each kernel computes in float32 but rounds to the model dtype exactly where the torch
formulation does (which is where transformers rounds), so half-precision results match the
references bit for bit except where a float32 reduction order, ``exp`` or a division differs
by a few ulps and those ulps straddle a rounding boundary of the dtype. SiLU takes the
hardware's approximate ``exp`` and division unless ``KernelConfig.exact_silu``: torch's
``expf`` and IEEE division made the fused LoRA expand + SiLU bound by its instructions.

Launches depend only on host-side shapes (no host sync), so every kernel can be captured in
a CUDA graph. The number of tokens is only a grid size, never a kernel argument, so it
compiles nothing new; the model's sizes (hidden, heads, head dim) are constexprs.

Two things differ between compiled kernels and Triton's interpreter (the CPU tests), chosen
by the ``INTERPRET`` constexpr: the interpreter casts float32 to bfloat16 by truncation while
the GPU (and torch) round to nearest even, so ``to_dtype`` rounds by hand there; and
libdevice, whose ``expf`` is the one torch's CUDA SiLU calls, is not interpreted, so
``tl.exp`` (numpy) stands in for it.

``to_dtype``, ``silu_mul`` and ``rotate_pair`` are shared with the LoRA kernels that end in
the same work (``lora_expand_triton``, ``lora_qkv_triton``), so both round alike.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.runtime.interpreter import InterpretedFunction

from engine.kernels.utils import next_pow2

# Widest row one program normalizes; wider rows raise (no Llama-family model is near it).
MAX_NORM_BLOCK = 65536

# Compiled kernels would contract `a * b + c` into an FMA, which rounds once where torch's
# separate ops round twice (it matters for float32 RoPE): no contraction in any kernel.
NO_FMA = {"enable_fp_fusion": False}


# ----------------------------------------------------------------------------- kernels


@triton.jit
def to_dtype(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    # x (float32) rounded to dtype, to nearest even as torch and the GPU do.
    if INTERPRET and dtype == tl.bfloat16:
        # The interpreter truncates float32 -> bfloat16: round the bits by hand.
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_res,
    stride_out,
    stride_res_out,
    eps,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # One program per token: its whole [D] row is in registers (BLOCK >= D, masked).
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < D
    x = tl.load(x_ptr + t * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    # Loaded now, not after the reduction, so that its latency hides behind the row's.
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + t * stride_res + offs, mask=ok, other=0.0).to(tl.float32)
        # The residual stream is kept in the model dtype: round the sum as torch's `x + r`.
        s = to_dtype(x + r, res_out_ptr.dtype.element_ty, INTERPRET)
        tl.store(res_out_ptr + t * stride_res_out + offs, s, mask=ok)
        x = s.to(tl.float32)
    # Statistics in float32; the normalized row is rounded to the input dtype before the
    # weight multiplies it (in the output dtype), as transformers' LlamaRMSNorm does.
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    h = to_dtype(x * rstd, x_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
    y = to_dtype(w * h, out_ptr.dtype.element_ty, INTERPRET)
    tl.store(out_ptr + t * stride_out + offs, y, mask=ok)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    stride_x,
    stride_out,
    n_cols,
    BLOCK: tl.constexpr,
    EXACT_SILU: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # Program (t, b): columns [b * BLOCK, (b + 1) * BLOCK) of token t; gate is x[t, :n_cols],
    # up is x[t, n_cols:].
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_cols
    dtype = out_ptr.dtype.element_ty
    row = x_ptr + t * stride_x
    gate = tl.load(row + offs, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(row + n_cols + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(
        out_ptr + t * stride_out + offs, silu_mul(gate, up, dtype, EXACT_SILU, INTERPRET), mask=ok
    )


@triton.jit
def silu_mul(gate, up, dtype: tl.constexpr, EXACT: tl.constexpr, INTERPRET: tl.constexpr):
    # torch's SiLU, x / (1 + exp(-x)) in float32 rounded to the dtype, then the product with
    # `up`, rounded again. gate, up: float32 -> dtype.
    if EXACT:
        # IEEE division and libdevice's exp, the expf torch's CUDA kernel calls (tl.exp
        # compiles to ex2.approx).
        e = tl.exp(-gate) if INTERPRET else libdevice.exp(-gate)
        silu = to_dtype(tl.div_rn(gate, 1.0 + e), dtype, INTERPRET).to(tl.float32)
    else:
        # The hardware's approximate exp (ex2.approx) and division (div.full). In float32 it
        # is off torch's by a few ulps, more as |gate| grows (exp rounds its argument
        # -gate * log2(e) first): at most 18 for |gate| <= 20 on an H200. A rounded result
        # differs from torch's only where those ulps straddle a rounding boundary of dtype
        # (no bfloat16 element in 4 M did).
        silu = to_dtype(gate / (1.0 + tl.exp(-gate)), dtype, INTERPRET).to(tl.float32)
    return to_dtype(silu * up, dtype, INTERPRET)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cos,
    stride_sin,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # Program (t, b): heads [b * BLOCK_H, (b + 1) * BLOCK_H) of token t, of q and of k
    # (masked past each one's head count). Rotated in place.
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    d = tl.arange(0, BLOCK_HALF)  # [BLOCK_HALF]
    d_ok = d < HALF
    dtype = q_ptr.dtype.element_ty
    # cos/sin rounded to the model dtype first, as the reference's `.to(x.dtype)`.
    c_ptr = cos_ptr + t * stride_cos + d
    s_ptr = sin_ptr + t * stride_sin + d
    cos1 = to_dtype(tl.load(c_ptr, mask=d_ok, other=0.0).to(tl.float32), dtype, INTERPRET)
    cos2 = to_dtype(tl.load(c_ptr + HALF, mask=d_ok, other=0.0).to(tl.float32), dtype, INTERPRET)
    sin1 = to_dtype(tl.load(s_ptr, mask=d_ok, other=0.0).to(tl.float32), dtype, INTERPRET)
    sin2 = to_dtype(tl.load(s_ptr + HALF, mask=d_ok, other=0.0).to(tl.float32), dtype, INTERPRET)
    cos1 = cos1.to(tl.float32)[None, :]
    cos2 = cos2.to(tl.float32)[None, :]
    sin1 = sin1.to(tl.float32)[None, :]
    sin2 = sin2.to(tl.float32)[None, :]
    q_row = q_ptr + t * stride_qt
    k_row = k_ptr + t * stride_kt
    _rotate(q_row, stride_qh, heads, d, d_ok, NUM_Q_HEADS, HALF, cos1, cos2, sin1, sin2, INTERPRET)
    _rotate(k_row, stride_kh, heads, d, d_ok, NUM_K_HEADS, HALF, cos1, cos2, sin1, sin2, INTERPRET)


@triton.jit
def _rotate(
    base,
    stride_h,
    heads,
    d,
    d_ok,
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    cos1,
    cos2,
    sin1,
    sin2,
    INTERPRET: tl.constexpr,
):
    # x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1), every product and
    # the sum rounded to the model dtype as the torch ops are.
    ok = (heads < NUM_HEADS)[:, None] & d_ok[None, :]
    p1 = base + heads[:, None] * stride_h + d[None, :]  # [BLOCK_H, BLOCK_HALF]
    p2 = p1 + HALF
    dtype = base.dtype.element_ty
    x1 = tl.load(p1, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=ok, other=0.0).to(tl.float32)
    o1, o2 = rotate_pair(x1, x2, cos1, cos2, sin1, sin2, dtype, INTERPRET)
    tl.store(p1, o1, mask=ok)
    tl.store(p2, o2, mask=ok)


@triton.jit
def rotate_pair(x1, x2, cos1, cos2, sin1, sin2, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    # The halves (x1, x2) of rows in dtype (as float32) and cos/sin (rounded to dtype, as
    # float32) -> the rotated halves in dtype: every product and sum rounded as torch's ops.
    a1 = to_dtype(x1 * cos1, dtype, INTERPRET).to(tl.float32)
    b1 = to_dtype(-x2 * sin1, dtype, INTERPRET).to(tl.float32)
    a2 = to_dtype(x2 * cos2, dtype, INTERPRET).to(tl.float32)
    b2 = to_dtype(x1 * sin2, dtype, INTERPRET).to(tl.float32)
    return to_dtype(a1 + b1, dtype, INTERPRET), to_dtype(a2 + b2, dtype, INTERPRET)


# Triton decides when it decorates whether to interpret (TRITON_INTERPRET=1, the CPU tests).
INTERPRET = isinstance(_rms_norm_kernel, InterpretedFunction)


def _norm_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def rms_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``weight * rms_norm(x)``, or with ``residual``: ``s = x + residual`` first, then its
    norm; returns ``(normed, s or None)``.

    x, residual: [T, D] with unit-stride rows; weight: [D] -> normed [T, D] in
    ``promote_types(x.dtype, weight.dtype)``, s [T, D] in x's dtype. New tensors; the
    inputs are not written.
    """
    num_tokens, dim = x.shape
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res_out = torch.empty_like(x) if residual is not None else None
    if (
        x.stride(-1) != 1
        or weight.stride(-1) != 1
        or (residual is not None and residual.stride(-1) != 1)
    ):
        raise ValueError("rms_norm_triton needs unit-stride rows")
    if residual is not None and (residual.dtype != x.dtype or residual.shape != x.shape):
        raise ValueError("rms_norm_triton needs x and residual of one shape and dtype")
    block = next_pow2(dim)
    if block > MAX_NORM_BLOCK:
        raise ValueError(f"rms_norm_triton normalizes rows of at most {MAX_NORM_BLOCK}, got {dim}")
    if num_tokens == 0:
        return out, res_out
    _rms_norm_kernel[(num_tokens,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        res_out if res_out is not None else out,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        res_out.stride(0) if res_out is not None else 0,
        float(eps),
        D=dim,
        BLOCK=block,
        HAS_RESIDUAL=residual is not None,
        INTERPRET=INTERPRET,
        num_warps=_norm_warps(block),
        **NO_FMA,
    )
    return out, res_out


def silu_and_mul_triton(gate_up: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate, up = gate_up.chunk(2, -1)``; ``exact``: torch's
    ``expf`` and IEEE division instead of the approximate ones.

    gate_up: [T, 2 * I] with unit-stride rows -> [T, I] (new tensor).
    """
    num_tokens, width = gate_up.shape
    n_cols = width // 2
    out = torch.empty(num_tokens, n_cols, dtype=gate_up.dtype, device=gate_up.device)
    if gate_up.stride(-1) != 1:
        raise ValueError("silu_and_mul_triton needs unit-stride rows")
    if num_tokens == 0 or n_cols == 0:
        return out
    block = min(2048, next_pow2(n_cols))
    _silu_and_mul_kernel[(num_tokens, -(-n_cols // block))](
        gate_up,
        out,
        gate_up.stride(0),
        out.stride(0),
        n_cols,
        BLOCK=block,
        EXACT_SILU=exact,
        INTERPRET=INTERPRET,
        num_warps=4 if block <= 1024 else 8,
        **NO_FMA,
    )
    return out


def apply_rotary_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """Rotate q and k in place (rotate-half RoPE, rounded as ``apply_rotary_reference``).

    q: [T, H, Dh]; k: [T, Hkv, Dh] (any token and head strides, unit-stride head rows:
    views into the fused qkv output are fine); cos, sin: [T, Dh] in any float dtype, rounded
    to q's dtype first.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    if k.dtype != q.dtype or k.shape[2] != head_dim or head_dim % 2:
        raise ValueError(
            f"apply_rotary_triton needs q and k of one dtype and one even head_dim, got "
            f"{q.dtype}/{k.dtype} and {head_dim}/{k.shape[2]}"
        )
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("apply_rotary_triton needs unit-stride head rows and cos/sin rows")
    if num_tokens == 0:
        return
    half = head_dim // 2
    block_half = next_pow2(half)
    # About 1024 elements per half per program: a few heads of one token.
    block_h = min(next_pow2(max(num_q_heads, num_k_heads)), max(1, 1024 // block_half))
    grid = (num_tokens, -(-max(num_q_heads, num_k_heads) // block_h))
    _rotary_kernel[grid](
        q,
        k,
        cos,
        sin,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        sin.stride(0),
        NUM_Q_HEADS=num_q_heads,
        NUM_K_HEADS=num_k_heads,
        HALF=half,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        INTERPRET=INTERPRET,
        num_warps=4,
        **NO_FMA,
    )
