"""Python SDK: submit a request to the workers through Redis and follow its tokens.

``AsyncClient.generate`` implements the client loop of docs/protocol.md on one request:
SUBSCRIBE to the reply channel (confirmed) before the XADD, take events in ``seq`` order,
drop duplicates, fill a gap from the result stream ``{prefix}:out:{id}``, honour ``restart``,
raise a named exception on an error event, and abort the request when the caller stops
listening (early exit, timeout, cancellation). ``Client`` is the same on a background loop.

All requests of one ``AsyncClient`` share one reply channel and so one pub/sub connection
(``_Replies``): a task reads it and hands each event to its request by id. A thousand
concurrent streams take one Redis connection for their replies, not a thousand. When that
connection drops, redis-py reconnects and subscribes again, and every open request reads
what it missed from its result stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.from_thread
import redis.asyncio as aioredis
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from broker import heartbeat, producer, routing
from broker.protocol import (
    ErrorEvent,
    Event,
    GenerateRequest,
    TokenEvent,
)
from broker.redis_conn import RedisSettings, connect, is_cluster
from broker.routing import Layout, Shard

DEFAULT_TIMEOUT_S = 60.0
NO_WORKER_AFTER_S = 3.0
"""A request without any event this long checks whether any worker consumes the stream."""
ROUTING_TTL_S = 5.0
"""How long the fleet's routing record (``{prefix}:routing``) is trusted before it is read
again: a fleet restarted with other routing is followed within this time."""

logger = logging.getLogger("lorastream.sdk")

RESYNC = None
"""Put on every open request's queue after the reply connection came back: read the result
stream for what the channel lost meanwhile."""


# ----------------------------------------------------------------------------- errors
class ClientError(Exception):
    """Base of everything the SDK raises."""

    code = "client_error"

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id


class RequestFailed(ClientError):
    """The worker ended the request with an error event; ``code`` is the stable wire code."""

    def __init__(self, code: str, message: str, *, request_id: str | None = None) -> None:
        super().__init__(f"[{code}] {message}", request_id=request_id)
        self.code = code
        self.message = message


class InvalidRequestError(RequestFailed):
    """The request itself is wrong (a field, a sampling parameter, a prompt too long)."""


class AdapterUnavailable(RequestFailed):
    """The adapter is not registered or cannot be loaded."""


class ServerError(RequestFailed):
    """A worker bug, or a request that crashed every worker that ran it."""


class RequestExpired(RequestFailed, TimeoutError):
    """The request's deadline (sent as now + its timeout) passed before a worker finished
    it: the worker ended it with ``expired``, without running it if it had not started."""


class RequestTimeout(ClientError, TimeoutError):
    """No final event in time. ``started`` says whether any event had arrived: when none
    had, no worker picked the request up (none running, or all busy)."""

    code = "timeout"

    def __init__(self, message: str, *, request_id: str, started: bool) -> None:
        super().__init__(message, request_id=request_id)
        self.started = started


class EventsLost(ClientError):
    """A gap in ``seq`` that the result stream cannot fill (result streams off, or trimmed)."""

    code = "events_lost"


_INVALID_CODES = frozenset(
    {
        "bad_payload",
        "payload_too_large",
        "unsupported_version",
        "invalid_request",
        "invalid_sampling_params",
        "prompt_too_long",
    }
)


def error_for(event: ErrorEvent) -> RequestFailed:
    """The named exception of an error event."""
    if event.code in _INVALID_CODES:
        cls: type[RequestFailed] = InvalidRequestError
    elif event.code == "expired":
        cls = RequestExpired
    elif event.code.startswith("adapter_"):
        cls = AdapterUnavailable
    else:
        cls = ServerError
    return cls(event.code, event.message, request_id=event.id)


# ----------------------------------------------------------------------------- results
@dataclass
class Completion:
    """A finished request: the whole text and what the worker reported."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: dict[str, float] = field(default_factory=dict)
    logprobs: list[list[tuple[int, float, str]]] | None = None
    """With ``logprobs`` asked: per token, (token id, logprob, text) of the sampled token
    first, then of the top-n by rank."""

    @property
    def prompt_tokens(self) -> int:
        return int(self.usage.get("prompt_tokens", 0))

    @property
    def completion_tokens(self) -> int:
        return int(self.usage.get("completion_tokens", len(self.token_ids)))


