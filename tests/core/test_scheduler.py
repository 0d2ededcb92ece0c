"""Scheduler: continuous batching, token budget, adapter limit, preemption, bounded
adapter wait, stops. Hand-built requests and a fake runner — no model, no torch in the core."""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.config import EngineArgs, SchedulerConfig
from engine.core.block_manager import BlockManager
from engine.core.scheduler import PLACEHOLDER, ScheduledRequest, Scheduler, SchedulerOutput
from engine.errors import PromptTooLong
from engine.lora.request import LoRARequest
from engine.sampling_params import SamplingParams
from engine.sequence import Request, RequestStatus

EOS = 2


def _config(**overrides: int | bool | None) -> SchedulerConfig:
    fields: dict[str, int | bool | None] = {
        "max_num_seqs": 8,
        "max_num_batched_tokens": 64,
        "max_model_len": 64,
        "max_loras": 0,
        "max_lora_wait_steps": 64,
        "enable_chunked_prefill": True,
    }
    fields.update(overrides)
    return SchedulerConfig(**fields)  # type: ignore[arg-type]


def _scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    lora_ready: Callable[[int], bool] | None = None,
    prefix_caching: bool = False,
    **config: int | bool | None,
) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, enable_caching=prefix_caching)
    if lora_ready is None:
        return Scheduler(_config(**config), bm)
    return Scheduler(_config(**config), bm, lora_ready)


_arrivals = iter(range(10**9))


def _request(
    request_id: str,
    num_prompt: int = 4,
    max_tokens: int | None = 4,
    lora_id: int = 0,
    priority: int = 0,
    **params: object,
) -> Request:
    lora = LoRARequest(f"a{lora_id}", lora_id, f"/adapters/{lora_id}") if lora_id else None
    return Request(
        request_id=request_id,
        prompt_token_ids=[
            100 + (sum(map(ord, request_id)) + 7 * i) % 50 for i in range(num_prompt)
        ],
        sampling_params=SamplingParams(max_tokens=max_tokens, **params),  # type: ignore[arg-type]
        lora_request=lora,
        eos_token_id=EOS,
        priority=priority,
        arrival_time=float(next(_arrivals)),
    )


def _next_token(context: list[int]) -> int:
    """The fake model: a deterministic function of the whole context, never EOS."""
    return 100 + (sum((i + 1) * t for i, t in enumerate(context)) * 31 + 7) % 50


class FakeRunner:
    """Writes every computed token's "KV" into its slot and samples from what the cache
    holds, so a wrong block table, a skipped position or a stale block changes (or fails)
    the output. As in a model, the KV at a position stands for the adapter and every token
    up to it, and is built from the KV at the position before: a shared block whose content
    is not the request's own prefix under its adapter fails the check at sampling."""

    def __init__(self, block_size: int, prefix_caching: bool = False) -> None:
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        """Blocks may hold KV another request wrote: only their content is checked."""
        # slot -> (request id that wrote it, adapter id, the tokens at positions 0..p)
        self.kv: dict[int, tuple[str, int, tuple[int, ...]]] = {}

    def _slot(self, req: Request, pos: int) -> int:
        return req.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def execute(
        self, out: SchedulerOutput, previous: dict[str, int] | None = None
    ) -> dict[str, int]:
        """``previous``: the tokens sampled by the step launched before this one, which a
        ``PLACEHOLDER`` stands for (as the runner fills them on the device)."""
        sampled: dict[str, int] = {}
        for s in out.scheduled:
            req = s.request
            end = s.start_position + s.num_new_tokens
            tokens = req.token_ids_slice(s.start_position, end)
            if PLACEHOLDER in tokens:
                assert tokens.index(PLACEHOLDER) == len(tokens) - 1, "placeholder not last"
                assert previous is not None
                tokens[-1] = previous[req.request_id]
            for pos, tok in zip(range(s.start_position, end), tokens, strict=True):
                before = self.kv[self._slot(req, pos - 1)][2] if pos else ()
                self.kv[self._slot(req, pos)] = (req.request_id, req.lora_int_id, (*before, tok))
            if s.sample:
                context = self.kv[self._slot(req, end - 1)][2]
                for pos in range(end):
                    owner, lora_id, prefix = self.kv[self._slot(req, pos)]
                    assert (lora_id, prefix) == (req.lora_int_id, context[: pos + 1]), "stale KV"
                    if not self.prefix_caching:
                        assert owner == req.request_id, "stale KV slot"
                sampled[req.request_id] = _next_token(list(context))
        return sampled


def _reference_output(req: Request, max_len: int) -> list[int]:
    """What the fake model generates for ``req`` when nothing gets in the way."""
    tokens = list(req.prompt_token_ids)
    out: list[int] = []
    max_tokens = req.sampling_params.max_tokens or 10**9
    while True:
        out.append(_next_token(tokens))
        tokens.append(out[-1])
        if out[-1] in req.sampling_params.stop_token_ids:
            return out
        if len(out) >= max_tokens or len(tokens) >= max_len:
            return out


def _step(
    sched: Scheduler, runner: FakeRunner, check: bool = False
) -> tuple[SchedulerOutput, list[Request]]:
    """One engine step; with ``check``, the invariants are checked after each half."""
    out = _schedule(sched, check)
    changed = sched.update_from_output(out, runner.execute(out)) if out.scheduled else []
    if check:
        _check_blocks(sched)
    return out, changed


InFlight = deque[tuple[SchedulerOutput, dict[str, int]]]


def _pipelined_step(
    sched: Scheduler,
    runner: FakeRunner,
    in_flight: InFlight,
    check: bool = False,
    launched: list[SchedulerOutput] | None = None,
) -> list[Request]:
    """One engine step with async scheduling: launch a step (two when none is in flight)
    before collecting the oldest, as ``EngineCore.step`` does. Launched steps are appended
    to ``launched``."""

    def launch() -> None:
        out = _schedule(sched, check)
        if out.scheduled:
            sampled = runner.execute(out, in_flight[-1][1] if in_flight else None)
            sched.advance(out)
            in_flight.append((out, sampled))
            if launched is not None:
                launched.append(out)

    if not in_flight:
        launch()
    if len(in_flight) == 1:
        launch()
    if not in_flight:
        return []
    out, sampled = in_flight.popleft()
    changed = sched.update_from_output(out, sampled)
    if check:
        _check_blocks(sched)
    return changed


