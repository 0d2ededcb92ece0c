"""On a real Redis Cluster (3 masters, ``redis-cli --cluster create``): streaming through the
SDK and raw clients, takeover after SIGKILL, and bad input, as on one redis-server.

Every key of a request carries its shard's hash tag, so the fenced scripts stay on one slot
while the shards spread over the masters; token events go out with SPUBLISH (sharded
pub/sub) and the SDK reads them with SSUBSCRIBE.
"""

from __future__ import annotations

import signal
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio as aioredis

from broker import heartbeat, producer
from broker.protocol import ErrorEvent, Event, decode_event
from broker.redis_conn import RedisSettings, connect
from broker.registry import AdapterRegistry
from clients.sdk import AsyncClient
from tests.broker.cluster import LocalCluster
from tests.broker.conftest import PREFIX, fake_engine, running_service
from tests.broker.fake_engine import expected_tokens
from tests.broker.test_bad_input import NO_REPLY, WITH_REPLY, good, pack
from tests.broker.test_fencing import check_once
from tests.broker.workers import Workers

pytestmark = pytest.mark.anyio

SHARDS = 6
GROUP = f"{PREFIX}:workers"
AFFINE = ("--routing", "affine", "--num-shards", str(SHARDS), "--heartbeat-interval", "0.2",
          "--claim-idle-ms", "1000", "--steal-after-ms", "600000")  # fmt: skip
ADAPTERS = [f"c{i}" for i in range(8)]


def shard_prefix(shard: int) -> str:
    return f"{{{PREFIX}:{shard}}}"


def shard_of(key: str) -> int:
    return zlib.crc32(key.encode()) % SHARDS


@pytest.fixture
async def cluster(cluster_url: str) -> AsyncIterator[aioredis.Redis]:
    c = connect(RedisSettings(cluster_url, block_ms=100))
    try:
        yield c
    finally:
        await c.aclose()


@pytest.fixture
def cluster_workers(cluster_url: str, tmp_path: Path) -> Iterator[Workers]:
    w = Workers(cluster_url, tmp_path)
    try:
        yield w
    finally:
        w.stop_all()


@pytest.fixture
def lora(tmp_path: Path) -> list[str]:
    for name in ADAPTERS:
        (tmp_path / "ad" / name).mkdir(parents=True)
    return ["--lora-modules", *(f"{n}={tmp_path / 'ad' / n}" for n in ADAPTERS)]


async def live(cluster: aioredis.Redis, names: set[str]) -> dict[int, str]:
    """Wait until ``names`` are the live workers and their records split the shards."""
    with anyio.fail_after(30):
        while True:
            workers = await heartbeat.live_workers(cluster, PREFIX)
            owner = {s: w.consumer for w in workers for s in w.shards}
            listed = sum(len(w.shards) for w in workers)
            if {w.consumer for w in workers} == names and listed == len(owner) == SHARDS:
                return owner
            await anyio.sleep(0.05)


def keys_per_master(redis_cluster: LocalCluster) -> list[int]:
    counts = []
    for node in redis_cluster.nodes:
        client = redis.Redis(port=node.port)
        try:
            counts.append(int(client.dbsize()))
        finally:
            client.close()
    return counts


async def raw_request(cluster: aioredis.Redis, rid: str, reply_to: str | None) -> list[Event]:
    """XADD a request to its shard as docs/protocol.md says and follow its events."""
    prefix = shard_prefix(shard_of(rid))
    got: list[Event] = []

    async def follow() -> None:
        async for e in producer.events(cluster, prefix, rid, reply_to=reply_to, timeout_s=20):
            got.append(e)

    async with anyio.create_task_group() as tg:
        # follow() may subscribe after the events went out: it replays the result stream.
        tg.start_soon(follow)
        request: dict[str, Any] = {"id": rid, "prompt_token_ids": [7], "params": {"max_tokens": 9}}
        if reply_to:
            request["reply_to"] = reply_to
        await producer.submit(cluster, prefix, request)
    return got


