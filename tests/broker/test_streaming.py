"""End to end through a real redis-server with a fake engine: streaming, replay, abort."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
import redis.asyncio as aioredis

from broker import producer
from broker.embedded import RedisServer
from broker.protocol import Event, TokenEvent
from broker.registry import AdapterRegistry
from tests.broker.conftest import PREFIX, eventually, fake_engine, running_service
from tests.broker.fake_engine import FakeTokenizer, expected_tokens

pytestmark = pytest.mark.anyio


async def collect(
    client: aioredis.Redis, request_id: str, timeout_s: float = 20, **kw: object
) -> list[Event]:
    return [e async for e in producer.events(client, PREFIX, request_id, timeout_s=timeout_s, **kw)]  # type: ignore[arg-type]


def check_stream(events: list[Event], expected: list[int], reason: str = "length") -> None:
    assert [e.seq for e in events] == list(range(len(events))), "seq must be gapless from 0"
    assert events[-1].finished
    assert events[-1].finish_reason == reason
    assert all(not e.finished for e in events[:-1])
    tokens, text = producer.assemble(events)
    assert tokens == expected
    assert text == FakeTokenizer().decode(expected)


@pytest.mark.parametrize("as_json", [False, True], ids=["msgpack", "json"])
async def test_streams_several_adapters_at_once(
    redis_server: RedisServer, client: aioredis.Redis, adapter_root: Path, as_json: bool
) -> None:
    registry = AdapterRegistry(key=f"{PREFIX}:adapters", lora_root=adapter_root)
    await client.hset(
        f"{PREFIX}:adapters", mapping={"alpha": "alpha", "beta": "beta", "gamma": "gamma"}
    )
    async with running_service(
        redis_server.url, registry=registry, engine=fake_engine(step_delay_s=0.005)
    ):
        adapters = ["alpha", "beta", "gamma", None]
        results: dict[str, list[Event]] = {}

        async def one(i: int, adapter: str | None) -> None:
            rid = f"req-{i}"
            async with anyio.create_task_group() as tg:

                async def listen() -> None:
                    results[rid] = await collect(client, rid)

                tg.start_soon(listen)
                await anyio.sleep(0.05)  # subscribed; the replay would also cover a late start
                await producer.submit(
                    client, PREFIX,
                    {"id": rid, "prompt": f"hello {i}", "adapter": adapter, "params": {"max_tokens": 12}},
                    as_json=as_json,
                )  # fmt: skip

        async with anyio.create_task_group() as tg:
            for i, adapter in enumerate(adapters * 2):
                tg.start_soon(one, i, adapter)
    for i, adapter in enumerate(adapters * 2):
        events = results[f"req-{i}"]
        check_stream(events, expected_tokens(FakeTokenizer().encode(f"hello {i}"), 12, adapter))
        # One event per engine step: 12 tokens, one per step, never one Redis write per token
        # batch across requests but never merged within a request unless Redis lagged.
        assert 1 < len(events) <= 12
        usage = events[-1].usage
        assert usage is not None
        assert usage["prompt_tokens"] == len(f"hello {i}")
        assert usage["completion_tokens"] == 12
        assert "ttft_ms" in usage
    # Every entry was acked with its final event.
    assert (await client.xpending(f"{PREFIX}:requests", f"{PREFIX}:workers"))["pending"] == 0


async def test_prompt_token_ids_messages_and_logprobs(
    redis_server: RedisServer, client: aioredis.Redis
) -> None:
    async with running_service(redis_server.url):
        await producer.submit(
            client,
            PREFIX,
            {
                "id": "ids",
                "prompt_token_ids": [5, 6, 7],
                "params": {"max_tokens": 4, "logprobs": 2},
            },
        )
        await producer.submit(
            client, PREFIX,
            {"id": "chat", "messages": [{"role": "user", "content": "hi"}], "params": {"max_tokens": 3}},
        )  # fmt: skip
        ids_events = await collect(client, "ids")
        chat_events = await collect(client, "chat")
    check_stream(ids_events, expected_tokens([5, 6, 7], 4))
    assert sum(len(e.logprobs or []) for e in ids_events if isinstance(e, TokenEvent)) == 4
    chat_prompt = FakeTokenizer().apply_chat_template([{"role": "user", "content": "hi"}])
    check_stream(chat_events, expected_tokens(FakeTokenizer().encode(chat_prompt), 3))


async def test_late_subscriber_replays_from_the_result_stream(
    redis_server: RedisServer, client: aioredis.Redis
) -> None:
    async with running_service(redis_server.url):
        await producer.submit(
            client, PREFIX, {"id": "late", "prompt": "abc", "params": {"max_tokens": 8}}
        )
        # Nobody listens while it runs.
        with anyio.fail_after(10):
            while (
                not await client.exists(f"{PREFIX}:out:late")
                or not (await producer.replay(client, PREFIX, "late"))[-1].finished
            ):
                await anyio.sleep(0.02)
        events = await collect(client, "late")
    check_stream(events, expected_tokens(FakeTokenizer().encode("abc"), 8))
    ttl = await client.ttl(f"{PREFIX}:out:late")
    assert 0 < ttl <= 3600


async def test_result_ttl_zero_disables_result_streams(
    redis_server: RedisServer, client: aioredis.Redis
) -> None:
    got: list[Event] = []

    async def listen() -> None:
        got.extend(await collect(client, "nottl"))

    async with running_service(redis_server.url, result_ttl_s=0), anyio.create_task_group() as tg:
        tg.start_soon(listen)
        await anyio.sleep(0.05)
        await producer.submit(
            client, PREFIX, {"id": "nottl", "prompt": "abc", "params": {"max_tokens": 3}}
        )
    check_stream(got, expected_tokens(FakeTokenizer().encode("abc"), 3))
    assert not await client.exists(f"{PREFIX}:out:nottl")


async def test_abort_frees_the_sequence_and_ends_with_abort(
    redis_server: RedisServer, client: aioredis.Redis
) -> None:
    engine = fake_engine(step_delay_s=0.01)
    async with running_service(redis_server.url, engine=engine) as running:
        await producer.submit(
            client, PREFIX, {"id": "long", "prompt": "x", "params": {"max_tokens": 10_000}}
        )
        seen: list[Event] = []
        async for e in producer.events(client, PREFIX, "long", timeout_s=10):
            seen.append(e)
            if len(seen) == 3:
                await producer.abort(client, PREFIX, "long")
        assert seen[-1].finished
        assert seen[-1].finish_reason == "abort"
        assert [e.seq for e in seen] == list(range(len(seen)))
        assert "long" in engine.aborted
        assert engine.free_capacity() == engine.engine.config.max_num_seqs
        await eventually(lambda: running.service.inflight == 0)
        usage = seen[-1].usage
        assert usage is not None
        assert 0 < usage["completion_tokens"] < 10_000
    assert (await client.xpending(f"{PREFIX}:requests", f"{PREFIX}:workers"))["pending"] == 0


async def test_abort_before_the_entry_is_read(
    redis_server: RedisServer, client: aioredis.Redis
) -> None:
    engine = fake_engine(max_num_seqs=1, step_delay_s=0.01)
    async with running_service(redis_server.url, engine=engine):
        await producer.submit(
            client, PREFIX, {"id": "first", "prompt": "x", "params": {"max_tokens": 30}}
        )
        await producer.submit(
            client, PREFIX, {"id": "queued", "prompt": "y", "params": {"max_tokens": 30}}
        )
        await anyio.sleep(0.1)  # "queued" waits in Redis: the engine has one slot
        await producer.abort(client, PREFIX, "queued")
        events = await collect(client, "queued")
        assert len(events) == 1
        assert events[0].finish_reason == "abort"
        check_stream(
            await collect(client, "first"), expected_tokens(FakeTokenizer().encode("x"), 30)
        )
    assert [c[0] for c in engine.generate_calls] == ["first"]