def _ids(out: SchedulerOutput) -> list[str]:
    return [s.request.request_id for s in out.scheduled]


def _schedule(sched: Scheduler, check: bool) -> SchedulerOutput:
    """``sched.schedule()``; with ``check``, the invariants are checked on its output."""
    running_before = {r.request_id for r in sched.running}
    out = sched.schedule()
    if check:
        _check_schedule(sched, out, running_before)
    return out


def _is_decode(s: ScheduledRequest, running_before: set[str]) -> bool:
    """A running request's next token after its whole prompt."""
    return (
        s.request_id in running_before
        and s.num_new_tokens == 1
        and s.start_position >= s.request.num_prompt_tokens
    )


def _check_schedule(
    sched: Scheduler, out: SchedulerOutput, running_before: set[str] | None = None
) -> None:
    cfg = sched.config
    bm = sched.block_manager
    assert len(sched.running) <= cfg.max_num_seqs
    assert out.num_scheduled_tokens <= cfg.max_num_batched_tokens
    cap = cfg.max_num_mixed_prefill_tokens
    if running_before is not None and cap is not None and cfg.enable_chunked_prefill:
        decodes = [s for s in out.scheduled if _is_decode(s, running_before)]
        if decodes:
            num_prefill = out.num_scheduled_tokens - len(decodes)
            assert num_prefill <= cap, f"{num_prefill} prompt tokens in a step with decodes"
    scheduled_loras = {s.request.lora_int_id for s in out.scheduled if s.request.lora_int_id}
    running_loras = {r.lora_int_id for r in sched.running if r.lora_int_id}
    if cfg.max_loras:
        assert len(running_loras) <= cfg.max_loras
    assert scheduled_loras <= running_loras == out.active_lora_ids
    assert len({s.request.request_id for s in out.scheduled}) == len(out.scheduled)
    for s in out.scheduled:
        req = s.request
        assert s.num_new_tokens >= 1
        assert len(req.block_table) >= bm.num_blocks_for(s.start_position + s.num_new_tokens)
        assert req.status == RequestStatus.RUNNING
        assert s.start_position == req.num_computed_tokens
        assert s.start_position + s.num_new_tokens <= req.num_tokens
        assert s.sample == (s.start_position + s.num_new_tokens == req.num_tokens)
    _check_blocks(sched)


def _check_blocks(sched: Scheduler) -> None:
    bm = sched.block_manager
    for req in sched.waiting:
        assert req.block_table == []
        assert req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
    holders: dict[int, list[Request]] = {}
    for r in sched.requests.values():
        assert len(set(r.block_table)) == len(r.block_table), "a block twice in one table"
        for b in r.block_table:
            holders.setdefault(b, []).append(r)
    for b, reqs in holders.items():
        assert bm.ref_count(b) == len(reqs)
        if not bm.enable_caching:
            assert len(reqs) == 1, "a block is owned twice"
        assert len({r.lora_int_id for r in reqs}) == 1, "a block shared across adapters"
    assert len(holders) == bm.num_used_blocks
    assert bm.num_used_blocks + bm.num_free_blocks == bm.num_blocks
    assert set(sched.requests) == {r.request_id for r in sched.waiting + sched.running}


# ---------------------------------------------------------------- batching and budget
def test_new_requests_join_running_ones_every_step() -> None:
    sched = _scheduler()
    runner = FakeRunner(4)
    sched.add_request(_request("a", max_tokens=5))
    out, _ = _step(sched, runner)
    assert _ids(out) == ["a"]
    sched.add_request(_request("b", max_tokens=5))
    out, _ = _step(sched, runner)
    assert _ids(out) == ["a", "b"]
    assert [s.num_new_tokens for s in out.scheduled] == [1, 4]  # a decodes, b prefills
    assert all(s.sample for s in out.scheduled)
    sched.add_request(_request("c", max_tokens=5))
    out, _ = _step(sched, runner)
    assert _ids(out) == ["a", "b", "c"]


def test_long_prompt_is_chunked_and_sampled_only_on_the_last_chunk() -> None:
    sched = _scheduler(max_num_batched_tokens=8)
    runner = FakeRunner(4)
    req = _request("long", num_prompt=20)
    sched.add_request(req)
    chunks = []
    for _ in range(3):
        out, changed = _step(sched, runner)
        (s,) = out.scheduled
        chunks.append((s.start_position, s.num_new_tokens, s.sample))
    assert chunks == [(0, 8, False), (8, 8, False), (16, 4, True)]
    assert req.num_output_tokens == 1
    assert changed == [req]


def test_running_decodes_share_the_budget_with_a_prefill_chunk() -> None:
    sched = _scheduler(max_num_batched_tokens=8)
    runner = FakeRunner(4)
    sched.add_request(_request("a", num_prompt=4, max_tokens=10))
    _step(sched, runner)
    sched.add_request(_request("long", num_prompt=20))
    out, _ = _step(sched, runner)
    assert [(s.request_id, s.num_new_tokens, s.sample) for s in out.scheduled] == [
        ("a", 1, True),
        ("long", 7, False),
    ]


def test_without_chunked_prefill_a_prompt_waits_for_a_budget_it_fits_in() -> None:
    sched = _scheduler(max_num_batched_tokens=32, max_model_len=32, enable_chunked_prefill=False)
    runner = FakeRunner(4)
    for i in range(3):
        sched.add_request(_request(f"d{i}", num_prompt=10, max_tokens=3))
    sched.add_request(_request("long", num_prompt=30))
    sched.add_request(_request("small", num_prompt=1))
    out, _ = _step(sched, runner)
    assert _ids(out) == [
        "d0",
        "d1",
        "d2",
    ]  # 30 tokens: "long" does not fit, "small" stays behind it
    out, _ = _step(sched, runner)
    assert _ids(out) == ["d0", "d1", "d2"]  # 3 decodes + 30 > 32
    for _ in range(3):
        out, _ = _step(sched, runner)
        if "long" in _ids(out):
            break
    long_s = next(s for s in out.scheduled if s.request_id == "long")
    assert (long_s.num_new_tokens, long_s.sample) == (30, True)


