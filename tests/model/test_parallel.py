"""The vocabulary-parallel embedding against a whole table, and what a model must allow to be
split over N ranks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from engine.distributed.group import TPGroup
from engine.model.parallel import VocabParallelEmbedding, check_tensor_parallel, kv_head_range
from engine.testing.ranks import run_ranks


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_embedding_matches_whole_table(world):
    vocab, dim = 10, 6  # 10 rows over 4 ranks: 3 each, the last rank padded
    table = torch.randn(vocab, dim, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([0, 9, 3, 3, 5, 2, 8, 1])

    def run(group: TPGroup) -> torch.Tensor:
        emb = VocabParallelEmbedding(vocab, dim, group, torch.float32, torch.device("cpu"))
        local = table[emb.start : emb.start + emb.rows]
        emb.weight.zero_()
        emb.weight[: local.shape[0]].copy_(local)
        return emb(ids)

    for got in run_ranks(world, run):
        torch.testing.assert_close(got, F.embedding(ids, table))


def test_kv_heads_are_split_or_replicated_by_rank():
    assert [kv_head_range(8, 4, r) for r in range(4)] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    # Fewer KV heads than ranks: rank r's query heads use KV head r * Hkv // N.
    assert [kv_head_range(2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]


@pytest.mark.parametrize(
    ("heads", "kv_heads", "inter", "world", "problem"),
    [
        (4, 2, 128, 3, "4 attention heads"),
        (8, 6, 128, 4, "6 key/value heads"),
        (8, 8, 100, 8, "intermediate size 100"),
    ],
)
def test_a_size_that_does_not_divide_the_model_is_refused(heads, kv_heads, inter, world, problem):
    cfg = SimpleNamespace(
        num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=inter
    )
    with pytest.raises(ValueError, match=f"tensor_parallel_size={world} is invalid") as info:
        check_tensor_parallel(cfg, world)
    assert problem in str(info.value)


def test_sizes_that_divide_the_model_are_accepted():
    cfg = SimpleNamespace(num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336)
    for world in (1, 2, 4, 8, 16):  # 16 > 8 KV heads: replicated
        check_tensor_parallel(cfg, world)