class TokenStream:
    """The events of one request, in order and exactly once (an async iterator).

    Use it as ``async with client.generate(...) as stream: async for event in stream``; leaving
    the block before the final event aborts the request. A bare ``async for`` that breaks
    early aborts too, when the stream is garbage collected (the loop closes async generators).
    ``text``, ``token_ids``, ``finish_reason`` and ``usage`` accumulate as events arrive; an
    event with ``restart`` set clears them (the worker ran the request again from the start).
    """

    def __init__(self, request_id: str, gen: AsyncGenerator[TokenEvent, None]) -> None:
        self.request_id = request_id
        self._gen = gen
        self.text = ""
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, float] = {}
        self.logprobs: list[list[tuple[int, float, str]]] | None = None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> TokenEvent:
        event = await self._gen.__anext__()
        if event.restart:
            self.text, self.token_ids, self.logprobs = "", [], None
        self.text += event.text
        self.token_ids += event.token_ids
        if event.logprobs is not None:
            self.logprobs = (self.logprobs or []) + event_logprobs(event)
        if event.finished:
            self.finish_reason = event.finish_reason
            self.usage = dict(event.usage or {})
        return event

    async def aclose(self) -> None:
        """Stop following; aborts the request when it has not finished."""
        await self._gen.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def collect(self) -> Completion:
        async with self:
            async for _ in self:
                pass
        return Completion(
            self.request_id, self.text, self.token_ids, self.finish_reason, self.usage,
            self.logprobs,
        )  # fmt: skip


def event_logprobs(event: TokenEvent) -> list[list[tuple[int, float, str]]]:
    """An event's logprobs as (token id, logprob, text) per entry, the sampled token first;
    a token's text is ``token_id:N`` when the worker sent none (vLLM's convention)."""
    texts = event.logprob_tokens or []
    out = []
    for i, entries in enumerate(event.logprobs or []):
        names = texts[i] if i < len(texts) else []
        out.append(
            [
                (int(tid), float(lp), names[j] if j < len(names) else f"token_id:{int(tid)}")
                for j, (tid, lp) in enumerate(entries)
            ]
        )
    return out


