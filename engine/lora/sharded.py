"""LoRA layers split over tensor-parallel ranks, with vLLM's ``fully_sharded_loras`` layouts.

A column-parallel layer (fused q/k/v, fused gate/up) holds a row range of every slice's
output; a row-parallel layer (o, down) holds a column range of the input and sums partial
outputs with one all-reduce. Each adapter's ``A [r, in]`` and ``B [out, r]`` (``set_lora``
gets them whole, as the adapter manager read them) are cut to the rank's share:

======================  ==========================  ======================================
layer                   ``fully_sharded_loras`` off  on (S-LoRA's layout)
======================  ==========================  ======================================
column-parallel         A whole, B rows of the       A rows ``[rank * R/N, (rank+1) * R/N)``
                        rank's outputs; no           of the rank dim padded to ``R =
                        communication                max_lora_rank``, B as off; the shrink
                                                     output is all-gathered to ``[T, S*R]``
row-parallel            A columns of the rank's      A as off, B rows of the rank's share of
                        inputs, B whole; the shrink  the outputs: the shrink output is
                        output ``[T, r]`` is         all-reduced and the expand writes that
                        all-reduced, then every      share of the partial sums, so the delta
                        rank expands it whole after  joins the layer's own all-reduce
                        the layer's all-reduce
======================  ==========================  ======================================

Off, a column-parallel layer is a plain ``LoRALinear`` over its local slices (every fast
path of ``engine.lora.layers`` applies). The other three compute the shrink and the expand
apart, with the collective between them: the Triton kernels where ``LoRALinear`` would take
them, else a torch loop over the step's adapters at their own ranks. ``docs/architecture.md``
counts the bytes each layout moves.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from engine.config import LoRAConfig
from engine.distributed.group import TPGroup
from engine.kernels.dispatch import Kernels
from engine.lora.layers import LoRALinear
from engine.lora.manager import LoRAManager
from engine.lora.metadata import LoRAMetadata
from engine.lora.request import LoRARequest


def shrink(
    x: torch.Tensor,  # [T, K]
    lora_a: torch.Tensor,  # [L, S, R, K]
    ranks: torch.Tensor,  # [L, S] int32 on the device
    host_ranks: list[list[int]],  # the same, on the host
    lora: LoRAMetadata,
    kernels: Kernels,
) -> torch.Tensor:
    """h [T, S * R] float32: ``x · A[slot]ᵀ`` of each token's slot, per slice up to its rank.
    Entries past a rank, and rows of tokens without an adapter, are left unspecified (the
    kernel does not write them): ``expand`` never reads them."""
    if lora.has_kernel_layout and kernels.use_triton(x):
        return kernels.triton.lora_shrink(x, lora_a, ranks, lora).sum(0)
    _, num_slices, max_rank, _ = lora_a.shape
    h = torch.zeros(x.shape[0], num_slices * max_rank, dtype=torch.float32, device=x.device)
    for slot, idx in lora.groups:
        xs = x.index_select(0, idx).to(lora_a.dtype)
        for s in range(num_slices):
            r = host_ranks[slot][s]
            if r:
                cols = slice(s * max_rank, s * max_rank + r)
                h[idx, cols] = (xs @ lora_a[slot, s, :r].t()).float()
    return h


def expand(
    y: torch.Tensor,  # [T, N], updated in place (may be a column range of a wider tensor)
    h: torch.Tensor,  # [T, S * R] float32
    lora_b: torch.Tensor,  # [L, N, R]
    ranks: torch.Tensor,  # [L, S] int32 on the device
    host_ranks: list[list[int]],
    slice_offsets: torch.Tensor,  # [S + 1] int32 on the device
    out_slices: list[int],
    lora: LoRAMetadata,
    kernels: Kernels,
) -> None:
    """y[t, slice s] += h[t, s * R : s * R + rank] · B[slot(t), s]ᵀ."""
    if lora.has_kernel_layout and kernels.use_triton(y):
        kernels.triton.lora_expand(
            y, h.unsqueeze(0), lora_b, ranks, slice_offsets, out_slices, lora
        )
        return
    max_rank = lora_b.shape[2]
    offsets = [0, *itertools.accumulate(out_slices)]
    for slot, idx in lora.groups:
        hs = h.index_select(0, idx)
        for s, (lo, hi) in enumerate(itertools.pairwise(offsets)):
            r = host_ranks[slot][s]
            if r:
                b = lora_b[slot, lo:hi, :r]
                delta = hs[:, s * max_rank : s * max_rank + r].to(b.dtype) @ b.t()
                y[:, lo:hi].index_add_(0, idx, delta.to(y.dtype))


class ColumnParallelLoRALinear(LoRALinear):
    """Rows ``shards[i] = (start, size)`` of each output slice ``i`` of a layer whose whole
    slices are ``full_slices``; the input is whole. Output [T, sum(sizes)], no collective
    unless ``fully_sharded`` and the step has adapters (one all-gather of ``[T, S * R/N]``)."""

    def __init__(
        self,
        in_features: int,
        full_slices: Sequence[int],
        shards: Sequence[tuple[int, int]],
        slice_names: Sequence[str],
        group: TPGroup,
        fully_sharded: bool,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        kernels: Kernels | None = None,
    ) -> None:
        outs = [n for _, n in shards]
        super().__init__(in_features, outs, slice_names, bias, dtype, device, kernels)
        self.full_in_features = in_features
        self.full_out_slices = list(full_slices)
        self.shards = list(shards)
        self.group = group
        self.fully_sharded = fully_sharded
        self.local_ranks = torch.empty(0, dtype=torch.int32)
        self.local_slot_ranks: list[list[int]] = []

    def create_lora_buffers(self, max_loras: int, max_rank: int, dtype: torch.dtype) -> None:
        if not self.fully_sharded:
            super().create_lora_buffers(max_loras, max_rank, dtype)
            return
        world = self.group.world_size
        if max_rank % world:
            raise ValueError(
                f"max_lora_rank={max_rank} is not a multiple of tensor_parallel_size={world}, "
                "which fully_sharded_loras needs"
            )
        dev = self.weight.device
        num_slices = len(self.out_slices)
        # A: [L, S, R/N, in], this rank's rows of each adapter's rank dimension; B whole in r.
        self.lora_a_stacked = torch.zeros(
            max_loras, num_slices, max_rank // world, self.in_features, dtype=dtype, device=dev
        )
        self.lora_b_stacked = torch.zeros(
            max_loras, self.out_features, max_rank, dtype=dtype, device=dev
        )
        self.lora_ranks = torch.zeros(max_loras, num_slices, dtype=torch.int32, device=dev)
        self.local_ranks = torch.zeros_like(self.lora_ranks)
        self.slot_ranks = [[0] * num_slices for _ in range(max_loras)]
        self.local_slot_ranks = [[0] * num_slices for _ in range(max_loras)]
        offsets = [0, *itertools.accumulate(self.out_slices)]
        self.slice_offsets = torch.tensor(offsets, dtype=torch.int32, device=dev)
        self.lora_a = [self.lora_a_stacked[:, i] for i in range(num_slices)]
        self.lora_b = [self.lora_b_stacked[:, lo:hi] for lo, hi in itertools.pairwise(offsets)]

    def set_lora(self, slot: int, slice_idx: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """a: [r, in]; b: [full out_slice, r], whole; this rank keeps its share."""
        start, size = self.shards[slice_idx]
        b = b[start : start + size]
        if not self.fully_sharded:
            super().set_lora(slot, slice_idx, a, b)
            return
        r = a.shape[0]
        part = self.lora_a_stacked.shape[2]
        a = a[self.group.rank * part : (self.group.rank + 1) * part]  # [<= R/N, in]
        self.lora_a[slice_idx][slot].zero_()
        self.lora_b[slice_idx][slot].zero_()
        self.lora_a[slice_idx][slot, : a.shape[0]].copy_(a, non_blocking=True)
        self.lora_b[slice_idx][slot, :, :r].copy_(b, non_blocking=True)
        self.lora_ranks[slot, slice_idx].fill_(r)
        self.local_ranks[slot, slice_idx].fill_(a.shape[0])
        self.slot_ranks[slot][slice_idx] = r
        self.local_slot_ranks[slot][slice_idx] = a.shape[0]

    def clear_lora(self, slot: int) -> None:
        super().clear_lora(slot)
        if self.fully_sharded:
            self.local_ranks[slot].zero_()
            self.local_slot_ranks[slot] = [0] * len(self.out_slices)

    def forward(
        self, x: torch.Tensor, lora: LoRAMetadata | None = None, *, stack_a: bool | None = None
    ) -> torch.Tensor:
        if not self.fully_sharded:
            return super().forward(x, lora, stack_a=stack_a)
        y = nn.functional.linear(x, self.weight, self.bias)  # [T, out / N]
        if not self._has_deltas(lora):
            return y
        assert lora is not None
        a_args = (self.lora_a_stacked, self.local_ranks, self.local_slot_ranks)
        h = shrink(x, *a_args, lora, self.kernels)
        num_slices, part = len(self.out_slices), self.lora_a_stacked.shape[2]
        parts = self.group.all_gather(h)  # [N, T, S * R/N]
        # Rank k holds rows k * R/N .. of every slice's rank dimension: [T, S, N, R/N].
        h = parts.view(-1, x.shape[0], num_slices, part).permute(1, 2, 0, 3)
        h = h.reshape(x.shape[0], -1)  # [T, S * R]
        b_args = (self.lora_b_stacked, self.lora_ranks, self.slot_ranks, self.slice_offsets)
        expand(y, h, *b_args, self.out_slices, lora, self.kernels)
        return y

    def silu_and_mul(
        self, x: torch.Tensor, lora: LoRAMetadata | None = None, *, stack_a: bool | None = None
    ) -> torch.Tensor:
        if not self.fully_sharded:
            return super().silu_and_mul(x, lora, stack_a=stack_a)
        return self.kernels.silu_and_mul(self(x, lora))

    def stacked_lora_product(
        self, x: torch.Tensor, lora: LoRAMetadata | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.fully_sharded:
            return None  # the expand needs the gathered shrink: nothing to fuse with it
        return super().stacked_lora_product(x, lora)


class RowParallelLoRALinear(LoRALinear):
    """Columns ``shard = (start, size)`` of the input of a layer with ``full_in_features``
    inputs and ``out_features`` outputs: partial products summed by one all-reduce, the bias
    added once after it."""

    def __init__(
        self,
        full_in_features: int,
        shard: tuple[int, int],
        out_features: int,
        slice_name: str,
        group: TPGroup,
        fully_sharded: bool,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        kernels: Kernels | None = None,
    ) -> None:
        super().__init__(shard[1], [out_features], [slice_name], bias, dtype, device, kernels)
        if fully_sharded and out_features % group.world_size:
            raise ValueError(
                f"{slice_name}: {out_features} outputs do not split over "
                f"{group.world_size} ranks (fully_sharded_loras)"
            )
        self.full_in_features = full_in_features
        self.full_out_slices = [out_features]
        self.shard = shard
        self.group = group
        self.fully_sharded = fully_sharded
        # The rows of the output this rank's B covers (all of them unless fully sharded).
        part = out_features // group.world_size if fully_sharded else out_features
        self.b_rows = (group.rank * part if fully_sharded else 0, part)

    def create_lora_buffers(self, max_loras: int, max_rank: int, dtype: torch.dtype) -> None:
        dev = self.weight.device
        self.lora_a_stacked = torch.zeros(
            max_loras, 1, max_rank, self.in_features, dtype=dtype, device=dev
        )
        self.lora_b_stacked = torch.zeros(
            max_loras, self.b_rows[1], max_rank, dtype=dtype, device=dev
        )
        self.lora_ranks = torch.zeros(max_loras, 1, dtype=torch.int32, device=dev)
        self.slot_ranks = [[0] for _ in range(max_loras)]
        self.slice_offsets = torch.tensor([0, self.b_rows[1]], dtype=torch.int32, device=dev)
        self.lora_a = [self.lora_a_stacked[:, 0]]
        self.lora_b = [self.lora_b_stacked]

    def set_lora(self, slot: int, slice_idx: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """a: [r, full in]; b: [out, r], whole; this rank keeps its columns of A (and its
        rows of B when fully sharded)."""
        start, size = self.shard
        lo, n = self.b_rows
        super().set_lora(slot, slice_idx, a[:, start : start + size], b[lo : lo + n])

    def forward(
        self, x: torch.Tensor, lora: LoRAMetadata | None = None, *, stack_a: bool | None = None
    ) -> torch.Tensor:
        # x: [T, in / N] -> [T, out]
        y = nn.functional.linear(x, self.weight)  # partial sums over this rank's inputs
        h = None
        if self._has_deltas(lora):
            assert lora is not None
            a_args = (self.lora_a_stacked, self.lora_ranks, self.slot_ranks)
            h = self.group.all_reduce(shrink(x, *a_args, lora, self.kernels))  # [T, R], whole
            if self.fully_sharded:
                lo, n = self.b_rows
                self._expand(y[:, lo : lo + n], h, lora)  # joins the all-reduce below
        self.group.all_reduce(y)
        if h is not None and not self.fully_sharded:
            assert lora is not None
            self._expand(y, h, lora)
        if self.bias is not None:
            y += self.bias
        return y

    def _expand(self, y: torch.Tensor, h: torch.Tensor, lora: LoRAMetadata) -> None:
        b_args = (self.lora_b_stacked, self.lora_ranks, self.slot_ranks, self.slice_offsets)
        expand(y, h, *b_args, [self.b_rows[1]], lora, self.kernels)

    def silu_and_mul(
        self, x: torch.Tensor, lora: LoRAMetadata | None = None, *, stack_a: bool | None = None
    ) -> torch.Tensor:
        raise ValueError("a row-parallel layer is never a [gate, up] layer")

    def stacked_lora_product(
        self, x: torch.Tensor, lora: LoRAMetadata | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None


def full_module_shapes(
    layers: Mapping[str, LoRALinear],
) -> dict[str, tuple[str, int, int, int]]:
    """``lora_targets_from_layers`` with each sharded layer's whole shapes: adapters are
    checked and read whole, and each layer keeps its share in ``set_lora``."""
    shapes: dict[str, tuple[str, int, int, int]] = {}
    for key, layer in layers.items():
        parent = key.rpartition(".")[0]
        in_f = getattr(layer, "full_in_features", layer.in_features)
        outs = getattr(layer, "full_out_slices", layer.out_slices)
        for i, (name, out) in enumerate(zip(layer.slice_names, outs, strict=True)):
            shapes[f"{parent}.{name}" if parent else name] = (key, i, in_f, out)
    return shapes


@dataclass(frozen=True)
class LoRAOp:
    """An adapter-manager call rank 0 made, for the other ranks to repeat (in order)."""

    kind: str
    """load (background), add (now), remove, pin or unpin: the host cache and the device
    slots of every rank then see the same calls."""
    lora_id: int
    name: str = ""
    path: str = ""


class ShardedLoRAManager(LoRAManager):
    """The adapter manager of one rank. Rank 0's decides (host cache, slots) and records the
    calls the others repeat (``take_ops``); the others follow: ``apply_ops`` then ``place``
    puts exactly rank 0's adapter in each slot a step uses, reading it from their own host
    cache (or disk) and keeping their share."""

    def __init__(
        self,
        lora_config: LoRAConfig,
        lora_layers: Mapping[str, LoRALinear],
        device: torch.device | str,
    ) -> None:
        super().__init__(lora_config, lora_layers, device)
        self.module_shapes = full_module_shapes(self.layers)
        self._ops: list[LoRAOp] = []
        self._ops_lock = threading.Lock()

    # ---------------------------------------------------------------- rank 0
    def request_load(self, lora_request: LoRARequest) -> None:
        self._record("load", lora_request)
        super().request_load(lora_request)

    def add_lora(self, lora_request: LoRARequest) -> bool:
        added = super().add_lora(lora_request)
        self._record("add", lora_request)
        return added

    def remove_lora(self, lora_int_id: int) -> bool:
        with self._ops_lock:
            self._ops.append(LoRAOp("remove", lora_int_id))
        return super().remove_lora(lora_int_id)

    def pin(self, lora_ids: Iterable[int]) -> None:
        ids = [i for i in lora_ids if i]
        with self._ops_lock:
            self._ops.extend(LoRAOp("pin", i) for i in ids)
        super().pin(ids)

    def unpin(self, lora_ids: Iterable[int]) -> None:
        ids = list(lora_ids)
        with self._ops_lock:
            self._ops.extend(LoRAOp("unpin", i) for i in ids)
        super().unpin(ids)

    def _record(self, kind: str, req: LoRARequest) -> None:
        with self._ops_lock:
            self._ops.append(LoRAOp(kind, req.lora_int_id, req.lora_name, str(req.lora_path)))

    def take_ops(self) -> list[LoRAOp]:
        """The calls recorded since the last ``take_ops``, oldest first."""
        with self._ops_lock:
            ops, self._ops = self._ops, []
        return ops

    def slot_ids(self) -> list[int]:
        """The adapter id in each device slot (0: none)."""
        with self._lock:
            return [i or 0 for i in self._slot_ids]

    # ---------------------------------------------------------------- other ranks
    def apply_ops(self, ops: Sequence[LoRAOp]) -> None:
        with self._ops_lock:
            self._ops.clear()  # what this rank's own fallback reads recorded: nobody takes it
        for op in ops:
            if op.kind in ("remove", "pin", "unpin"):
                if op.kind == "remove":
                    super().remove_lora(op.lora_id)
                else:
                    (super().pin if op.kind == "pin" else super().unpin)([op.lora_id])
                continue
            request = LoRARequest(op.name, op.lora_id, op.path)
            if op.kind == "add":
                super().add_lora(request)
            else:
                super().request_load(request)
        self.poll_errors()  # a failed load fails at ``place``, if rank 0 ever places it

    def place(self, slot_ids: Sequence[int]) -> None:
        """Put adapter ``slot_ids[s]`` in slot ``s`` where it is not already (0: leave)."""
        for slot, want in enumerate(slot_ids):
            if not want or self._slot_ids[slot] == want:
                continue
            weights = self._host_weights(want)
            with self._lock:
                old = self._slot_ids[slot]
                if old is not None:
                    self._device_lru.pop(old, None)
                moved = self._device_lru.pop(want, None)
                if moved is not None:
                    self._slot_ids[moved] = None
                self._slot_ids[slot] = None
            self._write_slot(slot, want, weights)
        # Slots it repeated from rank 0 stay in step with its LRU order.
        self._last_activation = None


__all__ = [
    "ColumnParallelLoRALinear",
    "LoRAOp",
    "RowParallelLoRALinear",
    "ShardedLoRAManager",
    "expand",
    "full_module_shapes",
    "shrink",
]
