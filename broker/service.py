"""The worker: Redis streams in, ``AsyncLLMEngine`` in the middle, events out.

One task group; tasks talk through one bounded memory object stream::

    intake ──start──▶ job (one per request) ──_Out──▶ publisher ──MULTI/EXEC──▶ Redis
      ▲ XREADGROUP / XAUTOCLAIM, COUNT = free capacity        (PUBLISH, XADD out, XACK)
    keepalive: XCLAIM JUSTID of our running entries (Lua: only while still ours)
    control:   SUBSCRIBE {prefix}:control → abort → cancel the job's scope
    metrics:   XINFO GROUPS → lag

Delivery is at-least-once: an entry is XACKed in the same transaction that publishes its
final event. A request run again (our own pending entries after a restart, or an idle entry
taken over from a dead worker) resumes from what its result stream already holds: the
tokens published so far are appended to the prompt and ``seq`` continues, so the client's
stream stays complete and gapless and never shows a token twice (docs/protocol.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import redis
import redis.asyncio as aioredis
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from broker.metrics import BrokerMetrics
from broker.protocol import (
    AbortRequest,
    BadPayload,
    Codec,
    DuplicateRequest,
    ErrorEvent,
    Event,
    GenerateRequest,
    MaxDeliveriesExceeded,
    PayloadTooLarge,
    TokenEvent,
    decode_event,
    encode_event,
    error_field,
    logprobs_to_wire,
    reply_address,
)
from broker.redis_conn import REDIS_ERRORS, Backoff
from broker.registry import AdapterRegistry
from engine.errors import EngineDead, InvalidRequest, LoRAStreamError
from engine.lora.request import LoRARequest
from engine.outputs import RequestOutput, ResumedOutput
from engine.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("lorastream.broker")

# Keeps our running entries alive without stealing one that another worker has taken over:
# XCLAIM with min-idle 0 would move it back to us, so ownership is checked in the same
# atomic step. Returns the ids that now belong to someone else.
_KEEPALIVE_LUA = """
local stolen = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] then
    if p[1][2] == ARGV[2] then
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    else
      table.insert(stolen, ARGV[i])
    end
  end
end
return stolen
"""

# Idle time given to entries we give up on while draining, so another worker's next
# XAUTOCLAIM takes them at once instead of after --claim-idle-ms.
_RELEASED_IDLE_MS = 10**12


class EngineClient(Protocol):
    """What the service needs from ``engine.AsyncLLMEngine`` (tests pass a fake)."""

    engine: Any
    """``.tokenizer`` and ``.config`` (``max_model_len``, ``model``, ``scheduler.max_num_seqs``)."""

    def generate(
        self,
        prompt: Any,
        sampling_params: SamplingParams,
        request_id: str,
        lora_request: LoRARequest | None = None,
        priority: int = 0,
        resumed: ResumedOutput | None = None,
    ) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    def free_capacity(self) -> int: ...


@dataclass(frozen=True)
class ServiceConfig:
    prefix: str = "lorastream"
    consumer: str = field(default_factory=lambda: f"{socket.gethostname()}:cpu")
    """Stable per worker (host + device): a restarted worker finds its own pending entries."""
    block_ms: int = 1000
    claim_idle_ms: int = 30_000
    """Entries of other consumers idle this long are taken over; ours are kept alive at a third."""
    max_deliveries: int = 5
    drain_timeout_s: float = 30.0
    result_ttl_s: int = 3600
    """Lifetime of {prefix}:out:{id} after its last event; 0 disables result streams."""
    result_maxlen: int = 10_000
    max_payload_bytes: int = 1 << 20
    max_inflight: int | None = None
    """Requests held at once; defaults to the engine's max_num_seqs."""
    metrics_interval_s: float = 5.0
    publish_batch: int = 1024
    remembered_aborts: int = 10_000
    dlq_maxlen: int = 100_000

    def __post_init__(self) -> None:
        for name in (
            "block_ms",
            "claim_idle_ms",
            "max_deliveries",
            "result_maxlen",
            "max_payload_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be >= 1")
        if self.result_ttl_s < 0 or self.drain_timeout_s < 0:
            raise ValueError("result_ttl_s and drain_timeout_s must be >= 0")
        if not self.prefix or not self.consumer:
            raise ValueError("prefix and consumer must be non-empty")

    @property
    def stream(self) -> str:
        return f"{self.prefix}:requests"

    @property
    def group(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}:requests:dlq"

    @property
    def control(self) -> str:
        return f"{self.prefix}:control"

    def out_key(self, request_id: str) -> str:
        return f"{self.prefix}:out:{request_id}"