async def test_streams_reach_sdk_and_raw_clients_with_shards_on_every_master(
    cluster_workers: Workers,
    cluster: aioredis.Redis,
    redis_cluster: LocalCluster,
    lora: list[str],
    cluster_url: str,
) -> None:
    for name in "ab":
        cluster_workers.start(name, *AFFINE, "--step-delay", "0.005", *lora)
    await live(cluster, set("ab"))
    results: dict[str, Any] = {}
    async with AsyncClient(cluster_url, PREFIX, timeout_s=30) as sdk:

        async def one(i: int, adapter: str) -> None:
            results[f"{adapter}/{i}"] = await sdk.complete(
                prompt_token_ids=[i + 1], adapter=adapter, max_tokens=12
            )

        async with anyio.create_task_group() as tg:
            for adapter in ADAPTERS:
                for i in range(3):
                    tg.start_soon(one, i, adapter)
    for key, done in results.items():
        adapter, i = key.split("/")
        assert done.token_ids == expected_tokens([int(i) + 1], 12, adapter), key
        assert done.finish_reason == "length"
    # Raw producers: the default reply channel is sharded (SSUBSCRIBE); a channel of their
    # own outside the shard's slot gets a plain PUBLISH (SUBSCRIBE).
    for rid, reply_to in (("raw-default", None), ("raw-inbox", "my:inbox")):
        got = await raw_request(cluster, rid, reply_to)
        assert producer.assemble(got)[0] == expected_tokens([7], 9), rid
    # The shard streams and result streams are spread over the three masters.
    assert all(n > 0 for n in keys_per_master(redis_cluster))


async def test_a_killed_owners_streams_finish_elsewhere_once_on_a_cluster(
    cluster_workers: Workers, cluster: aioredis.Redis, lora: list[str], cluster_url: str
) -> None:
    procs = {n: cluster_workers.start(n, *AFFINE, "--step-delay", "0.02", *lora) for n in "ab"}
    owner = await live(cluster, set("ab"))
    victims = [a for a in ADAPTERS if owner[shard_of(a)] == "a"]
    assert victims
    results: dict[str, Any] = {}
    started: dict[str, anyio.Event] = {a: anyio.Event() for a in ADAPTERS}
    async with AsyncClient(cluster_url, PREFIX, timeout_s=60) as sdk:

        async def one(adapter: str) -> None:
            async with sdk.generate(
                prompt_token_ids=[3], adapter=adapter, max_tokens=60, request_id=f"k-{adapter}"
            ) as stream:
                async for _ in stream:
                    started[adapter].set()
                results[adapter] = (stream.token_ids, stream.finish_reason, stream.usage)

        async with anyio.create_task_group() as tg:
            for adapter in ADAPTERS:
                tg.start_soon(one, adapter)
            with anyio.fail_after(20):
                for event in started.values():
                    await event.wait()
            procs["a"].send_signal(signal.SIGKILL)
    for adapter in ADAPTERS:
        token_ids, reason, usage = results[adapter]
        expected = expected_tokens([3], 60, adapter)
        assert (token_ids, reason) == (expected, "length"), adapter
        stream = f"{shard_prefix(shard_of(adapter))}:out:k-{adapter}"
        check_once([decode_event(f[b"data"]) for _, f in await cluster.xrange(stream)], expected)
        if adapter in victims:
            assert usage["deliveries"] >= 2, adapter  # resumed by b after the kill
    assert set((await live(cluster, {"b"})).values()) == {"b"}


