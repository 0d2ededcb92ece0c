"""The collectives a sharded forward pass really runs (counted on 2 gloo ranks) are the ones
``engine.distributed.traffic`` predicts, which docs/architecture.md and the benchmark use."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from engine import EngineArgs
from engine.distributed.group import TPGroup
from engine.distributed.traffic import step_collectives
from engine.lora.sharded import ShardedLoRAManager
from engine.model.parallel import load_sharded_model
from engine.testing.forward import PagedDriver
from engine.testing.ranks import run_ranks
from tests.engine.test_matches_peft import lora_requests

MAX_RANK = 32


class CountingGroup(TPGroup):
    """Records (op, payload bytes) of every collective it runs."""

    def __init__(self, group: TPGroup) -> None:
        super().__init__(group.rank, group.world_size, group.pg)
        self.seen: Counter[tuple[str, int]] = Counter()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.seen["all_reduce", x.numel() * x.element_size()] += 1
        return super().all_reduce(x)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        self.seen["all_gather", self.world_size * x.numel() * x.element_size()] += 1
        return super().all_gather(x)

    def gather_to_leader(self, x: torch.Tensor) -> torch.Tensor | None:
        self.seen["gather", self.world_size * x.numel() * x.element_size()] += 1
        return super().gather_to_leader(x)


@pytest.mark.parametrize("fully_sharded", [False, True], ids=["off", "fully-sharded"])
@pytest.mark.parametrize("with_adapter", [False, True], ids=["base", "adapter"])
def test_counted_collectives_match_the_model(tiny_model_dir, fully_sharded, with_adapter):
    args = EngineArgs(
        model=str(tiny_model_dir), device="cpu", dtype="float32", tensor_parallel_size=2,
        enable_lora=True, max_lora_rank=MAX_RANK, fully_sharded_loras=fully_sharded,
    )  # fmt: skip
    config = args.create_engine_config()
    assert config.lora is not None
    tokens = [5, 17, 99, 3, 250, 7, 42]
    lora = lora_requests(tiny_model_dir)[2]  # rank 32 on all seven modules

    def run(group: TPGroup) -> Counter[tuple[str, int]]:
        counting = CountingGroup(group)
        model = load_sharded_model(config, counting)
        manager = ShardedLoRAManager(config.lora, model.lora_layers(), "cpu")
        try:
            manager.add_lora(lora)
            slot = manager.activate([lora.lora_int_id])[lora.lora_int_id]
            driver = PagedDriver(model, num_blocks=8, block_size=16)
            slots = {"seq": slot} if with_adapter else None
            counting.seen.clear()
            driver.step({"seq": tokens}, slots)  # logits of every token
        finally:
            manager.close()
        return counting.seen

    want: Counter[tuple[str, int]] = Counter()
    for c in step_collectives(
        config.hf_config, 2, len(tokens), len(tokens), 4,
        MAX_RANK if with_adapter else None, fully_sharded,
    ):  # fmt: skip
        want[c.op, c.payload] += c.count
    for seen in run_ranks(2, run):
        assert seen == want
