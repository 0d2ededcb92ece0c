"""Property: whatever hostile entries are interleaved with good requests, a real worker
(``lorastream serve`` on the tiny model, its own process) never dies, every entry ends
exactly once (one final event or one dead letter), and every good request's tokens equal
those of a run without the hostile ones.

CI runs a dozen examples (``LORASTREAM_HOSTILE_EXAMPLES=500`` runs more); ``scripts/soak.py``
runs the same generator for 10,000+ entries while workers are killed and stopped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgpack
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.embedded import RedisServer
from broker.protocol import decode_event
from tests.broker.hostile import Entry, Tracker, good_request, hostile_entries

PREFIX = "hp"
ROOT = Path(__file__).resolve().parents[2]
GOOD = [("Once upon a time", None), ("The cat sat", "lora0"), ("Hello there", None)]


class Served:
    def __init__(self, redis: RedisServer, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.redis = redis
        self.proc = proc
        self.log = log
        self.reference: dict[tuple[str, str | None], list[int]] = {}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("hostile")
    (tmp / "redis").mkdir()
    log = tmp / "worker.log"
    with RedisServer(data_dir=tmp / "redis") as redis_server:
        cmd = [
            sys.executable, "-m", "engine.cli", "serve",
            "--model", str(tiny_model_dir), "--device", "cpu", "--enable-lora",
            "--max-lora-rank", "32", "--max-num-seqs", "16", "--disable-log-stats",
            "--lora-modules", f"lora0={tiny_model_dir / 'adapters' / 'lora0'}",
            "--redis-url", redis_server.url, "--prefix", PREFIX, "--consumer-name", "prop",
            "--block-ms", "100",
        ]  # fmt: skip
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        s = Served(redis_server, proc, log)
        try:
            # The reference: each good request alone, before any hostile entry.
            for prompt, adapter in GOOD:
                (tokens,) = anyio.run(run_batch, s, [good_entry(prompt, adapter)])
                s.reference[(prompt, adapter)] = tokens
            yield s
        finally:
            proc.kill()
            proc.wait()


def good_entry(prompt: str, adapter: str | None) -> Entry:
    wire = good_request(f"good-{uuid.uuid4().hex}", prompt, adapter)
    return Entry({b"data": msgpack.packb(wire, use_bin_type=True)}, wire["id"])


async def run_batch(s: Served, entries: list[Entry], goods: list[int] | None = None) -> list[Any]:
    """XADD ``entries`` in one pipeline; wait until all are consumed; return the tokens of
    the entries at ``goods`` (default: all)."""
    client = aioredis.Redis.from_url(s.redis.url)
    try:
        pipe = client.pipeline(transaction=False)
        for e in entries:
            pipe.xadd(f"{PREFIX}:requests", e.fields)
        entry_ids = [x.decode() for x in await pipe.execute()]
        tracker = Tracker(PREFIX)
        for eid, e in zip(entry_ids, entries, strict=True):
            tracker.sent(eid, e)
        with anyio.fail_after(120):
            while True:
                assert s.proc.poll() is None, s.log.read_text()
                groups = await client.xinfo_groups(f"{PREFIX}:requests")
                if groups and groups[0]["lag"] == 0 and groups[0]["pending"] == 0:
                    break
                await anyio.sleep(0.05)
        counts = await tracker.check(client)
        assert counts["lost"] == 0, counts
        assert counts["duplicates"] == 0, counts
        out = []
        for i in goods if goods is not None else range(len(entries)):
            rid = entries[i].request_id
            events = [
                decode_event(f[b"data"]) for _, f in await client.xrange(f"{PREFIX}:out:{rid}")
            ]
            assert events[-1].finish_reason == "length", events[-1]
            out.append([t for e in events for t in e.token_ids])
        return out
    finally:
        await client.aclose()


@st.composite
def batches(draw: st.DrawFn) -> tuple[list[Entry], list[tuple[int, tuple[str, str | None]]]]:
    n_bad = draw(st.integers(min_value=1, max_value=10))
    entries = [draw(hostile_entries(f"bad-{uuid.uuid4().hex}")) for _ in range(n_bad)]
    goods = []
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        prompt, adapter = draw(st.sampled_from(GOOD))
        at = draw(st.integers(min_value=0, max_value=len(entries)))
        entries.insert(at, good_entry(prompt, adapter))
        goods = [(i + (i >= at), key) for i, key in goods]
        goods.append((at, (prompt, adapter)))
    return entries, goods


@settings(
    max_examples=int(os.environ.get("LORASTREAM_HOSTILE_EXAMPLES", "12")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
)  # fmt: skip
@given(batch=batches())
def test_hostile_entries_never_stop_the_worker_nor_change_good_outputs(
    served: Served, batch: tuple[list[Entry], list[tuple[int, tuple[str, str | None]]]]
) -> None:
    entries, goods = batch
    tokens = anyio.run(run_batch, served, entries, [i for i, _ in goods])
    for got, (_, key) in zip(tokens, goods, strict=True):
        assert got == served.reference[key], key
    assert served.proc.poll() is None
