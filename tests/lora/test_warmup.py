"""Start-up compilation of the LoRA kernels (``engine.lora.warmup``).

On CPU: the plan covers every split of K the shrink can pick, and the warm-up launches each
distinct layer shape once per (tile height, tile count) of the plan through the layers' own
paths (the kernels interpreted). On CUDA: after the warm-up, steps of random sizes and
adapter mixes compile no new kernel variant.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import torch

pytest.importorskip("triton")

from engine.config import KernelConfig
from engine.kernels.dispatch import Kernels
from engine.kernels.lora_shrink_triton import split_k_for
from engine.lora import (
    BLOCK_MS,
    LoRALinear,
    LoRAMetadata,
    build_lora_metadata,
    tile_capacity,
    warmup,
)

CUDA = torch.cuda.is_available()

Step = Callable[[LoRALinear, torch.Tensor, LoRAMetadata | None], Any]

DEVICE = torch.device("cuda" if CUDA else "cpu")
BF16 = torch.bfloat16

# llama-3.1-8b at rank 16: (rows of A = slices * rank, in_features) of qkv, o, gate_up, down.
LLAMA_8B = [(48, 4096), (16, 4096), (32, 4096), (16, 14336)]


@pytest.mark.parametrize(("sr", "k"), LLAMA_8B)
@pytest.mark.parametrize("sms", [132, 108, 0])
def test_tile_counts_reach_every_split_the_shrink_picks(sr: int, k: int, sms: int) -> None:
    most = 8192 // 16 + 32 + 1
    plan = warmup.tile_counts(sr, k, most, sms)
    every = {split_k_for(sr, k, tiles, sms) for tiles in range(1, most + 1)}
    assert {split_k_for(sr, k, tiles, sms) for tiles in plan} == every
    assert len(plan) == len(every)  # one launch per split
    assert plan[0] == 1
    if sms == 132:  # an H200: decode-sized tile counts split K, prefill-sized ones do not
        assert split_k_for(sr, k, 47, sms) > 1
        assert split_k_for(sr, k, most, sms) == 1
        assert len(every) >= 3


def make_layer(in_f: int, slices: list[int], max_loras: int = 4, rank: int = 8) -> LoRALinear:
    # The Triton paths, on CPU too (interpreted).
    kernels = Kernels(KernelConfig(backend="triton"), DEVICE)
    names = [f"s{i}" for i in range(len(slices))]
    layer = LoRALinear(in_f, slices, names, dtype=BF16, device=DEVICE, kernels=kernels)
    layer.weight.normal_(0, 0.02)
    layer.create_lora_buffers(max_loras, rank, BF16)
    return layer


def model_layers() -> dict[str, LoRALinear]:
    """Two decoder layers' projections, the second's the same shapes as the first's."""
    out: dict[str, LoRALinear] = {}
    for i in range(2):
        out[f"layers.{i}.qkv_proj"] = make_layer(64, [64, 16, 16])
        out[f"layers.{i}.o_proj"] = make_layer(64, [64])
        out[f"layers.{i}.gate_up_proj"] = make_layer(64, [128, 128])
        out[f"layers.{i}.down_proj"] = make_layer(128, [64])
    return out


def test_warm_up_launches_each_layer_shape_through_its_paths(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    launched: list[tuple[str, tuple[int, ...], int, int, bool]] = []
    forward, silu_and_mul = LoRALinear.forward, LoRALinear.silu_and_mul

    def record(kind: str, real: Step) -> Step:
        def call(
            self: LoRALinear,
            x: torch.Tensor,
            lora: LoRAMetadata | None = None,
            *,
            stack_a: bool | None = None,
        ) -> Any:
            assert lora is not None
            assert lora.tiles is not None
            assert stack_a is not None  # the warm-up names the path
            shape = (tuple(self.out_slices), lora.block_m, lora.tiles.shape[1])
            launched.append((kind, *shape, stack_a))
            return real(self, x, lora, stack_a=stack_a)

        return call

    monkeypatch.setattr(LoRALinear, "forward", record("forward", forward))
    monkeypatch.setattr(LoRALinear, "silu_and_mul", record("silu_and_mul", silu_and_mul))
    mods = model_layers()
    launches = warmup.warm_up_lora_kernels(mods, max_num_tokens=64, max_loras=4)
    sms = 0 if DEVICE.type == "cpu" else torch.cuda.get_device_properties(0).multi_processor_count
    expected = []
    for name, layer in list(mods.items())[:4]:  # the second layer repeats the first's shapes
        key = tuple(layer.out_slices)
        sr = len(layer.out_slices) * 8
        gate_up = name.endswith("gate_up_proj")
        for block_m in BLOCK_MS:
            plan = warmup.tile_counts(sr, layer.in_features, tile_capacity(64, 4, block_m), sms)
            for tiles in plan:  # the shrink kernel's path
                expected.append(("forward", key, block_m, tiles, False))
                if gate_up:
                    expected.append(("silu_and_mul", key, block_m, tiles, False))
                    if block_m < KernelConfig().lora_fused_silu_min_block_m:  # expand, then SiLU
                        expected.append(("forward", key, block_m, tiles, False))
            # then once the stacked GEMM's, whose expand has no split (fused with the SiLU)
            expected.append(("forward", key, block_m, plan[-1], True))
            if gate_up:
                expected.append(("silu_and_mul", key, block_m, plan[-1], True))
    assert launched == expected
    assert launches == sum(1 for c in expected if c[0] == "silu_and_mul" or c[1] != (128, 128))


def test_warm_up_skips_layers_without_buffers() -> None:
    bare = LoRALinear(64, [64], ["o"], dtype=BF16, device=DEVICE)
    assert warmup.warm_up_lora_kernels({"o_proj": bare}, max_num_tokens=64, max_loras=4) == 0


@pytest.mark.gpu  # compiled kernel variants exist on CUDA only
def test_no_step_compiles_a_kernel_after_the_warm_up() -> None:
    from engine.kernels import lora_expand_triton as expand_mod
    from engine.kernels import lora_shrink_triton as shrink_mod

    max_tokens, max_loras = 512, 4
    mods = model_layers()
    warmup.warm_up_lora_kernels(mods, max_num_tokens=max_tokens, max_loras=max_loras)
    kernels = [
        shrink_mod._lora_shrink_kernel,
        expand_mod._lora_expand_kernel,
        expand_mod._lora_expand_silu_kernel,
    ]
    dev = torch.cuda.current_device()

    def variants() -> list[int]:
        return [len(k.device_caches[dev][0]) for k in kernels]

    before = variants()
    rng = random.Random(0)
    for _ in range(40):
        tokens = rng.choice([1, 2, 7, 16, 33, 100, 256, 300, max_tokens])
        slots = [rng.randrange(-1, max_loras) for _ in range(tokens)]
        if rng.random() < 0.5:  # prefill-like: long runs of one adapter
            slots = sorted(slots)
        slots[0] = max(slots[0], 0)
        meta = build_lora_metadata(slots, DEVICE)
        for name, layer in mods.items():
            x = torch.randn(tokens, layer.in_features, dtype=BF16, device=DEVICE)
            layer(x, meta)
            if name.endswith("gate_up_proj"):
                layer.silu_and_mul(x, meta)
    torch.cuda.synchronize()
    assert variants() == before
