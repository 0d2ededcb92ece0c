"""A minimal raw producer and subscriber for the demo and the tests (the SDK is clients/).

``events`` is the reference client loop of docs/protocol.md: SUBSCRIBE first, then replay
the result stream, then follow the channel, dropping events already seen (``seq``) and
filling a gap from the result stream. Anyone who can PUBLISH may write to a reply channel,
so it takes only events of its own request id and skips anything it cannot decode.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import redis.asyncio as aioredis

from broker.protocol import VERSION, AbortRequest, Codec, Event, decode_event, default_reply_to
from broker.redis_conn import is_cluster
from broker.routing import sharded_channel

logger = logging.getLogger("lorastream.producer")


async def submit(
    client: aioredis.Redis, prefix: str, request: dict[str, Any], *, as_json: bool = False
) -> str:
    """XADD one request (a wire map; ``v`` is filled in). Returns the entry id."""
    payload = {"v": VERSION, **request}
    field = {"json": json.dumps(payload)} if as_json else {"data": Codec.pack(payload)}
    entry_id = await client.xadd(f"{prefix}:requests", field)  # type: ignore[arg-type]
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


async def abort(client: aioredis.Redis, prefix: str, request_id: str) -> None:
    await client.publish(f"{prefix}:control", Codec.pack(AbortRequest(request_id).to_wire()))


async def replay(
    client: aioredis.Redis, prefix: str, request_id: str, after_seq: int = -1
) -> list[Event]:
    entries: Any = await client.xrange(f"{prefix}:out:{request_id}")
    events = [e for _, fields in entries if (e := own_event(fields.get(b"data"), request_id))]
    return [e for e in events if e.seq > after_seq]


def read_event(raw: Any) -> Event | None:
    """The event in ``raw``, or None when it is not one (whoever wrote it)."""
    if not isinstance(raw, bytes):
        return None
    try:
        event = decode_event(raw)
    except Exception as e:
        logger.debug("skipping an undecodable event (%s)", e)
        return None
    if not isinstance(event.id, str) or type(event.seq) is not int:
        return None
    return event


def own_event(raw: Any, request_id: str) -> Event | None:
    """The event in ``raw`` if it is one and belongs to ``request_id``, else None."""
    event = read_event(raw)
    return event if event is not None and event.id == request_id else None


async def events(
    client: aioredis.Redis,
    prefix: str,
    request_id: str,
    *,
    reply_to: str | None = None,
    timeout_s: float = 60.0,
) -> AsyncIterator[Event]:
    """Every event of one request in seq order, exactly once, until the final one.

    ``prefix`` is the request's shard prefix (``broker.routing.Shard.prefix``; the plain
    prefix for the single stream). On Redis Cluster a channel in the shard's slot is read
    with SSUBSCRIBE, as the worker SPUBLISHes there."""
    channel = reply_to or default_reply_to(prefix, request_id)
    sharded = sharded_channel(is_cluster(client), prefix, channel)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    if sharded:
        await pubsub.ssubscribe(channel)
    else:
        await pubsub.subscribe(channel)
    last = -1
    try:
        with anyio.fail_after(timeout_s):
            # Subscribed before the replay: nothing falls between the two.
            for event in await replay(client, prefix, request_id):
                if event.seq == last + 1:
                    last = event.seq
                    yield event
                    if event.finished:
                        return
            while True:
                if sharded:
                    msg = await pubsub.get_sharded_message(
                        ignore_subscribe_messages=True, timeout=1.0
                    )
                else:
                    msg = await pubsub.get_message(timeout=1.0)
                if msg is None or msg.get("type") not in ("message", "smessage"):
                    continue
                got = own_event(msg["data"], request_id)
                if got is None:
                    continue  # another request's event, or not an event at all
                if got.seq <= last:
                    continue  # seen already (replayed, or sent twice after a reconnect)
                pending = [got]
                if got.seq > last + 1:
                    # A gap: the result stream has what the channel lost.
                    pending = [
                        e
                        for e in await replay(client, prefix, request_id, last)
                        if e.seq <= got.seq
                    ]
                for e in pending:
                    if e.seq != last + 1:
                        continue
                    last = e.seq
                    yield e
                    if e.finished:
                        return
    finally:
        await pubsub.aclose()


def assemble(events_: list[Event]) -> tuple[list[int], str]:
    """Token ids and text of a request from its events, honouring ``restart`` markers."""
    token_ids: list[int] = []
    text = ""
    for e in events_:
        if getattr(e, "restart", False):
            token_ids, text = [], ""
        token_ids += e.token_ids
        text += e.text
    return token_ids, text