# ----------------------------------------------------------------------------- async client
class AsyncClient:
    """Talks to ``lorastream serve`` workers through Redis (docs/protocol.md).

    ``timeout_s`` bounds a whole request, ``first_event_timeout_s`` the wait for its first
    event (a request nobody picks up fails fast); both can be overridden per call. Every
    request carries ``deadline`` = now + its timeout (epoch ms): a worker that reads it later
    ends it with ``expired`` without running it.

    A request that has no event after ``no_worker_after_s`` seconds checks whether any
    worker consumes ``{prefix}:requests`` (a live heartbeat record, or an active consumer of
    the group); if none does, ``on_no_worker(message)`` is called once (default: a log
    warning) and the request keeps waiting, up to its timeouts. ``None`` turns the check off.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        prefix: str = "lorastream",
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        first_event_timeout_s: float | None = None,
        ca_file: str | None = None,
        redis: aioredis.Redis | None = None,
        no_worker_after_s: float | None = NO_WORKER_AFTER_S,
        on_no_worker: Callable[[str], None] | None = None,
    ) -> None:
        if redis is None and not redis_url:
            raise ValueError("redis_url is required (or pass a redis client)")
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.first_event_timeout_s = first_event_timeout_s
        self.no_worker_after_s = no_worker_after_s
        self.on_no_worker = on_no_worker or logger.warning
        self._owns_redis = redis is None
        self.redis = redis or connect(RedisSettings(str(redis_url), ca_file=ca_file))
        self.cluster = is_cluster(self.redis)
        self._replies = _Replies(
            self.redis, prefix, f"client-{uuid.uuid4().hex}", sharded=self.cluster
        )
        self._layout: tuple[float, Layout] | None = None

    async def aclose(self) -> None:
        await self._replies.aclose()
        if self._owns_redis:
            await self.redis.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[dict[str, str]] | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
        priority: int = 0,
        timeout_s: float | None = None,
        first_event_timeout_s: float | None = None,
        **sampling: Any,
    ) -> TokenStream:
        """Submit one request; iterate the returned stream for its TokenEvents.

        ``sampling`` holds vLLM's SamplingParams names (max_tokens, temperature, stop,
        logprobs, guided_json, ...). Raises ``RequestFailed`` (a subclass named for the code)
        on an error event, ``RequestTimeout`` when the final event is late. Nothing is sent
        before the first ``__anext__``, so a stream that is never iterated submits nothing.
        For several samples of one prompt use ``generate_n``."""
        if sampling.get("n", 1) != 1:
            raise ValueError("n > 1: use generate_n (one request per sample)")
        sampling.pop("n", None)
        rid = request_id or f"sdk-{uuid.uuid4().hex}"
        request = GenerateRequest(
            id=rid,
            reply_to="",  # the client's channel of the request's shard, set when it is sent
            prompt=prompt,
            prompt_token_ids=list(prompt_token_ids) if prompt_token_ids is not None else None,
            messages=[dict(m) for m in messages] if messages is not None else None,
            adapter=adapter,
            params=dict(sampling),
            priority=priority,
        )
        total = self.timeout_s if timeout_s is None else timeout_s
        first = first_event_timeout_s or self.first_event_timeout_s or total
        return TokenStream(rid, self._follow(request, total, min(first, total)))

    def generate_n(
        self,
        prompt: str | None = None,
        *,
        n: int,
        request_id: str | None = None,
        **kwargs: Any,
    ) -> list[TokenStream]:
        """``n`` independent samples of one prompt, as ``n`` requests ``{request_id}-{i}``
        (docs/protocol.md: ``n`` is 1 on the wire); with ``seed``, sample ``i`` uses
        ``seed + i``, as vLLM's children do. A worker that reads them together computes the
        prompt once (its prefix cache)."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n={n!r} is invalid: must be an integer >= 1")
        base = request_id or f"sdk-{uuid.uuid4().hex}"
        seed = kwargs.pop("seed", None)
        streams = []
        for i in range(n):
            extra = {"seed": seed + i} if seed is not None else {}
            streams.append(
                self.generate(
                    prompt, request_id=f"{base}-{i}" if n > 1 else base, **kwargs, **extra
                )
            )
        return streams

    async def complete_n(
        self, prompt: str | None = None, *, n: int, **kwargs: Any
    ) -> list[Completion]:
        """``n`` samples of one prompt (``generate_n``), collected concurrently."""
        streams = self.generate_n(prompt, n=n, **kwargs)
        results: list[Completion | None] = [None] * n

        async def collect(i: int) -> None:
            results[i] = await streams[i].collect()

        try:
            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(collect, i)
        except BaseExceptionGroup as group:  # one sample's error is the call's
            raise group.exceptions[0] from None
        finally:
            for stream in streams:
                await stream.aclose()
        return [r for r in results if r is not None]

    async def complete(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[dict[str, str]] | None = None,
        adapter: str | None = None,
        **kwargs: Any,
    ) -> Completion:
        """The whole text and usage of one request."""
        return await self.generate(prompt, messages=messages, adapter=adapter, **kwargs).collect()

    async def abort(self, request_id: str) -> None:
        await producer.abort(self.redis, self.prefix, request_id)

    async def adapters(self) -> dict[str, str]:
        """The adapter registry: name → path."""
        raw: Any = await self.redis.hgetall(f"{self.prefix}:adapters")
        return {_s(k): _s(v) for k, v in raw.items()}

    async def workers(self) -> list[heartbeat.WorkerInfo]:
        """The live workers' heartbeat records (docs/protocol.md, "Live workers")."""
        return await heartbeat.live_workers(self.redis, self.prefix)

    async def layout(self) -> Layout:
        """The fleet's streams, from the routing record its workers keep in Redis: where
        each request goes (``broker.routing``). Without a record (no worker started yet, or
        workers that route through the single stream) the single stream; on Redis Cluster,
        where that stream is not served, a record is required."""
        now = time.monotonic()
        if self._layout is not None and now - self._layout[0] < ROUTING_TTL_S:
            return self._layout[1]
        raw = await self.redis.get(routing.routing_key(self.prefix))
        record = routing.decode_record(raw)
        if record is None and self.cluster:
            raise ClientError(
                f"no routing record at {routing.routing_key(self.prefix)}: no worker has "
                "started on this Redis Cluster yet (start one with the same --prefix)"
            )
        layout = Layout.from_record(self.prefix, record, cluster=self.cluster)
        self._layout = (now, layout)
        return layout

    async def _check_consumers(self, request_id: str, waited_s: float, left_s: float) -> None:
        try:
            if await heartbeat.consuming(self.redis, self.prefix):
                return
        except Exception as e:  # the check is advice: a failure of its own only gets logged
            logger.debug("request %s: cannot check for workers: %s", request_id, e)
            return
        self.on_no_worker(
            f"request {request_id}: no worker is consuming {self.prefix}:requests after "
            f"{waited_s:g} s (no live worker heartbeat); waiting up to {left_s:.0f} s more"
        )

    async def _follow(
        self, request: GenerateRequest, timeout_s: float, first_event_timeout_s: float
    ) -> AsyncGenerator[TokenEvent, None]:
        rid = request.id
        finished = False
        started = False
        shard = (await self.layout()).shard_for(request.adapter, rid)
        # Routed before the XADD, on a subscription already confirmed: an event published
        # before the subscription is live would only be in the result stream.
        replies = await self._replies.open(rid, shard)
        try:
            wire = request.to_wire()
            wire["reply_to"] = self._replies.channel_for(shard)
            wire["deadline"] = int((time.time() + timeout_s) * 1000)
            await producer.submit(self.redis, shard.prefix, wire)
            follower = _Follower(self.redis, shard.prefix, rid)
            start = anyio.current_time()
            deadline = start + timeout_s
            first_deadline = start + first_event_timeout_s
            after = self.no_worker_after_s
            check_at = math.inf if after is None else start + after
            while True:
                now = anyio.current_time()
                limit = deadline if started else min(deadline, first_deadline)
                if now >= limit:
                    what = "no event" if not started else "no final event"
                    raise RequestTimeout(
                        f"request {rid}: {what} within "
                        f"{timeout_s if started else first_event_timeout_s:g} s",
                        request_id=rid,
                        started=started,
                    )
                if not started and now >= check_at:
                    check_at = math.inf
                    await self._check_consumers(rid, now - start, limit - now)
                    continue
                item: Event | None = RESYNC
                wake = limit if started else min(limit, check_at)
                with anyio.move_on_after(min(1.0, wake - now)) as waited:
                    try:
                        item = await replies.receive()
                    except anyio.EndOfStream:
                        raise ClientError("the client was closed", request_id=rid) from None
                if waited.cancelled_caught:
                    continue
                taken = await (follower.resync() if item is RESYNC else follower.take(item))
                for event in taken:
                    started = True
                    if isinstance(event, ErrorEvent):
                        finished = True
                        raise error_for(event)
                    if event.finished:
                        finished = True
                    yield event
                    if finished:
                        return
        finally:
            # Shielded: this runs on cancellation too, and the abort must still go out.
            with anyio.CancelScope(shield=True):
                if not finished:
                    with contextlib.suppress(Exception):
                        await producer.abort(self.redis, self.prefix, rid)
                self._replies.close(rid)
                replies.close()


