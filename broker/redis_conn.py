"""Redis connections: URLs with ACL credentials and TLS, timeouts above BLOCK, backoff.

Every loop of the worker catches ``TRANSIENT`` errors, sleeps with ``Backoff`` and tries
again: the worker never dies of a Redis error. redis-py reconnects a pooled connection on
the next command after a drop, so "reconnect" is simply "try again later".
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import anyio
import redis
import redis.asyncio as aioredis
import redis.cluster
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

logger = logging.getLogger("lorastream.broker")

# Errors after which the same command may succeed later (Redis restarting, network blip).
TRANSIENT: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,
    OSError,
)
# Everything a worker loop survives: transient errors and any other error reply.
REDIS_ERRORS: tuple[type[Exception], ...] = (*TRANSIENT, redis.RedisError)


@dataclass(frozen=True)
class RedisSettings:
    url: str
    """redis://[user:password@]host:port/db, rediss://... (TLS), unix:///path/to.sock, or
    redis+cluster://host:port (rediss+cluster:// with TLS): a Redis Cluster, found from any
    of its nodes."""
    ca_file: str | None = None
    """CA bundle for rediss:// (the system store when None)."""
    block_ms: int = 1000
    """BLOCK of XREADGROUP; socket reads must outlast it."""
    connect_timeout_s: float = 5.0

    @property
    def socket_timeout_s(self) -> float:
        # redis-py 8 times a socket read out after 5 s by default; a blocked XREADGROUP
        # legitimately waits block_ms, so reads get that plus headroom.
        return self.block_ms / 1000 + 5.0

    @property
    def redacted_url(self) -> str:
        return redact_url(self.url)


def redact_url(url: str) -> str:
    """The URL without its password, for logs: secrets are never logged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable redis url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{user}:***@{host}" if user else f":***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _client_kwargs(settings: RedisSettings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.connect_timeout_s,
        "health_check_interval": 10,
        # One quick retry absorbs a pooled connection that went stale (Redis restarted);
        # longer outages are the callers' backoff loops' business.
        "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
    }
    scheme = urlsplit(settings.url).scheme
    if scheme not in SCHEMES:
        raise ValueError(
            f"--redis-url scheme {scheme!r} is invalid: use redis://, rediss://, unix:// or "
            "redis+cluster://"
        )
    if settings.ca_file and scheme.startswith("rediss"):
        kwargs["ssl_ca_certs"] = settings.ca_file
    return kwargs


SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")


def cluster_url(url: str) -> str | None:
    """The redis:// (rediss://) URL of a redis+cluster:// one, None for other URLs."""
    parts = urlsplit(url)
    if not parts.scheme.endswith("+cluster"):
        return None
    return urlunsplit((parts.scheme.removesuffix("+cluster"), *parts[1:]))


def connect(settings: RedisSettings) -> aioredis.Redis:
    """An asyncio client (a cluster client for redis+cluster:// URLs: it speaks the same
    commands and routes each to the master of its key's slot). Connects lazily: creating it
    never fails on a down server."""
    kwargs = _client_kwargs(settings)
    node = cluster_url(settings.url)
    if node is not None:
        kwargs.pop("health_check_interval")
        client: Any = RedisCluster.from_url(node, **kwargs)
        return cast(aioredis.Redis, client)
    return aioredis.Redis.from_url(settings.url, **kwargs)


def connect_sync(settings: RedisSettings) -> redis.Redis:
    from redis.retry import Retry as SyncRetry

    kwargs = {
        **_client_kwargs(settings),
        "retry": SyncRetry(ExponentialBackoff(cap=0.2, base=0.02), 1),
    }
    node = cluster_url(settings.url)
    if node is not None:
        kwargs.pop("health_check_interval")
        client: Any = redis.cluster.RedisCluster.from_url(node, **kwargs)
        return cast(redis.Redis, client)
    return redis.Redis.from_url(settings.url, **kwargs)


def is_cluster(client: object) -> bool:
    """Whether ``client`` talks to a Redis Cluster: then every script and multi-key command
    must stay on one slot, and token events go out on sharded pub/sub."""
    return isinstance(client, RedisCluster | redis.cluster.RedisCluster)


def keyspace(client: object, prefix: str) -> str:
    """The prefix of keys that go together in one MULTI or script (the heartbeat records and
    their set): on a cluster, ``{prefix}``, a hash tag that puts them on one slot."""
    return f"{{{prefix}}}" if is_cluster(client) else prefix


def is_nogroup(err: BaseException) -> bool:
    return isinstance(err, redis.ResponseError) and str(err).startswith("NOGROUP")


class Backoff:
    """Exponential backoff with full jitter, so many workers do not reconnect in lockstep."""

    def __init__(self, initial_s: float = 0.05, max_s: float = 2.0) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.failures = 0

    def reset(self) -> None:
        self.failures = 0

    def next_delay(self) -> float:
        delay = min(self.max_s, self.initial_s * 2**self.failures)
        self.failures += 1
        return random.uniform(delay / 2, delay)

    async def sleep(self) -> None:
        await anyio.sleep(self.next_delay())