def test_a_request_short_of_blocks_holds_back_later_ones() -> None:
    sched = _scheduler(num_blocks=4, block_size=4, max_model_len=32)
    runner = FakeRunner(4)
    sched.add_request(_request("a", num_prompt=8, max_tokens=2))
    _step(sched, runner)  # 2 blocks left
    sched.add_request(_request("big", num_prompt=12))
    sched.add_request(_request("small", num_prompt=2))
    out, _ = _step(sched, runner)
    assert _ids(out) == ["a"]  # big needs 3 blocks; small would fit but comes after big
    out, _ = _step(sched, runner)
    assert _ids(out) == ["big", "small"]  # a finished


def test_chunked_prefill_off_needs_a_budget_of_max_model_len() -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        _scheduler(max_num_batched_tokens=16, max_model_len=32, enable_chunked_prefill=False)


def test_max_num_seqs_caps_the_running_set() -> None:
    sched = _scheduler(max_num_seqs=2)
    runner = FakeRunner(4)
    for i in range(4):
        sched.add_request(_request(f"r{i}", max_tokens=2))
    out, _ = _step(sched, runner)
    assert _ids(out) == ["r0", "r1"]
    assert sched.num_running == 2
    assert sched.num_waiting == 2
    out, _ = _step(sched, runner)  # r0 and r1 finish
    out, _ = _step(sched, runner)
    assert _ids(out) == ["r2", "r3"]


def test_lower_priority_value_is_admitted_first_then_arrival() -> None:
    sched = _scheduler(max_num_seqs=1)
    runner = FakeRunner(4)
    for rid, prio in [("late-low", 5), ("first", 0), ("urgent", -1), ("second", 0)]:
        sched.add_request(_request(rid, max_tokens=1, priority=prio))
    order = []
    while sched.has_unfinished_requests():
        out, _ = _step(sched, runner)
        order += _ids(out)
    assert order == ["urgent", "first", "second", "late-low"]


# ---------------------------------------------------------------- adapters
def test_max_loras_limits_distinct_adapters_and_base_model_never_counts() -> None:
    sched = _scheduler(max_loras=2)
    runner = FakeRunner(4)
    for rid, lora in [("x", 1), ("base", 0), ("y", 2), ("z", 3), ("x2", 1)]:
        sched.add_request(_request(rid, lora_id=lora, max_tokens=3))
    out, _ = _step(sched, runner)
    assert _ids(out) == ["x", "base", "y", "x2"]  # z's adapter would be a third
    assert out.active_lora_ids == {1, 2}
    while "z" not in _ids(out):
        out, _ = _step(sched, runner)
    assert out.active_lora_ids == {3}


def test_adapter_not_ready_is_skipped_without_blocking_others_then_admitted() -> None:
    ready = {1: False, 2: True}
    sched = _scheduler(max_loras=1, lora_ready=lambda i: ready[i])
    runner = FakeRunner(4)
    sched.add_request(_request("slow", lora_id=1, max_tokens=2))
    sched.add_request(_request("base", max_tokens=2))
    out, _ = _step(sched, runner)
    assert _ids(out) == ["base"]
    assert out.active_lora_ids == frozenset()  # a request not yet loaded holds no slot
    sched.add_request(_request("fast", lora_id=2, max_tokens=2))
    out, _ = _step(sched, runner)
    assert _ids(out) == ["base", "fast"]
    ready[1] = True
    out, _ = _step(sched, runner)  # fast still holds the only slot
    assert "slow" not in _ids(out)
    out, _ = _step(sched, runner)
    assert _ids(out) == ["slow"]
    assert out.active_lora_ids == {1}


def _stream_until_admitted(
    max_lora_wait_steps: int, gen_len: int, max_steps: int
) -> tuple[Request, list[list[str]], int | None]:
    """max_loras=1; every step one new adapter-1 request and one base-model request, and at
    step 2 (first in line) one adapter-2 request ``b``. Returns b, the ids scheduled per step
    and the step at which b is first scheduled (None if never)."""
    sched = _scheduler(
        max_loras=1, max_num_seqs=16, num_blocks=256, max_lora_wait_steps=max_lora_wait_steps
    )
    runner = FakeRunner(4)
    b = _request("b", lora_id=2, max_tokens=gen_len)
    steps: list[list[str]] = []
    for step in range(max_steps):
        if step == 2:
            b.arrival_time = float(next(_arrivals))
            sched.add_request(b)
        sched.add_request(_request(f"a{step}", lora_id=1, max_tokens=gen_len))
        sched.add_request(_request(f"base{step}", max_tokens=gen_len))
        out, _ = _step(sched, runner, check=True)
        steps.append(_ids(out))
        if "b" in steps[-1]:
            return b, steps, step
    return b, steps, None


def test_without_a_wait_bound_a_stream_of_one_adapter_starves_another() -> None:
    b, _, admitted = _stream_until_admitted(max_lora_wait_steps=10**9, gen_len=4, max_steps=60)
    assert admitted is None
    assert b.num_bypassed_steps == 60 - 2


def test_starving_adapter_request_is_admitted_within_the_bound() -> None:
    wait, gen_len = 5, 4
    b, steps, admitted = _stream_until_admitted(wait, gen_len, max_steps=60)
    assert admitted is not None
    # b arrives at step 2 and is bypassed in steps 2 .. 2+wait-1: adapter-1 requests behind
    # it still join. In step 2+wait its count exceeds the bound and they stop joining; the
    # adapter-1 requests running then need at most gen_len - 1 more steps, then b joins.
    for step in range(2, 2 + wait):
        assert f"a{step}" in steps[step]
    assert f"a{2 + wait}" not in steps[2 + wait]
    assert admitted <= 2 + wait + gen_len - 1
    assert b.num_bypassed_steps == 0  # reset on admission


def test_base_model_requests_still_join_while_an_adapter_request_starves() -> None:
    wait, gen_len = 0, 6
    _, steps, admitted = _stream_until_admitted(wait, gen_len, max_steps=60)
    assert admitted is not None
    gated = steps[2:admitted]
    assert gated, "b had to wait for adapter 1 to drain"
    for step, ids in enumerate(gated, start=2):
        assert f"base{step}" in ids  # base-model requests are never held
        assert f"a{step}" not in ids  # adapter-1 requests behind b are held


