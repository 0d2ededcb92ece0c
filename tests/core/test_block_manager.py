"""BlockManager: paired can_allocate / allocate_slots, free, conservation of blocks, and
prefix caching: block hashes, sharing per adapter, reference counts, LRU eviction."""

from __future__ import annotations

import random

import pytest

from engine.core.block_manager import BlockManager
from engine.core.kv_cache_utils import ROOT_HASH, block_hashes, hash_block_tokens
from engine.lora.request import LoRARequest
from engine.sampling_params import SamplingParams
from engine.sequence import PLACEHOLDER, Request


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


# ---------------------------------------------------------------- prefix caching
def _prompt(tokens: list[int], request_id: str = "r", lora_id: int = 0) -> Request:
    lora = LoRARequest(f"a{lora_id}", lora_id, f"/adapters/{lora_id}") if lora_id else None
    return Request(request_id, list(tokens), SamplingParams(), lora_request=lora)


def _compute(bm: BlockManager, req: Request, num_tokens: int | None = None) -> None:
    """Admit ``req`` as the scheduler does: its cached blocks, then slots for the rest."""
    cached = bm.find_cached_blocks(req)
    req.num_computed_tokens = 0
    n = (req.num_tokens if num_tokens is None else num_tokens) - len(cached) * bm.block_size
    assert bm.allocate_slots(req, n, cached)
    req.num_computed_tokens = len(cached) * bm.block_size + n


def test_block_hash_chains_parent_tokens_and_adapter() -> None:
    a = hash_block_tokens(ROOT_HASH, [1, 2, 3, 4], 0)
    assert a == hash_block_tokens(ROOT_HASH, [1, 2, 3, 4], 0)
    assert len(a) == 32  # SHA-256: not Python's hash, which a prompt could be made to collide
    others = {
        hash_block_tokens(ROOT_HASH, [1, 2, 3, 5], 0),  # a token
        hash_block_tokens(ROOT_HASH, [2, 1, 3, 4], 0),  # the order
        hash_block_tokens(ROOT_HASH, [1, 2, 3, 4], 1),  # an adapter against the base model
        hash_block_tokens(ROOT_HASH, [1, 2, 3, 4], 2),  # another adapter
        hash_block_tokens(a, [1, 2, 3, 4], 0),  # the same tokens after another block
    }
    assert a not in others
    assert len(others) == 5


def test_request_block_hashes_cover_full_blocks_of_known_tokens() -> None:
    req = _prompt(list(range(10)), lora_id=3)
    hashes = block_hashes(req, 4, 10)
    assert hashes == [
        hash_block_tokens(ROOT_HASH, [0, 1, 2, 3], 3),
        hash_block_tokens(hashes[0], [4, 5, 6, 7], 3),
    ]  # positions 8 and 9 fill no block
    req.output_token_ids += [10, PLACEHOLDER]
    assert len(block_hashes(req, 4, 10)) == 2  # the third block's last token is not known
    req.output_token_ids[-1] = 11
    assert block_hashes(req, 4, 10)[2] == hash_block_tokens(hashes[1], [8, 9, 10, 11], 3)


def test_same_prefix_and_adapter_share_full_blocks_and_never_the_last_token() -> None:
    bm = BlockManager(num_blocks=16, block_size=4, enable_caching=True)
    prompt = list(range(100, 110))  # 2 full blocks and 2 tokens
    first = _prompt(prompt, "first", lora_id=1)
    _compute(bm, first)
    same = _prompt([*prompt[:8], 7, 7, 7], "same", lora_id=1)
    assert bm.find_cached_blocks(same) == first.block_table[:2]
    whole = _prompt(prompt[:8], "whole", lora_id=1)  # all of it cached: the last is computed
    assert bm.find_cached_blocks(whole) == first.block_table[:1]
    assert bm.find_cached_blocks(_prompt(prompt, "other", lora_id=2)) == []
    assert bm.find_cached_blocks(_prompt(prompt, "base")) == []
    assert bm.find_cached_blocks(_prompt([0, *prompt], "shifted", lora_id=1)) == []
    _compute(bm, same)
    assert same.block_table[:2] == first.block_table[:2]
    assert [bm.ref_count(b) for b in same.block_table] == [2, 2, 1]
    assert bm.num_used_blocks == 4


