"""The gateway against a real redis-server and fake worker processes: /health follows the
live workers' heartbeats, /v1/models lists what they serve, Redis down is a 503 in OpenAI's
shape on every endpoint, and chat requests get a bounded default max_tokens and a deadline."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import msgpack
import openai
import redis

from broker.embedded import RedisServer
from clients.gateway import GatewayConfig
from tests.broker.conftest import PREFIX
from tests.clients.conftest import FakeWorker, running_gateway, wait_for

BASE = "base-model"


def call(url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """(status, JSON body) of a GET, or a POST when ``body`` is given."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            return res.status, json.load(res)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def config(url: str, **kw: Any) -> GatewayConfig:
    return GatewayConfig(redis_url=url, prefix=PREFIX, served_model_name=BASE, **kw)


def test_health_and_models_follow_the_live_workers(
    redis_server: RedisServer, fake_workers: Callable[..., FakeWorker]
) -> None:
    r = redis.Redis.from_url(redis_server.url)
    r.hset(f"{PREFIX}:adapters", "from-registry", "x")
    with running_gateway(config(redis_server.url)) as gw:
        status, body = call(gw + "/health")
        assert status == 503
        assert body["error"]["code"] == "no_worker"
        assert body["error"]["type"] == "service_unavailable"

        worker = fake_workers(
            redis_server.url, PREFIX, "--consumer-name", "w1",
            "--lora-modules", "sql=/adapters/sql", "chat=/adapters/chat",
        )  # fmt: skip
        wait_for(lambda: call(gw + "/health")[0] == 200, "the worker's heartbeat")
        assert call(gw + "/health")[1] == {"status": "ok", "workers": 1}
        status, models = call(gw + "/v1/models")
        assert status == 200
        assert [m["id"] for m in models["data"]] == [BASE, "chat", "from-registry", "sql"]

        worker.kill()  # SIGKILL: no goodbye, the record expires by itself
        wait_for(lambda: call(gw + "/health")[0] == 503, "the record to expire")
        assert [m["id"] for m in call(gw + "/v1/models")[1]["data"]] == [BASE, "from-registry"]
        assert r.zcard(f"{PREFIX}:workers:live") == 0  # pruned by the readers
    r.close()


def test_redis_down_is_503_in_openai_shape_on_every_endpoint(redis_server: RedisServer) -> None:
    with running_gateway(config(redis_server.url)) as gw:
        redis_server.kill()
        chat = {"model": BASE, "messages": [{"role": "user", "content": "hi"}]}
        requests: list[tuple[str, dict[str, Any] | None]] = [
            ("/health", None),
            ("/v1/models", None),
            ("/v1/completions", {"model": BASE, "prompt": "hi", "max_tokens": 2}),
            ("/v1/completions", {"model": "some-adapter", "prompt": "hi"}),
            ("/v1/completions", {"model": BASE, "prompt": "hi", "stream": True}),
            ("/v1/chat/completions", chat),
            ("/v1/chat/completions", {**chat, "stream": True}),
        ]
        for path, body in requests:
            status, answer = call(gw + path, body)
            assert status == 503, (path, body, answer)
            assert answer["error"]["code"] == "redis_unavailable", answer
            assert set(answer["error"]) == {"message", "type", "param", "code"}


def test_chat_gets_the_bounded_default_max_tokens_and_a_deadline(
    redis_server: RedisServer, fake_workers: Callable[..., FakeWorker]
) -> None:
    fake_workers(redis_server.url, PREFIX, "--consumer-name", "w1")
    cfg = config(redis_server.url, default_max_tokens=7, timeout_s=42)
    with running_gateway(cfg) as gw:
        wait_for(lambda: call(gw + "/health")[0] == 200, "the worker's heartbeat")
        client = openai.OpenAI(base_url=gw + "/v1", api_key="unused", max_retries=0)
        before = time.time()
        # The fake model never ends by itself: without a default it would fill max_model_len.
        done = client.chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": "Tell me everything"}]
        )
        after = time.time()
        client.close()
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None
    assert done.usage.completion_tokens == 7
    r = redis.Redis.from_url(redis_server.url)
    [(_, fields)] = r.xrange(f"{PREFIX}:requests")
    r.close()
    wire = msgpack.unpackb(fields[b"data"])
    assert (before + 42) * 1000 <= wire["deadline"] <= (after + 42) * 1000
    assert wire["params"]["max_tokens"] == 7


def test_a_draining_worker_does_not_count_as_healthy(
    redis_server: RedisServer, fake_workers: Callable[..., FakeWorker]
) -> None:
    worker = fake_workers(
        redis_server.url, PREFIX, "--consumer-name", "w1", "--step-delay", "0.05",
        "--drain-timeout", "60",
    )  # fmt: skip
    r = redis.Redis.from_url(redis_server.url)
    with running_gateway(config(redis_server.url)) as gw:
        wait_for(lambda: call(gw + "/health")[0] == 200, "the worker's heartbeat")
        body = {"v": 1, "id": "long", "prompt": "a", "params": {"max_tokens": 100000}}
        r.xadd(f"{PREFIX}:requests", {"json": json.dumps(body)})
        wait_for(lambda: r.xlen(f"{PREFIX}:out:long") > 0, "the long request to run")
        worker.proc.send_signal(signal.SIGTERM)  # drains: finishes "long", reads nothing new
        wait_for(lambda: call(gw + "/health")[0] == 503, "the draining record")
        assert call(gw + "/health")[1]["error"]["code"] == "no_worker"
        assert r.exists(f"{PREFIX}:worker:w1")  # still there, marked draining
    r.close()
