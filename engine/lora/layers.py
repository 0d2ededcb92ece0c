"""Linear layers that add each token's adapter delta to the base output.

One layer may hold several output slices (fused qkv, fused gate_up); every slice gets its
own LoRA A/B pair, as PEFT trains them on separate q/k/v or gate/up modules. Weights of up
to ``max_loras`` adapters sit in stacked, zero-padded device buffers indexed by slot; the
adapter manager writes them, the runner maps each token to a slot (``LoRAMetadata``).

Two paths compute the delta: the batched Triton kernels (``engine.kernels``) and a torch
reference looping over the step's adapters, each slice at its adapter's own rank and
skipped where the adapter does not target it. The layer's ``Kernels`` decides which, and
holds the fusion switches and stacking limits (``KernelConfig``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from engine.kernels.dispatch import Kernels
from engine.lora.metadata import BLOCK_MS, LoRAMetadata, build_lora_metadata


class LoRALinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_slices: Sequence[int],
        slice_names: Sequence[str],
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        kernels: Kernels | None = None,
    ) -> None:
        super().__init__()
        assert len(out_slices) == len(slice_names)
        self.kernels = kernels or Kernels()
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
        kernel path's shrink: True the stacked GEMM (``KernelConfig.lora_stack_a_max``),
        False the kernel, None by the step's size. y may be a view with a row stride above ``out``."""
        if not self._has_deltas(lora):
            return nn.functional.linear(x, self.weight, self.bias)
        assert lora is not None
        kernels = self.kernels
        triton = kernels.triton
        if not (lora.has_kernel_layout and kernels.use_triton(x)):
            y = nn.functional.linear(x, self.weight, self.bias)
            ranks = self.slot_ranks or None  # None: buffers made without create_lora_buffers
            kernels.torch.add_lora(y, x, self.lora_a, self.lora_b, self.out_slices, lora, ranks)
            return y
        b_args = (self.lora_b_stacked, self.lora_ranks, self.slice_offsets, self.out_slices)
        if self._stacks_a(x, stack_a):
            y, h = self._stacked_product(x)
            triton.lora_expand(y, h, *b_args, lora, h_per_slot=True)
            return y
        if not (kernels.config.lora_delta_into_gemm and self.bias is None):
            y = nn.functional.linear(x, self.weight, self.bias)
            triton.add_lora(y, x, self.lora_a_stacked, *b_args, lora)
            return y
        # The expand writes the delta and the GEMM adds its product to it (beta = 1): y is
        # written once and read once by the GEMM, instead of written by the GEMM, then read
        # and written again by the expand.
        h = triton.lora_shrink(x, self.lora_a_stacked, self.lora_ranks, lora)
        y = x.new_empty(x.shape[0], self.out_features)
        triton.lora_expand(y, h, *b_args, lora, accumulate=False)
        return y.addmm_(x, self.weight.t())

    @property
    def is_gate_up(self) -> bool:
        """Two equal slices: a [gate, up] layer, which ``silu_and_mul`` serves."""
        return len(self.out_slices) == 2 and self.out_slices[0] == self.out_slices[1]

    def silu_and_mul(
        self, x: torch.Tensor, lora: LoRAMetadata | None = None, *, stack_a: bool | None = None
    ) -> torch.Tensor:
        """``silu(gate) * up`` of this [gate, up] layer's output, adapters applied: x [T, in]
        -> [T, out / 2]. Where the kernels run and the tiles are prefill-tall
        (``KernelConfig.lora_fused_silu_min_block_m``), one launch adds the adapters' deltas
        and applies the activation, so the [T, out] sum is never written back and read
        again; the result is the same, bit for bit. With the stacked product
        (``lora_fused_silu_stacked``) the fused kernel runs at any tile height. ``stack_a``
        as for ``forward``."""
        if not self.is_gate_up:
            raise ValueError(f"silu_and_mul needs two equal slices, got {self.out_slices}")
        kernels = self.kernels
        cfg = kernels.config
        if (
            cfg.lora_fused_silu
            and self._has_deltas(lora)
            and lora is not None
            and lora.has_kernel_layout
            and kernels.use_triton(x)
        ):
            b_args = (self.lora_b_stacked, self.lora_ranks, lora)
            stack_a = self._stacks_a(x, stack_a)  # decided once: forward below takes it
            if stack_a and cfg.lora_fused_silu_stacked:
                y, h = self._stacked_product(x)
                return kernels.triton.lora_expand_silu_and_mul(y, h, *b_args, h_per_slot=True)
            if not stack_a and lora.block_m >= cfg.lora_fused_silu_min_block_m:
                y = nn.functional.linear(x, self.weight, self.bias)
                h = kernels.triton.lora_shrink(x, self.lora_a_stacked, self.lora_ranks, lora)
                return kernels.triton.lora_expand_silu_and_mul(y, h, *b_args)
        return kernels.silu_and_mul(self(x, lora, stack_a=stack_a))

    def stacked_lora_product(
        self, x: torch.Tensor, lora: LoRAMetadata | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``x · [W; A]ᵀ`` as ``(y [T, out], h [T, L * S * R])`` when these tokens take the
        kernel path's stacked product with adapters (``forward`` would then expand h into
        y); None otherwise. For callers that fuse the expand with what follows it."""
        if not (self._has_deltas(lora) and lora is not None and lora.has_kernel_layout):
            return None
        if not (self.kernels.use_triton(x) and self._stacks_a(x, None)):
            return None
        return self._stacked_product(x)

    def qkv_rope(
        self,
        x: torch.Tensor,
        lora: LoRAMetadata | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        num_heads: int,
    ) -> torch.Tensor | None:
        """For a [q, k, v] layer: ``x`` projected with the adapters' deltas, q and k rotated
        (``rope`` = cos, sin [T, Dh]), k and v written into ``kv_cache`` at
        ``slot_mapping``, in one launch after the stacked GEMM (``lora_fused_qkv_rope``).
        Returns q [T, H * Dh] (a view); None where these tokens do not take that path, and
        then nothing was computed."""
        if not self.kernels.config.lora_fused_qkv_rope:
            return None
        stacked = self.stacked_lora_product(x, lora)
        if stacked is None:
            return None
        assert lora is not None
        y, h = stacked
        self.kernels.triton.lora_expand_qkv_rope(
            y,
            h,
            self.lora_b_stacked,
            self.lora_ranks,
            lora,
            *rope,
            kv_cache,
            slot_mapping,
            num_heads,
        )
        return y[:, : self.out_slices[0]]

    @torch.inference_mode()
    def warm_up_qkv_rope(self, kv_cache: torch.Tensor, num_heads: int) -> int:
        """Compile ``qkv_rope`` for every tile height an eager step can use (graphs compile
        theirs at capture), on zero inputs that write no KV. Returns the launches made: none
        where this layer never takes that path."""
        x = torch.zeros(1, self.in_features, dtype=self.weight.dtype, device=self.weight.device)
        head_dim = kv_cache.shape[-1]
        cos = torch.zeros(1, head_dim, dtype=x.dtype, device=x.device)
        nowhere = torch.full((1,), -1, dtype=torch.long, device=x.device)
        launches = 0
        for block_m in BLOCK_MS:
            meta = build_lora_metadata([0], x.device, block_m=block_m)
            if self.qkv_rope(x, meta, (cos, cos), kv_cache, nowhere, num_heads) is not None:
                launches += 1
        return launches

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
        cfg = self.kernels.config
        return (
            x.shape[0] * rows_a <= cfg.lora_stack_a_max
            and a.numel() * a.element_size() <= cfg.lora_stack_a_max_bytes
        )

    def _stacked_product(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x · [W; A]ᵀ (+ [bias; 0]) -> (y [T, out], h [T, L * S * R]), views of one output."""
        assert self.weight_and_a is not None
        out = nn.functional.linear(x, self.weight_and_a, self.bias_and_zeros)
        return out[:, : self.out_features], out[:, self.out_features :]

    def _has_deltas(self, lora: LoRAMetadata | None) -> bool:
        return lora is not None and not lora.empty and bool(self.lora_a)