def test_partial_blocks_and_blocks_not_yet_computed_are_not_cached() -> None:
    bm = BlockManager(num_blocks=16, block_size=4, enable_caching=True)
    prompt = list(range(100, 111))
    first = _prompt(prompt, "first")
    _compute(bm, first, num_tokens=5)  # a first chunk: one full block computed
    assert bm.find_cached_blocks(_prompt(prompt, "b")) == first.block_table[:1]
    assert bm.allocate_slots(first, 6)
    first.num_computed_tokens = 11
    assert bm.find_cached_blocks(_prompt(prompt, "c")) == first.block_table[:2]
    assert bm.num_cached_blocks == 2  # positions 8..10 fill no block


def test_a_block_completed_by_a_placeholder_is_cached_once_its_token_is_known() -> None:
    bm = BlockManager(num_blocks=16, block_size=4, enable_caching=True)
    req = _prompt([100, 101, 102], "r")
    _compute(bm, req)  # positions 0..2; the sampled token is a placeholder
    req.output_token_ids.append(PLACEHOLDER)
    assert bm.allocate_slots(req, 1)  # the next step computes position 3: still unknown
    req.num_computed_tokens = 4
    assert bm.num_cached_blocks == 0
    req.output_token_ids[0] = 103
    req.output_token_ids.append(PLACEHOLDER)
    assert bm.allocate_slots(req, 1)  # the step after: position 3 is known now
    req.num_computed_tokens = 5
    assert bm.find_cached_blocks(_prompt([100, 101, 102, 103, 9], "s")) == req.block_table[:1]


def test_freed_cached_blocks_stay_findable_and_are_revived_by_a_hit() -> None:
    bm = BlockManager(num_blocks=4, block_size=4, enable_caching=True)
    prompt = list(range(100, 109))
    first = _prompt(prompt, "first", lora_id=1)
    _compute(bm, first)  # 3 blocks, 2 of them cached
    blocks = list(first.block_table)
    bm.free(first)
    assert bm.num_free_blocks == 4
    assert bm.usage == 0.0
    again = _prompt(prompt, "again", lora_id=1)
    assert bm.find_cached_blocks(again) == blocks[:2]
    # 2 cached + 2 new blocks: only 2 blocks are free once the cached ones are revived.
    long = _prompt([*prompt[:8], *range(9)], "long", lora_id=1)
    cached = bm.find_cached_blocks(long)
    assert not bm.can_allocate(long, 9, cached)
    assert not bm.allocate_slots(long, 9, cached)
    assert long.block_table == []
    assert bm.num_free_blocks == 4
    assert [bm.ref_count(b) for b in blocks[:2]] == [0, 0]
    assert bm.allocate_slots(long, 8, cached)
    assert long.block_table[:2] == blocks[:2]
    assert bm.num_free_blocks == 0
    assert bm.num_evictions == 0


def test_eviction_takes_never_cached_blocks_first_then_the_least_recently_freed() -> None:
    bm = BlockManager(num_blocks=8, block_size=2, enable_caching=True)
    old, new = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]  # 2 full blocks each, and a partial one

    def found(tokens: list[int]) -> int:
        return len(bm.find_cached_blocks(_prompt(tokens, "probe")))

    for i, tokens in enumerate((old, new)):
        req = _prompt(tokens, f"r{i}")
        _compute(bm, req)
        bm.free(req)
    assert bm.num_free_blocks == 8
    assert bm.num_cached_blocks == 4
    # 2 blocks never used and the 2 partial ones come first: nothing is evicted.
    assert bm.allocate_slots(_prompt(list(range(20, 28)), "fresh"), 8)
    assert (bm.num_evictions, found(old), found(new)) == (0, 2, 2)
    # Then old's blocks (freed first), its last block before its first.
    taker = _prompt(list(range(30, 37)), "taker")
    expected = [(1, 1, 2), (2, 0, 2), (3, 0, 1), (4, 0, 0)]
    for n, (evictions, left_old, left_new) in enumerate(expected, start=1):
        assert bm.allocate_slots(taker, 1)  # one block of 2 positions
        taker.num_computed_tokens = 2 * n
        assert (bm.num_evictions, found(old), found(new)) == (evictions, left_old, left_new)


