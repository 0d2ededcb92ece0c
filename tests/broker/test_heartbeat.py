"""Worker heartbeats against a real redis-server: the record and the live set, expiry,
defensive reading, Redis restarts, and a worker process's own record."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import msgspec
import pytest
import redis.asyncio as aioredis

from broker import heartbeat
from broker.embedded import RedisServer
from broker.heartbeat import WorkerInfo
from tests.broker.conftest import PREFIX

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
LIVE = f"{PREFIX}:workers:live"


async def wait_until(predicate, timeout_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    """Polls an async predicate until it holds."""
    with anyio.fail_after(timeout_s):
        while not await predicate():
            await anyio.sleep(0.02)


def info(consumer: str = "w1", **fields: object) -> WorkerInfo:
    return WorkerInfo(consumer=consumer, model="m", max_num_seqs=8, **fields)  # type: ignore[arg-type]


async def test_record_is_json_with_expiry_listed_and_deleted_on_exit(
    client: aioredis.Redis,
) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            heartbeat.heartbeat_loop, client, PREFIX, "w1", lambda: info(free_slots=3), 0.5
        )
        await wait_until(lambda: _has_workers(client, 1))
        raw = await client.get(f"{PREFIX}:worker:w1")
        record = json.loads(raw)  # plain JSON, as redis-cli GET shows it
        assert record["consumer"] == "w1"
        assert record["free_slots"] == 3
        assert 0 < await client.pttl(f"{PREFIX}:worker:w1") <= 1500  # 3 intervals
        score = await client.zscore(LIVE, "w1")
        assert score == record["last_seen_ms"]
        [live] = await heartbeat.live_workers(client, PREFIX)
        assert live == msgspec.json.decode(raw, type=WorkerInfo)
        tg.cancel_scope.cancel()
    assert await client.exists(f"{PREFIX}:worker:w1") == 0
    assert await client.zcard(LIVE) == 0


async def _has_workers(client: aioredis.Redis, n: int) -> bool:
    return len(await heartbeat.live_workers(client, PREFIX)) == n


async def test_a_record_that_expires_is_dropped_and_pruned(client: aioredis.Redis) -> None:
    # One write and no more: what a SIGKILLed worker leaves behind.
    await heartbeat.write(client, PREFIX, info("dead", last_seen_ms=heartbeat.now_ms()), 0.05)
    await heartbeat.write(client, PREFIX, info("alive", last_seen_ms=heartbeat.now_ms()), 60)
    assert [w.consumer for w in await heartbeat.live_workers(client, PREFIX)] == ["alive", "dead"]
    await wait_until(lambda: _gone(client, f"{PREFIX}:worker:dead"))
    assert [w.consumer for w in await heartbeat.live_workers(client, PREFIX)] == ["alive"]
    assert await client.zrange(LIVE, 0, -1) == [b"alive"]


async def _gone(client: aioredis.Redis, key: str) -> bool:
    return await client.exists(key) == 0


async def test_malformed_records_are_skipped(client: aioredis.Redis) -> None:
    good = info("good", last_seen_ms=1)
    await heartbeat.write(client, PREFIX, good, 60)
    bad = {
        "not-json": b"{nope",
        "wrong-types": json.dumps({"consumer": "wrong-types", "pid": "twelve"}).encode(),
        "not-a-map": b"[1, 2]",
        "other-name": msgspec.json.encode(info("someone-else")),
        "huge": json.dumps({"consumer": "huge", "model": "x" * 100_000}).encode(),
        "bad-utf8": b'{"consumer": "bad-utf8", "host": "\xff\xfe"}',
    }
    for name, raw in bad.items():
        await client.set(f"{PREFIX}:worker:{name}", raw)
        await client.zadd(LIVE, {name: 1})
    await client.hset(f"{PREFIX}:worker:a-hash", "consumer", "a-hash")  # not even a string
    await client.zadd(LIVE, {"a-hash": 1})
    # Unknown fields are fine (a newer worker): the known ones are read.
    newer = {**msgspec.to_builtins(info("newer")), "gpu": "H200"}
    await client.set(f"{PREFIX}:worker:newer", json.dumps(newer))
    await client.zadd(LIVE, {"newer": 1})
    assert [w.consumer for w in await heartbeat.live_workers(client, PREFIX)] == ["good", "newer"]


async def test_the_loop_rides_out_a_redis_restart(
    redis_server: RedisServer, client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    async def failed() -> bool:
        return any(r.getMessage().startswith("heartbeat failed") for r in caplog.records)

    async with anyio.create_task_group() as tg:
        tg.start_soon(heartbeat.heartbeat_loop, client, PREFIX, "w1", lambda: info(), 0.1)
        await wait_until(lambda: _has_workers(client, 1))
        await anyio.to_thread.run_sync(redis_server.kill)  # no persistence: the record is gone
        await wait_until(failed)
        await anyio.to_thread.run_sync(redis_server.start)
        await wait_until(lambda: _has_workers(client, 1))
        tg.cancel_scope.cancel()


def test_heartbeat_interval_must_be_positive() -> None:
    async def run() -> None:
        await heartbeat.heartbeat_loop(None, PREFIX, "w", lambda: info(), 0)  # type: ignore[arg-type]

    with pytest.raises(ValueError, match="interval"):
        anyio.run(run)


async def test_a_worker_process_keeps_its_record_and_deletes_it_on_sigterm(
    redis_server: RedisServer, client: aioredis.Redis, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.broker.fake_worker", "--redis-url", redis_server.url,
             "--prefix", PREFIX, "--consumer-name", "hb1", "--block-ms", "100",
             "--heartbeat-interval", "0.2", "--max-num-seqs", "5",
             "--lora-modules", "sql=/adapters/sql", "chat=/adapters/chat"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        await wait_until(lambda: _has_workers(client, 1))
        [w] = await heartbeat.live_workers(client, PREFIX)
        assert (w.consumer, w.pid, w.model) == ("hb1", proc.pid, "fake")
        assert w.adapters_served == ["chat", "sql"]
        assert (w.max_num_seqs, w.free_slots, w.inflight, w.draining) == (5, 5, 0, False)
        assert w.version == heartbeat.package_version()
        assert w.started_ms <= w.last_seen_ms
        # Refreshed: last_seen moves on.
        first = w.last_seen_ms
        await wait_until(lambda: _seen_after(client, first))
        proc.send_signal(signal.SIGTERM)
        assert await anyio.to_thread.run_sync(lambda: proc.wait(timeout=20)) == 0
        # A clean exit deletes the record at once (no waiting for the expiry).
        assert await client.exists(f"{PREFIX}:worker:hb1") == 0
        assert await client.zcard(LIVE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text()


async def _seen_after(client: aioredis.Redis, ms: int) -> bool:
    workers = await heartbeat.live_workers(client, PREFIX)
    return bool(workers) and workers[0].last_seen_ms > ms