def test_only_the_oldest_adapter_blocked_request_counts_bypassed_steps() -> None:
    sched = _scheduler(max_loras=1)
    runner = FakeRunner(4)
    sched.add_request(_request("x", lora_id=1, max_tokens=10))
    _step(sched, runner)
    first, second = _request("y", lora_id=2), _request("z", lora_id=3)
    sched.add_request(first)
    sched.add_request(second)
    for _ in range(3):
        _step(sched, runner)
    assert (first.num_bypassed_steps, second.num_bypassed_steps) == (3, 0)


def test_starving_request_keeps_adapters_held_while_its_adapter_reloads() -> None:
    ready = {1: True, 2: True}
    sched = _scheduler(max_loras=1, max_lora_wait_steps=0, lora_ready=lambda i: ready[i])
    runner = FakeRunner(4)
    sched.add_request(_request("x", lora_id=1, max_tokens=3))
    _step(sched, runner)
    b = _request("b", lora_id=2)
    sched.add_request(b)
    _step(sched, runner)  # b is blocked and, with a bound of 0, starving at once
    assert b.num_bypassed_steps == 1
    ready[2] = False  # say the adapter manager evicted it from host memory
    sched.add_request(_request("x2", lora_id=1))
    sched.add_request(_request("base"))
    out, _ = _step(sched, runner)
    assert _ids(out) == ["x", "base"]  # x finishes; x2 may not take adapter 1 past b
    out, _ = _step(sched, runner)
    assert _ids(out) == ["base"]  # the free slot waits for b
    ready[2] = True
    out, _ = _step(sched, runner)
    assert "b" in _ids(out)
    assert "x2" not in _ids(out)


# ---------------------------------------------------------------- preemption
def test_newest_running_request_is_preempted_when_an_older_one_needs_blocks() -> None:
    # 3 blocks of 2 tokens: old's 4-token prompt takes 2, new's 1-token prompt takes 1.
    sched = _scheduler(num_blocks=3, block_size=2, max_model_len=16)
    runner = FakeRunner(2)
    old = _request("old", num_prompt=4, max_tokens=8)
    new = _request("new", num_prompt=1, max_tokens=8)
    sched.add_request(old)
    sched.add_request(new)
    _step(sched, runner, check=True)
    out, _ = _step(sched, runner, check=True)  # old's position 4 needs a third block
    assert _ids(out) == ["old"]
    assert out.preempted == [new]
    assert new.status == RequestStatus.PREEMPTED
    assert (new.num_computed_tokens, new.block_table, new.num_preemptions) == (0, [], 1)
    assert new.num_output_tokens == 1  # kept, to be recomputed
    assert sched.waiting == [new]
    assert sched.get_stats().num_preemptions == 1


def test_request_preempts_itself_when_it_is_the_newest() -> None:
    sched = _scheduler(num_blocks=3, block_size=2, max_model_len=16)
    runner = FakeRunner(2)
    old = _request("old", num_prompt=2, max_tokens=8)
    new = _request("new", num_prompt=2, max_tokens=8)
    sched.add_request(old)
    sched.add_request(new)
    _step(sched, runner, check=True)  # one block each, one free
    out, _ = _step(sched, runner, check=True)  # position 2 of both needs a block: old gets it
    assert _ids(out) == ["old"]
    assert out.preempted == [new]
    assert old.num_preemptions == 0
    out, _ = _step(sched, runner, check=True)  # nothing free: new stays waiting
    assert _ids(out) == ["old"]
    assert new.status == RequestStatus.PREEMPTED


def test_no_request_is_admitted_in_a_step_that_preempted() -> None:
    sched = _scheduler(num_blocks=4, block_size=2, max_model_len=16, max_num_seqs=2)
    runner = FakeRunner(2)
    sched.add_request(_request("old", num_prompt=2, max_tokens=8))
    new = _request("new", num_prompt=4, max_tokens=8)
    sched.add_request(new)
    _step(sched, runner)  # 1 + 2 blocks
    sched.add_request(_request("urgent", num_prompt=1, max_tokens=8, priority=-1))
    out, _ = _step(sched, runner, check=True)  # new preempts itself, freeing 2 blocks
    assert out.preempted == [new]
    assert _ids(out) == ["old"]  # memory is tight: urgent waits a step although it would fit
    out, _ = _step(sched, runner, check=True)
    assert "urgent" in _ids(out)


def test_preempted_request_goes_back_ahead_of_later_arrivals() -> None:
    sched = _scheduler(num_blocks=3, block_size=2, max_model_len=16, max_num_seqs=2)
    runner = FakeRunner(2)
    old = _request("old", num_prompt=4, max_tokens=8)
    new = _request("new", num_prompt=1, max_tokens=8)
    sched.add_request(old)
    sched.add_request(new)
    later = _request("later", num_prompt=1, max_tokens=8)
    sched.add_request(later)
    _step(sched, runner)
    _step(sched, runner)  # new is preempted
    assert sched.waiting == [new, later]


def test_preempted_request_resumes_with_the_same_tokens() -> None:
    def run(num_blocks: int) -> tuple[dict[str, list[int]], int, list[int]]:
        sched = _scheduler(
            num_blocks=num_blocks, block_size=2, max_model_len=32, max_num_batched_tokens=8
        )
        runner = FakeRunner(2)
        reqs = [_request(f"r{i}", num_prompt=3 + i, max_tokens=10) for i in range(3)]
        for r in reqs:
            sched.add_request(r)
        num_outputs_at_resume: list[int] = []
        while sched.has_unfinished_requests():
            out, _ = _step(sched, runner, check=True)
            num_outputs_at_resume += [
                s.request.num_output_tokens
                for s in out.scheduled
                if s.request.num_preemptions and s.start_position == 0
            ]
        outputs = {r.request_id: r.output_token_ids for r in reqs}
        return outputs, sched.num_preemptions, num_outputs_at_resume

    roomy, no_preemptions, _ = run(num_blocks=64)
    tight, num_preemptions, resumed = run(num_blocks=10)
    assert no_preemptions == 0
    assert num_preemptions > 0
    assert tight == roomy
    # A resumed request recomputes its prompt and its earlier outputs before sampling again.
    assert resumed
    assert all(n >= 1 for n in resumed)


