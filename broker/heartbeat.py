"""Live workers: each worker's heartbeat record in Redis, its writer and its readers.

A worker keeps two things up to date every ``interval_s`` (``serve --heartbeat-interval``):

* ``{prefix}:worker:{consumer}``: a string holding the record as JSON (``redis-cli GET``
  shows it), with a PX expiry of three intervals, so a worker that dies vanishes by itself;
* ``{prefix}:workers:live``: a sorted set of consumer names scored by their last-seen epoch
  milliseconds, so readers list workers without SCAN.

Readers take the members of the set whose record still exists; members whose record has
expired are removed as they are found. Records are written by whoever can write to Redis, so
readers decode them defensively: a malformed record is skipped, never fatal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
import redis
import redis.asyncio as aioredis

from broker.redis_conn import REDIS_ERRORS, Backoff, keyspace

logger = logging.getLogger("lorastream.broker")

DEFAULT_INTERVAL_S = 2.0
EXPIRY_INTERVALS = 3
"""A record outlives its last write by this many intervals: one lost write is no death."""
MAX_RECORD_BYTES = 64 * 1024
"""Larger records are skipped unread (the key is writable by anyone with Redis access)."""
ACTIVE_CONSUMER_IDLE_MS = 10_000
"""A group consumer that touched the stream this recently counts as consuming."""


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One worker's heartbeat record (docs/protocol.md, "Live workers")."""

    consumer: str
    """The worker's consumer name in ``{prefix}:workers``."""
    host: str = ""
    pid: int = 0
    version: str = ""
    """The lorastream package version."""
    model: str = ""
    """The base model, as given to ``--model``."""
    adapters_served: list[str] = []
    """Names of ``--lora-modules`` (the registry ``{prefix}:adapters`` adds its own)."""
    adapters_resident: list[str] = []
    """Adapters in device slots, as of the engine's latest step."""
    adapters_host: list[str] = []
    """Adapters in the host cache, as of the engine's latest step."""
    max_num_seqs: int = 0
    free_slots: int = 0
    """Requests the worker would read now."""
    inflight: int = 0
    """Requests the worker holds."""
    draining: bool = False
    """Stopping: reads nothing more."""
    routing: str = "single"
    """``--routing``: ``single`` or ``affine``."""
    shards: list[int] = []
    """With affine routing, the shard streams this worker owns, as it sees the live workers."""
    started_ms: int = 0
    last_seen_ms: int = 0
    """Epoch milliseconds of this write (the writer's clock)."""


_decoder = msgspec.json.Decoder(WorkerInfo)

# Drops live-set members whose record has expired, unless the worker wrote it again since
# the reader looked (then the record exists again and the member stays).
_PRUNE_LUA = """
local live = KEYS[#KEYS]
local removed = 0
for i = 1, #ARGV do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    removed = removed + redis.call('ZREM', live, ARGV[i])
  end
end
return removed
"""


def record_key(prefix: str, consumer: str) -> str:
    return f"{prefix}:worker:{consumer}"


def live_key(prefix: str) -> str:
    return f"{prefix}:workers:live"


def now_ms() -> int:
    return int(time.time() * 1000)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorastream")
    except PackageNotFoundError:
        return "unknown"


def this_host() -> tuple[str, int]:
    return socket.gethostname(), os.getpid()


def decode_record(raw: Any) -> WorkerInfo | None:
    """The record in ``raw``, or None when it is not one (wrong type, size, JSON, fields)."""
    if not isinstance(raw, bytes | str) or len(raw) > MAX_RECORD_BYTES:
        return None
    try:
        return _decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


# ----------------------------------------------------------------------------- writer
async def write(client: aioredis.Redis, prefix: str, info: WorkerInfo, interval_s: float) -> None:
    """One heartbeat: the record with its expiry and the live set's score, in one MULTI."""
    space = keyspace(client, prefix)
    key = record_key(space, info.consumer)
    async with client.pipeline(transaction=True) as pipe:
        pipe.set(
            key, msgspec.json.encode(info), px=max(1, int(EXPIRY_INTERVALS * interval_s * 1000))
        )
        pipe.zadd(live_key(space), {info.consumer: info.last_seen_ms})
        await pipe.execute()


