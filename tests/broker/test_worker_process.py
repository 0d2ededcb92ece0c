"""Worker processes killed and drained: nothing is lost and every client stream stays whole.

Workers run ``broker.cli.serve`` on the fake engine (tests/broker/fake_worker.py), as
separate processes so they can be SIGKILLed and SIGTERMed.
"""

from __future__ import annotations

import signal

import anyio
import pytest
import redis.asyncio as aioredis

from broker import producer
from tests.broker.conftest import PREFIX
from tests.broker.fake_engine import expected_tokens
from tests.broker.workers import (
    GROUP,
    STREAM,
    Listener,
    Workers,
    check_client_stream,
    prompt_of,
    submit,
    wait_exit,
    wait_for_consumer,
)

pytestmark = pytest.mark.anyio


async def test_sigkilled_workers_requests_are_finished_by_another_worker(
    workers: Workers, client: aioredis.Redis
) -> None:
    first = [f"k{i}" for i in range(40)]
    later = [f"late{i}" for i in range(10)]
    listener = Listener(client)
    async with anyio.create_task_group() as tg:
        await tg.start(listener.run)
        a = workers.start("a", "--claim-idle-ms", "1000", "--step-delay", "0.02")
        await wait_for_consumer(client, "a")
        await submit(client, first, 50)
        # Kill it mid-run: every request has streamed a few tokens, none has finished.
        with anyio.fail_after(20):
            while not all(len(listener.events.get(r, [])) >= 3 for r in first):
                await anyio.sleep(0.01)
        a.send_signal(signal.SIGKILL)
        assert await wait_exit(a, 5) == -signal.SIGKILL
        assert not any(listener.events[r][-1].finished for r in first)
        await submit(client, later, 5)
        workers.start("b", "--claim-idle-ms", "1000", "--step-delay", "0.005")
        with anyio.fail_after(30):
            while not listener.finished(first + later):
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    for rid in first:
        check_client_stream(listener.events[rid], expected_tokens([prompt_of(rid)], 50))
        # The result stream (what a late subscriber replays) says the same.
        assert await producer.replay(client, PREFIX, rid) == listener.events[rid]
        usage = listener.events[rid][-1].usage
        assert usage is not None
        assert usage["completion_tokens"] == 50
        assert usage["resumed_tokens"] >= 3
    for rid in later:
        check_client_stream(listener.events[rid], expected_tokens([prompt_of(rid)], 5))
    assert (await client.xpending(STREAM, GROUP))["pending"] == 0
    assert await client.xlen(f"{PREFIX}:requests:dlq") == 0


async def test_a_restarted_worker_takes_its_own_pending_entries_at_once(
    workers: Workers, client: aioredis.Redis
) -> None:
    ids = [f"own{i}" for i in range(10)]
    listener = Listener(client)
    async with anyio.create_task_group() as tg:
        await tg.start(listener.run)
        # A claim-idle far beyond the test: only "own pending first" can bring them back.
        a = workers.start("a", "--claim-idle-ms", "600000", "--step-delay", "0.02")
        await wait_for_consumer(client, "a")
        await submit(client, ids, 40)
        with anyio.fail_after(20):
            while not all(len(listener.events.get(r, [])) >= 2 for r in ids):
                await anyio.sleep(0.01)
        a.send_signal(signal.SIGKILL)
        await wait_exit(a, 5)
        workers.start("a", "--claim-idle-ms", "600000", "--step-delay", "0.005")
        with anyio.fail_after(20):
            while not listener.finished(ids):
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    for rid in ids:
        check_client_stream(listener.events[rid], expected_tokens([prompt_of(rid)], 40))


async def test_sigterm_drains_running_requests_and_reads_no_more(
    workers: Workers, client: aioredis.Redis
) -> None:
    running = [f"d{i}" for i in range(8)]
    listener = Listener(client)
    async with anyio.create_task_group() as tg:
        await tg.start(listener.run)
        a = workers.start("a", "--step-delay", "0.02", "--drain-timeout", "20")
        await wait_for_consumer(client, "a")
        await submit(client, running, 30)
        with anyio.fail_after(20):
            while not all(listener.events.get(r) for r in running):
                await anyio.sleep(0.01)
        a.send_signal(signal.SIGTERM)
        await anyio.sleep(0.3)
        await submit(client, ["after-term"], 5)
        assert await wait_exit(a, 20) == 0, workers.log()
        await anyio.sleep(0.1)
        tg.cancel_scope.cancel()
    for rid in running:
        check_client_stream(listener.events[rid], expected_tokens([prompt_of(rid)], 30))
    assert "after-term" not in listener.events
    (group,) = await client.xinfo_groups(STREAM)
    assert (group["pending"], group["lag"]) == (0, 1)  # the new one waits for another worker
    assert "drained" in workers.log()


async def test_drain_timeout_leaves_requests_for_another_worker_to_finish(
    workers: Workers, client: aioredis.Redis
) -> None:
    ids = [f"t{i}" for i in range(6)]
    listener = Listener(client)
    async with anyio.create_task_group() as tg:
        await tg.start(listener.run)
        a = workers.start(
            "a", "--step-delay", "0.02", "--drain-timeout", "0.3", "--claim-idle-ms", "600000"
        )
        await wait_for_consumer(client, "a")
        await submit(client, ids, 100)
        with anyio.fail_after(20):
            while not all(len(listener.events.get(r, [])) >= 2 for r in ids):
                await anyio.sleep(0.01)
        a.send_signal(signal.SIGTERM)
        assert await wait_exit(a, 10) == 0, workers.log()
        assert (await client.xpending(STREAM, GROUP))["pending"] == len(ids)
        # Released with a huge idle time: taken over at once despite a 10-minute claim-idle.
        workers.start("b", "--step-delay", "0.002", "--claim-idle-ms", "600000")
        with anyio.fail_after(20):
            while not listener.finished(ids):
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    for rid in ids:
        check_client_stream(listener.events[rid], expected_tokens([prompt_of(rid)], 100))
