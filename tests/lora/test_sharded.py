"""Each sharded LoRA layer, on 2 and 4 gloo ranks, against the unsharded layer's math
(plain matmuls per token: y = W x + b + B (A x) for the token's adapter), with
fully_sharded_loras off and on."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from engine.config import KernelConfig
from engine.distributed.group import TPGroup
from engine.kernels.dispatch import Kernels
from engine.lora import build_lora_metadata
from engine.lora.metadata import LoRAMetadata
from engine.lora.sharded import ColumnParallelLoRALinear, RowParallelLoRALinear
from engine.model.parallel import kv_head_range
from engine.testing.forward import make_lora_metadata
from engine.testing.ranks import run_ranks

IN = 32
HEAD_DIM, HEADS, KV_HEADS = 4, 4, 2  # q 16, k 8, v 8: at 4 ranks each KV head is replicated
MAX_LORAS, MAX_RANK = 4, 32
RANKS = {0: 8, 1: 16, 2: 32}  # slot -> adapter rank; slot 3 stays empty
TOKEN_SLOTS = [-1, 0, 0, 1, 2, 2, -1, 1, 0, 2, 3]


class _OneAtATime:
    """A Triton kernel whose launches hold a lock: the interpreter is not thread-safe, and
    the ranks here are threads (a launch never spans a collective, so none waits on one)."""

    def __init__(self, kernel: Any, lock: threading.Lock) -> None:
        self.kernel, self.lock = kernel, lock

    def __getitem__(self, grid: Any) -> Any:
        launch = self.kernel[grid]

        def locked(*args: Any, **kwargs: Any) -> Any:
            with self.lock:
                return launch(*args, **kwargs)

        return locked


@pytest.fixture(params=["torch", "triton"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Kernels:
    """The torch loop (CPU's path) and the Triton kernels (CUDA's; interpreted on CPU)."""
    if request.param == "torch":
        return Kernels(KernelConfig(backend="torch"))
    if torch.cuda.is_available():
        pytest.skip("CPU tensors: on a GPU the kernels run in tests/lora/test_kernels.py")
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    from engine.kernels import lora_expand_triton, lora_shrink_triton

    lock = threading.Lock()
    for mod in (lora_shrink_triton, lora_expand_triton):
        for name, value in list(vars(mod).items()):
            if name.endswith("_kernel") and isinstance(value, InterpretedFunction):
                monkeypatch.setattr(mod, name, _OneAtATime(value, lock))
    return Kernels(KernelConfig(backend="triton"))


def metadata(kernels: Kernels, slots: list[int]) -> LoRAMetadata:
    if kernels.config.backend == "triton":
        return build_lora_metadata(slots, "cpu")
    return make_lora_metadata(slots)


def adapters(slices: list[int], in_features: int, seed: int) -> dict[int, list]:
    """Per slot, per slice: (A [r, in], B [out, r]) or None (slot 1 skips slice 1)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[int, list] = {}
    for slot, r in RANKS.items():
        out[slot] = [
            None
            if slot == 1 and i == 1 and len(slices) > 1
            else (
                torch.randn(r, in_features, generator=gen) / 4,
                torch.randn(n, r, generator=gen) / 4,
            )
            for i, n in enumerate(slices)
        ]
    return out


def reference(
    weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, pairs: dict, slices: list[int]
) -> torch.Tensor:
    rows = []
    for t, slot in enumerate(TOKEN_SLOTS):
        y = weight.double() @ x[t].double() + bias.double()
        if slot in pairs:
            deltas = [
                torch.zeros(n, dtype=torch.float64)
                if p is None
                else p[1].double() @ (p[0].double() @ x[t].double())
                for p, n in zip(pairs[slot], slices, strict=True)
            ]
            y = y + torch.cat(deltas)
        rows.append(y)
    return torch.stack(rows).float()


@pytest.mark.parametrize("fully_sharded", [False, True], ids=["off", "fully-sharded"])
@pytest.mark.parametrize("world", [2, 4])
def test_column_parallel_qkv_matches_unsharded(world, fully_sharded, kernels):
    slices = [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM]
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(sum(slices), IN, generator=gen) / 4
    bias = torch.randn(sum(slices), generator=gen)
    x = torch.randn(len(TOKEN_SLOTS), IN, generator=gen)
    pairs = adapters(slices, IN, seed=1)
    want = reference(weight, bias, x, pairs, slices)

    def run(group: TPGroup) -> None:
        heads = HEADS // world
        kv_start, kv_heads = kv_head_range(KV_HEADS, world, group.rank)
        q = (group.rank * heads * HEAD_DIM, heads * HEAD_DIM)
        kv = (kv_start * HEAD_DIM, kv_heads * HEAD_DIM)
        shards = [q, kv, kv]
        layer = ColumnParallelLoRALinear(
            IN, slices, shards, ["q", "k", "v"], group, fully_sharded, bias=True, kernels=kernels
        )
        offsets = [0, slices[0], slices[0] + slices[1]]
        rows = torch.cat(
            [torch.arange(o + s, o + s + n) for o, (s, n) in zip(offsets, shards, strict=True)]
        )
        layer.weight.copy_(weight[rows])
        assert layer.bias is not None
        layer.bias.copy_(bias[rows])
        layer.create_lora_buffers(MAX_LORAS, MAX_RANK, torch.float32)
        for slot, per_slice in pairs.items():
            for i, pair in enumerate(per_slice):
                if pair is not None:
                    layer.set_lora(slot, i, *pair)
        got = layer(x, metadata(kernels, TOKEN_SLOTS))
        torch.testing.assert_close(got, want[:, rows], rtol=1e-4, atol=1e-4)
        # No adapter in the step: the base layer alone (and no collective).
        base = layer(x, metadata(kernels, [-1] * len(TOKEN_SLOTS)))
        torch.testing.assert_close(base, (x @ weight.t() + bias)[:, rows], rtol=1e-4, atol=1e-4)

    run_ranks(world, run)


@pytest.mark.parametrize("fully_sharded", [False, True], ids=["off", "fully-sharded"])
@pytest.mark.parametrize("world", [2, 4])
def test_row_parallel_matches_unsharded(world, fully_sharded, kernels):
    full_in, out = 2 * IN, 24
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(out, full_in, generator=gen) / 4
    bias = torch.randn(out, generator=gen)
    x = torch.randn(len(TOKEN_SLOTS), full_in, generator=gen)
    pairs = adapters([out], full_in, seed=3)
    want = reference(weight, bias, x, pairs, [out])

    def run(group: TPGroup) -> None:
        part = full_in // world
        cols = slice(group.rank * part, (group.rank + 1) * part)
        layer = RowParallelLoRALinear(
            full_in, (group.rank * part, part), out, "down_proj", group, fully_sharded,
            bias=True, kernels=kernels,
        )  # fmt: skip
        layer.weight.copy_(weight[:, cols])
        assert layer.bias is not None
        layer.bias.copy_(bias)
        layer.create_lora_buffers(MAX_LORAS, MAX_RANK, torch.float32)
        for slot, (pair,) in pairs.items():
            layer.set_lora(slot, 0, *pair)
        got = layer(x[:, cols], metadata(kernels, TOKEN_SLOTS))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    run_ranks(world, run)


def test_fully_sharded_needs_rank_divisible_by_world():
    def run(group: TPGroup) -> None:
        layer = ColumnParallelLoRALinear(IN, [8], [(group.rank * 4, 4)], ["q"], group, True)
        with pytest.raises(ValueError, match="max_lora_rank=1 is not a multiple"):
            layer.create_lora_buffers(MAX_LORAS, 1, torch.float32)

    run_ranks(2, run)
