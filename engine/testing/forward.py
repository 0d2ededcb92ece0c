"""Test helpers: build a step's ``ForwardBatch`` by hand and drive a model through its
paged KV cache without the scheduler, the way the model runner does."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from engine.lora import LoRAMetadata, build_lora_metadata
from engine.model.llama import LlamaForCausalLM
from engine.model.metadata import AttentionMetadata, ForwardBatch


@dataclass
class SeqChunk:
    """One sequence's share of a step."""

    token_ids: list[int]
    """The new tokens (prefill chunk or one decode token)."""
    num_computed: int
    """Tokens of this sequence already in the KV cache; the new ones follow them."""
    block_table: list[int]
    """Must cover num_computed + len(token_ids) positions."""
    lora_slot: int = -1


def make_forward_batch(
    chunks: list[SeqChunk],
    block_size: int,
    device: torch.device | str = "cpu",
    *,
    lora_kernel_layout: bool = False,
) -> ForwardBatch:
    """``lora_kernel_layout``: LoRA metadata as the runner builds it (tiles for the Triton
    kernels, ``build_lora_metadata``) instead of per-adapter token groups only."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    token_lora: list[int] = []
    qsl, seq_lens = [0], []
    for c in chunks:
        end = c.num_computed + len(c.token_ids)
        assert len(c.block_table) * block_size >= end, "block table too short"
        input_ids += c.token_ids
        positions += range(c.num_computed, end)
        slots += [
            c.block_table[p // block_size] * block_size + p % block_size
            for p in range(c.num_computed, end)
        ]
        token_lora += [c.lora_slot] * len(c.token_ids)
        qsl.append(qsl[-1] + len(c.token_ids))
        seq_lens.append(end)
    max_blocks = max(len(c.block_table) for c in chunks)
    tables = [c.block_table + [0] * (max_blocks - len(c.block_table)) for c in chunks]
    attn = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens,
        max_query_len=max(len(c.token_ids) for c in chunks),
        max_seq_len=max(seq_lens),
    )
    return ForwardBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        attn=attn,
        lora=(
            build_lora_metadata(token_lora, device)
            if lora_kernel_layout
            else make_lora_metadata(token_lora, device)
        ),
    )


def make_lora_metadata(token_slots: list[int], device: torch.device | str = "cpu") -> LoRAMetadata:
    groups: dict[int, list[int]] = {}
    for t, s in enumerate(token_slots):
        if s >= 0:
            groups.setdefault(s, []).append(t)
    return LoRAMetadata(
        token_slots=torch.tensor(token_slots, dtype=torch.long, device=device),
        groups=[(s, torch.tensor(ix, dtype=torch.long, device=device)) for s, ix in groups.items()],
    )


@dataclass
class _Seq:
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)


class PagedDriver:
    """Owns KV caches for ``model`` and hands out blocks in shuffled order, so a sequence's
    blocks are neither contiguous nor ascending (as they are after preemptions)."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        num_blocks: int,
        block_size: int,
        seed: int = 0,
        *,
        lora_kernel_layout: bool = False,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.lora_kernel_layout = lora_kernel_layout
        device = model.model.embed_tokens.weight.device
        self.device = device
        shape = model.kv_cache_shape(num_blocks, block_size)
        self.kv_caches = [
            torch.zeros(shape, dtype=model.dtype, device=device) for _ in range(model.num_layers)
        ]
        model.bind_kv_caches(self.kv_caches)
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.seqs: dict[str, _Seq] = {}

    @torch.inference_mode()
    def step(
        self, work: dict[str, list[int]], lora_slots: dict[str, int] | None = None
    ) -> dict[str, torch.Tensor]:
        """Run one step over ``{seq_id: new token ids}``; returns each sequence's logits
        ``[len(new), V]`` (float32)."""
        chunks = []
        for seq_id, ids in work.items():
            seq = self.seqs.setdefault(seq_id, _Seq())
            need = -(-(seq.num_computed + len(ids)) // self.block_size)
            while len(seq.block_table) < need:
                seq.block_table.append(self.free.pop())
            chunks.append(
                SeqChunk(
                    ids, seq.num_computed, list(seq.block_table), (lora_slots or {}).get(seq_id, -1)
                )
            )
        batch = make_forward_batch(
            chunks, self.block_size, self.device, lora_kernel_layout=self.lora_kernel_layout
        )
        logits = self.model.compute_logits(self.model(batch))  # [T, V]
        out = {}
        for (seq_id, ids), start in zip(work.items(), batch.attn.query_start_loc_cpu, strict=False):
            out[seq_id] = logits[start : start + len(ids)]
            self.seqs[seq_id].num_computed += len(ids)
        return out
