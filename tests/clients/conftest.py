"""Fixtures of the client tests: the broker's (a private redis-server per test, a client)."""

from __future__ import annotations

from tests.broker.conftest import anyio_backend, client, redis_server

__all__ = ["anyio_backend", "client", "redis_server"]
