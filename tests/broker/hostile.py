"""Hostile stream entries for property tests and the soak script (scripts/soak.py).

``hostile_entries()`` is a hypothesis strategy of stream entries a producer we do not
control might write: a good request with one field replaced by an arbitrary value, odd
keys, deep and wide containers, integers past 64 bits, lone surrogates, random bytes.
``Tracker`` checks the contract afterwards: every entry ended in exactly one final event
(its result stream) or one dead-letter entry, and nothing else was written twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import redis.asyncio as aioredis
from hypothesis import strategies as st

from broker.protocol import decode_event

GOOD_PARAMS = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64) + 1, max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
any_value = st.recursive(
    _scalars,
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=8), c, max_size=5),
    max_leaves=12,
)
_fields = ("v", "id", "prompt", "prompt_token_ids", "messages", "adapter", "params",
           "reply_to", "priority", "deadline", "ttl_ms")  # fmt: skip
_param_fields = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                 "stop_token_ids", "ignore_eos", "logprobs", "skip_special_tokens", "n")  # fmt: skip


def good_request(rid: str, prompt: str, adapter: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"v": 1, "id": rid, "prompt": prompt, "params": dict(GOOD_PARAMS)}
    if adapter is not None:
        out["adapter"] = adapter
    return out


@dataclass
class Entry:
    """One entry to XADD, and the id a worker can reply to if the payload keeps one."""

    fields: dict[bytes, bytes]
    request_id: str | None


@st.composite
def hostile_entries(draw: st.DrawFn, rid: str) -> Entry:
    """One hostile entry whose request id, when it has a usable one, is ``rid``."""
    kind = draw(st.sampled_from(["field", "param", "key", "bytes", "json", "deep", "wide", "big"]))
    base = good_request(rid, draw(st.text(min_size=1, max_size=12)))
    reply_id: str | None = rid
    if kind == "field":
        name = draw(st.sampled_from(_fields))
        base[name] = draw(any_value)
        if name == "id":
            # A string id that happens to be valid is replied to under that id.
            reply_id = base["id"] if isinstance(base["id"], str) and base["id"] else None
    elif kind == "param":
        base["params"][draw(st.sampled_from(_param_fields))] = draw(any_value)
    elif kind == "key":
        base[draw(st.text(min_size=1, max_size=30).filter(lambda k: k not in _fields))] = draw(
            any_value
        )
    elif kind == "bytes":
        return Entry({b"data": draw(st.binary(max_size=200))}, None)
    elif kind == "json":
        # Text a person types into redis-cli: escapes included, lone surrogates too.
        text = json.dumps(base)[:-1] + ', "x": "' + draw(st.sampled_from(
            ["\\udc00", "\\ud800", "\\u0000", "\\n\\u001b[31m", "\\uDFFF\\uD800"]
        )) + '"}'  # fmt: skip
        return Entry({b"json": text.encode()}, rid)
    elif kind == "deep":
        depth = draw(st.integers(min_value=900, max_value=5000))
        raw = msgpack.packb(base, use_bin_type=True)
        return Entry({b"data": raw[:-1] + b"\x91" * depth + b"\xc0"}, rid)
    elif kind == "wide":
        n = draw(st.integers(min_value=10_000, max_value=200_000))
        base["x"] = [[]] * n
    else:  # big: integers msgpack cannot carry, in JSON
        name = draw(st.sampled_from(["priority", "deadline", "max_tokens", "seed"]))
        target = base["params"] if name in ("max_tokens", "seed") else base
        target[name] = draw(st.integers(min_value=2**63, max_value=2**200))
        return Entry({b"json": json.dumps(base).encode()}, rid)
    try:
        raw = msgpack.packb(base, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return Entry({b"json": json.dumps(base, default=repr).encode()}, reply_id)
    return Entry({b"data": raw}, reply_id)


@dataclass
class Tracker:
    """What was sent, and the check of what the workers made of it."""

    prefix: str
    entries: dict[str, Entry] = field(default_factory=dict)
    """Key -> entry: the stream entry id, or ``"{shard prefix} {entry id}"`` for an entry of a
    shard stream (ids are per stream, so two streams can give the same one)."""
    streams: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Key -> (key prefix of the stream it went to, stream entry id)."""

    def sent(self, entry_id: str, entry: Entry, shard_prefix: str | None = None) -> str:
        """Records an accepted entry; returns its key."""
        prefix = shard_prefix or self.prefix
        key = entry_id if prefix == self.prefix else f"{prefix} {entry_id}"
        self.entries[key] = entry
        self.streams[key] = (prefix, entry_id)
        return key

    def out_key(self, key: str) -> str | None:
        """The result stream of the entry with this key (None: it names no request)."""
        rid = self.entries[key].request_id
        return None if rid is None else f"{self.streams[key][0]}:out:{rid}"

    async def check(
        self, client: aioredis.Redis, keys: Iterable[str] | None = None
    ) -> dict[str, int]:
        """Every entry ended exactly once: one dead letter, or a result stream whose last
        event is its only final one and whose seq are 0, 1, 2, ... Returns counts."""
        dead: dict[tuple[str, str], int] = {}
        for prefix in {self.prefix, *(p for p, _ in self.streams.values())}:
            for _, f in await client.xrange(f"{prefix}:requests:dlq"):
                where = (prefix, f[b"entry_id"].decode())
                dead[where] = dead.get(where, 0) + 1
        counts = {"entries": 0, "dead_lettered": 0, "finished": 0, "lost": 0, "duplicates": 0}
        for key in keys if keys is not None else self.entries:
            counts["entries"] += 1
            n_dead = dead.get(self.streams[key], 0)
            finals = 0
            if (out := self.out_key(key)) is not None:
                events = [decode_event(f[b"data"]) for _, f in await client.xrange(out)]
                seqs = [e.seq for e in events]
                assert seqs == list(range(len(seqs))), (key, seqs)
                finals = sum(e.finished for e in events)
                if finals:
                    assert events[-1].finished, (key, events)
            if n_dead + finals == 0:
                counts["lost"] += 1
            # A dead letter whose client is told (max_deliveries_exceeded) has both, once each.
            if n_dead > 1 or finals > 1:
                counts["duplicates"] += 1
            counts["dead_lettered"] += n_dead > 0
            counts["finished"] += finals > 0 and n_dead == 0
        return counts
