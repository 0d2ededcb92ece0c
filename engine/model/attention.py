"""The model's attention layer over a paged KV cache.

Each layer owns one cache tensor ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
(K at index 0, V at index 1). A step first writes its new K/V at ``attn.slot_mapping``,
then every sequence attends over its whole context, gathered through its block table. The
kernels (Triton or the torch references, as ``KernelConfig`` says) are in
``engine.kernels.attention``.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.kernels.dispatch import Kernels
from engine.model.metadata import AttentionMetadata


class PagedAttention(nn.Module):
    """Stores K/V of the new tokens, then attends; holds no weights, only the bound cache."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
        kernels: Kernels | None = None,
    ) -> None:
        super().__init__()
        self.kernels = kernels or Kernels()
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
        self.kernels.store_kv(self.cache(), k, v, attn.slot_mapping)
        return self.attend(q, attn)

    def attend(self, q: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        """Attention alone, for a step whose K/V something else already wrote into the
        cache: q [T, H, Dh] -> [T, H * Dh]."""
        out = self.kernels.paged_attention(q, self.cache(), attn, self.scale, self.sliding_window)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def cache(self) -> torch.Tensor:
        if self.kv_cache is None:
            raise RuntimeError("no KV cache bound: call bind_kv_caches() before running the model")
        return self.kv_cache
