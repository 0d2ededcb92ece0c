"""The publisher: everything the worker writes to Redis, a batch per engine step.

Jobs and intake put ``Out`` records in its mailbox, where a request's deltas merge into one
event until it is written; the publisher takes everything waiting and writes it with one
call of the fenced publish script
(``broker.ownership``): events on the reply channels and result streams, acks, dead
letters, only for entries still ours. Entries found lost are reported to the jobs, which
stop them. A batch is retried until Redis takes it (Redis down: events are late, never
dropped); the script makes a retried batch write nothing twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from broker.metrics import BrokerMetrics
from broker.ownership import Ownership, WriteOp
from broker.protocol import ErrorEvent, Event, TokenEvent, encode_event, untrusted
from broker.redis_conn import REDIS_ERRORS, Backoff

if TYPE_CHECKING:
    from broker.jobs import Job

logger = logging.getLogger("lorastream.broker")


@dataclass(eq=False)
class Out:
    """What the publisher writes for one entry: an event (merged per request per batch), an
    ack, a dead letter."""

    request_id: str | None
    reply_to: str | None
    entry_id: str
    shard: Ownership | None = None
    """The scripts of the entry's stream (set for every Out: a job's come from the job)."""
    job: Job | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[list[list[float]]] | None = None
    logprob_tokens: list[list[str]] | None = None
    finished: bool = False
    finish_reason: str | None = None
    error: tuple[str, str, str | None] | None = None
    """(code, message, field)."""
    usage: dict[str, float] | None = None
    seq: int = 0
    """For events without a job (bad input, dead letters); jobs number their own."""
    ack: bool = False
    dlq: dict[str, str | bytes] | None = None
    fenced: bool = True

    @property
    def has_event(self) -> bool:
        return self.request_id is not None and self.reply_to is not None

    def merge(self, later: Out) -> None:
        """Coalesce a later delta of the same request (when Redis was slower than the engine)."""
        self.token_ids = self.token_ids + later.token_ids
        self.text += later.text
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs
        if later.logprob_tokens is not None:
            self.logprob_tokens = (self.logprob_tokens or []) + later.logprob_tokens
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
            logprobs=self.logprobs, logprob_tokens=self.logprob_tokens, restart=restart,
        )  # fmt: skip


@dataclass(frozen=True)
class PublishSettings:
    result_ttl_s: int
    result_maxlen: int
    dlq_maxlen: int
    batch: int


class Publisher:
    """A mailbox and a writer. ``put`` never waits: a job's deltas merge into the one ``Out``
    it has waiting, so while Redis is slower than the engine (or away) memory grows by the
    tokens only, one entry per job, and the engine's outputs are always taken at once. The
    writer takes everything waiting, one script call per batch, in the order put."""

    def __init__(
        self,
        settings: PublishSettings,
        metrics: BrokerMetrics,
        *,
        on_lost: Callable[[Ownership, Sequence[str]], None],
        on_written: Callable[[Out], None],
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._waiting: list[Out] = []
        self._by_job: dict[int, Out] = {}
        self._wake = anyio.Event()
        self._closed = False
        self._on_lost = on_lost
        self._on_written = on_written
        self.done = anyio.Event()

    def put(self, out: Out) -> None:
        if self._closed:
            raise RuntimeError("the publisher is closed")
        head = self._by_job.get(id(out.job)) if out.job is not None else None
        if head is not None and not head.finished:
            head.merge(out)
        else:
            self._waiting.append(out)
            if out.job is not None:
                self._by_job[id(out.job)] = out
        self._wake.set()

    def close(self) -> None:
        """No more puts: ``run`` writes what is waiting, then returns."""
        self._closed = True
        self._wake.set()

    async def run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                # Let every job woken by the same engine step put its delta: one script
                # call per step, never a round trip per token.
                await anyio.lowlevel.checkpoint()
                while self._waiting:
                    n = min(len(self._waiting), self.settings.batch)
                    batch, self._waiting = self._waiting[:n], self._waiting[n:]
                    for out in batch:
                        if out.job is not None and self._by_job.get(id(out.job)) is out:
                            del self._by_job[id(out.job)]
                    await self.write(batch)
                if self._closed:
                    return
        finally:
            self.done.set()

    async def write(self, batch: list[Out]) -> None:
        """Write one batch, one script call per shard stream in it (each retried until Redis
        takes it), then report lost entries and written finals."""
        by_shard: dict[int, list[Out]] = {}
        for out in batch:
            assert out.shard is not None
            by_shard.setdefault(id(out.shard), []).append(out)
        for outs in by_shard.values():
            await self._write_shard(outs)

    async def _write_shard(self, batch: list[Out]) -> None:
        shard = batch[0].shard
        assert shard is not None
        ops = [self._op(out, shard) for out in batch]
        backoff = Backoff()
        s = self.settings
        while True:
            try:
                lost = await shard.publish(
                    ops, result_ttl_s=s.result_ttl_s, result_maxlen=s.result_maxlen,
                    dlq_maxlen=s.dlq_maxlen,
                )  # fmt: skip
                break
            except REDIS_ERRORS as e:
                self.metrics.redis_errors.labels("publish").inc()
                delay = backoff.next_delay()
                if backoff.failures == 1:
                    logger.warning("publish failed (%s: %s); retrying", type(e).__name__, e)
                await anyio.sleep(delay)
        if lost:
            self._on_lost(shard, sorted(lost))
        for out in batch:
            if out.entry_id in lost and out.fenced:
                continue
            if out.finished and out.has_event:
                if out.error is not None:
                    self.metrics.errors.labels(out.error[0]).inc()
                self.metrics.requests.labels(out.finish_reason or "error").inc()
            if out.dlq is not None:
                self.metrics.dead_letters.labels(str(out.dlq.get("reason", ""))).inc()
            self._on_written(out)

    def _op(self, out: Out, shard: Ownership) -> WriteOp:
        op = WriteOp(out.entry_id, ack=out.ack, fenced=out.fenced)
        if out.request_id is not None and out.reply_to is not None:
            if out.job is not None:
                # The restart marker goes on the first event of the new run only.
                seq, restart = out.job.next_seq, out.job.restart
                out.job.next_seq += 1
                out.job.restart = False
            else:
                seq, restart = out.seq, False
            op.data = _encode(out, seq, restart)
            op.channel, op.seq, op.fin = out.reply_to, seq, out.finished
            op.sharded = shard.sharded_channel(out.reply_to)
            if self.settings.result_ttl_s:
                op.result_key = shard.shard.out_key(out.request_id)
        if out.dlq is not None:
            op.dlq = [x for kv in out.dlq.items() for x in kv]
        return op


def _encode(out: Out, seq: int, restart: bool) -> bytes:
    """The event's bytes; an event that cannot be packed becomes an error event (it holds
    only what the schema and the engine produced, so this is a bug, and it ends the request
    instead of the publisher)."""
    try:
        return encode_event(out.event(seq, restart))
    except Exception as e:
        logger.exception("event for %s could not be encoded", untrusted(out.request_id))
        out.finished, out.finish_reason = True, "error"
        out.error = ("internal_error", f"the event could not be encoded: {type(e).__name__}", None)
        out.token_ids, out.text, out.logprobs, out.usage = [], "", None, None
        out.logprob_tokens = None
        return encode_event(out.event(seq, False))


def dlq_fields(
    entry_id: str, fields: Any, code: str, message: str, consumer: str, max_bytes: int
) -> dict[str, str | bytes]:
    """A dead letter: why, and the original payload (cut at ``max_bytes``: an entry too
    large to run is not copied whole)."""
    dlq: dict[str, str | bytes] = {
        "entry_id": entry_id,
        "reason": code,
        "message": message,
        "consumer": consumer,
    }
    if isinstance(fields, dict):
        for key in (b"data", b"json"):
            value = fields.get(key)
            if isinstance(value, bytes):
                dlq[key.decode()] = value[:max_bytes]
                if len(value) > max_bytes:
                    dlq["truncated_from"] = str(len(value))
    return dlq


__all__ = ["Out", "PublishSettings", "Publisher", "dlq_fields"]