@dataclass(eq=False)
class _Job:
    """One request this worker holds, from intake until its final event is published."""

    entry_id: str
    req: GenerateRequest
    params: SamplingParams
    deliveries: int
    entry_ms: int
    intake_time: float
    lora: LoRARequest | None = None
    next_seq: int = 0
    """Owned by the publisher: the seq of the next event."""
    resumed_tokens: list[int] = field(default_factory=list)
    """Tokens a previous run published; the engine continues after them."""
    resumed_text: str = ""
    """The text a previous run published (the detokenizer continues it)."""
    restart: bool = False
    """The next event carries ``restart``: the client drops what it had for this id."""
    scope: anyio.CancelScope | None = None
    abort_requested: bool = False
    stolen: bool = False
    """Another worker took the entry over (we were presumed dead)."""
    final_queued: bool = False
    last_output_time: float | None = None


@dataclass(eq=False)
class _Out:
    """What the publisher writes: an event (merged per request per batch), an ack, a DLQ entry."""

    request_id: str | None
    reply_to: str | None
    job: _Job | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[list[list[float]]] | None = None
    finished: bool = False
    finish_reason: str | None = None
    error: tuple[str, str, str | None] | None = None
    """(code, message, field)."""
    usage: dict[str, float] | None = None
    seq: int = 0
    """For events without a job (bad input, DLQ); jobs number their own."""
    ack: str | None = None
    dlq: dict[str, str | bytes] | None = None

    def merge(self, later: _Out) -> None:
        """Coalesce a later delta of the same request (when Redis was slower than the engine)."""
        self.token_ids = self.token_ids + later.token_ids
        self.text += later.text
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs
        self.finished, self.finish_reason = later.finished, later.finish_reason
        self.error, self.usage, self.ack = later.error, later.usage, later.ack

    def event(self, seq: int, restart: bool) -> Event:
        assert self.request_id is not None
        if self.error is not None:
            code, message, field_name = self.error
            return ErrorEvent(
                id=self.request_id, seq=seq, code=code, message=message,
                token_ids=self.token_ids, text=self.text, usage=self.usage, field=field_name,
            )  # fmt: skip
        return TokenEvent(
            id=self.request_id, seq=seq, token_ids=self.token_ids, text=self.text,
            finished=self.finished, finish_reason=self.finish_reason, usage=self.usage,
            logprobs=self.logprobs, restart=restart,
        )  # fmt: skip


