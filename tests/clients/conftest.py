"""Fixtures of the client tests: the broker's per-test redis-server, and one session-wide
stack of redis-server + a real worker on the tiny model + the gateway (the openai, browser
and loadtest tests share it; each test reads what it needs, never the global state)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import uvicorn

from broker.embedded import RedisServer, free_port
from clients.gateway import GatewayConfig, build_app
from tests.broker.conftest import anyio_backend, client, redis_server

__all__ = ["anyio_backend", "client", "redis_server"]

ROOT = Path(__file__).resolve().parents[2]
STACK_PREFIX = "gw"
BASE_MODEL = "tiny-base"


@dataclass
class Stack:
    redis_url: str
    prefix: str
    gateway_url: str
    metrics_url: str
    model_dir: Path
    worker_log: Path

    @property
    def adapters(self) -> list[str]:
        return ["lora0", "lora1", "lora2"]


def _wait_http(url: str, proc: subprocess.Popen[bytes] | None, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"worker exited: {log.read_text()[-3000:]}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not up: {log.read_text()[-3000:]}") from None
            time.sleep(0.1)


def _wait_consumer(url: str, prefix: str, timeout_s: float, log: Path) -> None:
    r = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                if r.xinfo_consumers(f"{prefix}:requests", f"{prefix}:workers"):
                    return
            except redis.ResponseError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"worker never joined the group: {log.read_text()[-3000:]}")
    finally:
        r.close()


@contextlib.contextmanager
def running_gateway(cfg: GatewayConfig) -> Iterator[str]:
    """The gateway on a free port in a thread (uvicorn); yields its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(build_app(cfg), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive(), "the gateway stopped"
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="session")
def stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stack")
    (tmp / "redis").mkdir()
    adapters = tiny_model_dir / "adapters"
    with RedisServer(data_dir=tmp / "redis") as server:
        r = redis.Redis.from_url(server.url)
        # lora0 is preloaded by the worker; lora1 and lora2 come from the registry.
        r.hset(f"{STACK_PREFIX}:adapters", mapping={"lora1": "lora1", "lora2": "lora2"})
        r.close()
        metrics_port = free_port()
        log = tmp / "worker.log"
        cmd = [
            sys.executable, "-m", "engine.cli", "serve",
            "--model", str(tiny_model_dir), "--device", "cpu",
            "--enable-lora", "--max-loras", "2", "--max-cpu-loras", "4", "--max-lora-rank", "32",
            "--max-num-seqs", "16", "--disable-log-stats",
            "--lora-modules", f"lora0={adapters / 'lora0'}", "--lora-root", str(adapters),
            "--redis-url", server.url, "--prefix", STACK_PREFIX, "--consumer-name", "w1",
            "--block-ms", "100", "--metrics-port", str(metrics_port),
            "--metrics-addr", "127.0.0.1",
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with log.open("wb") as out:
            worker = subprocess.Popen(
                cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env,
            )  # fmt: skip
        # No --adapter: the gateway learns lora0 from the worker's heartbeat.
        cfg = GatewayConfig(
            redis_url=server.url,
            prefix=STACK_PREFIX,
            served_model_name=BASE_MODEL,
            timeout_s=60,
            first_event_timeout_s=30,
        )
        try:
            metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            _wait_http(metrics_url, worker, log, 60)
            _wait_consumer(server.url, STACK_PREFIX, 60, log)
            with running_gateway(cfg) as gateway_url:
                _wait_http(gateway_url + "/health", worker, log, 60)  # 200: the worker is live
                yield Stack(server.url, STACK_PREFIX, gateway_url, metrics_url, tiny_model_dir, log)
        finally:
            worker.terminate()
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


class FakeWorker:
    """``broker.cli.serve`` on the fake engine in its own process (starts in a fraction of a
    second), so a test can SIGKILL it."""

    def __init__(self, redis_url: str, prefix: str, log: Path, *args: str) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.broker.fake_worker", "--redis-url", redis_url,
                 "--prefix", prefix, "--block-ms", "100", "--heartbeat-interval", "0.2", *args],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def fake_workers(tmp_path: Path) -> Iterator[Callable[..., FakeWorker]]:
    started: list[FakeWorker] = []

    def start(redis_url: str, prefix: str, *args: str) -> FakeWorker:
        w = FakeWorker(redis_url, prefix, tmp_path / f"worker-{len(started)}.log", *args)
        started.append(w)
        return w

    try:
        yield start
    finally:
        for w in started:
            w.kill()


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
