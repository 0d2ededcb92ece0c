"""The one dispatch of the model's kernels: each call runs the Triton kernel or its torch
reference, as the engine's ``KernelConfig`` says, with the device's launch settings.

``Kernels`` holds two implementations of the same calls, ``triton`` (``TritonKernels``)
and ``torch`` (``TorchKernels``), and ``Kernels.on(tensor)`` picks one. The model's modules
each hold the model's ``Kernels`` (the loader hands it down), so a model runs with the
kernels its config chose and nothing else decides; a test may hand in its own ``triton``
(say, one that counts calls). The Triton modules are imported on first use: Triton reads
``TRITON_INTERPRET`` when it decorates a kernel (the CPU tests set it), and a CPU-only
install need not have Triton at all. The LoRA kernels have no torch twin here:
``LoRALinear`` has its own reference path (``engine.kernels.lora``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from engine.config import KernelConfig, LaunchConfig
from engine.kernels import attention, elementwise, lora

if TYPE_CHECKING:
    from engine.lora.metadata import LoRAMetadata
    from engine.model.metadata import AttentionMetadata


class TorchKernels:
    """The pure-torch references."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return elementwise.rms_norm_reference(x, weight, eps)

    def fused_add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return elementwise.fused_add_rms_norm_reference(x, residual, weight, eps)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return elementwise.silu_and_mul_reference(gate_up)

    def apply_rotary(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return elementwise.apply_rotary_reference(q, k, cos, sin)

    def store_kv(
        self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        attention.store_kv_reference(kv_cache, k, v, slot_mapping)

    def paged_attention(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        return attention.paged_attention_reference(q, kv_cache, attn, scale, sliding_window)

    def add_lora(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a: list[torch.Tensor],
        lora_b: list[torch.Tensor],
        out_slices: list[int],
        meta: LoRAMetadata,
        ranks: list[list[int]] | None,
    ) -> None:
        """``lora.add_lora_reference``: per adapter of the step, at its own ranks."""
        lora.add_lora_reference(y, x, lora_a, lora_b, out_slices, meta, ranks)


class TritonKernels:
    """The Triton kernels, launched with ``launch`` (the device's settings)."""

    def __init__(self, config: KernelConfig, launch: LaunchConfig) -> None:
        self.exact_silu = config.exact_silu
        self.launch = launch

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        from engine.kernels.elementwise_triton import rms_norm_triton

        return rms_norm_triton(x, weight, eps)[0]

    def fused_add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from engine.kernels.elementwise_triton import rms_norm_triton

        normed, new_residual = rms_norm_triton(x, weight, eps, residual)
        assert new_residual is not None
        return normed, new_residual

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        from engine.kernels.elementwise_triton import silu_and_mul_triton

        return silu_and_mul_triton(gate_up, exact=self.exact_silu)

    def apply_rotary(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from engine.kernels.elementwise_triton import apply_rotary_triton

        apply_rotary_triton(q, k, cos, sin)  # in place
        return q, k

    def store_kv(
        self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        from engine.kernels.attention_triton import store_kv_triton

        store_kv_triton(kv_cache, k, v, slot_mapping)

    def paged_attention(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        from engine.kernels.attention_triton import paged_attention_triton

        return paged_attention_triton(q, kv_cache, attn, scale, sliding_window, launch=self.launch)

    def lora_shrink(
        self, x: torch.Tensor, lora_a: torch.Tensor, lora_ranks: torch.Tensor, meta: LoRAMetadata
    ) -> torch.Tensor:
        from engine.kernels.lora_shrink_triton import lora_shrink

        return lora_shrink(x, lora_a, lora_ranks, meta, launch=self.launch)

    def lora_expand(
        self,
        y: torch.Tensor,
        h: torch.Tensor,
        lora_b: torch.Tensor,
        lora_ranks: torch.Tensor,
        slice_offsets: torch.Tensor,
        out_slices: list[int],
        meta: LoRAMetadata,
        *,
        accumulate: bool = True,
        h_per_slot: bool = False,
    ) -> None:
        from engine.kernels.lora_expand_triton import lora_expand

        lora_expand(
            y,
            h,
            lora_b,
            lora_ranks,
            slice_offsets,
            out_slices,
            meta,
            accumulate=accumulate,
            h_per_slot=h_per_slot,
            launch=self.launch,
        )

    def add_lora(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        lora_ranks: torch.Tensor,
        slice_offsets: torch.Tensor,
        out_slices: list[int],
        meta: LoRAMetadata,
    ) -> None:
        """y[t, slice s] += x[t] · A[slot(t), s]ᵀ · B[slot(t), s]ᵀ for every token with a
        slot: the shrink, then the expand in place. y: [T, N]; x: [T, K]; lora_a:
        [L, S, R, K]; lora_b: [L, N, R]."""
        h = self.lora_shrink(x, lora_a, lora_ranks, meta)  # [split_k, T, S * R] float32
        self.lora_expand(y, h, lora_b, lora_ranks, slice_offsets, out_slices, meta)

    def lora_expand_silu_and_mul(
        self,
        y: torch.Tensor,
        h: torch.Tensor,
        lora_b: torch.Tensor,
        lora_ranks: torch.Tensor,
        meta: LoRAMetadata,
        *,
        h_per_slot: bool = False,
    ) -> torch.Tensor:
        from engine.kernels.lora_expand_triton import lora_expand_silu_and_mul

        return lora_expand_silu_and_mul(
            y,
            h,
            lora_b,
            lora_ranks,
            meta,
            h_per_slot=h_per_slot,
            exact_silu=self.exact_silu,
            launch=self.launch,
        )

    def lora_expand_qkv_rope(
        self,
        y: torch.Tensor,
        h: torch.Tensor,
        lora_b: torch.Tensor,
        lora_ranks: torch.Tensor,
        meta: LoRAMetadata,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        num_heads: int,
    ) -> None:
        from engine.kernels.lora_qkv_triton import lora_expand_qkv_rope

        lora_expand_qkv_rope(
            y,
            h,
            lora_b,
            lora_ranks,
            meta,
            cos,
            sin,
            kv_cache,
            slot_mapping,
            num_heads,
            h_per_slot=True,
            launch=self.launch,
        )


class Kernels:
    """The kernels of one model under one ``KernelConfig`` on one device."""

    def __init__(
        self,
        config: KernelConfig | None = None,
        device: torch.device | str | None = None,
        *,
        triton: TritonKernels | None = None,
    ) -> None:
        self.config = config or KernelConfig()
        self.launch: LaunchConfig = self.config.launch_for(device)
        self.triton = triton or TritonKernels(self.config, self.launch)
        self.torch = TorchKernels()

    def use_triton(self, t: torch.Tensor) -> bool:
        """Whether kernels on ``t``'s device run Triton (else the torch references)."""
        return self.config.use_triton(t.device)

    def on(self, t: torch.Tensor) -> TritonKernels | TorchKernels:
        """The implementation for tensors on ``t``'s device."""
        return self.triton if self.use_triton(t) else self.torch

    def describe(self) -> dict[str, object]:
        """The effective settings, launch settings resolved (what ``EngineCore`` reports)."""
        out: dict[str, object] = {
            f.name: getattr(self.config, f.name)
            for f in dataclasses.fields(self.config)
            if f.name != "launch_overrides"
        }
        out["launch"] = dataclasses.asdict(self.launch)
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """``weight * norm(x)``; x: [T, D], weight: [D] -> [T, D]."""
        return self.on(x).rms_norm(x, weight, eps)

    def fused_add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual = x + residual`` (in the model dtype), then ``(norm(residual), residual)``.

        x, residual: [T, D]; weight: [D]. Returns new tensors; the inputs are not written.
        """
        return self.on(x).fused_add_rms_norm(x, residual, weight, eps)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` of the fused gate_up projection; [T, 2 * I] -> [T, I]."""
        return self.on(gate_up).silu_and_mul(gate_up)

    def apply_rotary(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate-half RoPE of q and k; returns the rotated ``(q, k)``.

        q: [T, H, Dh] or [T, H * Dh]; k: [T, Hkv, Dh] or [T, Hkv * Dh] (views into the fused
        qkv output are fine); cos, sin: [T, Dh]. The Triton path rotates q and k in place and
        returns them; the reference returns new tensors. Either way the caller must use the
        returned tensors and not read the inputs again.
        """
        head_dim = cos.shape[-1]
        if q.dim() == 2:
            q = q.view(q.shape[0], q.shape[1] // head_dim, head_dim)  # [T, H, Dh]
        if k.dim() == 2:
            k = k.view(k.shape[0], k.shape[1] // head_dim, head_dim)  # [T, Hkv, Dh]
        return self.on(q).apply_rotary(q, k, cos, sin)

    def store_kv(
        self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Write this step's K/V into the cache at ``slot_mapping`` (negative: skipped)."""
        self.on(kv_cache).store_kv(kv_cache, k, v, slot_mapping)

    def paged_attention(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        """Causal attention of each sequence's new tokens over its cached context."""
        return self.on(q).paged_attention(q, kv_cache, attn, scale, sliding_window)
