"""Adapter-affine routing: shard streams, who owns which, and how producers find them.

Requests are partitioned by adapter over a fixed number of shard streams. Each shard is a
key prefix, ``{prefix:N}``: its stream is ``{prefix:N}:requests``, its dead letters
``{prefix:N}:requests:dlq``, a request's result stream ``{prefix:N}:out:{id}`` and its default
reply channel ``{prefix:N}:tokens:{id}``. The braces are a Redis Cluster hash tag, so every
key of one request (and the Lua scripts that write them together) lives on one slot, while
the shards spread over the masters. The single stream of ``--routing single`` is the shard
whose prefix is ``{prefix}`` itself: ``{prefix}:requests``, as it has always been.

A request goes to shard ``crc32(adapter) mod num_shards`` (UTF-8 bytes; CRC-32 as zlib
computes it, so a producer in any language can): every request of one adapter meets the
same worker and its warm adapter cache. A request without adapter goes to
``crc32(id) mod num_shards``: the base model is resident everywhere, so it is spread.

Each live worker owns the shards whose rendezvous (highest-random-weight) score is highest
for it among the live, non-draining workers of the heartbeat records (``broker.heartbeat``):
a worker that joins or dies moves only its own share. Workers may disagree for a moment (a
heartbeat record not seen yet, or just expired): then two workers read one shard through one
consumer group, which delivers each entry to one of them. Disagreement costs affinity, never
correctness; ownership of an *entry* is the PEL's (``broker.ownership``), not the shard's.

Workers publish the layout in ``{prefix}:routing`` (JSON, ``RoutingRecord``) and producers
read it there, so a producer using the SDK needs no change.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec
from redis.crc import key_slot

ROUTINGS: Final = ("single", "affine")
DEFAULT_NUM_SHARDS: Final = 64
MAX_NUM_SHARDS: Final = 4096


class RoutingRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """``{prefix}:routing``: how the fleet under this prefix routes requests."""

    v: int = 1
    routing: str = "single"
    num_shards: int = 0
    """0: the single stream ``{prefix}:requests``; else the shard streams ``{prefix:N}``."""


def routing_key(prefix: str) -> str:
    return f"{prefix}:routing"


def decode_record(raw: Any) -> RoutingRecord | None:
    """The record in ``raw`` or None when it is not one (anyone may write the key)."""
    if not isinstance(raw, bytes | str) or len(raw) > 4096:
        return None
    try:
        record = msgspec.json.decode(raw, type=RoutingRecord)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if record.routing not in ROUTINGS or not 0 <= record.num_shards <= MAX_NUM_SHARDS:
        return None
    return record


def encode_record(record: RoutingRecord) -> bytes:
    return msgspec.json.encode(record)


@dataclass(frozen=True)
class Shard:
    """The keys of one shard stream. ``index`` is None for the single stream."""

    index: int | None
    prefix: str
    """The key prefix of everything of this shard (``lorastream`` or ``{lorastream:3}``)."""

    @property
    def stream(self) -> str:
        return f"{self.prefix}:requests"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}:requests:dlq"

    def out_key(self, request_id: str) -> str:
        return f"{self.prefix}:out:{request_id}"

    def reply_to(self, request_id: str) -> str:
        return f"{self.prefix}:tokens:{request_id}"


@dataclass(frozen=True)
class Layout:
    """The shard streams of one prefix."""

    prefix: str
    num_shards: int = 0
    """0: only the single stream ``{prefix}:requests``."""
    shared: bool = False
    """Whether the single stream is served besides the shards (any worker, no affinity): a
    producer that knows nothing of shards still gets served. Never on Redis Cluster, where
    its requests' result streams would live on other slots than the stream."""

    def __post_init__(self) -> None:
        if not 0 <= self.num_shards <= MAX_NUM_SHARDS:
            raise ValueError(
                f"num_shards={self.num_shards} is invalid: must be 0..{MAX_NUM_SHARDS}"
            )

    @property
    def single(self) -> Shard:
        return Shard(None, self.prefix)

    def shard(self, index: int) -> Shard:
        return Shard(index, f"{{{self.prefix}:{index}}}")

    @property
    def shards(self) -> list[Shard]:
        """Every stream a worker may read: the shards, then the single stream if served."""
        if not self.num_shards:
            return [self.single]
        out = [self.shard(i) for i in range(self.num_shards)]
        return [*out, self.single] if self.shared else out

    def shard_for(self, adapter: str | None, request_id: str) -> Shard:
        """Where a producer sends a request."""
        if not self.num_shards:
            return self.single
        return self.shard(shard_index(adapter, request_id, self.num_shards))

    @classmethod
    def from_record(cls, prefix: str, record: RoutingRecord | None, *, cluster: bool) -> Layout:
        if record is None or not record.num_shards:
            return cls(prefix)
        return cls(prefix, record.num_shards, shared=not cluster)


