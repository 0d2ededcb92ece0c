"""Per-step metadata, built once per step by the model runner and passed down the model.

Tokens of all scheduled sequences are flattened into one dimension ``T``; sequence ``i``
owns tokens ``query_start_loc[i]:query_start_loc[i+1]`` whose positions are the last
``query_len`` positions of its ``seq_len`` context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.lora import LoRAMetadata


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset where each new K/V goes
    query_start_loc: torch.Tensor  # [B + 1] int32, cumulative new-token counts
    seq_lens: torch.Tensor  # [B] int32, context length including this step's tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    # Host copies, so reference paths never sync with the device.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn: AttentionMetadata
    lora: LoRAMetadata | None = None
