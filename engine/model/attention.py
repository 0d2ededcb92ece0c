"""Paged attention over a block-structured KV cache.

Each layer owns one cache tensor ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
(K at index 0, V at index 1). A step first writes its new K/V at ``attn.slot_mapping``,
then every sequence attends over its whole context, gathered through its block table.

``PagedAttention.forward`` is the one call the model makes; it goes through two
module-level functions, ``store_kv`` and ``paged_attention``, which today are the
plain-torch references below. A GPU kernel (flash-attn's varlen/paged API, a Triton
kernel) replaces them behind the same signatures and is tested against them.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.metadata import AttentionMetadata


def store_kv_reference(
    kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write this step's K/V into the cache.

    kv_cache: [2, num_blocks, block_size, Hkv, Dh]; k, v: [T, Hkv, Dh]; slot_mapping: [T]
    (block_id * block_size + offset).
    """
    # A flat [num_blocks * block_size] view turns a slot into a plain row index.
    flat = kv_cache.view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1])  # [2, slots, Hkv, Dh]
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


# The implementations PagedAttention calls; a device kernel is swapped in here.
store_kv = store_kv_reference
paged_attention = paged_attention_reference


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
        if self.kv_cache is None:
            raise RuntimeError("no KV cache bound: call bind_kv_caches() before running the model")
        store_kv(self.kv_cache, k, v, attn.slot_mapping)
        out = paged_attention(q, self.kv_cache, attn, self.scale, self.sliding_window)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
