"""Compiling the LoRA kernels before the first request needs them.

Triton compiles a kernel variant the first time a launch needs it: per tile height (the
metadata's ``block_m``), and for the expand per split of K (``SPLIT_K``, which the shrink
picks from the step's tile count). The decode graphs compile their own variants when they
are captured; steps that run eagerly (a prefill chunk, a batch above the largest graph)
would compile theirs in the middle of serving, stalling every request in the step (about
0.4 s a launch shape with an empty Triton cache). ``warm_up_lora_kernels`` launches each variant once at start-up instead, on zero
inputs, through the layers' own forward paths: the shrink kernel's, and the stacked GEMM's
(``LoRALinear.forward``) where A is stored under W.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from engine.kernels.utils import num_sms
from engine.lora.layers import LoRALinear
from engine.lora.metadata import BLOCK_MS, build_lora_metadata, tile_capacity


def tile_counts(sr: int, k: int, max_tiles: int, sms: int, programs_per_sm: int = 3) -> list[int]:
    """The smallest tile count, in 1..``max_tiles``, for each split of K the shrink may pick
    for ``sr`` rows of A over ``k`` inputs: one launch per split compiles them all."""
    # Imported here: Triton is only needed where the kernels run.
    from engine.kernels.lora_shrink_triton import split_k_for

    first: dict[int, int] = {}
    for tiles in range(1, max_tiles + 1):
        first.setdefault(split_k_for(sr, k, tiles, sms, programs_per_sm), tiles)
    return sorted(first.values())


@torch.inference_mode()
def warm_up_lora_kernels(
    layers: Mapping[str, LoRALinear], max_num_tokens: int, max_loras: int
) -> int:
    """Launch every LoRA kernel variant an eager step of at most ``max_num_tokens`` tokens
    over ``max_loras`` slots can launch, once per distinct layer shape. The layers' buffers
    must exist (the LoRA manager creates them); slot 0 is used whatever it holds, and
    nothing is written outside fresh outputs. Returns the number of (layer, metadata)
    launches made."""
    seen: set[tuple[object, ...]] = set()
    launches = 0
    for layer in layers.values():
        if not layer.lora_a:
            continue
        a = layer.lora_a_stacked  # [L, S, R, K]
        shape = (layer.in_features, tuple(layer.out_slices), layer.bias is not None, a.shape[2])
        if shape in seen:
            continue
        seen.add(shape)
        dev = layer.weight.device
        sms = num_sms(dev.index or 0) if dev.type == "cuda" else 0
        x = torch.zeros(1, layer.in_features, dtype=layer.weight.dtype, device=dev)
        sr = a.shape[1] * a.shape[2]
        per_sm = layer.kernels.launch.lora_shrink_programs_per_sm
        for block_m in BLOCK_MS:
            most = tile_capacity(max_num_tokens, max_loras, block_m)
            for tiles in tile_counts(sr, layer.in_features, most, sms, per_sm):
                meta = build_lora_metadata([0], dev, block_m=block_m, max_tiles=tiles)
                # The shrink kernel's path, which large steps take.
                layer(x, meta, stack_a=False)
                if layer.is_gate_up:  # the MLP's path: the fused expand + SiLU for tall tiles
                    layer.silu_and_mul(x, meta, stack_a=False)
                launches += 1
            if layer.can_stack_a:  # small steps: the stacked GEMM's expand, which has no split
                layer(x, meta, stack_a=True)
                if layer.is_gate_up:
                    layer.silu_and_mul(x, meta, stack_a=True)
                launches += 1
    return launches