# ---------------------------------------------------------------- abort and finish
def test_abort_frees_blocks_at_once_and_reports_the_id_next_step() -> None:
    sched = _scheduler()
    runner = FakeRunner(4)
    running, waiting = _request("running", num_prompt=9), _request("waiting")
    sched.add_request(running)
    _step(sched, runner)
    sched.add_request(waiting)
    assert sched.block_manager.num_used_blocks == 3
    aborted = sched.abort_requests(["running", "waiting", "unknown"])
    assert aborted == [running, waiting]
    assert all(r.status == RequestStatus.FINISHED_ABORTED for r in aborted)
    assert running.block_table == []
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    assert not sched.has_unfinished_requests()
    out = sched.schedule()
    assert out.finished_request_ids == {"running", "waiting"}
    assert sched.schedule().finished_request_ids == frozenset()


def test_request_aborted_while_its_step_runs_is_left_alone() -> None:
    sched = _scheduler()
    runner = FakeRunner(4)
    req = _request("r")
    sched.add_request(req)
    out = sched.schedule()
    sampled = runner.execute(out)
    sched.abort_requests("r")
    assert sched.update_from_output(out, sampled) == []
    assert req.output_token_ids == []
    assert req.status == RequestStatus.FINISHED_ABORTED


def test_finish_requests_frees_with_the_given_status() -> None:
    sched = _scheduler()
    runner = FakeRunner(4)
    req = _request("r", max_tokens=10)
    sched.add_request(req)
    _step(sched, runner)
    assert sched.finish_requests(["r"], RequestStatus.FINISHED_STOPPED) == [req]
    assert req.status == RequestStatus.FINISHED_STOPPED
    assert sched.block_manager.num_used_blocks == 0
    with pytest.raises(ValueError, match="not a finished status"):
        sched.finish_requests(["x"], RequestStatus.RUNNING)


# ---------------------------------------------------------------- stops
def _run_scripted(
    req: Request, tokens: list[int], num_blocks: int = 64, block_size: int = 4, **config: int
) -> list[Request]:
    """Feed ``tokens`` as the sampled tokens of ``req`` until it finishes."""
    sched = Scheduler(_config(**config), BlockManager(num_blocks, block_size))
    sched.add_request(req)
    changed: list[Request] = []
    for tok in tokens:
        out = sched.schedule()
        changed = sched.update_from_output(out, {req.request_id: tok})
        if req.is_finished:
            break
    assert changed == [req]
    return changed


def test_max_tokens_finishes_with_length() -> None:
    req = _request("r", max_tokens=3)
    _run_scripted(req, [7, 8, 9, 10])
    assert (req.status, req.output_token_ids) == (RequestStatus.FINISHED_LENGTH, [7, 8, 9])


def test_max_model_len_finishes_with_length() -> None:
    req = _request("r", num_prompt=6, max_tokens=None)
    _run_scripted(req, [7] * 10, max_model_len=8)
    assert req.status == RequestStatus.FINISHED_LENGTH
    assert req.num_tokens == 8


def test_eos_finishes_with_stop_and_no_stop_reason() -> None:
    req = _request("r", max_tokens=10)
    _run_scripted(req, [7, EOS, 9])
    assert (req.status, req.stop_reason) == (RequestStatus.FINISHED_STOPPED, None)
    assert req.output_token_ids == [7, EOS]


def test_ignore_eos_keeps_generating() -> None:
    req = _request("r", max_tokens=3, ignore_eos=True)
    _run_scripted(req, [EOS, EOS, EOS])
    assert req.status == RequestStatus.FINISHED_LENGTH


def test_stop_token_id_finishes_with_the_token_as_stop_reason() -> None:
    req = _request("r", max_tokens=10, stop_token_ids=[42])
    _run_scripted(req, [7, 42])
    assert (req.status, req.stop_reason) == (RequestStatus.FINISHED_STOPPED, 42)


def test_min_tokens_suppresses_eos_and_stop_tokens() -> None:
    req = _request("r", max_tokens=10, min_tokens=3, stop_token_ids=[42])
    _run_scripted(req, [EOS, 42, EOS])
    assert req.status == RequestStatus.FINISHED_STOPPED
    assert req.output_token_ids == [EOS, 42, EOS]


def test_stop_token_wins_over_length_on_the_same_token() -> None:
    req = _request("r", max_tokens=2, stop_token_ids=[42])
    _run_scripted(req, [7, 42])
    assert (req.status, req.stop_reason) == (RequestStatus.FINISHED_STOPPED, 42)


def test_sequence_stops_with_length_when_the_cache_cannot_hold_another_token() -> None:
    # 2 blocks of 4 = 8 token positions: the 9th token is sampled but could never be computed.
    req = _request("r", num_prompt=6, max_tokens=None)
    _run_scripted(req, [7] * 10, num_blocks=2, block_size=4, max_model_len=64)
    assert req.status == RequestStatus.FINISHED_LENGTH
    assert req.num_tokens == 9


def test_first_token_time_is_set_on_the_first_sample() -> None:
    sched = _scheduler(max_num_batched_tokens=4)
    req = _request("r", num_prompt=6)
    sched.add_request(req)
    sched.update_from_output(sched.schedule(), {})
    assert req.first_token_time is None
    sched.update_from_output(sched.schedule(), {"r": 7})
    assert req.first_token_time is not None


# ---------------------------------------------------------------- async scheduling
def _run_pipelined(sched: Scheduler, runner: FakeRunner) -> list[SchedulerOutput]:
    """Step with async scheduling until everything finishes; returns the launched steps."""
    in_flight: InFlight = deque()
    launched: list[SchedulerOutput] = []
    while sched.has_unfinished_requests() or in_flight:
        _pipelined_step(sched, runner, in_flight, check=True, launched=launched)
    return launched


