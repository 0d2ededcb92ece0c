"""Pure-torch references of the Llama model's elementwise ops: RMSNorm (optionally with the
residual add fused in), SiLU-and-mul and RoPE. The Triton kernels beside them
(``elementwise_triton``) do the same work in one launch per op; ``Kernels`` picks one.

The references are the model's numerics: they round where transformers rounds (RMSNorm
statistics in float32, the normalized row cast to the model dtype and only then multiplied
by the weight; residual adds, RoPE products and sums, SiLU and its product with ``up`` each
rounded to the model dtype). The kernels round at the same points.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

# ----------------------------------------------------------------------------- references


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [T, D]; weight: [D] -> [T, D]. Statistics in float32; the normalized row is cast back
    # to x's dtype before the weight multiplies it, as transformers does.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    # x, residual: [T, D] -> (normed [T, D], new residual [T, D]); the add in the model dtype.
    residual = x + residual
    return rms_norm_reference(residual, weight, eps), residual


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    # gate_up: [T, 2 * I] -> [T, I]; SiLU rounded to the dtype, then the product.
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, Dh]; cos, sin: [T, Dh]. Rotates halves (not interleaved pairs), like HF;
    # cos/sin are cast to x's dtype and every op rounds in it.
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def apply_rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # q: [T, H, Dh], k: [T, Hkv, Dh]; cos, sin: [T, Dh] -> rotated copies of q and k.
    return rotate_reference(q, cos, sin), rotate_reference(k, cos, sin)
