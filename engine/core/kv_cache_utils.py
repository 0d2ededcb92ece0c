"""Block hashes for prefix caching. Pure Python (no torch).

A full KV-cache block is named by a hash that chains the hash of the block before it, the
adapter id and the block's token ids, so equal hashes mean the same tokens from position 0
under the same adapter — the only inputs its keys and values depend on. Two requests share a
block exactly when their prompts agree up to its end and they use the same adapter; an
adapter's blocks are never shared with another adapter or with the base model (id 0), since
LoRA changes every layer's hidden states and so the keys and values themselves.

The hash is SHA-256 over a fixed-length encoding (parent digest, adapter id, token ids):
a prompt cannot be crafted to collide with another tenant's block, which Python's ``hash``
would allow (vLLM moved its default to SHA-256 for the same reason).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

from engine.sequence import PLACEHOLDER, Request

BlockHash = bytes

ROOT_HASH: BlockHash = bytes(32)
"""The parent of a request's first block."""


def hash_block_tokens(parent: BlockHash, token_ids: Sequence[int], lora_id: int) -> BlockHash:
    """The hash of a full block of ``token_ids`` following the block hashed ``parent``,
    under adapter ``lora_id`` (0: the base model)."""
    h = hashlib.sha256(parent)
    h.update(lora_id.to_bytes(8, "little"))
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def num_known_tokens(request: Request) -> int:
    """Tokens of ``request`` whose ids the host knows: all but the trailing ``PLACEHOLDER``s
    of launched steps (async scheduling)."""
    n = request.num_tokens
    out = request.output_token_ids
    while n > request.num_prompt_tokens and out[n - request.num_prompt_tokens - 1] == PLACEHOLDER:
        n -= 1
    return n


def block_hashes(request: Request, block_size: int, num_blocks: int) -> list[BlockHash]:
    """The hashes of ``request``'s first ``num_blocks`` full blocks, or of as many as its
    known tokens fill. Extends ``request.block_hashes`` (hashes never change: known tokens
    stay as they are) and returns it, possibly longer than ``num_blocks``."""
    hashes = request.block_hashes
    if len(hashes) >= num_blocks:
        return hashes
    end = min(num_blocks, num_known_tokens(request) // block_size)
    lora_id = request.lora_int_id
    parent = hashes[-1] if hashes else ROOT_HASH
    for i in range(len(hashes), end):
        tokens = request.token_ids_slice(i * block_size, (i + 1) * block_size)
        parent = hash_block_tokens(parent, tokens, lora_id)
        hashes.append(parent)
    return hashes
