"""Worker processes on the fake engine, and a client of many requests at once: shared by
the kill, drain and fencing tests.

Workers run ``broker.cli.serve`` (tests/broker/fake_worker.py) as separate processes so
they can be SIGKILLed, SIGSTOPped and SIGTERMed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import redis.asyncio as aioredis

from broker import producer
from broker.protocol import Codec, Event, TokenEvent, decode_event
from tests.broker.conftest import PREFIX

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
