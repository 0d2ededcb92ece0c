"""Linear layers that add each token's adapter delta to the base output.

One layer may hold several output slices (fused qkv, fused gate_up); every slice gets its
own LoRA A/B pair, as PEFT trains them on separate q/k/v or gate/up modules. Weights of up
to ``max_loras`` adapters sit in stacked, zero-padded device buffers indexed by slot; the
adapter manager writes them, the runner maps each token to a slot (``LoRAMetadata``).

Two paths compute the delta: the batched Triton kernels in ``engine.lora.kernels`` (on CUDA)
and a torch reference looping over the step's adapters (on CPU), each slice at its adapter's
own rank and skipped where the adapter does not target it. ``LORA_KERNELS`` (from the
``LORASTREAM_LORA_KERNELS`` environment variable) forces one: ``triton`` runs the kernels
on CPU too, under ``TRITON_INTERPRET=1``; ``torch`` keeps the reference on CUDA.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from engine.kernel_utils import pinned
from engine.lora.kernels.reference import add_lora_reference
from engine.model import ops
from engine.model.metadata import LoRAMetadata

LORA_KERNELS = os.environ.get("LORASTREAM_LORA_KERNELS", "auto")
"""auto (Triton on CUDA, torch elsewhere) | triton | torch; read once, tests may assign it."""

FUSED_SILU = os.environ.get("LORASTREAM_LORA_FUSED_SILU", "1") != "0"
"""gate_up's expand and the SiLU in one kernel (``LoRALinear.silu_and_mul``); 0 runs them
apart, for benchmarks. Read once, tests may assign it."""

DELTA_INTO_GEMM = os.environ.get("LORASTREAM_LORA_DELTA_INTO_GEMM", "1") != "0"
"""On the kernel path, the expand writes each token's delta and the base GEMM accumulates
onto it (``LoRALinear.forward``); 0 adds the delta to the GEMM's output in place, for
benchmarks. Layers with a bias always take the second way. Read at call time; tests and
benchmarks may assign it."""

# The fused expand + SiLU runs for tiles at least this tall. On an H200 (llama-3.1-8b
# gate_up, 32 adapters of rank 16; scripts/gpu_lora_kernels.py --fusion-only) it took
# 133 us against 234 us for expand then SiLU on a 4096-token prefill (tiles of 32). On a
# 256-token decode step (tiles of 16) the two kernels win in the engine: a graph step of
# 10.215 against 10.249 ms with the fusion (scripts/gpu_decode_step.py --switch
# engine.lora.layers:FUSED_SILU_MIN_BLOCK_M=16,32), though alone the fused kernel takes
# 24 us against 26 us for the two.
FUSED_SILU_MIN_BLOCK_M = 32

STACK_A_MAX = 256 * 2048
"""Steps of ``T`` tokens whose ``T * (rows of A)`` is at most this run the shrink inside the
base GEMM: ``x · [W; A]ᵀ`` over A stored under W (``LoRALinear.create_lora_buffers``), then
one expand; larger ones (prefill) launch the shrink kernel, which reads each adapter's A
once per tile instead of multiplying every token by every slot's A. Read at call time;
benchmarks may assign it (0 turns the stacked product off). On an H200 (llama-3.1-8b, 32
slots of rank 16, 256 tokens) the extra GEMM columns cost 13 us a layer against 28 us for
the four shrink launches."""

STACK_A_MAX_BYTES = 16 * 2**20
"""...and only for layers whose A of all slots is at most this many bytes. The stacked GEMM
reads every slot's A, up to ``max_lora_rank``, whether or not the step uses it; the shrink
kernel reads only the step's adapters, up to their ranks. 16 MiB take about 4 us at an
H200's copy rate, about the fixed cost of a shrink launch: 32 slots of rank 16 stay under it
in every llama-3.1-8b layer (down_proj: 14 MiB), while 32 slots of rank 64 (up to 56 MiB)
would make a step with one small adapter read all of them. Read at call time."""

FUSED_SILU_STACKED = True
"""With the stacked product, gate_up's expand and the SiLU run as one kernel at any tile
height. Read at call time; benchmarks may assign it."""

FUSED_QKV_ROPE = os.environ.get("LORASTREAM_LORA_FUSED_ROPE", "1") != "0"
"""With the stacked product, the q/k/v layer's expand, RoPE and the KV-cache write run as
one kernel (``engine.lora.kernels.qkv``) instead of three; ``LORASTREAM_LORA_FUSED_ROPE=0``
turns it off. On an H200 (llama-3.1-8b, 32 slots of rank 16, 256 sequences at 192 tokens)
the one launch took 7.9 us a layer against 10.6 us for the three, and the graph step 10.02 ms
against 10.09 ms (``scripts/gpu_decode_step.py --switch
engine.lora.layers:FUSED_QKV_ROPE=0,1``). Read at call time; tests and benchmarks may
assign it."""

# Tile heights the kernels are compiled for; the smallest that holds the longest segment.
# Not 64: on an H200, 32-token tiles ran a 4096-token prefill as fast or faster.
BLOCK_MS = (16, 32)


class LoRALinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_slices: Sequence[int],
        slice_names: Sequence[str],
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        assert len(out_slices) == len(slice_names)
        self.in_features = in_features
        self.out_slices = list(out_slices)
        self.slice_names = list(slice_names)
        self.out_features = sum(out_slices)
        self.weight = nn.Parameter(
            torch.empty(self.out_features, in_features, dtype=dtype, device=device),
            requires_grad=False,
        )
        self.bias = (
            nn.Parameter(
                torch.empty(self.out_features, dtype=dtype, device=device), requires_grad=False
            )
            if bias
            else None
        )
        # All slices in two buffers, so one kernel launch covers the layer (see
        # create_lora_buffers); lora_a / lora_b are per-slice views of them.
        self.lora_a_stacked = torch.empty(0)
        self.lora_b_stacked = torch.empty(0)
        # [W; A] and [bias; 0]: W, A and the bias are views of these where the adapters'
        # dtype is the model's (create_lora_buffers); None otherwise.
        self.weight_and_a: torch.Tensor | None = None
        self.bias_and_zeros: torch.Tensor | None = None
        self.lora_ranks = torch.empty(0, dtype=torch.int32)
        self.slice_offsets = torch.empty(0, dtype=torch.int32)
        self.lora_a: list[torch.Tensor] = []
        self.lora_b: list[torch.Tensor] = []
        # lora_ranks on the host, for the torch path: [slot][slice].
        self.slot_ranks: list[list[int]] = []

    def create_lora_buffers(self, max_loras: int, max_rank: int, dtype: torch.dtype) -> None:
        dev = self.weight.device
        num_slices = len(self.out_slices)
        n, k = self.out_features, self.in_features
        rows_a = max_loras * num_slices * max_rank
        # A: [max_loras, S, max_rank, in]: a slot's A of every slice is one [S * max_rank, in]
        # matrix, so the shrink kernel reads x once for all slices. Stored under W when the
        # dtypes agree: one GEMM then gives x · Wᵀ and every slot's x · Aᵀ (small steps).
        if dtype == self.weight.dtype:
            both = torch.zeros(n + rows_a, k, dtype=dtype, device=dev)
            both[:n].copy_(self.weight)
            self.weight = nn.Parameter(both[:n], requires_grad=False)
            self.weight_and_a = both
            if self.bias is not None:
                bias = torch.zeros(n + rows_a, dtype=self.bias.dtype, device=dev)
                bias[:n].copy_(self.bias)
                self.bias = nn.Parameter(bias[:n], requires_grad=False)
                self.bias_and_zeros = bias
            a = both[n:]
        else:
            a = torch.zeros(rows_a, k, dtype=dtype, device=dev)
        self.lora_a_stacked = a.view(max_loras, num_slices, max_rank, k)
        # B: [max_loras, out, max_rank]: rows of slice i at slice_offsets[i]:slice_offsets[i+1].
        self.lora_b_stacked = torch.zeros(
            max_loras, self.out_features, max_rank, dtype=dtype, device=dev
        )
        # Rank of each (slot, slice); 0 where the adapter skips the slice or the slot is free.
        # The kernels read no weights past it, so small ranks cost only their own bytes.
        self.lora_ranks = torch.zeros(max_loras, num_slices, dtype=torch.int32, device=dev)
        self.slot_ranks = [[0] * num_slices for _ in range(max_loras)]
        offsets = [0, *itertools.accumulate(self.out_slices)]
        self.slice_offsets = torch.tensor(offsets, dtype=torch.int32, device=dev)  # [S + 1]
        # Per slice: A [max_loras, max_rank, in], B [max_loras, out_slice, max_rank] (scaling
        # folded in), views of the stacked buffers.
        self.lora_a = [self.lora_a_stacked[:, i] for i in range(num_slices)]
        self.lora_b = [self.lora_b_stacked[:, lo:hi] for lo, hi in itertools.pairwise(offsets)]

    def set_lora(self, slot: int, slice_idx: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """a: [r, in]; b: [out_slice, r] already multiplied by the adapter's scaling."""
        r = a.shape[0]
        self.lora_a[slice_idx][slot].zero_()
        self.lora_b[slice_idx][slot].zero_()
        self.lora_a[slice_idx][slot, :r].copy_(a, non_blocking=True)
        self.lora_b[slice_idx][slot, :, :r].copy_(b, non_blocking=True)
        # fill_ passes r to a kernel; item assignment would copy it from pageable host memory
        # and so wait for the steps in flight (an adapter can be loaded while they run).
        self.lora_ranks[slot, slice_idx].fill_(r)
        self.slot_ranks[slot][slice_idx] = r

    def clear_lora(self, slot: int) -> None:
        self.lora_a_stacked[slot].zero_()
        self.lora_b_stacked[slot].zero_()
        self.lora_ranks[slot].zero_()
        self.slot_ranks[slot] = [0] * len(self.out_slices)

    def forward(
        self, x: torch.Tensor, lora: LoRAMetadata | None = None, *, stack_a: bool | None = None
    ) -> torch.Tensor:
        """x: [T, in] -> y: [T, out], each token's adapter delta added. ``stack_a`` picks the
        kernel path's shrink: True the stacked GEMM (``STACK_A_MAX``), False the kernel,
        None by the step's size. y may be a view with a row stride above ``out``."""
        if not self._has_deltas(lora):
            return nn.functional.linear(x, self.weight, self.bias)
        assert lora is not None
        if not (lora.has_kernel_layout and use_triton(x)):
            y = nn.functional.linear(x, self.weight, self.bias)
            ranks = self.slot_ranks or None  # None: buffers made without create_lora_buffers
            add_lora_reference(y, x, self.lora_a, self.lora_b, self.out_slices, lora, ranks)
            return y
        # Imported here: Triton decides at import whether to interpret kernels, and CPU-only
        # installs need not have it.
        from engine.lora.kernels import add_lora
        from engine.lora.kernels.expand import lora_expand
        from engine.lora.kernels.shrink import lora_shrink

        b_args = (self.lora_b_stacked, self.lora_ranks, self.slice_offsets, self.out_slices)
        if self._stacks_a(x, stack_a):
            y, h = self._stacked_product(x)
            lora_expand(y, h, *b_args, lora, h_per_slot=True)
            return y
        if not (DELTA_INTO_GEMM and self.bias is None):
            y = nn.functional.linear(x, self.weight, self.bias)
            add_lora(y, x, self.lora_a_stacked, *b_args, lora)
            return y
        # The expand writes the delta and the GEMM adds its product to it (beta = 1): y is
        # written once and read once by the GEMM, instead of written by the GEMM, then read
        # and written again by the expand.
        h = lora_shrink(x, self.lora_a_stacked, self.lora_ranks, lora)
        y = x.new_empty(x.shape[0], self.out_features)
        lora_expand(y, h, *b_args, lora, accumulate=False)
        return y.addmm_(x, self.weight.t())

    @property
    def is_gate_up(self) -> bool:
        """Two equal slices: a [gate, up] layer, which ``silu_and_mul`` serves."""
        return len(self.out_slices) == 2 and self.out_slices[0] == self.out_slices[1]

    def silu_and_mul(
        self, x: torch.Tensor, lora: LoRAMetadata | None = None, *, stack_a: bool | None = None
    ) -> torch.Tensor:
        """``silu(gate) * up`` of this [gate, up] layer's output, adapters applied: x [T, in]
        -> [T, out / 2]. Where the LoRA and the model's elementwise kernels both run and the
        tiles are prefill-tall (``FUSED_SILU_MIN_BLOCK_M``), one launch adds the adapters'
        deltas and applies the activation, so the [T, out] sum is never written back and read
        again; the result is the same, bit for bit. With the stacked product
        (``FUSED_SILU_STACKED``) the fused kernel runs at any tile height. ``stack_a`` as
        for ``forward``."""
        if not self.is_gate_up:
            raise ValueError(f"silu_and_mul needs two equal slices, got {self.out_slices}")
        if (
            FUSED_SILU
            and self._has_deltas(lora)
            and lora is not None
            and lora.has_kernel_layout
            and use_triton(x)
            and ops.use_triton(x)
        ):
            from engine.lora.kernels.expand import lora_expand_silu_and_mul
            from engine.lora.kernels.shrink import lora_shrink

            b_args = (self.lora_b_stacked, self.lora_ranks, lora)
            stack_a = self._stacks_a(x, stack_a)  # decided once: forward below takes it
            if stack_a and FUSED_SILU_STACKED:
                y, h = self._stacked_product(x)
                return lora_expand_silu_and_mul(y, h, *b_args, h_per_slot=True)
            if not stack_a and lora.block_m >= FUSED_SILU_MIN_BLOCK_M:
                y = nn.functional.linear(x, self.weight, self.bias)
                h = lora_shrink(x, self.lora_a_stacked, self.lora_ranks, lora)
                return lora_expand_silu_and_mul(y, h, *b_args)
        return ops.silu_and_mul(self(x, lora, stack_a=stack_a))

    def stacked_lora_product(
        self, x: torch.Tensor, lora: LoRAMetadata | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``x · [W; A]ᵀ`` as ``(y [T, out], h [T, L * S * R])`` when these tokens take the
        kernel path's stacked product with adapters (``forward`` would then expand h into
        y); None otherwise. For callers that fuse the expand with what follows it."""
        if not (self._has_deltas(lora) and lora is not None and lora.has_kernel_layout):
            return None
        if not (use_triton(x) and self._stacks_a(x, None)):
            return None
        return self._stacked_product(x)

    @property
    def can_stack_a(self) -> bool:
        """A is stored under W, and W and the bias are still views of the stacked buffers (a
        test or a loader may have replaced them since)."""
        both, bias = self.weight_and_a, self.bias_and_zeros
        return (
            both is not None
            and self.weight.data_ptr() == both.data_ptr()
            and (
                self.bias is None or (bias is not None and self.bias.data_ptr() == bias.data_ptr())
            )
        )

    def _stacks_a(self, x: torch.Tensor, stack_a: bool | None) -> bool:
        """Whether the kernel path takes the shrink from the stacked GEMM for these tokens."""
        if stack_a is not None:
            if stack_a and not self.can_stack_a:
                raise ValueError("stack_a=True needs A stored under W (same dtypes)")
            return stack_a
        if not self.can_stack_a:
            return False
        a = self.lora_a_stacked
        rows_a = a.shape[0] * a.shape[1] * a.shape[2]
        return (
            x.shape[0] * rows_a <= STACK_A_MAX and a.numel() * a.element_size() <= STACK_A_MAX_BYTES
        )

    def _stacked_product(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x · [W; A]ᵀ (+ [bias; 0]) -> (y [T, out], h [T, L * S * R]), views of one output."""
        assert self.weight_and_a is not None
        out = nn.functional.linear(x, self.weight_and_a, self.bias_and_zeros)
        return out[:, : self.out_features], out[:, self.out_features :]

    def _has_deltas(self, lora: LoRAMetadata | None) -> bool:
        return lora is not None and not lora.empty and bool(self.lora_a)


def use_triton(x: torch.Tensor) -> bool:
    if LORA_KERNELS == "auto":
        return x.is_cuda
    return LORA_KERNELS == "triton"


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
    # slots are cut into tiles of block_m. In numpy: 0.4 ms for an 8192-token prefill (2.1 ms
    # with a Python sort), 0.14 ms for a 256-token decode step, on a 2-core CI machine.
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

    Tile capacity: the segments of ``k`` slots (and of no adapter) over ``T`` tokens cut
    into ``block_m`` tiles number at most ``ceil(T / block_m) + k``, and never more than ``T``.
    """
    k = max(1, min(max_loras + 1, num_tokens))
    max_tiles = max(1, min(num_tokens, -(-num_tokens // block_m) + k - 1))
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