class Service:
    """``await Service(...).run()`` serves until ``drain()`` (SIGTERM) and returns an exit code."""

    def __init__(
        self,
        engine: EngineClient,
        client: aioredis.Redis,
        config: ServiceConfig | None = None,
        *,
        registry: AdapterRegistry | None = None,
        metrics: BrokerMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.redis = client
        self.cfg = config or ServiceConfig()
        self.registry = registry or AdapterRegistry(key=f"{self.cfg.prefix}:adapters")
        self.metrics = metrics or BrokerMetrics()
        self.max_inflight = self.cfg.max_inflight or int(
            engine.engine.config.scheduler.max_num_seqs
        )
        self._by_entry: dict[str, _Job] = {}
        self._by_request: dict[str, _Job] = {}
        self._aborted: OrderedDict[str, None] = OrderedDict()
        self._changed = anyio.Event()
        self._draining = anyio.Event()
        self._jobs_tg: TaskGroup | None = None
        self._send: MemoryObjectSendStream[_Out] | None = None
        self._publisher_done = anyio.Event()
        self._fatal: BaseException | None = None
        self._abandoned: set[str] = set()
        """Entries we stopped running without a final event: released on exit."""
        self._keepalive = client.register_script(_KEEPALIVE_LUA)
        self.high_water = 0
        """Most requests held at once (tests check backpressure with it)."""
        self.ready = anyio.Event()
        """Set once the group exists and intake runs."""

    # ------------------------------------------------------------------ lifecycle
    def drain(self) -> None:
        """Stop reading; finish what runs within drain_timeout_s; then return from run()."""
        if not self._draining.is_set():
            logger.info("draining: %d request(s) running", len(self._by_entry))
        self._draining.set()
        self._notify()

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    @property
    def inflight(self) -> int:
        return len(self._by_entry)

    async def run(self) -> int:
        send, receive = anyio.create_memory_object_stream[_Out](max(2 * self.max_inflight, 64))
        self._send = send
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._publisher, receive)
            tg.start_soon(self._keepalive_loop)
            tg.start_soon(self._control_loop)
            tg.start_soon(self._metrics_loop)
            async with send, anyio.create_task_group() as jobs:
                self._jobs_tg = jobs
                await self._intake()
                timeout = 0.0 if self._fatal is not None else self.cfg.drain_timeout_s
                with anyio.move_on_after(timeout):
                    while self._by_entry:
                        await self._wait_changed(1.0)
                jobs.cancel_scope.cancel()
            # The send side is closed: the publisher flushes what the jobs queued, then ends.
            with anyio.move_on_after(max(5.0, self.cfg.block_ms / 1000)):
                await self._publisher_done.wait()
            if self._abandoned:
                await self._release(sorted(self._abandoned))
            tg.cancel_scope.cancel()
        if self._fatal is not None:
            logger.error("worker stopped: %s", self._fatal)
            return 1
        logger.info("drained")
        return 0

    async def _release(self, entry_ids: list[str]) -> None:
        """Leave entries we could not finish pending, idle enough for the next XAUTOCLAIM."""
        logger.warning("%d unfinished request(s) left pending for another worker", len(entry_ids))
        with contextlib.suppress(*REDIS_ERRORS):
            await self.redis.xclaim(
                self.cfg.stream, self.cfg.group, self.cfg.consumer, 0, list[Any](entry_ids),
                idle=_RELEASED_IDLE_MS, justid=True,
            )  # fmt: skip

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _wait_changed(self, timeout_s: float) -> None:
        with anyio.move_on_after(timeout_s):
            await self._changed.wait()

    def _capacity(self) -> int:
        return max(0, min(self.engine.free_capacity(), self.max_inflight - len(self._by_entry)))

    async def _ensure_group(self) -> None:
        """Create the group at 0, so entries a producer added before any worker are served
        (and after a Redis restart without persistence, whatever arrived since)."""
        try:
            await self.redis.xgroup_create(self.cfg.stream, self.cfg.group, id="0", mkstream=True)
            logger.info("created consumer group %s on %s", self.cfg.group, self.cfg.stream)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    # ------------------------------------------------------------------ intake
    async def _intake(self) -> None:
        backoff = Backoff()
        own_cursor: str | None = "0"  # our own pending entries first, then new ones
        claim_every = self.cfg.claim_idle_ms / 2000
        next_claim = 0.0
        group_ok = False
        while not self._draining.is_set():
            try:
                if not group_ok:
                    await self._ensure_group()
                    group_ok = True
                    self.ready.set()
                cap = self._capacity()
                if cap == 0:
                    # KV pressure changes without a notification: poll it too.
                    await self._wait_changed(0.05)
                    continue
                now = time.monotonic()
                if own_cursor is not None:
                    entries = await self._read(own_cursor, cap, block_ms=None)
                    if not entries:
                        own_cursor = None
                        continue
                    own_cursor = entries[-1][0]
                    await self._admit(entries, redelivered=True)
                elif now >= next_claim:
                    next_claim = now + claim_every
                    await self._autoclaim()
                else:
                    block = max(1, min(self.cfg.block_ms, int((next_claim - now) * 1000)))
                    entries = await self._read(">", cap, block_ms=block)
                    await self._admit(entries, redelivered=False)
                backoff.reset()
            except redis.ResponseError as e:
                if "NOGROUP" in str(e):
                    logger.warning("consumer group is gone (Redis restarted empty?): recreating it")
                    group_ok = False
                    continue
                await self._redis_error("intake", e, backoff)
            except REDIS_ERRORS as e:
                await self._redis_error("intake", e, backoff)

    async def _redis_error(self, op: str, err: BaseException, backoff: Backoff) -> None:
        self.metrics.redis_errors.labels(op).inc()
        delay = backoff.next_delay()
        # Loud on the first failure and every ~30 s of an outage, not on every retry.
        log = logger.warning if backoff.failures % 15 == 1 else logger.debug
        log("redis %s failed (%s: %s); retrying in %.2fs", op, type(err).__name__, err, delay)
        with anyio.move_on_after(delay):
            await self._draining.wait()

    async def _read(self, cursor: str, count: int, block_ms: int | None) -> list[tuple[str, Any]]:
        reply: Any = await self.redis.xreadgroup(
            self.cfg.group,
            self.cfg.consumer,
            {self.cfg.stream: cursor},
            count=count,
            block=block_ms,
        )
        if not reply:
            return []
        # RESP2: [[stream, [(id, fields), ...]]]
        return [(_s(eid), fields) for eid, fields in reply[0][1]]

    async def _autoclaim(self) -> None:
        cursor = "0-0"
        while not self._draining.is_set():
            cap = self._capacity()
            if cap == 0:
                return
            reply: Any = await self.redis.xautoclaim(
                self.cfg.stream, self.cfg.group, self.cfg.consumer,
                min_idle_time=self.cfg.claim_idle_ms, start_id=cursor, count=cap,
            )  # fmt: skip
            cursor = _s(reply[0])
            entries = [(_s(eid), fields) for eid, fields in reply[1]]
            if entries:
                self.metrics.claimed.inc(len(entries))
                logger.info("took over %d idle entr(ies) from other consumers", len(entries))
                await self._admit(entries, redelivered=True)
            if cursor == "0-0":
                return

    async def _admit(self, entries: Sequence[tuple[str, Any]], *, redelivered: bool) -> None:
        """Validate a batch, resolve adapters, resume what ran before, start the jobs.

        Redis round trips per batch, not per entry: one pipeline of XPENDING/XRANGE for
        redelivered entries, one HMGET for the adapters."""
        if not entries:
            return
        assert self._send is not None
        decoded: list[
            tuple[str, Any, GenerateRequest | None, BaseException | None, tuple[str, str] | None]
        ] = []
        for entry_id, fields in entries:
            if entry_id in self._by_entry:
                continue  # ours and running: claimed back by our own XAUTOCLAIM
            obj, req, err = self._decode(fields)
            decoded.append((entry_id, fields, req, err, reply_address(obj, prefix=self.cfg.prefix)))
        deliveries: dict[str, int] = {}
        history: dict[str, list[Event]] = {}
        if redelivered and decoded:
            deliveries, history = await self._redelivery_info(decoded)
        adapters = {req.adapter for _, _, req, _, _ in decoded if req is not None and req.adapter}
        loras = await self.registry.resolve_many(self.redis, adapters) if adapters else {}
        for entry_id, fields, req, err, address in decoded:
            count = deliveries.get(entry_id, 1)
            rid = req.id if req else (address[0] if address else "")
            seq = _next_seq(history.get(rid, []))
            if count > self.cfg.max_deliveries:
                reason = MaxDeliveriesExceeded(
                    f"entry {entry_id} was delivered {count} times (max {self.cfg.max_deliveries})"
                )
                await self._reject(entry_id, fields, address, reason, seq, dead_letter=True)
                continue
            if err is not None or req is None:
                err = err or BadPayload("undecodable entry")
                # No reply address: nobody to tell, so the entry is kept in the DLQ.
                await self._reject(entry_id, fields, address, err, seq, dead_letter=address is None)
                continue
            if req.id in self._by_request:
                # Its reply channel belongs to the running request: do not write there.
                dup = DuplicateRequest(f"request id {req.id!r} is already running on this worker")
                await self._reject(entry_id, fields, None, dup, 0, dead_letter=True)
                continue
            past = history.get(req.id, [])
            if past and past[-1].finished:
                # Published in full by a worker that died before its XACK.
                await self._send.send(_Out(None, None, ack=entry_id))
                continue
            lora = loras.get(req.adapter) if req.adapter else None
            if isinstance(lora, LoRAStreamError):
                await self._reject(entry_id, fields, address, lora, seq, dead_letter=False)
                continue
            job = _Job(
                entry_id=entry_id,
                req=req,
                params=req.sampling_params(),
                deliveries=count,
                entry_ms=_entry_ms(entry_id),
                intake_time=time.time(),
                lora=lora,
            )
            if count > 1:
                self._plan_resume(job, past)
            if req.id in self._aborted:
                job.abort_requested = True
            self._by_entry[entry_id] = job
            self._by_request[req.id] = job
            self.high_water = max(self.high_water, len(self._by_entry))
            self.metrics.inflight.set(len(self._by_entry))
            assert self._jobs_tg is not None
            self._jobs_tg.start_soon(self._run_job, job)

    def _decode(self, fields: Any) -> tuple[Any, GenerateRequest | None, BaseException | None]:
        """(payload object or None, request or None, error or None)."""
        fields = {_s(k): v for k, v in (fields or {}).items()}
        kinds = [k for k in ("data", "json") if k in fields]
        if len(kinds) != 1:
            what = "both data and json" if kinds else "no field data (msgpack) or json"
            return None, None, BadPayload(f"the entry has {what}")
        raw = fields[kinds[0]]
        try:
            obj = Codec.unpack(raw, kind=kinds[0])
        except BadPayload as e:
            return None, None, e
        if len(raw) > self.cfg.max_payload_bytes:
            # Decoded only to find where to send the error.
            err = PayloadTooLarge(
                f"payload is {len(raw)} bytes; max is {self.cfg.max_payload_bytes}"
            )
            return obj, None, err
        try:
            return obj, GenerateRequest.from_wire(obj, prefix=self.cfg.prefix), None
        except InvalidRequest as e:
            return obj, None, e
        except Exception as e:  # a validation bug must not take the worker down
            logger.exception("validation failed unexpectedly")
            return obj, None, BadPayload(f"the payload could not be validated: {type(e).__name__}")

    async def _redelivery_info(
        self, decoded: Sequence[tuple[str, Any, GenerateRequest | None, Any, Any]]
    ) -> tuple[dict[str, int], dict[str, list[Event]]]:
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, _, req, _, address in decoded:
            pipe.xpending_range(
                self.cfg.stream, self.cfg.group, min=entry_id, max=entry_id, count=1
            )
            request_id = req.id if req else (address[0] if address else None)
            if self.cfg.result_ttl_s and request_id:
                pipe.xrange(self.cfg.out_key(request_id))
        results = iter(await pipe.execute())
        deliveries: dict[str, int] = {}
        history: dict[str, list[Event]] = {}
        for entry_id, _, req, _, address in decoded:
            pending = next(results)
            if pending:
                deliveries[entry_id] = int(pending[0]["times_delivered"])
            request_id = req.id if req else (address[0] if address else None)
            if self.cfg.result_ttl_s and request_id:
                events = []
                for _, f in next(results):
                    with contextlib.suppress(LoRAStreamError, KeyError, TypeError):
                        events.append(decode_event(f[b"data"]))
                history[request_id] = events
        return deliveries, history

    def _plan_resume(self, job: _Job, past: list[Event]) -> None:
        """Continue after what the result stream shows, or restart visibly when it cannot."""
        if not self.cfg.result_ttl_s:
            job.restart = True  # we cannot know what the client saw: it must start over
            return
        seqs = [e.seq for e in past]
        if seqs != list(range(len(seqs))):
            job.restart, job.next_seq = True, (max(seqs) + 1 if seqs else 0)
            return
        if not past:
            # Nothing published, or the result stream expired: the client may have seen
            # events we cannot know of, so say "start over" (a no-op for one that saw none).
            job.restart = True
            return
        job.next_seq = len(past)
        for e in past:
            if isinstance(e, TokenEvent) and e.restart:
                # The client dropped what came before this event.
                job.resumed_tokens, job.resumed_text = [], ""
            job.resumed_tokens += e.token_ids
            if isinstance(e, TokenEvent):
                job.resumed_text += e.text
        if job.resumed_tokens:
            logger.info(
                "resuming %s after %d published token(s) (delivery %d)",
                job.req.id, len(job.resumed_tokens), job.deliveries,
            )  # fmt: skip

    async def _reject(
        self,
        entry_id: str,
        fields: Any,
        address: tuple[str, str] | None,
        err: BaseException,
        seq: int,
        *,
        dead_letter: bool,
    ) -> None:
        assert self._send is not None
        code = err.code if isinstance(err, LoRAStreamError) else "internal_error"
        message = err.message if isinstance(err, LoRAStreamError) else str(err)
        logger.warning("entry %s rejected (%s): %s", entry_id, code, message)
        out = _Out(
            address[0] if address else None, address[1] if address else None, seq=seq, ack=entry_id
        )
        if address is not None:
            out.finished, out.finish_reason = True, "error"
            out.error = (code, message, error_field(err))
        if dead_letter:
            out.dlq = self._dlq_fields(entry_id, fields, code, message)
            self.metrics.dead_letters.labels(code).inc()
        await self._send.send(out)

    def _dlq_fields(
        self, entry_id: str, fields: Any, code: str, message: str
    ) -> dict[str, str | bytes]:
        dlq: dict[str, str | bytes] = {
            "entry_id": entry_id,
            "reason": code,
            "message": message,
            "consumer": self.cfg.consumer,
        }
        for k, v in (fields or {}).items():
            if _s(k) in ("data", "json"):
                dlq[_s(k)] = v
        return dlq

    # ------------------------------------------------------------------ jobs
    async def _run_job(self, job: _Job) -> None:
        assert self._send is not None
        try:
            if job.abort_requested:
                await self._finish(
                    job,
                    _Out(job.req.id, job.req.reply_to, job, finished=True, finish_reason="abort"),
                )
                return
            resumed = len(job.resumed_tokens)
            prompt, params = self._engine_inputs(job)
            if prompt is None:  # the resumed tokens already used up max_tokens / max_model_len
                await self._finish(
                    job,
                    _Out(job.req.id, job.req.reply_to, job, finished=True, finish_reason="length"),
                )
                return
            completion_tokens = 0  # the engine sends deltas (output_kind DELTA)
            last: RequestOutput | None = None
            # A delta the publisher had no room for. The engine stream is drained every step
            # regardless, so a slow or absent Redis costs one growing delta per request here
            # rather than a cumulative output per step queued inside the engine.
            pending: _Out | None = None
            with anyio.CancelScope() as scope:
                job.scope = scope
                if job.abort_requested:
                    scope.cancel()
                stream = self.engine.generate(
                    prompt,
                    params,
                    job.req.id,
                    lora_request=job.lora,
                    priority=job.req.priority,
                    resumed=ResumedOutput(resumed, job.resumed_text) if resumed else None,
                )
                async with contextlib.aclosing(stream):  # type: ignore[type-var]
                    async for out in stream:
                        last = out
                        c = out.outputs[0]
                        delta = _Out(job.req.id, job.req.reply_to, job, c.token_ids, c.text)
                        if c.logprobs is not None:
                            delta.logprobs = logprobs_to_wire(c.logprobs)
                        completion_tokens += len(c.token_ids)
                        self._observe_latency(job, out, len(delta.token_ids))
                        if out.finished or out.error is not None:
                            delta.finished, delta.finish_reason = True, c.finish_reason or "error"
                            if out.error is not None:
                                delta.error = (out.error.code, out.error.message, None)
                                delta.finish_reason = "error"
                            delta.usage = self._usage(job, out, resumed, completion_tokens)
                            await self._finish(job, _merged(pending, delta))
                            return
                        if delta.token_ids or delta.text:
                            pending = _merged(pending, delta)
                            try:
                                self._send.send_nowait(pending)
                                pending = None
                            except anyio.WouldBlock:
                                pass
            # The engine stream ended early: an abort (ours via the scope, or the engine's).
            await self.engine.abort(job.req.id)
            if job.abort_requested or not scope.cancel_called:
                final = _Out(
                    job.req.id, job.req.reply_to, job, finished=True, finish_reason="abort"
                )
                final.usage = (
                    self._usage(job, last, resumed, completion_tokens) if last is not None else None
                )
                await self._finish(job, _merged(pending, final))
        except EngineDead as e:
            self._fatal = e
            self.drain()
        except LoRAStreamError as e:
            err = _Out(job.req.id, job.req.reply_to, job, finished=True, finish_reason="error")
            err.error = (e.code, e.message, error_field(e))
            logger.info(
                "request %s (entry %s) failed: %s: %s", job.req.id, job.entry_id, e.code, e.message
            )
            await self._finish(job, err)
        except Exception as e:
            logger.exception("request %s (entry %s) failed", job.req.id, job.entry_id)
            err = _Out(job.req.id, job.req.reply_to, job, finished=True, finish_reason="error")
            err.error = ("internal_error", f"{type(e).__name__}: {e}", None)
            await self._finish(job, err)
        finally:
            if not job.final_queued:
                # Abandoned (drain timeout, engine death, lost to another worker): not acked,
                # so the entry stays pending for whoever runs it next.
                if not job.stolen:
                    self._abandoned.add(job.entry_id)
                self._forget(job)

    async def _finish(self, job: _Job, final: _Out) -> None:
        assert self._send is not None
        final.ack = job.entry_id
        job.final_queued = True
        await self._send.send(final)

    def _forget(self, job: _Job) -> None:
        if self._by_entry.get(job.entry_id) is job:
            del self._by_entry[job.entry_id]
        if self._by_request.get(job.req.id) is job:
            del self._by_request[job.req.id]
        self.metrics.inflight.set(len(self._by_entry))
        self._notify()

    def _engine_inputs(self, job: _Job) -> tuple[Any, SamplingParams]:
        req = job.req
        # Deltas: what the reply stream publishes, without a copy of everything so far
        # being built for every request at every step.
        params = dataclasses.replace(job.params, output_kind=RequestOutputKind.DELTA)
        if req.messages is not None:
            tok = self.engine.engine.tokenizer
            if getattr(tok, "chat_template", None) is None:
                raise InvalidRequest(
                    "messages: the model has no chat template; send prompt instead"
                )
            text: str | None = tok.apply_chat_template(
                req.messages, tokenize=False, add_generation_prompt=True
            )
        else:
            text = req.prompt
        if not job.resumed_tokens:
            prompt: Any = text if text is not None else {"prompt_token_ids": req.prompt_token_ids}
            return prompt, params
        # Resume: the engine continues after what the client already has.
        base = (
            list(req.prompt_token_ids or [])
            if text is None
            else self.engine.engine.tokenize(text)[1]
        )
        n = len(job.resumed_tokens)
        if params.max_tokens is not None and params.max_tokens - n < 1:
            return None, params
        if len(base) + n >= int(self.engine.engine.config.max_model_len):
            return None, params
        params = dataclasses.replace(
            params,
            max_tokens=None if params.max_tokens is None else params.max_tokens - n,
            min_tokens=max(0, params.min_tokens - n),
        )
        return {"prompt_token_ids": base + job.resumed_tokens}, params

    def _usage(
        self, job: _Job, out: RequestOutput, resumed: int, completion_tokens: int
    ) -> dict[str, float]:
        m = out.metrics
        usage: dict[str, float] = {
            "prompt_tokens": len(out.prompt_token_ids) - resumed,
            "completion_tokens": resumed + completion_tokens,
            "queue_ms": round(max(0.0, job.intake_time * 1000 - job.entry_ms), 3),
            "deliveries": job.deliveries,
        }
        if "first_token_time" in m and "arrival_time" in m:
            usage["ttft_ms"] = round((m["first_token_time"] - m["arrival_time"]) * 1000, 3)
        if "finished_time" in m and "arrival_time" in m:
            usage["e2e_ms"] = round((m["finished_time"] - m["arrival_time"]) * 1000, 3)
        if resumed:
            usage["resumed_tokens"] = resumed
        return usage

    def _observe_latency(self, job: _Job, out: RequestOutput, new_tokens: int) -> None:
        now = time.monotonic()
        if new_tokens:
            if job.last_output_time is None:
                m = out.metrics
                if "first_token_time" in m and "arrival_time" in m:
                    self.metrics.ttft.observe(max(0.0, m["first_token_time"] - m["arrival_time"]))
            else:
                per_token = (now - job.last_output_time) / new_tokens
                for _ in range(new_tokens):
                    self.metrics.itl.observe(per_token)
            job.last_output_time = now
        if out.finished and "finished_time" in out.metrics and "arrival_time" in out.metrics:
            self.metrics.e2e.observe(
                max(0.0, out.metrics["finished_time"] - out.metrics["arrival_time"])
            )

    # ------------------------------------------------------------------ publisher
    async def _publisher(self, receive: MemoryObjectReceiveStream[_Out]) -> None:
        try:
            async with receive:
                while True:
                    try:
                        first = await receive.receive()
                    except anyio.EndOfStream:
                        return
                    # Let every job woken by the same engine step queue its delta: one
                    # pipeline per step, never a round trip per token.
                    await anyio.lowlevel.checkpoint()
                    batch = [first]
                    while len(batch) < self.cfg.publish_batch:
                        try:
                            batch.append(receive.receive_nowait())
                        except (anyio.WouldBlock, anyio.EndOfStream):
                            break
                    await self._publish(_coalesce(batch))
        finally:
            self._publisher_done.set()

    async def _publish(self, batch: list[_Out]) -> None:
        ttl, cfg = self.cfg.result_ttl_s, self.cfg
        commands: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        for out in batch:
            if out.request_id is not None and out.reply_to is not None:
                if out.job is not None:
                    # The restart marker goes on the first event of the new run only.
                    seq, restart = out.job.next_seq, out.job.restart
                    out.job.next_seq += 1
                    out.job.restart = False
                else:
                    seq, restart = out.seq, False
                data = encode_event(out.event(seq, restart))
                commands.append(("publish", (out.reply_to, data), {}))
                if ttl:
                    key = cfg.out_key(out.request_id)
                    commands.append(
                        (
                            "xadd",
                            (key, {"data": data}),
                            {"maxlen": cfg.result_maxlen, "approximate": True},
                        )
                    )
                    commands.append(("expire", (key, ttl), {}))
            if out.dlq is not None:
                commands.append(
                    ("xadd", (cfg.dlq, out.dlq), {"maxlen": cfg.dlq_maxlen, "approximate": True})
                )
            if out.ack is not None:
                commands.append(("xack", (cfg.stream, cfg.group, out.ack), {}))
        backoff = Backoff()
        while True:
            pipe = self.redis.pipeline(transaction=True)
            for name, args, kwargs in commands:
                getattr(pipe, name)(*args, **kwargs)
            try:
                results = await pipe.execute(raise_on_error=False)
                break
            except REDIS_ERRORS as e:
                # Events are kept and sent again: delayed while Redis is away, never dropped.
                self.metrics.redis_errors.labels("publish").inc()
                delay = backoff.next_delay()
                if backoff.failures == 1:
                    logger.warning("publish failed (%s: %s); retrying", type(e).__name__, e)
                await anyio.sleep(delay)
        for (name, _, _), result in zip(commands, results, strict=True):
            if isinstance(result, Exception) and not (name == "xack" and "NOGROUP" in str(result)):
                logger.warning("%s failed: %s", name, result)
        for out in batch:
            if out.finished and out.request_id is not None:
                if out.error is not None:
                    self.metrics.errors.labels(out.error[0]).inc()
                self.metrics.requests.labels(out.finish_reason or "error").inc()
            if out.job is not None and out.job.final_queued and out.ack is not None:
                self._forget(out.job)

    # ------------------------------------------------------------------ keepalive, control, metrics
    async def _keepalive_loop(self) -> None:
        backoff = Backoff()
        interval = self.cfg.claim_idle_ms / 3000
        while True:
            await anyio.sleep(interval if not backoff.failures else backoff.next_delay())
            ids = list(self._by_entry)
            if not ids:
                continue
            try:
                stolen = await self._keepalive(
                    keys=[self.cfg.stream], args=[self.cfg.group, self.cfg.consumer, *ids]
                )
                backoff.reset()
            except REDIS_ERRORS as e:
                self.metrics.redis_errors.labels("keepalive").inc()
                if backoff.failures == 0:
                    logger.warning("keepalive failed (%s: %s)", type(e).__name__, e)
                backoff.failures += 1
                continue
            for raw in stolen or []:
                job = self._by_entry.get(_s(raw))
                if job is not None and job.scope is not None and not job.final_queued:
                    # We were presumed dead (Redis unreachable past --claim-idle-ms) and another
                    # worker runs it now: stop ours so the client gets one stream.
                    logger.warning(
                        "entry %s (%s) was taken over by another worker", job.entry_id, job.req.id
                    )
                    job.stolen = True
                    job.scope.cancel()

    async def _control_loop(self) -> None:
        backoff = Backoff()
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.cfg.control)
                backoff.reset()
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        await self._on_control(msg["data"])
            except REDIS_ERRORS as e:
                # Aborts published while we are disconnected are lost: clients may resend.
                self.metrics.redis_errors.labels("control").inc()
                if backoff.failures == 0:
                    logger.warning(
                        "control channel lost (%s: %s); resubscribing", type(e).__name__, e
                    )
                await backoff.sleep()
            finally:
                with contextlib.suppress(*REDIS_ERRORS):
                    await pubsub.aclose()

    async def _on_control(self, raw: bytes) -> None:
        try:
            msg = AbortRequest.from_wire(Codec.unpack_any(raw))
        except LoRAStreamError as e:
            logger.warning("ignored control message: %s", e)
            return
        # Remembered for entries not read yet (bounded: memory must not grow with traffic).
        self._aborted[msg.id] = None
        while len(self._aborted) > self.cfg.remembered_aborts:
            self._aborted.popitem(last=False)
        job = self._by_request.get(msg.id)
        if job is not None and not job.final_queued:
            logger.info("aborting %s", msg.id)
            job.abort_requested = True
            if job.scope is not None:
                job.scope.cancel()

    async def _metrics_loop(self) -> None:
        while True:
            await anyio.sleep(self.cfg.metrics_interval_s)
            self.metrics.idle()
            try:
                groups = await self.redis.xinfo_groups(self.cfg.stream)
            except REDIS_ERRORS:
                continue
            for g in groups:
                if _s(g.get("name", b"")) == self.cfg.group:
                    if g.get("lag") is not None:
                        self.metrics.stream_lag.set(float(g["lag"]))
                    self.metrics.stream_pending.set(float(g.get("pending", 0)))


# ---------------------------------------------------------------------- helpers
def _coalesce(batch: list[_Out]) -> list[_Out]:
    """One event per request per batch: later deltas of a job merge into its first one."""
    merged: list[_Out] = []
    by_job: dict[int, _Out] = {}
    for out in batch:
        head = by_job.get(id(out.job)) if out.job is not None else None
        if head is not None and not head.finished:
            head.merge(out)
            continue
        merged.append(out)
        if out.job is not None:
            by_job[id(out.job)] = out
    return merged


def _merged(head: _Out | None, later: _Out) -> _Out:
    if head is None:
        return later
    head.merge(later)
    return head


def _next_seq(events: list[Event]) -> int:
    return max((e.seq for e in events), default=-1) + 1


def _entry_ms(entry_id: str) -> int:
    with contextlib.suppress(ValueError):
        return int(entry_id.split("-", 1)[0])
    return 0


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


__all__ = ["EngineClient", "Service", "ServiceConfig"]
