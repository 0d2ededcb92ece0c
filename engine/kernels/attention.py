"""Paged attention over a block-structured KV cache: the pure-torch references, and the
launch sizing the Triton kernels (``attention_triton``) share with their tests.

Each layer owns one cache tensor ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
(K at index 0, V at index 1). A step first writes its new K/V at ``attn.slot_mapping``,
then every sequence attends over its whole context, gathered through its block table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.kernels.utils import next_pow2

if TYPE_CHECKING:
    from engine.model.metadata import AttentionMetadata


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


def attention_blocks(
    group: int, max_query_len: int, decode_block_n: int = 64
) -> tuple[int, int, int]:
    """(BLOCK_Q query tokens, BLOCK_M rows = BLOCK_Q * group padded to a power of two,
    BLOCK_N context tokens per tile) for a batch whose longest query is ``max_query_len``.

    A decode program holds one token's ``group`` heads in 16 rows (the smallest tile
    ``tl.dot`` takes); prefill programs hold 64 rows. Both read the context 64 tokens at a
    time (decode: ``LaunchConfig.attention_decode_block_n``, ``decode_block_n`` here).
    """
    rows = 16 if max_query_len == 1 else 64
    rows = max(rows, next_pow2(group))
    block_q = max(1, rows // group)
    return block_q, next_pow2(block_q * group), decode_block_n if max_query_len == 1 else 64