def test_evict_adapter_forgets_only_that_adapters_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=2, enable_caching=True)
    one, two = _prompt([1, 2, 3], "one", lora_id=1), _prompt([1, 2, 3], "two", lora_id=2)
    _compute(bm, one)
    _compute(bm, two)
    bm.free(one)
    bm.evict_adapter(1)
    assert bm.find_cached_blocks(_prompt([1, 2, 3], "x", lora_id=1)) == []
    assert bm.find_cached_blocks(_prompt([1, 2, 3], "y", lora_id=2)) == two.block_table[:1]
    assert bm.num_free_blocks == 6
    assert bm.num_cached_blocks == 1


def test_reset_prefix_cache_forgets_every_block_and_keeps_holders_running() -> None:
    bm = BlockManager(num_blocks=8, block_size=2, enable_caching=True)
    done, running = _prompt([1, 2, 3], "done"), _prompt([4, 5, 6], "running")
    _compute(bm, done)
    _compute(bm, running)
    bm.free(done)
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0
    assert bm.find_cached_blocks(_prompt([1, 2, 3], "x")) == []
    assert bm.find_cached_blocks(_prompt([4, 5, 6], "y")) == []
    assert bm.num_used_blocks == 2
    assert bm.num_free_blocks == 6
    bm.free(running)
    assert bm.num_free_blocks == 8


def test_without_caching_nothing_is_found_or_kept() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    first = _prompt([1, 2, 3, 4, 5], "first")
    _compute(bm, first)
    assert bm.find_cached_blocks(_prompt([1, 2, 3, 4, 5], "second")) == []
    bm.free(first)
    assert bm.num_cached_blocks == 0


def test_shared_blocks_are_conserved_under_random_use() -> None:
    rng = random.Random(1)
    bm = BlockManager(num_blocks=24, block_size=2, enable_caching=True)
    stems = [[rng.randint(0, 3) for _ in range(16)] for _ in range(2)]
    reqs: list[Request] = []
    for step in range(3000):
        if len(reqs) < 8 and rng.random() < 0.3:
            n = rng.randint(1, 16)
            req = _prompt(rng.choice(stems)[:n], f"r{step}", lora_id=rng.randint(0, 2))
            cached = bm.find_cached_blocks(req)
            assert len(cached) * 2 < req.num_tokens
            if bm.allocate_slots(req, req.num_tokens - 2 * len(cached), cached):
                req.num_computed_tokens = req.num_tokens
                reqs.append(req)
            else:
                assert req.block_table == []
        elif reqs and rng.random() < 0.3:
            req = reqs.pop(rng.randrange(len(reqs)))
            bm.free(req)
        elif reqs:  # one more token
            req = rng.choice(reqs)
            req.output_token_ids.append(rng.randint(0, 3))
            if bm.allocate_slots(req, 1):
                req.num_computed_tokens += 1
            else:
                req.output_token_ids.pop()
        counts: dict[int, int] = {}
        for r in reqs:
            assert len(r.block_table) == bm.num_blocks_for(r.num_computed_tokens)
            for b in r.block_table:
                counts[b] = counts.get(b, 0) + 1
        assert all(bm.ref_count(b) == n for b, n in counts.items())
        assert len(counts) == bm.num_used_blocks
        assert bm.num_used_blocks + bm.num_free_blocks == bm.num_blocks
    assert bm.num_evictions > 0