def sharded_channel(cluster: bool, shard_prefix: str, channel: str) -> bool:
    """Whether a worker publishes ``channel``'s events with SPUBLISH (so its readers use
    SSUBSCRIBE): on Redis Cluster, for a channel in the slot of the shard's keys (the
    publish script may touch no other slot); any other channel gets a plain PUBLISH, which
    a cluster carries to every node."""
    if not cluster:
        return False
    return key_slot(channel.encode()) == key_slot(f"{shard_prefix}:requests".encode())


def ranges(indices: Iterable[int]) -> str:
    """0,1,2,5 → "0-2, 5" (for log lines and tables)."""
    out: list[list[int]] = []
    for i in sorted(indices):
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out) or "none"


def shard_index(adapter: str | None, request_id: str, num_shards: int) -> int:
    key = adapter if adapter is not None else request_id
    return zlib.crc32(key.encode()) % num_shards


# ----------------------------------------------------------------------------- ownership
def score(consumer: str, shard: int) -> int:
    """The rendezvous weight of ``consumer`` for ``shard``."""
    digest = hashlib.blake2b(f"{consumer}\x00{shard}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def ranking(consumers: Iterable[str], shard: int) -> list[str]:
    """Consumers by preference for ``shard``: the owner first, then who takes over from it."""
    return sorted(set(consumers), key=lambda c: (score(c, shard), c), reverse=True)


def owners(consumers: Sequence[str], num_shards: int) -> dict[int, str]:
    """Shard → owner (no entry while nobody is live)."""
    live = set(consumers)
    if not live:
        return {}
    return {s: max(live, key=lambda c: (score(c, s), c)) for s in range(num_shards)}


@dataclass
class Router:
    """The shards one worker reads, recomputed from the live-worker list.

    ``affine``: its own shards (rendezvous), the single stream when the layout serves it, and
    others' only by stealing. ``single``: every stream (the one stream, or on Redis Cluster
    every shard), any worker any request."""

    layout: Layout
    consumer: str
    routing: str = "single"

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing={self.routing!r} is invalid: {' or '.join(ROUTINGS)}")
        self.owned: list[Shard] = []
        self.rank: dict[str, int] = {}
        """Shard prefix → this worker's place in its ranking (0: the owner)."""
        self.update([])

    @property
    def affine(self) -> bool:
        return self.routing == "affine" and self.layout.num_shards > 0

    @property
    def all(self) -> list[Shard]:
        return self.layout.shards

    def update(self, live: Sequence[str]) -> bool:
        """Recompute from the live, non-draining consumers (this one is always counted);
        returns whether the owned set changed."""
        before = [s.prefix for s in self.owned]
        if not self.affine:
            self.owned = list(self.all)
            self.rank = {s.prefix: 0 for s in self.owned}
        else:
            consumers = {*live, self.consumer}
            owned, rank = [], {}
            for shard in self.all:
                if shard.index is None:
                    owned.append(shard)
                    rank[shard.prefix] = 0
                    continue
                order = ranking(consumers, shard.index)
                rank[shard.prefix] = order.index(self.consumer)
                if rank[shard.prefix] == 0:
                    owned.append(shard)
            self.owned, self.rank = owned, rank
        return before != [s.prefix for s in self.owned]

    def others(self) -> list[Shard]:
        """Shards this worker does not own, those it is next in line for first."""
        owned = {s.prefix for s in self.owned}
        rest = [s for s in self.all if s.prefix not in owned]
        return sorted(rest, key=lambda s: (self.rank.get(s.prefix, 0), s.index or 0))


__all__ = [
    "DEFAULT_NUM_SHARDS",
    "ROUTINGS",
    "Layout",
    "Router",
    "RoutingRecord",
    "Shard",
    "decode_record",
    "owners",
    "ranges",
    "ranking",
    "routing_key",
    "shard_index",
    "sharded_channel",
]