async def test_bad_input_gets_its_error_or_dead_letter_per_shard_on_a_cluster(
    cluster_url: str, cluster: aioredis.Redis, adapter_root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (adapter_root / "escape").symlink_to(outside)
    registry = AdapterRegistry(key=f"{PREFIX}:adapters", lora_root=adapter_root)
    await cluster.hset(
        f"{PREFIX}:adapters", mapping={"escape": "escape", "ghost": "ghost", "broken": "broken"}
    )
    async with running_service(
        cluster_url, registry=registry, engine=fake_engine(max_model_len=256),
        max_payload_bytes=4096, routing="affine", num_shards=SHARDS,
    ):  # fmt: skip
        # A raw producer may write anything into any shard stream: spread them.
        for i, (rid, (fields, _)) in enumerate(WITH_REPLY.items()):
            await cluster.xadd(f"{shard_prefix(shard_of(rid))}:requests", fields)
            await cluster.xadd(
                f"{shard_prefix(i % SHARDS)}:requests", {"data": pack(good(f"g{i}"))}
            )
        for i, (fields, _) in enumerate(NO_REPLY):
            await cluster.xadd(f"{shard_prefix(i % SHARDS)}:requests", fields)
        for i in range(len(WITH_REPLY)):
            prefix = shard_prefix(i % SHARDS)
            events = [e async for e in producer.events(cluster, prefix, f"g{i}", timeout_s=10)]
            assert events[-1].finish_reason == "length"
        for rid, (_, code) in WITH_REPLY.items():
            prefix = shard_prefix(shard_of(rid))
            (event,) = [e async for e in producer.events(cluster, prefix, rid, timeout_s=10)]
            assert isinstance(event, ErrorEvent), rid
            assert (event.code, event.seq) == (code, 0), rid
        with anyio.fail_after(10):
            while True:
                dead: list[tuple[int, bytes]] = []
                for shard in range(SHARDS):
                    for _, f in await cluster.xrange(f"{shard_prefix(shard)}:requests:dlq"):
                        dead.append((shard, f[b"reason"]))
                if len(dead) == len(NO_REPLY):
                    break
                await anyio.sleep(0.05)
        expected = sorted((i % SHARDS, code.encode()) for i, (_, code) in enumerate(NO_REPLY))
        assert sorted(dead) == expected
        for shard in range(SHARDS):
            pending = await cluster.xpending(f"{shard_prefix(shard)}:requests", GROUP)
            assert pending["pending"] == 0


async def test_gateway_models_and_status_follow_the_workers_on_a_cluster(
    cluster_workers: Workers, cluster: aioredis.Redis, tmp_path: Path, cluster_url: str
) -> None:
    from broker.cli import collect_status
    from broker.redis_conn import connect_sync
    from clients.gateway import GatewayConfig
    from tests.clients.conftest import running_gateway
    from tests.clients.test_gateway_workers import call

    for name in ("x1", "y1"):
        (tmp_path / "ad" / name).mkdir(parents=True)
    common = (*AFFINE, "--step-delay", "0.005")
    # y1 on both (affine routing sends it to its shard's owner, whichever that is); x1 only
    # on a, so /v1/models loses it with a.
    x1, y1 = (f"{n}={tmp_path / 'ad' / n}" for n in ("x1", "y1"))
    a = cluster_workers.start("a", *common, "--lora-modules", x1, y1)
    cluster_workers.start("b", *common, "--lora-modules", y1)
    owner = await live(cluster, {"a", "b"})
    cfg = GatewayConfig(redis_url=cluster_url, prefix=PREFIX, served_model_name="base")

    def models() -> list[str]:
        return [m["id"] for m in call(gw + "/v1/models")[1]["data"]]

    with running_gateway(cfg) as gw:
        assert await anyio.to_thread.run_sync(models) == ["base", "x1", "y1"]
        body = {"model": "y1", "prompt": "hi", "max_tokens": 5, "temperature": 0}
        status, done = await anyio.to_thread.run_sync(call, gw + "/v1/completions", body)
        assert status == 200, done
        assert done["usage"]["completion_tokens"] == 5
        sync = connect_sync(RedisSettings(cluster_url))
        try:
            shown = await anyio.to_thread.run_sync(collect_status, sync, PREFIX)
        finally:
            sync.close()
        assert shown["routing"]["num_shards"] == SHARDS
        assert {r["index"]: r["owner"] for r in shown["routing"]["shards"]} == owner
        a.send_signal(signal.SIGKILL)  # no goodbye: its record expires, its adapter goes
        await live(cluster, {"b"})
        assert await anyio.to_thread.run_sync(models) == ["base", "y1"]
