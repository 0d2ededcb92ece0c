"""``lorastream serve | adapters``: flags, the adapter registry commands, embedded Redis."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
import redis

from broker import producer
from broker.embedded import RedisServer
from broker.redis_conn import RedisSettings, connect
from engine.cli import build_parser, main
from tests.broker.conftest import PREFIX

ROOT = Path(__file__).resolve().parents[2]


def test_serve_takes_engine_and_service_flags() -> None:
    ns = build_parser().parse_args(
        ["serve", "--model", "m", "--enable-lora", "--max-loras", "4", "--redis-url", "redis://h:1/0",
         "--claim-idle-ms", "5000", "--max-deliveries", "3", "--drain-timeout", "7", "--result-ttl", "0",
         "--max-payload-bytes", "100", "--lora-root", "/a", "--metrics-port", "9100", "--consumer-name", "c"]
    )  # fmt: skip
    assert (ns.command, ns.enable_lora, ns.max_loras, ns.claim_idle_ms) == ("serve", True, 4, 5000)
    assert (ns.max_deliveries, ns.drain_timeout, ns.result_ttl, ns.lora_root) == (3, 7.0, 0, "/a")


def test_adapters_add_ls_rm(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "sql").mkdir()
    base = ["adapters", "--redis-url", redis_server.url, "--prefix", PREFIX]
    assert main([*base, "add", "sql", "sql", "--lora-root", str(tmp_path)]) == 0
    assert main([*base, "add", "chat", "/abs/chat"]) == 0
    assert main([*base, "add", "evil", "../x", "--lora-root", str(tmp_path)]) == 2
    assert "must not contain '..'" in capsys.readouterr().err
    assert main([*base, "ls"]) == 0
    assert capsys.readouterr().out.splitlines() == ["chat\t/abs/chat", "sql\tsql"]
    assert main([*base, "rm", "chat"]) == 0
    assert main([*base, "rm", "chat"]) == 1
    r = redis.Redis.from_url(redis_server.url)
    assert r.hgetall(f"{PREFIX}:adapters") == {b"sql": b"sql"}
    r.close()


@pytest.mark.anyio
async def test_serve_without_a_url_starts_and_stops_a_private_redis() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.broker.fake_worker", "--prefix", PREFIX, "--consumer-name", "solo"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await anyio.to_thread.run_sync(proc.stdout.readline)
        match = re.search(rb"private redis-server at (redis://\S+)", line)
        assert match, line
        url = match.group(1).decode()
        client = connect(RedisSettings(url))
        try:
            await producer.submit(
                client, PREFIX, {"id": "e", "prompt": "a", "params": {"max_tokens": 3}}
            )
            events = [e async for e in producer.events(client, PREFIX, "e", timeout_s=20)]
            assert events[-1].finish_reason == "length"
        finally:
            await client.aclose()
        proc.send_signal(signal.SIGTERM)
        assert await anyio.to_thread.run_sync(lambda: proc.wait(timeout=20)) == 0
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