async def remove(client: aioredis.Redis, prefix: str, consumer: str) -> None:
    space = keyspace(client, prefix)
    async with client.pipeline(transaction=True) as pipe:
        pipe.delete(record_key(space, consumer))
        pipe.zrem(live_key(space), consumer)
        await pipe.execute()


async def heartbeat_loop(
    client: aioredis.Redis,
    prefix: str,
    consumer: str,
    info: Callable[[], WorkerInfo],
    interval_s: float = DEFAULT_INTERVAL_S,
) -> None:
    """Write ``info()`` every ``interval_s`` until cancelled, then delete the record.

    Redis errors are logged (once per outage) and retried with backoff; the loop never ends
    on one. ``info()`` is called on the event loop and must be cheap."""
    if interval_s <= 0:
        raise ValueError(f"heartbeat interval {interval_s!r} is invalid: must be > 0")
    backoff = Backoff(max_s=interval_s)
    try:
        while True:
            record = msgspec.structs.replace(info(), consumer=consumer, last_seen_ms=now_ms())
            try:
                await write(client, prefix, record, interval_s)
            except REDIS_ERRORS as e:
                if backoff.failures == 0:
                    logger.warning("heartbeat failed (%s: %s); retrying", type(e).__name__, e)
                await backoff.sleep()
                continue
            if backoff.failures:
                logger.info("heartbeat written again")
            backoff.reset()
            await anyio.sleep(interval_s)
    finally:
        # Shielded: this runs on cancellation, the normal way out.
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(2),
            contextlib.suppress(*REDIS_ERRORS),
        ):
            await remove(client, prefix, consumer)


# ----------------------------------------------------------------------------- readers
def _s(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _pick(prefix: str, members: list[Any], raws: list[Any]) -> tuple[list[WorkerInfo], list[str]]:
    """(live records, members whose record has expired)."""
    live: list[WorkerInfo] = []
    gone: list[str] = []
    for member, raw in zip(members, raws, strict=True):
        name = _s(member)
        if raw is None:
            gone.append(name)
            continue
        record = decode_record(raw)
        if record is None:
            logger.debug("skipping a malformed heartbeat record %s", record_key(prefix, name))
        elif record.consumer == name:
            live.append(record)
    return sorted(live, key=lambda w: w.consumer), gone


async def live_workers(client: aioredis.Redis, prefix: str) -> list[WorkerInfo]:
    """Workers whose heartbeat record exists, by consumer name. Redis errors propagate."""
    prefix = keyspace(client, prefix)
    members: Any = await client.zrange(live_key(prefix), 0, -1)
    if not members:
        return []
    raws: Any = await client.mget([record_key(prefix, _s(m)) for m in members])
    live, gone = _pick(prefix, list(members), list(raws))
    if gone:
        keys = [record_key(prefix, g) for g in gone]
        await client.eval(_PRUNE_LUA, len(gone) + 1, *keys, live_key(prefix), *gone)
    return live


def live_workers_sync(client: redis.Redis, prefix: str) -> list[WorkerInfo]:
    """``live_workers`` for synchronous callers (``lorastream status``)."""
    prefix = keyspace(client, prefix)
    members: Any = client.zrange(live_key(prefix), 0, -1)
    if not members:
        return []
    raws: Any = client.mget([record_key(prefix, _s(m)) for m in members])
    live, gone = _pick(prefix, list(members), list(raws))
    if gone:
        keys = [record_key(prefix, g) for g in gone]
        client.eval(_PRUNE_LUA, len(gone) + 1, *keys, live_key(prefix), *gone)
    return live


async def consuming(client: aioredis.Redis, prefix: str) -> bool:
    """Whether any worker consumes ``{prefix}:requests``: a live heartbeat record of a worker
    that is not draining, or, where no worker keeps a record, a consumer of
    ``{prefix}:workers`` that touched the stream within ACTIVE_CONSUMER_IDLE_MS."""
    workers = await live_workers(client, prefix)
    if workers:
        return any(not w.draining for w in workers)
    try:
        consumers: Any = await client.xinfo_consumers(f"{prefix}:requests", f"{prefix}:workers")
    except redis.ResponseError:
        return False  # no stream or no group: no worker ever started
    return any(
        int(c.get("idle", ACTIVE_CONSUMER_IDLE_MS)) < ACTIVE_CONSUMER_IDLE_MS for c in consumers
    )
