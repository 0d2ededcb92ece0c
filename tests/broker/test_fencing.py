"""Stalled and crashing workers: every request ends exactly once, and a poison entry alone.

Workers are processes (tests/broker/fake_worker.py) so they can be stopped (SIGSTOP), paused
by Redis (CLIENT PAUSE) and killed. After each scenario every result stream must hold one
complete run: ``seq`` 0, 1, 2, ... with exactly one ``finished`` event, the last, and the
tokens of an uninterrupted run.
"""

from __future__ import annotations

import re
import signal
import urllib.request

import anyio
import pytest
import redis.asyncio as aioredis

from broker import producer
from broker.embedded import free_port
from broker.protocol import Codec, ErrorEvent, Event, decode_event
from tests.broker.conftest import PREFIX
from tests.broker.fake_engine import expected_tokens
from tests.broker.workers import (
    GROUP,
    STREAM,
    Listener,
    Workers,
    prompt_of,
    submit,
    wait_for_consumer,
)

pytestmark = pytest.mark.anyio


async def result_stream(client: aioredis.Redis, rid: str) -> list[Event]:
    return [decode_event(f[b"data"]) for _, f in await client.xrange(f"{PREFIX}:out:{rid}")]


def check_once(events: list[Event], expected: list[int]) -> None:
    """One run: gapless seq, exactly one final event and it is the last, the tokens of an
    uninterrupted run (a ``restart`` marker, sent when a rerun cannot know what its client
    saw, is honoured as clients do)."""
    assert [e.seq for e in events] == list(range(len(events)))
    assert [e.finished for e in events] == [False] * (len(events) - 1) + [True]
    assert events[-1].finish_reason == "length"
    assert producer.assemble(events)[0] == expected


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


async def pending_by_consumer(client: aioredis.Redis) -> dict[str, int]:
    info = await client.xpending(STREAM, GROUP)
    return {c["name"].decode(): int(c["pending"]) for c in info["consumers"] or []}


async def test_a_stopped_worker_that_lost_its_requests_never_writes_for_them_again(
    workers: Workers, client: aioredis.Redis
) -> None:
    ids = [f"s{i}" for i in range(12)]
    a_metrics = free_port()
    listener = Listener(client)
    async with anyio.create_task_group() as tg:
        await tg.start(listener.run)
        a = workers.start("a", "--claim-idle-ms", "600", "--step-delay", "0.02",
                          "--metrics-port", str(a_metrics))  # fmt: skip
        await wait_for_consumer(client, "a")
        await submit(client, ids, 60)
        with anyio.fail_after(20):
            while not all(len(listener.events.get(r, [])) >= 2 for r in ids):
                await anyio.sleep(0.01)
        a.send_signal(signal.SIGSTOP)
        workers.start("b", "--claim-idle-ms", "600", "--step-delay", "0.005")
        # b takes every unfinished request over (a is idle past --claim-idle-ms) ...
        with anyio.fail_after(30):
            while (await pending_by_consumer(client)).get("a", 0):
                await anyio.sleep(0.02)
        a.send_signal(signal.SIGCONT)
        with anyio.fail_after(30):
            while not listener.finished(ids):
                await anyio.sleep(0.02)
        # ... and a, woken, finds out and stops them without writing (fenced).
        with anyio.fail_after(30):
            while metric(a_metrics, "lorastream_requests_inflight") > 0:
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert metric(a_metrics, "lorastream_entries_lost_total") > 0
    finished_by_a = metric(a_metrics, 'lorastream_requests_finished_total{finish_reason="length"}')
    assert finished_by_a < len(ids)
    for rid in ids:
        expected = expected_tokens([prompt_of(rid)], 60)
        check_once(listener.events[rid], expected)
        check_once(await result_stream(client, rid), expected)
        usage = listener.events[rid][-1].usage
        assert usage is not None
        assert usage["completion_tokens"] == 60
    assert (await client.xpending(STREAM, GROUP))["pending"] == 0


async def test_client_pause_past_the_claim_time_leaves_one_run_per_request(
    workers: Workers, client: aioredis.Redis
) -> None:
    ids = [f"p{i}" for i in range(16)]
    ports = [free_port(), free_port()]
    listener = Listener(client)
    async with anyio.create_task_group() as tg:
        await tg.start(listener.run)
        for name, port in zip("ab", ports, strict=True):
            workers.start(name, "--claim-idle-ms", "500", "--step-delay", "0.02",
                          "--metrics-port", str(port))  # fmt: skip
            await wait_for_consumer(client, name)
        await submit(client, ids, 60)
        with anyio.fail_after(20):
            while not all(listener.events.get(r) for r in ids):
                await anyio.sleep(0.01)
        # Every client, the workers' included, stands still for three claim times; when it
        # lifts, each worker may find the other's entries idle before its own keepalive runs.
        await client.execute_command("CLIENT", "PAUSE", 1500, "ALL")
        with anyio.fail_after(60):
            while not listener.finished(ids):
                await anyio.sleep(0.05)
        with anyio.fail_after(30):
            while any(metric(p, "lorastream_requests_inflight") > 0 for p in ports):
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    finals = sum(
        metric(p, 'lorastream_requests_finished_total{finish_reason="length"}') for p in ports
    )
    assert finals == len(ids)  # usage and metrics counted once
    for rid in ids:
        expected = expected_tokens([prompt_of(rid)], 60)
        check_once(listener.events[rid], expected)
        check_once(await result_stream(client, rid), expected)


async def test_an_entry_that_kills_every_worker_goes_to_the_dead_letters_alone(
    workers: Workers, client: aioredis.Redis
) -> None:
    """The poison kills the process (no except can catch it) together with everything
    running beside it, so every one of them is redelivered and counted. Last deliveries run
    one at a time: the poison dies alone on its last one, and the bystanders finish."""
    poison = 777
    bystanders = [f"by{i}" for i in range(6)]
    listener = Listener(client)
    args = ("--claim-idle-ms", "600000", "--max-deliveries", "3", "--step-delay", "0.01",
            "--crash-on-token", str(poison))  # fmt: skip
    async with anyio.create_task_group() as tg:
        await tg.start(listener.run)
        a = workers.start("a", *args)
        await wait_for_consumer(client, "a")
        pipe = client.pipeline(transaction=False)
        pipe.xadd(STREAM, {"data": Codec.pack(
            {"v": 1, "id": "poison", "prompt_token_ids": [poison], "params": {"max_tokens": 5}}
        )})  # fmt: skip
        await pipe.execute()
        await submit(client, bystanders, 30)
        restarts = 0
        with anyio.fail_after(60):
            while not (
                listener.finished(bystanders) and await client.xlen(f"{PREFIX}:requests:dlq")
            ):
                if a.poll() is not None:  # crashed: a supervisor restarts it, same name
                    assert a.returncode == -signal.SIGKILL
                    restarts += 1
                    assert restarts <= 10, workers.log()
                    a = workers.start("a", *args)
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    assert restarts == 3  # deliveries 1, 2 and 3 of the poison; the 4th is refused unread
    for rid in bystanders:
        check_once(listener.events[rid], expected_tokens([prompt_of(rid)], 30))
    ((_, dead),) = await client.xrange(f"{PREFIX}:requests:dlq")
    assert dead[b"reason"] == b"max_deliveries_exceeded"
    assert Codec.unpack(dead[b"data"])["id"] == "poison"
    (told,) = [e async for e in producer.events(client, PREFIX, "poison", timeout_s=10)]
    assert isinstance(told, ErrorEvent)
    assert told.code == "max_deliveries_exceeded"
    assert (await client.xpending(STREAM, GROUP))["pending"] == 0
