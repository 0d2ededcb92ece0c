"""Redis restarted mid-run, with and without persistence: the worker recovers by itself."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
import redis
import redis.asyncio as aioredis

from broker import producer
from broker.embedded import RedisServer
from broker.protocol import Event
from broker.redis_conn import RedisSettings, connect
from tests.broker.conftest import PREFIX, fake_engine, running_service
from tests.broker.fake_engine import expected_tokens

pytestmark = pytest.mark.anyio


async def wait_final(client: aioredis.Redis, request_id: str, timeout_s: float = 20) -> list[Event]:
    """The result stream, read until its final event, retrying while Redis is away;
    deduplicated by seq as docs/protocol.md tells clients to."""
    with anyio.fail_after(timeout_s):
        while True:
            try:
                events = await producer.replay(client, PREFIX, request_id)
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, OSError):
                events = []
            if events and events[-1].finished:
                by_seq: dict[int, Event] = {}
                for e in events:
                    assert by_seq.setdefault(e.seq, e) == e, "one seq, two different events"
                return [by_seq[s] for s in sorted(by_seq)]
            await anyio.sleep(0.05)


async def submit_many(client: aioredis.Redis, ids: list[str], max_tokens: int) -> None:
    for i, rid in enumerate(ids):
        await producer.submit(
            client,
            PREFIX,
            {"id": rid, "prompt_token_ids": [i + 1], "params": {"max_tokens": max_tokens}},
        )


@pytest.mark.parametrize("persistent", [True, False], ids=["aof", "no-persistence"])
async def test_worker_recovers_when_redis_restarts(tmp_path: Path, persistent: bool) -> None:
    server = RedisServer(data_dir=tmp_path, appendonly=persistent).start()
    client = connect(RedisSettings(server.url, block_ms=100, connect_timeout_s=0.5))
    try:
        # 4 slots, 10 requests: some run when Redis dies, the rest wait in the stream.
        engine = fake_engine(max_num_seqs=4, step_delay_s=0.01)
        async with running_service(server.url, engine=engine) as running:
            before = [f"before-{i}" for i in range(10)]
            await submit_many(client, before, 40)
            with anyio.fail_after(5):
                while not await client.exists(f"{PREFIX}:out:before-0"):
                    await anyio.sleep(0.01)
            await anyio.sleep(0.1)
            server.kill()
            await anyio.sleep(0.5)  # the worker hits connection errors meanwhile
            server.start()
            assert not running.service.draining
            after = [f"after-{i}" for i in range(5)]
            await submit_many(client, after, 5)
            for i, rid in enumerate(after):
                events = await wait_final(client, rid)
                assert producer.assemble(events)[0] == expected_tokens([i + 1], 5)
                assert [e.seq for e in events] == list(range(len(events)))
            if persistent:
                # Nothing was lost: every stream is complete and gapless from seq 0.
                for i, rid in enumerate(before):
                    events = await wait_final(client, rid)
                    assert [e.seq for e in events] == list(range(len(events))), rid
                    assert producer.assemble(events)[0] == expected_tokens([i + 1], 40), rid
                with anyio.fail_after(10):
                    while (await client.xpending(f"{PREFIX}:requests", f"{PREFIX}:workers"))[
                        "pending"
                    ]:
                        await anyio.sleep(0.05)
            else:
                # What was running when Redis lost everything still ends with its final event.
                for rid in before[:4]:
                    events = await wait_final(client, rid)
                    assert events[-1].finish_reason == "length"
            registry = running.service.metrics.registry
            assert (
                registry.get_sample_value("lorastream_redis_errors_total", {"op": "publish"}) or 0
            ) > 0
        assert running.rc == 0
    finally:
        await client.aclose()
        server.close()


async def test_worker_waits_for_redis_that_is_not_up_yet(tmp_path: Path) -> None:
    server = RedisServer(data_dir=tmp_path)
    client = connect(RedisSettings(server.url, block_ms=100, connect_timeout_s=0.5))
    try:
        async with anyio.create_task_group() as tg:

            async def start_later() -> None:
                await anyio.sleep(0.5)
                server.start()

            tg.start_soon(start_later)
            async with running_service(server.url):
                await submit_many(client, ["late-redis"], 3)
                events = await wait_final(client, "late-redis")
        assert producer.assemble(events)[0] == expected_tokens([1], 3)
    finally:
        await client.aclose()
        server.close()