def test_next_step_is_scheduled_on_a_placeholder_of_the_running_one() -> None:
    sched = _scheduler()
    runner = FakeRunner(4)
    req = _request("r", num_prompt=4, max_tokens=3)
    sched.add_request(req)
    first = sched.schedule()
    sampled = runner.execute(first)
    sched.advance(first)
    assert req.output_token_ids == [PLACEHOLDER]
    second = sched.schedule()  # before the first step's token is known
    assert [(s.start_position, s.num_new_tokens, s.sample) for s in second.scheduled] == [
        (4, 1, True)
    ]
    sampled2 = runner.execute(second, sampled)
    sched.advance(second)
    assert sched.update_from_output(first, sampled) == [req]
    assert req.output_token_ids == [sampled["r"], PLACEHOLDER]
    sched.update_from_output(second, sampled2)
    assert req.output_token_ids == [sampled["r"], sampled2["r"]]
    assert req.output_token_ids == _reference_output(req, 64)[:2]


def test_request_ending_by_length_is_not_scheduled_past_its_last_token() -> None:
    sched = _scheduler()
    runner = FakeRunner(4)
    req = _request("r", num_prompt=5, max_tokens=3)
    sched.add_request(req)
    launched = _run_pipelined(sched, runner)
    # 5 prompt tokens, then one token per sample but the last: 7 computed, never an 8th.
    assert sum(s.num_new_tokens for o in launched for s in o.scheduled) == 5 + 3 - 1
    assert req.status == RequestStatus.FINISHED_LENGTH
    assert req.output_token_ids == _reference_output(req, 64)


def test_stop_token_found_a_step_late_drops_the_token_computed_after_it() -> None:
    sched = _scheduler()
    runner = FakeRunner(4)
    probe = _request("p", num_prompt=4, max_tokens=3)
    stop = _reference_output(probe, 64)[1]  # the second token this prompt generates
    req = _request("p", num_prompt=4, max_tokens=10, stop_token_ids=[stop])
    sched.add_request(req)
    launched = _run_pipelined(sched, runner)
    # The step after the stop token was launched before it was known...
    assert sum(s.num_new_tokens for o in launched for s in o.scheduled) == 4 + 2
    # ...and what it computed is not part of the output.
    assert req.output_token_ids == _reference_output(probe, 64)[:2]
    assert (req.status, req.stop_reason) == (RequestStatus.FINISHED_STOPPED, stop)
    assert sched.block_manager.num_used_blocks == 0


def test_request_aborted_with_a_step_in_flight_gets_no_more_tokens() -> None:
    sched = _scheduler()
    runner = FakeRunner(4)
    req = _request("r", max_tokens=10)
    sched.add_request(req)
    in_flight: InFlight = deque()
    _pipelined_step(sched, runner, in_flight)
    assert len(in_flight) == 1
    sched.abort_requests("r")
    out, sampled = in_flight.popleft()
    assert sched.update_from_output(out, sampled) == []
    assert req.status == RequestStatus.FINISHED_ABORTED
    assert sched.block_manager.num_used_blocks == 0


# ---------------------------------------------------------------- admission errors
def test_prompt_of_max_model_len_is_rejected() -> None:
    sched = _scheduler(max_model_len=16)
    with pytest.raises(PromptTooLong, match="16 tokens; max_model_len is 16"):
        sched.add_request(_request("r", num_prompt=16))
    assert not sched.has_unfinished_requests()


def test_prompt_larger_than_the_whole_cache_is_rejected() -> None:
    sched = _scheduler(num_blocks=4, block_size=4, max_model_len=64)
    sched.add_request(_request("fits", num_prompt=16))
    with pytest.raises(
        PromptTooLong, match=r"17 tokens, which need 5 KV-cache blocks of 4; the cache has 4"
    ):
        sched.add_request(_request("r", num_prompt=17))
    assert sched.num_waiting == 1


def test_stats_report_queue_sizes_usage_adapters_and_preemptions() -> None:
    sched = _scheduler(max_loras=2, max_num_seqs=1)
    sched.add_request(_request("x", lora_id=3, num_prompt=8))
    sched.add_request(_request("y", lora_id=4))
    _step(sched, FakeRunner(4))
    stats = sched.get_stats()
    assert (stats.num_waiting, stats.num_running, stats.num_preemptions) == (1, 1, 0)
    assert stats.active_lora_ids == {3}
    assert stats.kv_cache_usage == pytest.approx(2 / 64)


# ---------------------------------------------------------------- prompt cap of mixed steps
def _shares(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(s.request_id, s.num_new_tokens) for s in out.scheduled]


@pytest.mark.parametrize("cap", [8, None], ids=["cap", "no-cap"])
def test_a_step_with_decodes_takes_at_most_the_cap_of_prompt_tokens(cap: int | None) -> None:
    sched = _scheduler(max_num_batched_tokens=32, max_num_mixed_prefill_tokens=cap)
    runner = FakeRunner(4)
    sched.add_request(_request("a", num_prompt=4, max_tokens=20))
    sched.add_request(_request("b", num_prompt=4, max_tokens=20))
    out, _ = _step(sched, runner, check=True)
    assert _shares(out) == [("a", 4), ("b", 4)]  # no decodes yet: no cap
    sched.add_request(_request("long", num_prompt=20, max_tokens=2))
    sched.add_request(_request("c", num_prompt=6, max_tokens=2))
    steps = [_shares(_step(sched, runner, check=True)[0]) for _ in range(4)]
    if cap is None:  # decodes wait for every prompt token the budget allows
        assert steps[0] == [("a", 1), ("b", 1), ("long", 20), ("c", 6)]
        return
    assert steps == [
        [("a", 1), ("b", 1), ("long", 8)],
        [("a", 1), ("b", 1), ("long", 8)],
        [("a", 1), ("b", 1), ("long", 4), ("c", 4)],
        [("a", 1), ("b", 1), ("long", 1), ("c", 2)],  # long decodes now
    ]


def test_a_step_without_decodes_takes_prompts_up_to_the_budget() -> None:
    sched = _scheduler(max_num_batched_tokens=32, max_num_mixed_prefill_tokens=4)
    runner = FakeRunner(4)
    sched.add_request(_request("long", num_prompt=20, max_tokens=2))
    sched.add_request(_request("c", num_prompt=6, max_tokens=2))
    out, _ = _step(sched, runner, check=True)
    assert _shares(out) == [("long", 20), ("c", 6)]


