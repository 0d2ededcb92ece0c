"""Worker processes killed and drained: nothing is lost and every client stream stays whole.

Workers run ``broker.cli.serve`` on the fake engine (tests/broker/fake_worker.py), as
separate processes so they can be SIGKILLed and SIGTERMed.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import redis.asyncio as aioredis

from broker import producer
from broker.embedded import RedisServer
from broker.protocol import Codec, Event, TokenEvent, decode_event
from tests.broker.conftest import PREFIX
from tests.broker.fake_engine import expected_tokens

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
STREAM, GROUP = f"{PREFIX}:requests", f"{PREFIX}:workers"


class Workers:
    def __init__(self, url: str, logs: Path) -> None:
        self.url = url
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}-{len(self.procs)}.log").open("wb")
        cmd = [
            sys.executable, "-m", "tests.broker.fake_worker",
            "--redis-url", self.url, "--prefix", PREFIX, "--consumer-name", name,
            "--block-ms", "100", *args,
        ]  # fmt: skip
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")))


@pytest.fixture
def workers(redis_server: RedisServer, tmp_path: Path) -> Iterator[Workers]:
    w = Workers(redis_server.url, tmp_path)
    try:
        yield w
    finally:
        w.stop_all()


async def wait_for_consumer(client: aioredis.Redis, name: str) -> None:
    with anyio.fail_after(20):
        while True:
            try:
                consumers = await client.xinfo_consumers(STREAM, GROUP)
                if any(c["name"].decode() == name for c in consumers):
                    return
            except aioredis.ResponseError:
                pass  # no stream or group yet
            await anyio.sleep(0.02)


async def wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    with anyio.fail_after(timeout_s):
        while proc.poll() is None:
            await anyio.sleep(0.02)
    return int(proc.returncode)


class Listener:
    """A live client of many requests at once: PSUBSCRIBE to every reply channel."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.events: dict[str, list[Event]] = {}

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        await pubsub.psubscribe(f"{PREFIX}:tokens:*")
        task_status.started()
        try:
            while True:
                msg = await pubsub.get_message(timeout=1.0)
                if msg and msg["type"] == "pmessage":
                    e = decode_event(msg["data"])
                    self.events.setdefault(e.id, []).append(e)
        finally:
            await pubsub.aclose()

    def finished(self, ids: list[str]) -> bool:
        return all(rid in self.events and self.events[rid][-1].finished for rid in ids)


def check_client_stream(events: list[Event], expected: list[int]) -> None:
    """Complete, gapless, no duplicates, no restart: exactly the uninterrupted run's tokens."""
    assert [e.seq for e in events] == list(range(len(events)))
    assert events[-1].finished
    assert events[-1].finish_reason == "length"
    assert not any(isinstance(e, TokenEvent) and e.restart for e in events)
    assert producer.assemble(events)[0] == expected


async def submit(client: aioredis.Redis, ids: list[str], max_tokens: int) -> None:
    pipe = client.pipeline(transaction=False)
    for rid in ids:
        payload = {
            "v": 1,
            "id": rid,
            "prompt_token_ids": [prompt_of(rid)],
            "params": {"max_tokens": max_tokens},
        }
        pipe.xadd(STREAM, {"data": Codec.pack(payload)})
    await pipe.execute()


def prompt_of(rid: str) -> int:
    return sum(rid.encode()) % 900 + 1


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
