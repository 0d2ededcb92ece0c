"""Per-step metadata, built once per step by the model runner and passed down the model.

Tokens of all scheduled sequences are flattened into one dimension ``T``; sequence ``i``
owns tokens ``query_start_loc[i]:query_start_loc[i+1]`` whose positions are the last
``query_len`` positions of its ``seq_len`` context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
class LoRAMetadata:
    """Which adapter slot each token uses, in the layouts the LoRA paths read.

    Built by ``engine.lora.layers.build_lora_metadata`` from the host list of slots, with
    one host-to-device copy. ``T`` is the number of (possibly padded) tokens, ``G`` the
    tile capacity, ``T2`` is ``T`` rounded up to even. Device layout, all int64, every field
    a view of ``packed`` (``[2 * T2 + 3 * G]``: ``token_slots`` at 0, ``sorted_token_ids`` at
    ``T2``, ``tiles`` at ``2 * T2``, so each starts 16-byte aligned), so that refreshing
    static buffers is one copy; the entry between ``T`` and ``T2`` is ``-1`` then ``0``:

    ====================  ==========  ======================================================
    field                 shape       contents / padding rule
    ====================  ==========  ======================================================
    ``token_slots``       ``[T]``     device slot of each token, ``-1`` for no adapter
                                      (padding tokens are ``-1``)
    ``sorted_token_ids``  ``[T]``     every token index, stably sorted by slot: tokens
                                      without an adapter (slot -1, padding included) first
    ``tiles``             ``[3, G]``  one column per tile of at most ``block_m`` tokens of
                                      one slot: row 0 slot (-1 for no adapter), row 1 start
                                      in ``sorted_token_ids``, row 2 length; unused columns
                                      are ``(0, 0, 0)`` and their programs exit at once
    ====================  ==========  ======================================================

    Tiles are each slot's segment of ``sorted_token_ids`` cut every ``block_m`` tokens, so a
    prefill segment reuses one adapter tile for ``block_m`` tokens and a decode batch
    gathers its tokens per slot. The tiles of slot -1 are skipped by the shrink and the
    expand; a kernel that also applies the layer's activation covers every token with them.
    ``G`` is at least ``ceil(T / block_m) + max_loras`` for any assignment of ``T`` tokens
    to ``max_loras`` slots.

    Host-only: ``groups`` lists ``(slot, token indices [n] int64)`` views of
    ``sorted_token_ids`` for the torch reference path; ``block_m`` is the tile height the
    kernels are launched with. ``is_static`` marks preallocated buffers for CUDA graphs:
    they hold no ``groups`` and are never ``empty``, so the kernels are captured whatever the
    step's adapters; ``copy_into`` refreshes them. Metadata built by hand with only
    ``token_slots`` and ``groups`` (tests) has no kernel layout and takes the reference path.
    """

    token_slots: torch.Tensor  # [T] int64: device slot of each token's adapter, -1 for none
    # Host-side grouping for the torch reference path: (slot, token indices [n] int64 on device).
    groups: list[tuple[int, torch.Tensor]]
    sorted_token_ids: torch.Tensor | None = None  # [T] int64
    tiles: torch.Tensor | None = None  # [3, G] int64: slot, start, length
    block_m: int = 16
    is_static: bool = False
    packed: torch.Tensor | None = None  # [2 * T2 + 3 * G] int64, backs the three fields above

    @property
    def empty(self) -> bool:
        return not self.groups and not self.is_static

    @property
    def has_kernel_layout(self) -> bool:
        return self.tiles is not None and self.sorted_token_ids is not None

    @property
    def max_tiles(self) -> int:
        return 0 if self.tiles is None else self.tiles.shape[1]

    def copy_into(self, static: LoRAMetadata) -> None:
        """Refresh preallocated (CUDA graph) buffers with this step's metadata, one copy.

        ``static`` must have the same layout: build this step's metadata with the graph's
        padded token count and ``block_m``/``max_tiles`` taken from ``static``.
        """
        if self.packed is None or static.packed is None:
            raise ValueError("copy_into needs metadata built by build_lora_metadata")
        same = (
            self.token_slots.shape == static.token_slots.shape
            and self.max_tiles == static.max_tiles
            and self.block_m == static.block_m
        )
        if not same:
            raise ValueError(
                f"layout differs: {self.token_slots.shape[0]} tokens, {self.max_tiles} tiles "
                f"of {self.block_m} here; {static.token_slots.shape[0]} tokens, "
                f"{static.max_tiles} tiles of {static.block_m} in the static buffers"
            )
        static.packed.copy_(self.packed, non_blocking=True)


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn: AttentionMetadata
    lora: LoRAMetadata | None = None
