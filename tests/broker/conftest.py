"""Fixtures for the broker: a private redis-server per test and a service on a fake engine."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
import redis.asyncio as aioredis

from broker.embedded import RedisServer
from broker.metrics import BrokerMetrics
from broker.redis_conn import RedisSettings, connect
from broker.registry import AdapterRegistry
from broker.service import Service, ServiceConfig
from tests.broker.fake_engine import FakeAsyncEngine, FakeConfig

if TYPE_CHECKING:
    from tests.broker.cluster import LocalCluster
    from tests.broker.workers import Workers

PREFIX = "t"


@pytest.fixture
def anyio_backend() -> str:
    # The real AsyncLLMEngine is asyncio-based.
    return "asyncio"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server on a free loopback port (never the shared 6379); tests may
    kill and restart it."""
    server = RedisServer(data_dir=tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    with server:
        yield server


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    c = connect(RedisSettings(redis_server.url, block_ms=100))
    try:
        yield c
    finally:
        await c.aclose()


@pytest.fixture
def adapter_root(tmp_path: Path) -> Path:
    root = tmp_path / "adapters"
    for name in ("alpha", "beta", "gamma"):
        (root / name).mkdir(parents=True)
    (root / "broken").mkdir()
    (root / "broken" / "CORRUPT").write_text("")
    return root


class Running:
    """A service running in the test's event loop."""

    def __init__(self, service: Service, engine: FakeAsyncEngine) -> None:
        self.service = service
        self.engine = engine
        self.rc: int | None = None


@contextlib.asynccontextmanager
async def running_service(
    url: str,
    *,
    engine: FakeAsyncEngine | None = None,
    registry: AdapterRegistry | None = None,
    metrics: BrokerMetrics | None = None,
    consumer: str = "w1",
    ca_file: str | None = None,
    ready_timeout_s: float = 10.0,
    **config: Any,
) -> AsyncIterator[Running]:
    engine = engine or FakeAsyncEngine()
    cfg = ServiceConfig(
        **{"prefix": PREFIX, "consumer": consumer, "block_ms": 100, "claim_idle_ms": 1000, **config}
    )
    redis_client = connect(
        RedisSettings(url, ca_file=ca_file, block_ms=cfg.block_ms, connect_timeout_s=1.0)
    )
    service = Service(
        engine,
        redis_client,
        cfg,
        registry=registry or AdapterRegistry(key=f"{PREFIX}:adapters"),
        metrics=metrics,
    )
    running = Running(service, engine)

    async def run() -> None:
        running.rc = await service.run()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            with anyio.fail_after(ready_timeout_s):
                await service.ready.wait()
            yield running
            service.drain()
    finally:
        await redis_client.aclose()
        await engine.shutdown()


async def eventually(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    with anyio.fail_after(timeout_s):
        while not predicate():
            await anyio.sleep(0.01)


def fake_engine(**kwargs: Any) -> FakeAsyncEngine:
    step = kwargs.pop("step_delay_s", 0.002)
    return FakeAsyncEngine(FakeConfig(**kwargs), step_delay_s=step)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A real local Redis Cluster (3 masters), shared by the session: started once."""
    from tests.broker.cluster import LocalCluster

    with LocalCluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture
def cluster_url(redis_cluster: LocalCluster) -> str:
    """The cluster, emptied for this test."""
    redis_cluster.flush()
    return redis_cluster.url


@pytest.fixture
def workers(redis_server: RedisServer, tmp_path: Path) -> Iterator[Workers]:
    """Worker processes on the fake engine, killed at the end of the test."""
    from tests.broker.workers import Workers

    w = Workers(redis_server.url, tmp_path)
    try:
        yield w
    finally:
        w.stop_all()