class _Follower:
    """Orders one request's channel messages: duplicates dropped, gaps filled from the
    result stream, ``restart`` honoured."""

    def __init__(self, redis: aioredis.Redis, prefix: str, request_id: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self.request_id = request_id
        self.last = -1
        self._restarts: set[int] = set()

    async def resync(self) -> list[Event]:
        """What the result stream holds past the last event taken (the channel was down)."""
        replayed = await producer.replay(self.redis, self.prefix, self.request_id, self.last)
        return self._order(replayed) if replayed else []

    async def take(self, event: Event) -> list[Event]:
        if self._is_new_restart(event):
            # The worker ran the request again from the start; its seq may go back to 0.
            self.last = event.seq - 1
        if event.seq <= self.last:
            return []  # seen already (sent twice after a reconnect, or replayed)
        pending = [event]
        if event.seq > self.last + 1:
            replayed = await producer.replay(self.redis, self.prefix, self.request_id, self.last)
            pending = [e for e in replayed if e.seq < event.seq] + [event]
        return self._order(pending)

    def _order(self, pending: list[Event]) -> list[Event]:
        out: list[Event] = []
        for e in sorted(pending, key=lambda e: e.seq):
            if self._is_new_restart(e) and e.seq <= self.last:
                self.last = e.seq - 1
            if e.seq <= self.last:
                continue
            if e.seq != self.last + 1:
                raise EventsLost(
                    f"request {self.request_id}: events {self.last + 1}..{e.seq - 1} were lost "
                    "and the result stream does not have them",
                    request_id=self.request_id,
                )
            if isinstance(e, TokenEvent) and e.restart:
                self._restarts.add(e.seq)
            self.last = e.seq
            out.append(e)
        return out

    def _is_new_restart(self, event: Event) -> bool:
        return isinstance(event, TokenEvent) and event.restart and event.seq not in self._restarts


class _Replies:
    """One client's reply channel: one pub/sub connection for all its requests.

    ``open`` subscribes on first use (confirmed) and starts the reader task, which hands
    each event to the queue of its request id; events of requests no longer open are
    dropped. After a connection error redis-py reconnects and subscribes again; when the
    new subscription is confirmed the reader puts ``RESYNC`` on every open queue.

    On Redis Cluster a worker publishes from a script that may touch only its shard's slot,
    so the client has one sharded channel per shard it sends to (``{prefix:N}:tokens:NAME``,
    SSUBSCRIBE), read through redis-py's cluster pub/sub: at most one connection per
    master, however many shards."""

    def __init__(self, redis: aioredis.Redis, prefix: str, name: str, *, sharded: bool) -> None:
        self.redis = redis
        self.channel = f"{prefix}:tokens:{name}"
        self.name = name
        self.sharded = sharded
        self._routes: dict[str, MemoryObjectSendStream[Event | None]] = {}
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._lock = anyio.Lock()
        self._confirmed: dict[str, anyio.Event] = {}
        """Sharded channels subscribed to, set once their subscription is confirmed."""

    def channel_for(self, shard: Shard) -> str:
        return f"{shard.prefix}:tokens:{self.name}" if self.sharded else self.channel

    async def open(self, request_id: str, shard: Shard) -> MemoryObjectReceiveStream[Event | None]:
        async with self._lock:
            if self.sharded:
                await self._ssubscribe(self.channel_for(shard))
            elif self._pubsub is None:
                pubsub = self.redis.pubsub()
                try:
                    await pubsub.subscribe(self.channel)
                    with anyio.fail_after(10):
                        while True:
                            msg = await pubsub.get_message(timeout=1.0)
                            if msg is not None and msg.get("type") == "subscribe":
                                break
                except BaseException:
                    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                        await pubsub.aclose()
                    raise
                self._pubsub = pubsub
                self._reader = asyncio.get_running_loop().create_task(self._read(pubsub))
        send, receive = anyio.create_memory_object_stream[Event | None](math.inf)
        self._routes[request_id] = send
        return receive

    async def _ssubscribe(self, channel: str) -> None:
        """Subscribe to one more sharded channel and wait for the reader to see it confirmed."""
        if channel in self._confirmed:
            return
        confirmed = self._confirmed[channel] = anyio.Event()
        try:
            if self._pubsub is None:
                self._pubsub = self.redis.pubsub()
            await self._pubsub.ssubscribe(channel)
            if self._reader is None:
                self._reader = asyncio.get_running_loop().create_task(self._read(self._pubsub))
            with anyio.fail_after(10):
                await confirmed.wait()
        except BaseException:
            del self._confirmed[channel]
            raise

    def close(self, request_id: str) -> None:
        send = self._routes.pop(request_id, None)
        if send is not None:
            send.close()

    async def aclose(self) -> None:
        for request_id in list(self._routes):
            self.close(request_id)
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def _read(self, pubsub: Any) -> None:
        failing = False
        while True:
            try:
                if self.sharded:
                    msg = await pubsub.get_sharded_message(timeout=1.0)
                else:
                    msg = await pubsub.get_message(timeout=1.0)
            except Exception as e:  # a lost connection, mostly: read again after a pause
                if not failing:
                    logger.warning("reply channel %s: %s: %s", self.channel, type(e).__name__, e)
                failing = True
                await asyncio.sleep(0.2)
                continue
            failing = False
            kind = msg.get("type") if msg is not None else None
            if kind == "ssubscribe":
                confirmed = self._confirmed.get(_s(msg["channel"])) if msg else None
                if confirmed is not None and not confirmed.is_set():
                    confirmed.set()
                    continue
            if kind in ("subscribe", "ssubscribe"):
                # open() took the first confirmation, so this one follows a reconnect (which
                # redis-py may make inside get_message): the channel is live again, and what
                # it lost meanwhile is in the result streams.
                logger.info("reply channel %s: subscribed again", self.channel)
                for send in list(self._routes.values()):
                    self._put(send, RESYNC)
                continue
            if msg is None or kind not in ("message", "smessage"):
                continue
            # Anyone may PUBLISH here: only well-formed events of open requests are routed.
            event = producer.read_event(msg["data"])
            if event is None:
                logger.debug(
                    "reply channel %s: skipped a message that is not an event", self.channel
                )
                continue
            send_to = self._routes.get(event.id)
            if send_to is not None:
                self._put(send_to, event)

    @staticmethod
    def _put(send: MemoryObjectSendStream[Event | None], item: Event | None) -> None:
        # The request may have stopped listening since: the reader must go on regardless.
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            send.send_nowait(item)


# ----------------------------------------------------------------------------- sync client
class Client:
    """The synchronous twin of ``AsyncClient``: the same calls on a background event loop."""

    def __init__(
        self,
        redis_url: str,
        prefix: str = "lorastream",
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        first_event_timeout_s: float | None = None,
        ca_file: str | None = None,
        no_worker_after_s: float | None = NO_WORKER_AFTER_S,
        on_no_worker: Callable[[str], None] | None = None,
    ) -> None:
        self._stack = contextlib.ExitStack()
        self._portal = self._stack.enter_context(
            anyio.from_thread.start_blocking_portal(backend="asyncio")
        )

        async def make() -> AsyncClient:
            return AsyncClient(
                redis_url,
                prefix,
                timeout_s=timeout_s,
                first_event_timeout_s=first_event_timeout_s,
                ca_file=ca_file,
                no_worker_after_s=no_worker_after_s,
                on_no_worker=on_no_worker,
            )

        try:
            self._async = self._portal.call(make)
        except BaseException:
            self._stack.close()  # the portal's thread would keep the process alive
            raise

    def close(self) -> None:
        try:
            self._portal.call(self._async.aclose)
        finally:
            self._stack.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def generate(self, prompt: str | None = None, **kwargs: Any) -> Iterator[TokenEvent]:
        """TokenEvents as they arrive; leaving the loop early (``break``, an exception,
        Ctrl-C) aborts the request.

        A task on the client's loop follows the stream and queues its events here. This
        thread only waits on the queue, so a KeyboardInterrupt cancels that task, which then
        closes the stream (publishing the abort) on its own loop, instead of racing it."""
        stream = self._async.generate(prompt, **kwargs)
        events: queue.SimpleQueue[TokenEvent | Exception | None] = queue.SimpleQueue()
        ended = threading.Event()

        async def follow() -> None:
            try:
                async with stream:
                    async for event in stream:
                        events.put(event)
                events.put(None)
            except Exception as e:
                events.put(e)
            finally:
                ended.set()

        task = self._portal.start_task_soon(follow)
        try:
            while (item := events.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            if not ended.is_set():
                task.cancel()
                ended.wait(timeout=10)

    def complete(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        return self._portal.call(lambda: self._async.complete(prompt, **kwargs))

    def complete_n(self, prompt: str | None = None, *, n: int, **kwargs: Any) -> list[Completion]:
        return self._portal.call(lambda: self._async.complete_n(prompt, n=n, **kwargs))

    def abort(self, request_id: str) -> None:
        self._portal.call(self._async.abort, request_id)

    def adapters(self) -> dict[str, str]:
        return self._portal.call(self._async.adapters)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
