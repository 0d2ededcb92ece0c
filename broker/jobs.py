"""Jobs: one request this worker holds, from intake until its final event is written.

A job feeds the engine and turns its outputs into ``Out`` deltas for the publisher. It owns
resume (a request run again continues after what its result stream holds), abort, the
request's deadline, and what happens when the entry turns out to be someone else's: the
engine request is aborted at once (its KV freed) and nothing more is written for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from broker.metrics import BrokerMetrics
from broker.protocol import (
    ErrorEvent,
    Event,
    Expired,
    GenerateRequest,
    TokenEvent,
    error_field,
    logprob_tokens_to_wire,
    logprobs_to_wire,
    untrusted,
)
from broker.publisher import Out, Publisher
from engine.errors import EngineDead, LoRAStreamError
from engine.lora.request import LoRARequest
from engine.outputs import RequestOutput, ResumedOutput
from engine.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("lorastream.broker")


class EngineClient(Protocol):
    """What the service needs from the engine: ``engine.AsyncLLMEngine`` implements it, and so
    does the tests' fake. The synchronous methods may block (tokenizers): the service calls
    them on a worker thread."""

    @property
    def max_model_len(self) -> int: ...

    @property
    def max_num_seqs(self) -> int: ...

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

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a prompt string, as ``generate`` would tokenize it."""
        ...

    def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation with the model's chat template and the generation
        prompt applied; raises InvalidRequest when the model has no chat template."""
        ...


@dataclass(eq=False)
class Job:
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
    last_chance: bool = False
    """This is the entry's last delivery before the dead-letter stream (see Intake)."""
    scope: anyio.CancelScope | None = None
    abort_requested: bool = False
    lost: bool = False
    """The entry is no longer ours (another worker took it over): write nothing more."""
    final_queued: bool = False
    last_output_time: float | None = None

    def out(self, **kwargs: Any) -> Out:
        return Out(self.req.id, self.req.reply_to, self.entry_id, job=self, **kwargs)


