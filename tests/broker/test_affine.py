"""Adapter-affine routing across worker processes: ownership, takeover, joining, stealing.

Producers here are raw XADDs that follow docs/protocol.md's recipe (shard = CRC-32 of the
adapter name mod the number of shards, zlib's CRC-32), and who runs an entry is read from
Redis itself (XPENDING's consumer while the request is in flight). After each scenario every
result stream must hold one complete run: ``seq`` 0, 1, 2, ... with exactly one final event.
"""

from __future__ import annotations

import signal
import zlib
from pathlib import Path

import anyio
import pytest
import redis.asyncio as aioredis

from broker import heartbeat
from broker.embedded import free_port
from broker.protocol import Codec, Event, decode_event
from tests.broker.conftest import PREFIX
from tests.broker.fake_engine import expected_tokens
from tests.broker.test_fencing import check_once, metric
from tests.broker.workers import Workers, prompt_of

pytestmark = pytest.mark.anyio

SHARDS = 8
GROUP = f"{PREFIX}:workers"
AFFINE = ("--routing", "affine", "--num-shards", str(SHARDS), "--heartbeat-interval", "0.2",
          "--claim-idle-ms", "1000")  # fmt: skip


def shard_of(adapter: str) -> int:
    return zlib.crc32(adapter.encode()) % SHARDS


def stream_of(shard: int) -> str:
    return f"{{{PREFIX}:{shard}}}:requests"


def out_key(shard: int, rid: str) -> str:
    return f"{{{PREFIX}:{shard}}}:out:{rid}"


@pytest.fixture
def adapters(tmp_path: Path) -> list[str]:
    """Adapter names spread over the shards; the fake engine needs their directories."""
    names = [f"ad{i}" for i in range(12)]
    for name in names:
        (tmp_path / "ad" / name).mkdir(parents=True)
    return names


def lora_args(tmp_path: Path, names: list[str]) -> list[str]:
    return ["--lora-modules", *(f"{n}={tmp_path / 'ad' / n}" for n in names)]


async def submit(client: aioredis.Redis, rid: str, adapter: str, max_tokens: int) -> None:
    payload = {"v": 1, "id": rid, "adapter": adapter, "prompt_token_ids": [prompt_of(rid)],
               "params": {"max_tokens": max_tokens}}  # fmt: skip
    await client.xadd(stream_of(shard_of(adapter)), {"data": Codec.pack(payload)})


async def converged(client: aioredis.Redis, names: set[str]) -> dict[int, str]:
    """Wait until exactly ``names`` are live and their records split the shards between
    them, each shard listed once; returns shard → owner."""
    with anyio.fail_after(30):
        while True:
            workers = await heartbeat.live_workers(client, PREFIX)
            owner: dict[int, str] = {}
            clash = False
            for w in workers:
                for s in w.shards:
                    clash |= s in owner
                    owner[s] = w.consumer
            if (
                {w.consumer for w in workers} == names
                and not clash
                and set(owner) == set(range(SHARDS))
                and all(w.shards for w in workers)
            ):
                return owner
            await anyio.sleep(0.05)


async def runner_of(
    client: aioredis.Redis, adapter: str, rid_entries: dict[str, str]
) -> dict[str, str]:
    """Request id → the consumer its entry is pending under (entries of ``adapter``)."""
    rows = await client.xpending_range(stream_of(shard_of(adapter)), GROUP, "-", "+", 1000)
    by_entry = {r["message_id"].decode(): r["consumer"].decode() for r in rows}
    return {rid: by_entry[e] for rid, e in rid_entries.items() if e in by_entry}


async def result(client: aioredis.Redis, shard: int, rid: str) -> list[Event]:
    return [decode_event(f[b"data"]) for _, f in await client.xrange(out_key(shard, rid))]


async def all_finished(client: aioredis.Redis, reqs: dict[str, str], timeout_s: float) -> None:
    with anyio.fail_after(timeout_s):
        for rid, adapter in reqs.items():
            while True:
                events = await result(client, shard_of(adapter), rid)
                if events and events[-1].finished:
                    break
                await anyio.sleep(0.05)


async def check_all_once(client: aioredis.Redis, reqs: dict[str, str], max_tokens: int) -> None:
    for rid, adapter in reqs.items():
        expected = expected_tokens([prompt_of(rid)], max_tokens, adapter)
        check_once(await result(client, shard_of(adapter), rid), expected)


async def wait_started(client: aioredis.Redis, reqs: dict[str, str]) -> None:
    with anyio.fail_after(30):
        for rid, adapter in reqs.items():
            while not await client.exists(out_key(shard_of(adapter), rid)):
                await anyio.sleep(0.02)


async def entry_ids(client: aioredis.Redis, adapter: str) -> dict[str, str]:
    """Request id → entry id, for the requests of ``adapter``."""
    out = {}
    for eid, fields in await client.xrange(stream_of(shard_of(adapter))):
        request = Codec.unpack(fields[b"data"])
        if request["adapter"] == adapter:
            out[request["id"]] = eid.decode()
    return out


