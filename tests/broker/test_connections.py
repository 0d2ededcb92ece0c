"""Redis URLs: ACL users, TLS with a CA file, unix sockets; secrets never reach the logs."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import anyio
import pytest

from broker import producer
from broker.embedded import RedisServer, free_port
from broker.redis_conn import RedisSettings, connect, redact_url
from broker.service import Service, ServiceConfig
from tests.broker.conftest import PREFIX, running_service
from tests.broker.fake_engine import FakeAsyncEngine

pytestmark = pytest.mark.anyio


def test_redacted_urls_hide_only_the_password() -> None:
    assert redact_url("redis://alice:s3cret@h:6380/2") == "redis://alice:***@h:6380/2"
    assert redact_url("rediss://:s3cret@h/0") == "rediss://:***@h/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
    assert redact_url("unix:///tmp/r.sock") == "unix:///tmp/r.sock"


def test_socket_timeout_outlasts_block() -> None:
    assert RedisSettings("redis://h", block_ms=8000).socket_timeout_s > 8


def test_unknown_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="scheme"):
        connect(RedisSettings("http://h:1"))


async def serve_one(url: str, ca_file: str | None = None) -> None:
    client = connect(RedisSettings(url, ca_file=ca_file))
    try:
        async with running_service(url, ca_file=ca_file):
            await producer.submit(
                client, PREFIX, {"id": "x", "prompt": "a", "params": {"max_tokens": 2}}
            )
            events = [e async for e in producer.events(client, PREFIX, "x", timeout_s=10)]
            assert events[-1].finish_reason == "length"
    finally:
        await client.aclose()


async def keeps_retrying(url: str) -> None:
    """The worker cannot get in, and keeps trying instead of dying; it still drains."""
    client = connect(RedisSettings(url, block_ms=100, connect_timeout_s=0.5))
    service = Service(
        FakeAsyncEngine(), client, ServiceConfig(prefix=PREFIX, consumer="w", block_ms=100)
    )
    try:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(service.run)
                await anyio.sleep(1.0)
                assert not service.ready.is_set()
                service.drain()
    finally:
        await client.aclose()


async def test_acl_user_and_password(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    acl = ("--user", "worker", "on", ">s3cret-pw", "~*", "&*", "+@all", "--user", "default", "off")
    with RedisServer(data_dir=tmp_path, extra_args=acl) as server, caplog.at_level(logging.DEBUG):
        url = f"redis://worker:s3cret-pw@127.0.0.1:{server.port}/0"
        await serve_one(url)
        # A wrong password is retried (logged without the secret), never fatal.
        bad = f"redis://worker:wrong-pw@127.0.0.1:{server.port}/0"
        await keeps_retrying(bad)
    assert "s3cret-pw" not in caplog.text
    assert "wrong-pw" not in caplog.text


async def test_unix_socket(tmp_path: Path) -> None:
    with RedisServer(unix_socket=True) as server:
        assert server.url.startswith("unix://")
        await serve_one(server.url)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make certificates")
async def test_tls_with_a_private_ca(tmp_path: Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "srv.key",
        "-out",
        "srv.csr",
        "-subj",
        "/CN=localhost",
    )
    (tmp_path / "ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost")
    run("x509", "-req", "-in", "srv.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "srv.crt", "-days", "1", "-extfile", "ext")  # fmt: skip
    tls_port = free_port()
    tls = (
        "--tls-port", str(tls_port), "--tls-cert-file", str(tmp_path / "srv.crt"),
        "--tls-key-file", str(tmp_path / "srv.key"), "--tls-ca-cert-file", str(tmp_path / "ca.crt"),
        "--tls-auth-clients", "no",
    )  # fmt: skip
    data = tmp_path / "data"
    data.mkdir()
    with RedisServer(data_dir=data, extra_args=tls):
        await serve_one(f"rediss://127.0.0.1:{tls_port}/0", ca_file=str(tmp_path / "ca.crt"))
        # Without the CA the certificate is not trusted: the worker retries, never connects.
        await keeps_retrying(f"rediss://127.0.0.1:{tls_port}/0")
