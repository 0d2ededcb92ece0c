"""The collectives one step runs at tensor_parallel_size N, and the bytes each moves.

The model of what ``engine.model.parallel`` and ``engine.lora.sharded`` do, written once:
``docs/architecture.md``'s table comes from it, ``benchmarks/bench_tp.py`` times these
collectives at their sizes, and a test counts the real ones of a forward pass against it.

Per step of ``T`` tokens (``S`` of them sampled), ``L`` layers, hidden size ``D`` in the
model dtype, ``R = max_lora_rank`` (the shrink output is ``R`` wide per slice whatever the
adapter's rank; float32):

- base model: one all-reduce of ``[T, D]`` for the embedding, two per layer (o, down), and
  a gather of the ``[S, V/N]`` logits (model dtype) to rank 0;
- with adapters in the step, ``fully_sharded_loras`` off: two all-reduces of ``[T, R]``
  per layer (o's and down's shrink outputs);
- on: the same two, plus all-gathers of ``[T, 3R]`` (q/k/v) and ``[T, 2R]`` (gate/up) per
  layer, each rank bringing ``1/N`` of it.

"Bus bytes" are what each rank sends, as nccl-tests counts them: ``2 (N-1)/N`` of the
payload for a (ring) all-reduce, ``(N-1)/N`` of the gathered payload for an all-gather or
a gather; ``bus bytes / bus bandwidth`` is the time a collective takes at full speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

F32 = 4


@dataclass(frozen=True)
class Collective:
    name: str
    op: str
    """all_reduce | all_gather | gather."""
    shape: tuple[int, ...]
    """The reduced tensor, or the gathered result."""
    elem_bytes: int
    count: int
    """How many the step runs."""

    @property
    def payload(self) -> int:
        return math.prod(self.shape) * self.elem_bytes

    def bus_bytes(self, world_size: int) -> float:
        """Bytes each rank sends for one of them."""
        share = (world_size - 1) / world_size
        return (2 * share if self.op == "all_reduce" else share) * self.payload


def step_collectives(
    hf_config: Any,
    world_size: int,
    num_tokens: int,
    num_sampled: int,
    elem_bytes: int,
    max_lora_rank: int | None = None,
    fully_sharded: bool = False,
) -> list[Collective]:
    """The collectives of one step; ``max_lora_rank=None``: a step without adapter tokens."""
    if world_size == 1:
        return []
    t, d, layers = num_tokens, int(hf_config.hidden_size), int(hf_config.num_hidden_layers)
    vocab = math.ceil(int(hf_config.vocab_size) / world_size) * world_size
    out = [
        Collective("embedding", "all_reduce", (t, d), elem_bytes, 1),
        Collective("o_proj + down_proj", "all_reduce", (t, d), elem_bytes, 2 * layers),
    ]
    if num_sampled:
        out.append(Collective("logits to rank 0", "gather", (num_sampled, vocab), elem_bytes, 1))
    if max_lora_rank is not None:
        r = max_lora_rank
        out.append(Collective("LoRA shrink o + down", "all_reduce", (t, r), F32, 2 * layers))
        if fully_sharded:
            out.append(Collective("LoRA shrink qkv", "all_gather", (t, 3 * r), F32, layers))
            out.append(Collective("LoRA shrink gate_up", "all_gather", (t, 2 * r), F32, layers))
    return out


def step_bus_bytes(collectives: list[Collective], world_size: int) -> float:
    return sum(c.count * c.bus_bytes(world_size) for c in collectives)


__all__ = ["Collective", "step_bus_bytes", "step_collectives"]