async def test_every_request_of_an_adapter_runs_on_its_shard_owner(
    workers: Workers, client: aioredis.Redis, adapters: list[str], tmp_path: Path
) -> None:
    args = [*AFFINE, "--steal-after-ms", "600000", "--step-delay", "0.02",
            *lora_args(tmp_path, adapters)]  # fmt: skip
    for name in "abc":
        workers.start(name, *args)
    owner = await converged(client, set("abc"))
    reqs = {f"{a}-{i}": a for a in adapters for i in range(3)}
    for rid, adapter in reqs.items():
        await submit(client, rid, adapter, 200)
    await wait_started(client, reqs)
    for adapter in adapters:
        ran = await runner_of(client, adapter, await entry_ids(client, adapter))
        assert set(ran) == {r for r, a in reqs.items() if a == adapter}
        assert set(ran.values()) == {owner[shard_of(adapter)]}, adapter
    # Every worker had a share of the adapters (12 adapters over 8 shards, 3 workers).
    assert {owner[shard_of(a)] for a in adapters} == set("abc")


async def test_killing_an_owner_moves_its_shards_and_resumes_its_requests_once(
    workers: Workers, client: aioredis.Redis, adapters: list[str], tmp_path: Path
) -> None:
    args = [*AFFINE, "--steal-after-ms", "600000", "--step-delay", "0.02",
            *lora_args(tmp_path, adapters)]  # fmt: skip
    procs = {name: workers.start(name, *args) for name in "ab"}
    owner = await converged(client, set("ab"))
    reqs = {f"k{a}-{i}": a for a in adapters for i in range(2)}
    for rid, adapter in reqs.items():
        await submit(client, rid, adapter, 60)
    await wait_started(client, reqs)
    killed = [rid for rid, a in reqs.items() if owner[shard_of(a)] == "a"]
    assert killed
    procs["a"].send_signal(signal.SIGKILL)
    procs["a"].wait()
    # Its shards move to b, and its requests resume on b after --claim-idle-ms ...
    owner = await converged(client, {"b"})
    assert set(owner.values()) == {"b"}
    await all_finished(client, reqs, 60)
    await check_all_once(client, reqs, 60)
    for rid in killed:
        usage = (await result(client, shard_of(reqs[rid]), rid))[-1].usage
        assert usage is not None
        assert usage["deliveries"] >= 2  # taken over from a, not run by it to the end
    # ... and nothing stays pending.
    for shard in range(SHARDS):
        assert (await client.xpending(stream_of(shard), GROUP))["pending"] == 0
    # A new worker takes its share of the shards, and serves them from then on.
    workers.start("c", *args)
    owner = await converged(client, {"b", "c"})
    mine = [a for a in adapters if owner[shard_of(a)] == "c"]
    assert mine
    later = {f"n{a}": a for a in adapters}
    for rid, adapter in later.items():
        await submit(client, rid, adapter, 200)
    await wait_started(client, later)
    for adapter in adapters:
        ran = await runner_of(client, adapter, await entry_ids(client, adapter))
        assert set(ran.values()) <= {owner[shard_of(adapter)]}, adapter
        assert f"n{adapter}" in ran


async def test_an_idle_worker_steals_from_a_busy_owner(
    workers: Workers, client: aioredis.Redis, adapters: list[str], tmp_path: Path
) -> None:
    """The owner runs one request at a time; the other worker, idle, takes the waiting ones
    of that shard, and every request still runs once."""
    lora = lora_args(tmp_path, adapters)
    ports = {"a": free_port(), "b": free_port()}
    workers.start("a", *AFFINE, "--steal-after-ms", "100", "--max-num-seqs", "1",
                  "--step-delay", "0.02", "--metrics-port", str(ports["a"]), *lora)  # fmt: skip
    workers.start("b", *AFFINE, "--steal-after-ms", "100", "--step-delay", "0.005",
                  "--metrics-port", str(ports["b"]), *lora)  # fmt: skip
    owner = await converged(client, {"a", "b"})
    hot = next(a for a in adapters if owner[shard_of(a)] == "a")
    reqs = {f"h{i}": hot for i in range(12)}
    for rid, adapter in reqs.items():
        await submit(client, rid, adapter, 20)
    await all_finished(client, reqs, 60)
    await check_all_once(client, reqs, 20)
    finished = 'lorastream_requests_finished_total{finish_reason="length"}'
    with anyio.fail_after(10):  # a final reaches Redis just before the worker counts it
        while sum(metric(p, finished) for p in ports.values()) < len(reqs):
            await anyio.sleep(0.05)
    assert metric(ports["b"], "lorastream_entries_stolen_total") > 0
    assert metric(ports["b"], finished) > 0  # stolen and run
    assert metric(ports["a"], finished) > 0  # and the owner ran its share
    assert metric(ports["a"], "lorastream_entries_stolen_total") == 0
