"""BlockManager: paired can_allocate / allocate_slots, free, and conservation of blocks."""

from __future__ import annotations

import random

import pytest

from engine.core.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Request


def _request(num_prompt: int, request_id: str = "r") -> Request:
    return Request(request_id, list(range(num_prompt)), SamplingParams())


def test_allocate_slots_covers_the_computed_and_new_tokens() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    req = _request(9)
    assert bm.allocate_slots(req, 9)
    assert len(req.block_table) == 3  # ceil(9 / 4)
    assert len(set(req.block_table)) == 3
    assert all(0 <= b < 10 for b in req.block_table)
    assert bm.num_free_blocks == 7


def test_allocate_slots_grows_only_when_a_block_fills() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    req = _request(5)
    assert bm.allocate_slots(req, 5)
    req.num_computed_tokens = 5
    first = list(req.block_table)
    assert bm.allocate_slots(req, 3)  # positions 5..7 fit in block 2
    assert req.block_table == first
    req.num_computed_tokens = 8
    assert bm.allocate_slots(req, 1)  # position 8 needs a third block
    assert req.block_table[:2] == first
    assert len(req.block_table) == 3


def test_allocate_slots_returns_false_and_allocates_nothing_when_short() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    hog = _request(4, "hog")
    assert bm.allocate_slots(hog, 4)
    req = _request(4)
    assert not bm.can_allocate(req, 4)
    assert not bm.allocate_slots(req, 4)
    assert req.block_table == []
    assert bm.num_free_blocks == 1
    assert bm.can_allocate(req, 2)
    assert bm.allocate_slots(req, 2)
    assert bm.num_free_blocks == 0


def test_free_returns_blocks_and_clears_the_table() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    req = _request(7)
    assert bm.allocate_slots(req, 7)
    assert bm.usage == 1.0
    bm.free(req)
    assert req.block_table == []
    assert bm.num_free_blocks == 4
    assert bm.usage == 0.0


def test_usage_is_the_fraction_of_blocks_in_use() -> None:
    bm = BlockManager(num_blocks=8, block_size=16)
    req = _request(40)
    assert bm.allocate_slots(req, 40)
    assert bm.usage == pytest.approx(3 / 8)
    assert bm.num_used_blocks == 3


@pytest.mark.parametrize(("num_blocks", "block_size"), [(0, 16), (4, 0), (-1, 1)])
def test_invalid_sizes_raise_value_error(num_blocks: int, block_size: int) -> None:
    with pytest.raises(ValueError, match="BlockManager"):
        BlockManager(num_blocks, block_size)


def test_blocks_are_conserved_and_never_owned_twice_under_random_use() -> None:
    rng = random.Random(0)
    bm = BlockManager(num_blocks=32, block_size=4)
    reqs = [_request(rng.randint(1, 40), f"r{i}") for i in range(12)]
    for _ in range(2000):
        req = rng.choice(reqs)
        if rng.random() < 0.2:
            bm.free(req)
            req.num_computed_tokens = 0
        else:
            n = rng.randint(1, 9)
            could = bm.can_allocate(req, n)
            before = list(req.block_table)
            ok = bm.allocate_slots(req, n)
            assert ok == could
            if ok:
                req.num_computed_tokens += n
                assert len(req.block_table) == bm.num_blocks_for(req.num_computed_tokens)
            else:
                assert req.block_table == before
        owned = [b for r in reqs for b in r.block_table]
        assert len(owned) == len(set(owned))
        assert len(owned) + bm.num_free_blocks == bm.num_blocks