def test_decodes_behind_a_capped_prefill_still_run() -> None:
    sched = _scheduler(max_num_batched_tokens=12, max_num_mixed_prefill_tokens=4)
    runner = FakeRunner(4)
    sched.add_request(_request("d", num_prompt=2, max_tokens=20))
    _step(sched, runner)
    sched.add_request(_request("p", num_prompt=30, max_tokens=2, priority=-1))
    assert _shares(_step(sched, runner, check=True)[0]) == [("d", 1), ("p", 4)]
    for _ in range(6):  # p comes first now, but its chunks stop at the cap; d still decodes
        assert _shares(_step(sched, runner, check=True)[0]) == [("p", 4), ("d", 1)]
    assert _shares(_step(sched, runner, check=True)[0]) == [("p", 2), ("d", 1)]
    assert _shares(_step(sched, runner, check=True)[0]) == [("p", 1), ("d", 1)]


def test_cap_does_not_apply_without_chunked_prefill() -> None:
    sched = _scheduler(
        max_num_batched_tokens=64, max_num_mixed_prefill_tokens=4, enable_chunked_prefill=False
    )
    runner = FakeRunner(4)
    sched.add_request(_request("a", num_prompt=4, max_tokens=5))
    _step(sched, runner)
    sched.add_request(_request("long", num_prompt=20, max_tokens=2))
    assert _shares(_step(sched, runner)[0]) == [("a", 1), ("long", 20)]  # a prompt runs whole