class Jobs:
    """The jobs this worker runs, by entry id and by request id."""

    def __init__(
        self,
        engine: EngineClient,
        publisher: Publisher,
        metrics: BrokerMetrics,
        *,
        on_change: Callable[[], None],
        on_engine_dead: Callable[[BaseException], None],
    ) -> None:
        self.engine = engine
        self.publisher = publisher
        self.metrics = metrics
        self.by_entry: dict[str, Job] = {}
        self.by_request: dict[str, Job] = {}
        self.abandoned: set[str] = set()
        """Entries we stopped running without a final event: released on exit."""
        self._on_change = on_change
        self._on_engine_dead = on_engine_dead

    def __len__(self) -> int:
        return len(self.by_entry)

    @property
    def last_chance_running(self) -> bool:
        return any(job.last_chance for job in self.by_entry.values())

    def add(self, job: Job) -> None:
        self.by_entry[job.entry_id] = job
        self.by_request[job.req.id] = job
        self.metrics.inflight.set(len(self.by_entry))

    def forget(self, job: Job) -> None:
        if self.by_entry.get(job.entry_id) is job:
            del self.by_entry[job.entry_id]
        if self.by_request.get(job.req.id) is job:
            del self.by_request[job.req.id]
        self.metrics.inflight.set(len(self.by_entry))
        self._on_change()

    def request_abort(self, request_id: str) -> bool:
        job = self.by_request.get(request_id)
        if job is None or job.final_queued:
            return False
        job.abort_requested = True
        if job.scope is not None:
            job.scope.cancel()
        return True

    def lose(self, entry_ids: Sequence[str]) -> None:
        """These entries are someone else's now: stop their runs, write nothing more."""
        for entry_id in entry_ids:
            job = self.by_entry.get(entry_id)
            if job is None or job.lost:
                continue
            job.lost = True
            self.metrics.entries_lost.inc()
            if job.final_queued:
                # Finished here, but another worker holds it: its final is not ours to write.
                self.forget(job)
                continue
            logger.warning(
                "entry %s (%s) was taken over by another worker: stopping our run",
                entry_id, untrusted(job.req.id),
            )  # fmt: skip
            if job.scope is not None:
                job.scope.cancel()

    # ------------------------------------------------------------------ running
    async def run(self, job: Job) -> None:
        """Run one job to its final event. Whatever happens ends this job alone."""
        try:
            await self._run(job)
        except EngineDead as e:
            self._on_engine_dead(e)
        except Exception as e:
            if not job.final_queued and not job.lost:
                if isinstance(e, LoRAStreamError):
                    logger.info(
                        "request %s (entry %s) failed: %s: %s",
                        untrusted(job.req.id), job.entry_id, e.code, untrusted(e.message, 500),
                    )  # fmt: skip
                    error = (e.code, e.message, error_field(e))
                else:
                    logger.exception(
                        "request %s (entry %s) failed", untrusted(job.req.id), job.entry_id
                    )
                    error = ("internal_error", f"{type(e).__name__}: {e}", None)
                await self._finish(job, job.out(finished=True, finish_reason="error", error=error))
        finally:
            if not job.final_queued:
                # Abandoned (drain timeout, engine death) or lost: not acked. An abandoned
                # entry stays pending for whoever runs it next; a lost one is already theirs.
                if not job.lost:
                    self.abandoned.add(job.entry_id)
                self.forget(job)

    async def _run(self, job: Job) -> None:
        if job.abort_requested:
            await self._finish(job, job.out(finished=True, finish_reason="abort"))
            return
        remaining = _seconds_left(job)
        if remaining is not None and remaining <= 0:
            await self._finish(job, self._expired(job))
            return
        resumed = len(job.resumed_tokens)
        prompt, params = await anyio.to_thread.run_sync(self._engine_inputs, job)
        if prompt is None:  # the resumed tokens already used up max_tokens / max_model_len
            await self._finish(job, job.out(finished=True, finish_reason="length"))
            return
        completion_tokens = 0  # the engine sends deltas (output_kind DELTA)
        last: RequestOutput | None = None
        # A delta the publisher had no room for. The engine stream is drained every step
        # regardless, so a slow or absent Redis costs one growing delta per request here
        # rather than a cumulative output per step queued inside the engine.
        pending: Out | None = None
        expired = False
        with anyio.CancelScope() as scope:
            job.scope = scope
            if job.abort_requested or job.lost:
                scope.cancel()
            if remaining is not None:
                scope.deadline = anyio.current_time() + remaining
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
                    delta = job.out(token_ids=list(c.token_ids), text=c.text)
                    if c.logprobs is not None:
                        delta.logprobs = logprobs_to_wire(c.logprobs)
                        delta.logprob_tokens = logprob_tokens_to_wire(c.logprobs)
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
                        if self.publisher.offer(pending):
                            pending = None
        expired = scope.cancelled_caught and not job.abort_requested and not job.lost
        # The engine stream ended early: an abort (ours via the scope, or the engine's), the
        # deadline, or the entry lost to another worker.
        await self.engine.abort(job.req.id)
        if job.lost:
            return
        if expired:
            final = self._expired(job)
        elif job.abort_requested or not scope.cancel_called:
            final = job.out(finished=True, finish_reason="abort")
        else:
            return  # cancelled from outside (drain timeout): left pending, not finished
        final.usage = self._usage(job, last, resumed, completion_tokens) if last else None
        await self._finish(job, _merged(pending, final))

    def _expired(self, job: Job) -> Out:
        err = Expired(f"the request's deadline ({job.req.deadline_ms} ms since the epoch) passed")
        return job.out(finished=True, finish_reason="error", error=(err.code, err.message, None))

    async def _finish(self, job: Job, final: Out) -> None:
        final.ack = True
        job.final_queued = True
        await self.publisher.send(final)

    def _engine_inputs(self, job: Job) -> tuple[Any, SamplingParams]:
        """The engine's prompt and params for a job (called on a worker thread: tokenizing
        may take a while)."""
        req = job.req
        # Deltas: what the reply stream publishes, without a copy of everything so far
        # being built for every request at every step.
        params = dataclasses.replace(job.params, output_kind=RequestOutputKind.DELTA)
        if req.messages is not None:
            base = self.engine.tokenize_chat(req.messages)
        elif req.prompt is not None:
            if not job.resumed_tokens:
                return req.prompt, params
            base = self.engine.tokenize(req.prompt)
        else:
            base = list(req.prompt_token_ids or [])
        if not job.resumed_tokens:
            return {"prompt_token_ids": base}, params
        # Resume: the engine continues after what the client already has.
        n = len(job.resumed_tokens)
        if params.max_tokens is not None and params.max_tokens - n < 1:
            return None, params
        if len(base) + n >= self.engine.max_model_len:
            return None, params
        params = dataclasses.replace(
            params,
            max_tokens=None if params.max_tokens is None else params.max_tokens - n,
            min_tokens=max(0, params.min_tokens - n),
        )
        return {"prompt_token_ids": base + job.resumed_tokens}, params

    def _usage(
        self, job: Job, out: RequestOutput, resumed: int, completion_tokens: int
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
        if out.num_cached_tokens:
            usage["cached_tokens"] = out.num_cached_tokens
        if resumed:
            usage["resumed_tokens"] = resumed
        return usage

    def _observe_latency(self, job: Job, out: RequestOutput, new_tokens: int) -> None:
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


def plan_resume(job: Job, past: list[Event], *, result_streams: bool) -> None:
    """Continue after what the result stream shows, or restart visibly when it cannot."""
    if not result_streams:
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
            untrusted(job.req.id), len(job.resumed_tokens), job.deliveries,
        )  # fmt: skip


def next_seq(events: list[Event]) -> int:
    return max((e.seq for e in events), default=-1) + 1


def _seconds_left(job: Job) -> float | None:
    if job.req.deadline_ms is None:
        return None
    return job.req.deadline_ms / 1000 - time.time()


def _merged(head: Out | None, later: Out) -> Out:
    if head is None:
        return later
    head.merge(later)
    return head


__all__ = ["EngineClient", "ErrorEvent", "Job", "Jobs", "next_seq", "plan_resume"]
