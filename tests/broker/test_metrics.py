"""Prometheus metrics: served over HTTP, fed by the service and the engine's stat logger."""

from __future__ import annotations

import urllib.request

import anyio
import pytest
import redis.asyncio as aioredis

from broker import producer
from broker.embedded import RedisServer
from broker.metrics import BrokerMetrics
from tests.broker.conftest import PREFIX, fake_engine, running_service

pytestmark = pytest.mark.anyio


async def scrape(port: int) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    return await anyio.to_thread.run_sync(get)


def value(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{sample} not in the scrape")


async def test_metrics_cover_lag_latency_tokens_and_errors(
    redis_server: RedisServer, client: aioredis.Redis
) -> None:
    metrics = BrokerMetrics()
    engine = fake_engine(max_num_seqs=2, step_delay_s=0.005)
    engine.stat_loggers.append(metrics)
    async with running_service(
        redis_server.url, engine=engine, metrics=metrics, metrics_interval_s=0.05
    ):
        port = metrics.serve(0, "127.0.0.1")
        for i in range(10):
            await producer.submit(
                client, PREFIX, {"id": f"m{i}", "prompt": "ab", "params": {"max_tokens": 40}}
            )
        await producer.submit(
            client, PREFIX, {"id": "bad", "prompt": "ab", "params": {"top_k": -5}}
        )
        await anyio.sleep(0.3)
        busy = await scrape(port)
        for i in range(10):
            [e async for e in producer.events(client, PREFIX, f"m{i}", timeout_s=10)]
        await anyio.sleep(0.15)
        done = await scrape(port)
    assert value(busy, "lorastream_stream_lag") > 0  # the burst waits in the stream
    assert 1 <= value(busy, "lorastream_num_requests_running") <= 2
    assert value(done, "lorastream_stream_lag") == 0
    assert value(done, "lorastream_time_to_first_token_seconds_count") == 10
    assert value(done, "lorastream_inter_token_latency_seconds_count") == 10 * 39
    assert value(done, "lorastream_generation_tokens_total") == 400
    assert value(done, 'lorastream_requests_finished_total{finish_reason="length"}') == 10
    assert value(done, 'lorastream_errors_total{code="invalid_sampling_params"}') == 1
    assert value(done, "lorastream_adapter_loads_total") == 0
    assert "lorastream_kv_cache_usage_ratio" in done
