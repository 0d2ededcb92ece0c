"""The Llama model's elementwise ops: RMSNorm (optionally with the residual add fused in),
SiLU-and-mul and RoPE, each a pure-torch reference beside a dispatching function.

The references are the model's numerics: they round where transformers rounds (RMSNorm
statistics in float32, the normalized row cast to the model dtype and only then multiplied
by the weight; residual adds, RoPE products and sums, SiLU and its product with ``up`` each
rounded to the model dtype). The Triton kernels in ``engine.model.fused_kernels`` do the same
work in one launch per op and round at the same points.

``MODEL_KERNELS`` (from ``LORASTREAM_MODEL_KERNELS``) picks the path: ``auto`` runs Triton on
CUDA tensors and the references elsewhere; ``triton`` runs the kernels on CPU too (under
``TRITON_INTERPRET=1``, for tests); ``torch`` keeps the references on CUDA.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch.nn import functional as F

HAS_TRITON = importlib.util.find_spec("triton") is not None

MODEL_KERNELS = os.environ.get("LORASTREAM_MODEL_KERNELS", "auto")
"""auto (Triton on CUDA, torch elsewhere) | triton | torch; read once, tests may assign it."""

_KERNEL_CHOICES = ("auto", "triton", "torch")


def use_triton(x: torch.Tensor) -> bool:
    if MODEL_KERNELS == "auto":
        return HAS_TRITON and x.is_cuda
    if MODEL_KERNELS not in _KERNEL_CHOICES:
        raise ValueError(
            f"LORASTREAM_MODEL_KERNELS={MODEL_KERNELS!r}: expected one of {_KERNEL_CHOICES}"
        )
    return MODEL_KERNELS == "triton"


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


# ----------------------------------------------------------------------------- dispatch
# The Triton module is imported on first use: Triton decides at import and decoration time
# whether to interpret, and CPU-only installs need not have it.


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * norm(x)``; x: [T, D], weight: [D] -> [T, D]."""
    if use_triton(x):
        from engine.model.fused_kernels import rms_norm_triton

        return rms_norm_triton(x, weight, eps)[0]
    return rms_norm_reference(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual = x + residual`` (in the model dtype), then ``(norm(residual), residual)``.

    x, residual: [T, D]; weight: [D]. Returns new tensors; the inputs are not written.
    """
    if use_triton(x):
        from engine.model.fused_kernels import rms_norm_triton

        normed, new_residual = rms_norm_triton(x, weight, eps, residual)
        assert new_residual is not None
        return normed, new_residual
    return fused_add_rms_norm_reference(x, residual, weight, eps)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of the fused gate_up projection; gate_up: [T, 2 * I] -> [T, I]."""
    if use_triton(gate_up):
        from engine.model.fused_kernels import silu_and_mul_triton

        return silu_and_mul_triton(gate_up)
    return silu_and_mul_reference(gate_up)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE of q and k; returns the rotated ``(q, k)``.

    q: [T, H, Dh] or [T, H * Dh]; k: [T, Hkv, Dh] or [T, Hkv * Dh] (views into the fused qkv
    output are fine); cos, sin: [T, Dh]. The Triton path rotates q and k in place and returns
    them; the reference returns new tensors. Either way the caller must use the returned
    tensors and not read the inputs again.
    """
    head_dim = cos.shape[-1]
    if q.dim() == 2:
        q = q.view(q.shape[0], q.shape[1] // head_dim, head_dim)  # [T, H, Dh]
    if k.dim() == 2:
        k = k.view(k.shape[0], k.shape[1] // head_dim, head_dim)  # [T, Hkv, Dh]
    if use_triton(q):
        from engine.model.fused_kernels import apply_rotary_triton

        apply_rotary_triton(q, k, cos, sin)
        return q, k
    return apply_rotary_reference(q, k, cos, sin)


__all__ = [
    "HAS_TRITON",
    "MODEL_KERNELS",
    "apply_rotary",
    "apply_rotary_reference",
    "fused_add_rms_norm",
    "fused_add_rms_norm_reference",
    "rms_norm",
    "rms_norm_reference",
    "rotate_reference",
    "silu_and_mul",
    "silu_and_mul_reference",
    "use_triton",
]
