"""Linear layers that add each token's adapter delta to the base output.

One layer may hold several output slices (fused qkv, fused gate_up); every slice gets its
own LoRA A/B pair, as PEFT trains them on separate q/k/v or gate/up modules. Weights of up
to ``max_loras`` adapters sit in stacked, zero-padded device buffers indexed by slot; the
adapter manager writes them, the runner maps each token to a slot (``LoRAMetadata``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from engine.model.metadata import LoRAMetadata


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
            nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )
        # Per slice: A [max_loras, max_rank, in], B [max_loras, out_slice, max_rank] (scaling folded in).
        self.lora_a: list[torch.Tensor] = []
        self.lora_b: list[torch.Tensor] = []

    def create_lora_buffers(self, max_loras: int, max_rank: int, dtype: torch.dtype) -> None:
        dev = self.weight.device
        self.lora_a = [
            torch.zeros(max_loras, max_rank, self.in_features, dtype=dtype, device=dev)
            for _ in self.out_slices
        ]
        self.lora_b = [
            torch.zeros(max_loras, n, max_rank, dtype=dtype, device=dev) for n in self.out_slices
        ]

    def set_lora(self, slot: int, slice_idx: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """a: [r, in]; b: [out_slice, r] already multiplied by the adapter's scaling."""
        r = a.shape[0]
        self.lora_a[slice_idx][slot].zero_()
        self.lora_b[slice_idx][slot].zero_()
        self.lora_a[slice_idx][slot, :r].copy_(a, non_blocking=True)
        self.lora_b[slice_idx][slot, :, :r].copy_(b, non_blocking=True)

    def clear_lora(self, slot: int) -> None:
        for a, b in zip(self.lora_a, self.lora_b, strict=True):
            a[slot].zero_()
            b[slot].zero_()

    def forward(self, x: torch.Tensor, lora: LoRAMetadata | None = None) -> torch.Tensor:
        # x: [T, in] -> y: [T, out]
        y = nn.functional.linear(x, self.weight, self.bias)
        if lora is not None and not lora.empty and self.lora_a:
            add_lora_reference(y, x, self.lora_a, self.lora_b, self.out_slices, lora)
        return y


def add_lora_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    out_slices: list[int],
    lora: LoRAMetadata,
) -> None:
    """Plain torch: for each adapter in the batch, y[tokens, slice] += x[tokens] @ A.T @ B.T."""
    for slot, idx in lora.groups:
        xs = x.index_select(0, idx)  # [n, in]
        offset = 0
        for a, b, n in zip(lora_a, lora_b, out_slices, strict=True):
            delta = (xs @ a[slot].t()) @ b[slot].t()  # [n, out_slice]
            y[:, offset : offset + n].index_add_(0, idx, delta.to(y.dtype))
            offset += n


def build_lora_metadata(token_slots: list[int], device: torch.device) -> LoRAMetadata:
    """Per-step LoRA metadata from each token's device slot (-1: no adapter)."""
    groups: dict[int, list[int]] = {}
    for t, s in enumerate(token_slots):
        if s >= 0:
            groups.setdefault(s, []).append(t)
    return LoRAMetadata(
        token_slots=torch.tensor(token_slots, dtype=torch.long).to(device),
        groups=[(s, torch.tensor(ix, dtype=torch.long).to(device)) for s, ix in groups.items()],
    )
