"""``lorastream generate`` and ``loadtest`` as a user runs them (subprocesses) against a
real redis-server and a fake worker process: Ctrl-C, --chat --system, and the warning that
no worker consumes the stream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import redis

from broker import producer
from broker.embedded import RedisServer
from broker.protocol import Codec
from tests.broker.conftest import PREFIX
from tests.clients.conftest import ROOT, FakeWorker, wait_for

STREAM = f"{PREFIX}:requests"


def lorastream(*argv: str, **kw: object) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "LORASTREAM_REDIS_URL"}
    return subprocess.Popen(
        [sys.executable, "-m", "engine.cli", *argv], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        env={**env, "OMP_NUM_THREADS": "1"}, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def entries(r: redis.Redis) -> list[dict[str, object]]:
    return [Codec.unpack(fields[b"data"]) for _, fields in r.xrange(STREAM)]  # type: ignore[union-attr]


def last_event_reason(r: redis.Redis, request_id: str) -> str | None:
    events = r.xrange(f"{PREFIX}:out:{request_id}")
    if not events:
        return None
    return producer.read_event(events[-1][1][b"data"]).finish_reason  # type: ignore[index, union-attr]


def test_ctrl_c_in_generate_aborts_the_request_and_exits_130(
    redis_server: RedisServer, fake_workers: Callable[..., FakeWorker]
) -> None:
    fake_workers(redis_server.url, PREFIX, "--consumer-name", "w1", "--step-delay", "0.05")
    r = redis.Redis.from_url(redis_server.url)
    proc = lorastream(
        "generate", "--redis-url", redis_server.url, "--prefix", PREFIX,
        "--max-tokens", "100000", "Once upon a time",
    )  # fmt: skip
    try:
        wait_for(lambda: len(entries(r)) == 1, "the request")
        rid = str(entries(r)[0]["id"])
        wait_for(lambda: r.xlen(f"{PREFIX}:out:{rid}") > 2, "tokens")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "[aborted]" in err
    assert "Traceback" not in err
    assert out.strip()  # the tokens streamed before the interrupt
    wait_for(lambda: last_event_reason(r, rid) == "abort", "the worker to abort it")
    r.close()


def test_generate_chat_takes_a_system_message(
    redis_server: RedisServer, fake_workers: Callable[..., FakeWorker]
) -> None:
    fake_workers(redis_server.url, PREFIX, "--consumer-name", "w1")
    proc = lorastream(
        "generate", "--redis-url", redis_server.url, "--prefix", PREFIX, "--chat",
        "--system", "Answer in French.", "--max-tokens", "3", "Hello",
    )  # fmt: skip
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "3 completion tokens" in err
    r = redis.Redis.from_url(redis_server.url)
    [wire] = entries(r)
    r.close()
    assert wire["messages"] == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello"},
    ]


def test_generate_says_when_no_worker_consumes_the_stream(redis_server: RedisServer) -> None:
    proc = lorastream(
        "generate", "--redis-url", redis_server.url, "--prefix", PREFIX, "--timeout", "2",
        "--no-worker-warning", "0.3", "hi",
    )  # fmt: skip
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    warning, timeout = (line for line in err.splitlines() if line.strip())
    assert f"no worker is consuming {PREFIX}:requests" in warning
    assert "RequestTimeout" in timeout
    assert "Traceback" not in err


def test_ctrl_c_in_loadtest_writes_the_results_so_far(
    redis_server: RedisServer, fake_workers: Callable[..., FakeWorker], tmp_path: Path
) -> None:
    fake_workers(redis_server.url, PREFIX, "--consumer-name", "w1", "--step-delay", "0.02")
    r = redis.Redis.from_url(redis_server.url)
    out_dir = tmp_path / "lt"
    proc = lorastream(
        "loadtest", "--redis-url", redis_server.url, "--prefix", PREFIX, "--adapters", "base",
        "--workload", "punica", "--pattern", "identical", "--rate", "10", "--num-requests", "500",
        "--output-len", "20,20", "--no-progress", "--out", str(out_dir),
    )  # fmt: skip
    try:
        wait_for(lambda: r.xlen(STREAM) >= 5, "some requests", timeout_s=60)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        r.close()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    result = json.loads((out_dir / "results.json").read_text())
    summary = result["summary"]
    assert summary["interrupted"] is True
    assert 5 <= summary["requests"] < 500
    assert summary["requests"] == len(result["requests"])
    assert summary["completed"] + sum(summary["errors"].values()) == summary["requests"]
    assert summary["adapters"] == {"base": summary["requests"]}
    assert (out_dir / "throughput.png").exists()
    assert "SLO attainment" in out
