"""Per-step LoRA metadata: which adapter slot each token uses, in the layouts the LoRA paths
read, and its builders. One owner: ``build_lora_metadata`` fills it for a step (or refills
the static buffers of a CUDA graph), ``allocate_static_lora_metadata`` allocates those
buffers, and ``tile_capacity`` is the one rule for how many tiles a step can need.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.kernels.utils import pinned

# Tile heights the kernels are compiled for; the smallest that holds the longest segment.
# Not 64: 32-token tiles ran a 4096-token prefill as fast or faster.
BLOCK_MS = (16, 32)


def tile_capacity(num_tokens: int, max_loras: int, block_m: int) -> int:
    """Most tiles ``num_tokens`` tokens over up to ``max_loras`` slots can need: the segments
    of ``k`` slots (and of no adapter) cut into ``block_m`` tiles number at most
    ``ceil(T / block_m) + k - 1`` with ``k <= max_loras + 1``, and never more than ``T``."""
    k = max(1, min(max_loras + 1, num_tokens))
    return max(1, min(num_tokens, -(-num_tokens // block_m) + k - 1))


@dataclass
class LoRAMetadata:
    """Which adapter slot each token uses, in the layouts the LoRA paths read.

    Built by ``build_lora_metadata`` from the host list of slots, with one host-to-device
    copy. ``T`` is the number of (possibly padded) tokens, ``G`` the
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
    ``G`` is ``tile_capacity(T, max_loras, block_m)`` for static buffers.

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


def build_lora_metadata(
    token_slots: Sequence[int] | np.ndarray,
    device: torch.device | str,
    *,
    block_m: int | None = None,
    num_tokens: int | None = None,
    max_tiles: int | None = None,
    out: LoRAMetadata | None = None,
) -> LoRAMetadata:
    """Per-step LoRA metadata from each token's device slot (-1: no adapter); one H2D copy.

    Plain steps pass only ``token_slots``. For CUDA graphs, ``out`` (from
    ``allocate_static_lora_metadata``) is filled in place, padded to its token count, tile
    capacity and ``block_m``; ``num_tokens``/``max_tiles``/``block_m`` pad the same way
    without a destination (for ``LoRAMetadata.copy_into``). Nothing here reads the device.
    """
    if out is not None:
        num_tokens, max_tiles, block_m = out.token_slots.shape[0], out.max_tiles, out.block_m
    num_real = len(token_slots)
    num_tokens = num_real if num_tokens is None else num_tokens
    if num_real > num_tokens:
        raise ValueError(f"{num_real} tokens do not fit in {num_tokens}")

    # Every token, padding (slot -1) included, stably sorted by slot; the segments of equal
    # slots are cut into tiles of block_m. In numpy: a Python sort took several times as
    # long on a prefill's tokens (docs/benchmark-log.md).
    slots = np.full(num_tokens, -1, dtype=np.int64)
    slots[:num_real] = token_slots
    order = np.argsort(slots, kind="stable")
    sorted_slots = slots[order]
    change = np.flatnonzero(sorted_slots[1:] != sorted_slots[:-1]) + 1
    seg_start = np.concatenate(([0], change)) if num_tokens else change
    seg_len = np.diff(np.append(seg_start, num_tokens))
    seg_slot = sorted_slots[seg_start]
    if block_m is None:
        longest = int(seg_len[seg_slot >= 0].max(initial=1))
        block_m = next((b for b in BLOCK_MS if longest <= b), BLOCK_MS[-1])
    # Tokens without an adapter come first, as tiles of slot -1: the shrink and expand skip
    # them, kernels that also apply an activation (lora_expand_silu_and_mul) cover them.
    per_seg = -(-seg_len // block_m)
    seg_of_tile = np.repeat(np.arange(len(seg_start)), per_seg)
    tile_off = (np.arange(len(seg_of_tile)) - (np.cumsum(per_seg) - per_seg)[seg_of_tile]) * block_m
    num_used = len(seg_of_tile)
    num_tiles = num_used if max_tiles is None else max_tiles
    if num_used > num_tiles:
        raise ValueError(f"{num_used} tiles of {block_m} tokens exceed max_tiles={num_tiles}")

    field = _field_size(num_tokens)
    buf = np.zeros(2 * field + 3 * num_tiles, dtype=np.int64)
    buf[:field] = -1
    buf[:num_real] = token_slots
    buf[field : field + num_tokens] = order
    tiles = buf[2 * field :].reshape(3, num_tiles)
    tiles[0, :num_used] = seg_slot[seg_of_tile]
    tiles[1, :num_used] = seg_start[seg_of_tile] + tile_off
    tiles[2, :num_used] = np.minimum(block_m, seg_len[seg_of_tile] - tile_off)
    host = torch.from_numpy(buf)
    dev = torch.device(device)
    if out is not None:
        assert out.packed is not None
        out.packed.copy_(pinned(host, dev), non_blocking=True)
        return out
    packed = pinned(host, dev).to(dev, non_blocking=True)
    meta = _views(packed, num_tokens, num_tiles, block_m, is_static=False)
    sorted_dev = meta.sorted_token_ids
    assert sorted_dev is not None
    # One split call makes every adapter's group a view (slicing per slot costs a call each).
    adapter = seg_slot >= 0
    first = int(seg_start[adapter][0]) if adapter.any() else num_tokens
    sizes = seg_len[adapter].tolist()
    views = sorted_dev[first:].split(sizes) if sizes else ()
    meta.groups = list(zip(seg_slot[adapter].tolist(), views, strict=True))
    return meta


def allocate_static_lora_metadata(
    num_tokens: int, max_loras: int, device: torch.device | str, *, block_m: int = 16
) -> LoRAMetadata:
    """Static buffers for a CUDA graph of ``num_tokens`` (padded) tokens over up to
    ``max_loras`` slots: fill them each step with ``build_lora_metadata(..., out=static)``.

    """
    max_tiles = tile_capacity(num_tokens, max_loras, block_m)
    field = _field_size(num_tokens)
    packed = torch.zeros(2 * field + 3 * max_tiles, dtype=torch.long, device=device)
    packed[:field] = -1
    return _views(packed, num_tokens, max_tiles, block_m, is_static=True)


def _field_size(num_tokens: int) -> int:
    # Even, so every field of ``packed`` starts 16-byte aligned: Triton compiles a kernel
    # variant per pointer alignment.
    return num_tokens + num_tokens % 2


def _views(
    packed: torch.Tensor, num_tokens: int, num_tiles: int, block_m: int, *, is_static: bool
) -> LoRAMetadata:
    field = _field_size(num_tokens)
    return LoRAMetadata(
        token_slots=packed[:num_tokens],
        groups=[],
        sorted_token_ids=packed[field : field + num_tokens],
        tiles=packed[2 * field :].view(3, num_tiles),
        block_m=block_m,
        is_static=is_static,
        packed=packed,
    )
