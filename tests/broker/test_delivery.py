"""At-least-once delivery: own pending entries, takeover, resume, dead letters, backpressure."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from broker import producer
from broker.embedded import RedisServer
from broker.protocol import Codec, ErrorEvent, Event, TokenEvent, decode_event, encode_event
from tests.broker.conftest import PREFIX, fake_engine, running_service
from tests.broker.fake_engine import FakeTokenizer, expected_tokens

pytestmark = pytest.mark.anyio

STREAM, GROUP = f"{PREFIX}:requests", f"{PREFIX}:workers"


async def deliver_to(client: aioredis.Redis, consumer: str, request: dict[str, Any]) -> str:
    """Submit a request and have ``consumer`` read it (and then, say, die)."""
    await client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    entry_id = await producer.submit(client, PREFIX, request)
    await client.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=1)
    return entry_id


async def publish_as_if(client: aioredis.Redis, request_id: str, tokens: list[list[int]]) -> None:
    """Write the result stream a dead worker would have left: one event per step."""
    text = FakeTokenizer().decode
    for seq, step in enumerate(tokens):
        event = TokenEvent(id=request_id, seq=seq, token_ids=step, text=text(step))
        await client.xadd(f"{PREFIX}:out:{request_id}", {"data": encode_event(event)})


async def pending_count(client: aioredis.Redis) -> int:
    return int((await client.xpending(STREAM, GROUP))["pending"])


async def test_restarted_worker_resumes_its_own_pending_entry_without_duplicates(
    redis_server: RedisServer, client: aioredis.Redis
) -> None:
    prompt_ids = FakeTokenizer().encode("resume me")
    full = expected_tokens(prompt_ids, 10)
    await deliver_to(client, "w1", {"id": "r", "prompt": "resume me", "params": {"max_tokens": 10}})
    await publish_as_if(client, "r", [full[0:1], full[1:2], full[2:4]])
    engine = fake_engine()
    async with running_service(redis_server.url, engine=engine, consumer="w1"):
        events = [e async for e in producer.events(client, PREFIX, "r", timeout_s=10)]
    assert [e.seq for e in events] == list(range(len(events)))
    assert producer.assemble(events)[0] == full
    assert not any(isinstance(e, TokenEvent) and e.restart for e in events)
    # The engine continued after the 4 published tokens instead of starting over.
    ((_, prompt, params),) = engine.generate_calls
    assert prompt == {"prompt_token_ids": prompt_ids + full[:4]}
    assert params.max_tokens == 6
    usage = events[-1].usage
    assert usage is not None
    assert (usage["completion_tokens"], usage["prompt_tokens"], usage["resumed_tokens"]) == (
        10,
        len(prompt_ids),
        4,
    )
    assert usage["deliveries"] >= 2
    assert await pending_count(client) == 0


async def test_entry_whose_final_event_was_published_is_only_acked(
    redis_server: RedisServer, client: aioredis.Redis
) -> None:
    await deliver_to(client, "w1", {"id": "done", "prompt": "a", "params": {"max_tokens": 1}})
    final = TokenEvent(
        id="done", seq=0, token_ids=[1], text="b", finished=True, finish_reason="length"
    )
    await client.xadd(f"{PREFIX}:out:done", {"data": encode_event(final)})
    engine = fake_engine()
    async with running_service(redis_server.url, engine=engine, consumer="w1"):
        await eventually_async(lambda: pending_count(client), 0)
    assert engine.generate_calls == []
    assert await client.xlen(f"{PREFIX}:out:done") == 1


async def test_idle_entries_of_a_dead_consumer_are_taken_over(
    redis_server: RedisServer, client: aioredis.Redis
) -> None:
    await client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    for i in range(5):
        await producer.submit(
            client, PREFIX, {"id": f"orphan-{i}", "prompt": f"p{i}", "params": {"max_tokens": 5}}
        )
    await client.xreadgroup(GROUP, "dead", {STREAM: ">"}, count=5)
    async with running_service(redis_server.url, consumer="alive", claim_idle_ms=200) as running:
        for i in range(5):
            events = [e async for e in producer.events(client, PREFIX, f"orphan-{i}", timeout_s=10)]
            assert producer.assemble(events)[0] == expected_tokens(
                FakeTokenizer().encode(f"p{i}"), 5
            )
        assert running.service.metrics.claimed._value.get() == 5
    assert await pending_count(client) == 0


async def test_running_entries_are_kept_alive_and_not_stolen(
    redis_server: RedisServer, client: aioredis.Redis
) -> None:
    engine = fake_engine(step_delay_s=0.02)
    async with running_service(redis_server.url, engine=engine, consumer="w1", claim_idle_ms=300):
        await producer.submit(
            client, PREFIX, {"id": "slow", "prompt": "a", "params": {"max_tokens": 60}}
        )
        await anyio.sleep(0.8)  # > claim_idle_ms: only the keepalive keeps it from going idle
        claimed = await client.xautoclaim(STREAM, GROUP, "thief", min_idle_time=300, start_id="0-0")
        assert claimed[1] == []
        events = [e async for e in producer.events(client, PREFIX, "slow", timeout_s=10)]
    assert events[-1].finish_reason == "length"


async def test_too_many_deliveries_go_to_the_dead_letter_stream_and_the_client_is_told(
    redis_server: RedisServer, client: aioredis.Redis
) -> None:
    entry_id = await deliver_to(
        client, "crashy", {"id": "poison", "prompt": "a", "params": {"max_tokens": 3}}
    )
    await publish_as_if(client, "poison", [[1], [2]])
    for _ in range(4):  # each XCLAIM is one more delivery (5 so far)
        await client.xclaim(STREAM, GROUP, "crashy", 0, [entry_id])
    engine = fake_engine()
    async with running_service(
        redis_server.url, engine=engine, consumer="w2", claim_idle_ms=100, max_deliveries=5
    ):
        events = [e async for e in producer.events(client, PREFIX, "poison", timeout_s=10)]
    assert engine.generate_calls == []
    last = events[-1]
    assert isinstance(last, ErrorEvent)
    assert (last.code, last.seq) == ("max_deliveries_exceeded", 2)  # continues the client's seq
    ((_, fields),) = await client.xrange(f"{PREFIX}:requests:dlq")
    assert fields[b"reason"] == b"max_deliveries_exceeded"
    assert fields[b"entry_id"].decode() == entry_id
    assert Codec.unpack(fields[b"data"])["id"] == "poison"
    assert await pending_count(client) == 0


async def test_without_result_streams_a_rerun_is_marked_restart(
    redis_server: RedisServer, client: aioredis.Redis
) -> None:
    await deliver_to(client, "w1", {"id": "again", "prompt": "a", "params": {"max_tokens": 4}})
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(f"{PREFIX}:tokens:again")
    events: list[Event] = []
    async with running_service(redis_server.url, consumer="w1", result_ttl_s=0):
        with anyio.fail_after(10):
            while not events or not events[-1].finished:
                msg = await pubsub.get_message(timeout=1.0)
                if msg and msg["type"] == "message":
                    events.append(decode_event(msg["data"]))
    await pubsub.aclose()
    # The worker cannot know what the client saw before: it says "start over" once.
    assert [isinstance(e, TokenEvent) and e.restart for e in events] == [True] + [False] * (
        len(events) - 1
    )
    assert [e.seq for e in events] == list(range(len(events)))
    assert producer.assemble(events)[0] == expected_tokens(FakeTokenizer().encode("a"), 4)


async def test_a_burst_waits_in_redis_not_in_worker_memory(
    redis_server: RedisServer, client: aioredis.Redis
) -> None:
    n, slots = 1000, 16
    engine = fake_engine(max_num_seqs=slots, step_delay_s=0.001)
    async with running_service(redis_server.url, engine=engine) as running:
        pipe = client.pipeline(transaction=False)
        for i in range(n):
            payload = {
                "v": 1,
                "id": f"b{i}",
                "prompt_token_ids": [i % 900 + 1],
                "params": {"max_tokens": 3},
            }
            pipe.xadd(STREAM, {"data": Codec.pack(payload)})
        await pipe.execute()
        max_pending = 0
        with anyio.fail_after(60):
            while True:
                info = await client.xinfo_groups(STREAM)
                max_pending = max(max_pending, int(info[0]["pending"]))
                if info[0]["lag"] == 0 and info[0]["pending"] == 0:
                    break
                await anyio.sleep(0.005)
        assert running.service.high_water <= slots
        assert engine.max_running <= slots
        assert max_pending <= slots  # everything else waited in the stream
    for i in range(0, n, 97):
        events = await producer.replay(client, PREFIX, f"b{i}")
        assert producer.assemble(events)[0] == expected_tokens([i % 900 + 1], 3)
    keys = [k async for k in client.scan_iter(match=f"{PREFIX}:out:*", count=1000)]
    assert len(keys) == n


async def eventually_async(fn: Any, value: Any, timeout_s: float = 10) -> None:
    with anyio.fail_after(timeout_s):
        while await fn() != value:
            await anyio.sleep(0.02)


async def test_a_dead_engine_stops_the_worker_and_leaves_its_requests_for_others(
    redis_server: RedisServer, client: aioredis.Redis
) -> None:
    engine = fake_engine(step_delay_s=0.01)
    async with running_service(redis_server.url, engine=engine) as running:
        for i in range(3):
            await producer.submit(
                client, PREFIX, {"id": f"dies-{i}", "prompt": "a", "params": {"max_tokens": 500}}
            )
        with anyio.fail_after(5):
            while not all([await client.exists(f"{PREFIX}:out:dies-{i}") for i in range(3)]):
                await anyio.sleep(0.01)
        engine.die()
        with anyio.fail_after(10):
            while running.rc is None:
                await anyio.sleep(0.01)
    assert running.rc == 1
    pending = await client.xpending_range(STREAM, GROUP, min="-", max="+", count=10)
    assert len(pending) == 3
    # Released: idle enough for the next XAUTOCLAIM of any worker, not after --claim-idle-ms.
    assert all(p["time_since_delivered"] > 10**9 for p in pending)
    for i in range(3):
        assert not (await producer.replay(client, PREFIX, f"dies-{i}"))[-1].finished


async def test_a_worker_presumed_dead_stops_a_request_another_worker_took_over(
    redis_server: RedisServer, client: aioredis.Redis
) -> None:
    engine = fake_engine(step_delay_s=0.01)
    async with running_service(redis_server.url, engine=engine, claim_idle_ms=300) as running:
        entry_id = await producer.submit(
            client, PREFIX, {"id": "taken", "prompt": "a", "params": {"max_tokens": 1000}}
        )
        with anyio.fail_after(5):
            while not await client.exists(f"{PREFIX}:out:taken"):
                await anyio.sleep(0.01)
        # What XAUTOCLAIM by another worker does after our keepalive failed for too long.
        await client.xclaim(STREAM, GROUP, "other", 0, [entry_id])
        with anyio.fail_after(5):
            while running.service.inflight:
                await anyio.sleep(0.01)
        assert "taken" in engine.aborted
    (pending,) = await client.xpending_range(STREAM, GROUP, min="-", max="+", count=10)
    assert pending["consumer"] == b"other"  # ours to finish now: not acked, not released back
    assert not (await producer.replay(client, PREFIX, "taken"))[-1].finished


async def test_a_resume_after_a_restarted_run_keeps_only_the_tokens_after_the_marker(
    redis_server: RedisServer, client: aioredis.Redis
) -> None:
    full = expected_tokens(FakeTokenizer().encode("m"), 6)
    await deliver_to(client, "w1", {"id": "twice", "prompt": "m", "params": {"max_tokens": 6}})
    stale = TokenEvent(id="twice", seq=0, token_ids=[999, 998], text="??")
    rerun = TokenEvent(
        id="twice", seq=1, token_ids=full[:2], text=FakeTokenizer().decode(full[:2]), restart=True
    )
    for event in (stale, rerun):
        await client.xadd(f"{PREFIX}:out:twice", {"data": encode_event(event)})
    async with running_service(redis_server.url, consumer="w1"):
        events = [e async for e in producer.events(client, PREFIX, "twice", timeout_s=10)]
    assert [e.seq for e in events] == list(range(len(events)))
    assert producer.assemble(events)[0] == full