@pytest.mark.parametrize("pipelined", [False, True], ids=["sync", "async"])
def test_no_prompt_starves_under_a_steady_stream_of_decodes(pipelined: bool) -> None:
    """Three requests that came first decode on every step for 200 steps, short requests
    join every other step, and long prompts arrive faster than the cap lets them in: every
    one is still admitted, in order, while the decodes run, and no step with decodes takes
    more prompt tokens than the cap (``check``)."""
    cap = 3
    sched = _scheduler(
        num_blocks=512,
        max_num_batched_tokens=16,
        max_num_mixed_prefill_tokens=cap,
        max_num_seqs=10,
        max_model_len=256,
    )
    runner = FakeRunner(4)
    in_flight: InFlight = deque()
    decoders = [_request(f"decoder{i}", num_prompt=2, max_tokens=200) for i in range(3)]
    longs = [_request(f"long{i}", num_prompt=20, max_tokens=2) for i in range(8)]
    for r in decoders:
        sched.add_request(r)
    first_token_step: dict[str, int] = {}
    for step in range(300):
        if step % 4 == 1 and step // 4 < len(longs):
            sched.add_request(longs[step // 4])
        if step % 2 == 0 and step < 200:
            sched.add_request(_request(f"short{step}", num_prompt=2, max_tokens=3))
        if pipelined:
            _pipelined_step(sched, runner, in_flight, check=True)
        else:
            _step(sched, runner, check=True)
        for r in longs:
            if r.num_output_tokens and r.request_id not in first_token_step:
                first_token_step[r.request_id] = step
        if not sched.has_unfinished_requests() and not in_flight:
            break
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in decoders + longs)
    steps = [first_token_step[r.request_id] for r in longs]
    assert steps == sorted(steps)  # first come, first served
    # 160 prompt tokens at 3 a step, with the short requests' prompts: all in long before
    # the decoders finish, at step 200 or so.
    assert steps[-1] < 150, steps
    assert all(r.num_preemptions == 0 for r in decoders)


@pytest.mark.parametrize(
    ("kwargs", "cap"),
    [
        ({}, 512),  # the default
        ({"max_num_batched_tokens": 256}, 256),  # never above the step's budget
        ({"max_num_mixed_prefill_tokens": 64}, 64),
        ({"max_num_mixed_prefill_tokens": 10**6}, 2048),  # at the budget: no cap
    ],
)
def test_engine_args_resolve_the_prompt_cap_of_mixed_steps(
    tiny_model_dir: Path, kwargs: dict[str, int], cap: int
) -> None:
    args = EngineArgs(model=str(tiny_model_dir), device="cpu", max_num_seqs=16, **kwargs)
    assert args.create_engine_config().scheduler.max_num_mixed_prefill_tokens == cap


@pytest.mark.parametrize("value", [0, -1, 1.5, "8"])
def test_engine_args_reject_a_bad_prompt_cap(value: object) -> None:
    with pytest.raises(ValueError, match=r"EngineArgs\.max_num_mixed_prefill_tokens=") as info:
        EngineArgs(model="m", max_num_mixed_prefill_tokens=value)  # type: ignore[arg-type]
    assert "must be an integer >= 1 or None" in str(info.value)


def test_prompt_cap_flag_has_help_and_parses() -> None:
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    ns = parser.parse_args(["--model", "m", "--max-num-mixed-prefill-tokens", "64"])
    assert EngineArgs.from_cli_args(ns).max_num_mixed_prefill_tokens == 64
    text = " ".join(parser.format_help().split())
    assert "--max-num-mixed-prefill-tokens" in text
    assert "Default 512" in text


# ---------------------------------------------------------------- prefix caching
def _same_prompt(request_id: str, like: Request, num_prompt: int | None = None, **kw) -> Request:
    req = _request(request_id, **kw)
    req.prompt_token_ids = list(like.prompt_token_ids[:num_prompt])
    return req


def _run_until_done(sched: Scheduler, runner: FakeRunner) -> list[SchedulerOutput]:
    outs = []
    while sched.has_unfinished_requests():
        outs.append(_step(sched, runner, check=True)[0])
    return outs


def test_admission_starts_after_the_blocks_cached_under_the_same_adapter() -> None:
    sched = _scheduler(prefix_caching=True)
    runner = FakeRunner(4, prefix_caching=True)
    first = _request("first", num_prompt=10, lora_id=1)
    sched.add_request(first)
    _run_until_done(sched, runner)
    assert first.num_cached_tokens == 0
    reqs = {
        "same": _same_prompt("same", first, lora_id=1),
        "whole": _same_prompt("whole", first, num_prompt=8, lora_id=1),
        "other": _same_prompt("other", first, lora_id=2),
        "base": _same_prompt("base", first),
    }
    for req in reqs.values():
        sched.add_request(req)
    out, _ = _step(sched, runner, check=True)
    starts = {s.request_id: (s.start_position, s.num_new_tokens) for s in out.scheduled}
    # "whole" is all cached, yet its last block is computed: its last token gives the logits.
    assert starts == {"same": (8, 2), "whole": (4, 4), "other": (0, 10), "base": (0, 10)}
    assert {k: r.num_cached_tokens for k, r in reqs.items()} == {
        "same": 8,
        "whole": 4,
        "other": 0,
        "base": 0,
    }
    assert (out.num_prefix_queried_tokens, out.num_prefix_hit_tokens) == (38, 12)
    _run_until_done(sched, runner)
    for req in [first, *reqs.values()]:
        assert req.output_token_ids == _reference_output(req, sched.max_num_tokens)


def test_budget_counts_only_the_tokens_not_found_in_the_cache() -> None:
    sched = _scheduler(max_num_batched_tokens=8, prefix_caching=True)
    runner = FakeRunner(4, prefix_caching=True)
    first = _request("first", num_prompt=12, max_tokens=1)
    sched.add_request(first)
    _run_until_done(sched, runner)
    sched.add_request(_same_prompt("again", first, max_tokens=1))
    sched.add_request(_request("fresh", num_prompt=4, max_tokens=1))
    out, _ = _step(sched, runner, check=True)
    assert _shares(out) == [("again", 4), ("fresh", 4)]


def test_preempted_request_finds_its_own_blocks_when_it_comes_back() -> None:
    sched = _scheduler(num_blocks=12, block_size=4, max_model_len=64, prefix_caching=True)
    runner = FakeRunner(4, prefix_caching=True)
    reqs = [_request(f"r{i}", num_prompt=8, max_tokens=24) for i in range(3)]
    for req in reqs:
        sched.add_request(req)
    resumed_starts = []
    while sched.has_unfinished_requests():
        out, _ = _step(sched, runner, check=True)
        resumed_starts += [
            s.start_position
            for s in out.scheduled
            if s.request.num_preemptions and s.start_position < s.request.num_tokens - 1
        ]
    assert sched.num_preemptions > 0
    assert resumed_starts
    assert max(resumed_starts) > 0
    for req in reqs:
        assert req.num_cached_tokens == 0  # what the first admission found
        assert req.output_token_ids == _reference_output(req, sched.max_num_tokens)


# ---------------------------------------------------------------- randomized simulation
@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-cache", "prefix-cache"])
@pytest.mark.parametrize("pipelined", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("seed", range(30))
def test_invariants_hold_and_outputs_match_on_random_workloads(
    seed: int, pipelined: bool, prefix_caching: bool
) -> None:
    """Random limits, arrivals, adapters that load late, priorities, stop tokens and aborts;
    invariants are checked on every step, everything finishes, and every output equals what
    the fake model generates alone (chunking, preemption, the prompt cap of steps with
    decodes and, with async scheduling, steps launched before the previous one's tokens are
    known change nothing). With prefix caching, prompts share starts (under the same adapter
    or not), and no block is shared across adapters or holds KV other than the request's."""
    rng = random.Random(seed)
    # The newer knobs draw from their own generator: each seed's workload stays as it was.
    knobs = random.Random(seed + 10_000)
    stems = [[knobs.randint(100, 149) for _ in range(48)] for _ in range(3)]
    block_size = rng.choice([1, 2, 4, 8])
    max_model_len = rng.choice([16, 32, 48])
    chunked = rng.random() < 0.7
    num_lora_ids = rng.randint(0, 4)
    ready = {i: rng.random() < 0.6 for i in range(1, num_lora_ids + 1)}
    sched = _scheduler(
        num_blocks=rng.randint(max_model_len // block_size // 2 + 1, 40),
        block_size=block_size,
        lora_ready=lambda i: ready[i],
        max_num_seqs=rng.randint(1, 8),
        max_num_batched_tokens=rng.randint(4, 40)
        if chunked
        else max_model_len + rng.randint(0, 16),
        max_model_len=max_model_len,
        max_loras=rng.randint(1, 3) if num_lora_ids and rng.random() < 0.8 else 0,
        max_lora_wait_steps=rng.randint(0, 6),
        enable_chunked_prefill=chunked,
        prefix_caching=prefix_caching,
        max_num_mixed_prefill_tokens=knobs.choice([None, knobs.randint(1, 12)]),
    )
    runner = FakeRunner(block_size, prefix_caching)
    in_flight: InFlight = deque()
    finished: list[Request] = []
    num_arrival_steps = 60
    for step in range(3000):
        if step < num_arrival_steps:
            for _ in range(rng.choice([0, 0, 1, 1, 2])):
                req = _request(
                    f"s{seed}-{step}-{rng.random()}",
                    num_prompt=rng.randint(1, max_model_len - 1),
                    max_tokens=rng.randint(1, 12),
                    lora_id=rng.randint(0, num_lora_ids),
                    priority=rng.choice([0, 0, 0, 1, -1]),
                    stop_token_ids=rng.sample(range(100, 150), rng.choice([0, 0, 5])),
                )
                if prefix_caching:
                    shared = knobs.randint(0, req.num_prompt_tokens)
                    req.prompt_token_ids[:shared] = knobs.choice(stems)[:shared]
                try:
                    sched.add_request(req)
                except PromptTooLong:
                    assert (
                        sched.block_manager.num_blocks_for(req.num_prompt_tokens)
                        > sched.block_manager.num_blocks
                    )
            if rng.random() < 0.05 and sched.requests:
                aborted = sched.abort_requests([rng.choice(sorted(sched.requests))])
                assert aborted[0].status == RequestStatus.FINISHED_ABORTED
        for i in ready:
            ready[i] = ready[i] or rng.random() < 0.1
        if pipelined:
            changed = _pipelined_step(sched, runner, in_flight, check=True)
        else:
            _, changed = _step(sched, runner, check=True)
        finished += [r for r in changed if r.is_finished]
        if step >= num_arrival_steps and not (sched.has_unfinished_requests() or in_flight):
            break
    assert not sched.has_unfinished_requests(), "requests left behind (deadlock or starvation)"
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    assert finished
    for req in finished:
        expected = _reference_output(req, sched.max_num_tokens)
        assert req.output_token_ids == expected
        stopped = expected[-1] in req.sampling_params.stop_token_ids
        assert req.status == (
            RequestStatus.FINISHED_STOPPED if stopped else RequestStatus.FINISHED_LENGTH
        )


def test_scheduler_and_block_manager_do_not_import_torch() -> None:
    code = "import sys, engine.core; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
