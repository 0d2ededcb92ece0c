"""Jobs: one request this worker holds, from intake until its final event is written.

A job feeds the engine and turns its outputs into ``Out`` deltas for the publisher. It owns
resume (a request run again continues after what its result stream holds), abort, the
request's deadline, and what happens when the entry turns out to be someone else's: the
engine request is aborted at once (its KV freed) and nothing more is written for it.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from broker.metrics import BrokerMetrics
from broker.ownership import Ownership
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

EntryKey = tuple[str, str]
"""(shard prefix, entry id): entry ids are unique within one stream only."""


def entry_key(shard: Ownership, entry_id: str) -> EntryKey:
    return shard.shard.prefix, entry_id


class EngineClient(Protocol):
    """What the service needs from the engine: ``engine.AsyncLLMEngine`` implements it, and so
    does the tests' fake. The synchronous methods may block (tokenizers): the service calls
    them on a worker thread."""

    @property
    def max_model_len(self) -> int: ...

    @property
    def max_num_seqs(self) -> int: ...

    async def submit(
        self,
        prompt: Any,
        sampling_params: SamplingParams,
        request_id: str,
        lora_request: LoRARequest | None = None,
        priority: int = 0,
        resumed: ResumedOutput | None = None,
    ) -> None:
        """Add a request whose outputs come from ``step_outputs``; raises its error."""
        ...

    def step_outputs(self) -> AsyncIterator[list[Any]]:
        """Per engine step, the outputs (``RequestOutput``, or ``RequestFailed`` with
        ``request_id`` and ``error``) of every submitted request; raises EngineDead."""
        ...

    def abort_nowait(self, request_id: str) -> None:
        """Stop a submitted request: its KV is freed and no output of it follows."""
        ...

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
    shard: Ownership
    """The scripts of the stream the entry is in: every write for it goes through them."""
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
    abort_requested: bool = False
    lost: bool = False
    """The entry is no longer ours (another worker took it over): write nothing more."""
    submitted: bool = False
    """The engine holds the request: its outputs come through ``Jobs.run``."""
    final_queued: bool = False
    completion_tokens: int = 0
    last: RequestOutput | None = None
    last_output_time: float | None = None

    def out(self, **kwargs: Any) -> Out:
        return Out(self.req.id, self.req.reply_to, self.entry_id, self.shard, job=self, **kwargs)

    @property
    def key(self) -> EntryKey:
        return entry_key(self.shard, self.entry_id)

    @property
    def resumed(self) -> int:
        return len(self.resumed_tokens)


class Jobs:
    """The jobs this worker runs, by entry id and by request id.

    One task takes the engine's outputs, a list per step, for all of them (``run``): a step
    of hundreds of requests costs one wake-up, not one per request. A job has a task of its
    own only while it starts (its prompt is tokenized on a worker thread, then submitted).
    Aborts, deadlines and lost entries end a job from outside: the engine request is
    aborted, its final event put at once, and whatever output of it was still on the way is
    dropped."""

    def __init__(
        self,
        engine: EngineClient,
        publisher: Publisher,
        metrics: BrokerMetrics,
        *,
        on_change: Callable[[], None],
    ) -> None:
        self.engine = engine
        self.publisher = publisher
        self.metrics = metrics
        self.by_entry: dict[EntryKey, Job] = {}
        self.by_request: dict[str, Job] = {}
        self.abandoned: dict[EntryKey, Job] = {}
        """Entries we stopped running without a final event: released on exit."""
        self._on_change = on_change
        self._deadlines: list[tuple[float, int, Job]] = []
        self._deadline_changed = anyio.Event()

    def __len__(self) -> int:
        return len(self.by_entry)

    @property
    def last_chance_running(self) -> bool:
        return any(job.last_chance for job in self.by_entry.values())

    def add(self, job: Job) -> None:
        self.by_entry[job.key] = job
        self.by_request[job.req.id] = job
        self.metrics.inflight.set(len(self.by_entry))
        if job.req.deadline_ms is not None:
            heapq.heappush(self._deadlines, (job.req.deadline_ms / 1000, id(job), job))
            self._deadline_changed.set()

    def forget(self, job: Job) -> None:
        if self.by_entry.get(job.key) is job:
            del self.by_entry[job.key]
        if self.by_request.get(job.req.id) is job:
            del self.by_request[job.req.id]
        self.metrics.inflight.set(len(self.by_entry))
        self._on_change()

    # ------------------------------------------------------------------ ending from outside
    def request_abort(self, request_id: str) -> bool:
        job = self.by_request.get(request_id)
        if job is None or job.final_queued:
            return False
        job.abort_requested = True
        if job.submitted:
            self._end(job, job.out(finished=True, finish_reason="abort"))
        return True

    def lose(self, shard: Ownership, entry_ids: Sequence[str]) -> None:
        """These entries of ``shard`` are someone else's now: stop their runs, write nothing
        more."""
        for entry_id in entry_ids:
            job = self.by_entry.get(entry_key(shard, entry_id))
            if job is None or job.lost:
                continue
            job.lost = True
            self.metrics.entries_lost.inc()
            if not job.final_queued:
                logger.warning(
                    "entry %s (%s) was taken over by another worker: stopping our run",
                    entry_id, untrusted(job.req.id),
                )  # fmt: skip
                self._abort_engine(job)
            # Finished or not, its final is not ours to write.
            self.forget(job)

    def abandon_all(self) -> None:
        """Drain timeout, engine death: stop what runs, leave the entries pending (no ack)."""
        for job in list(self.by_entry.values()):
            if job.final_queued:
                continue
            self._abort_engine(job)
            self.abandoned[job.key] = job
            job.lost = True  # nothing more is written for it here
            self.forget(job)

    def _end(self, job: Job, final: Out) -> None:
        """End a running job now with ``final`` (abort, deadline)."""
        if job.final_queued or job.lost:
            return
        self._abort_engine(job)
        if job.last is not None:
            final.usage = self._usage(job, job.last)
        self._finish(job, final)

    def _abort_engine(self, job: Job) -> None:
        if job.submitted:
            job.submitted = False
            self.engine.abort_nowait(job.req.id)

    def _finish(self, job: Job, final: Out) -> None:
        final.ack = True
        job.final_queued = True
        self.publisher.put(final)

    # ------------------------------------------------------------------ starting
    async def start(self, job: Job) -> None:
        """Tokenize and submit one job (its own task); whatever fails ends this job alone."""
        try:
            if job.abort_requested:
                self._finish(job, job.out(finished=True, finish_reason="abort"))
                return
            if _seconds_left(job) is not None and _seconds_left(job) <= 0:  # type: ignore[operator]
                self._finish(job, self._expired(job))
                return
            prompt, params = await anyio.to_thread.run_sync(self._engine_inputs, job)
            if prompt is None:  # the resumed tokens already used up max_tokens / max_model_len
                self._finish(job, job.out(finished=True, finish_reason="length"))
                return
            await self.engine.submit(
                prompt,
                params,
                job.req.id,
                lora_request=job.lora,
                priority=job.req.priority,
                resumed=ResumedOutput(job.resumed, job.resumed_text) if job.resumed else None,
            )
            job.submitted = True
            if job.lost or job.abort_requested or job.final_queued:
                # Ended while it was being submitted.
                if job.abort_requested and not job.final_queued and not job.lost:
                    self._end(job, job.out(finished=True, finish_reason="abort"))
                else:
                    self._abort_engine(job)
        except EngineDead:
            raise
        except Exception as e:
            self._fail(job, e)

    def _fail(self, job: Job, e: BaseException) -> None:
        if job.final_queued or job.lost:
            return
        if isinstance(e, LoRAStreamError):
            logger.info(
                "request %s (entry %s) failed: %s: %s",
                untrusted(job.req.id), job.entry_id, e.code, untrusted(e.message, 500),
            )  # fmt: skip
            error = (e.code, e.message, error_field(e))
        else:
            logger.error(
                "request %s (entry %s) failed", untrusted(job.req.id), job.entry_id, exc_info=e
            )
            error = ("internal_error", f"{type(e).__name__}: {e}", None)
        self._abort_engine(job)
        final = job.out(finished=True, finish_reason="error", error=error)
        if job.last is not None:
            final.usage = self._usage(job, job.last)
        self._finish(job, final)

    # ------------------------------------------------------------------ running
    async def run(self) -> None:
        """Take the engine's outputs, a list per step, until it dies (EngineDead)."""
        async for batch in self.engine.step_outputs():
            for item in batch:
                job = self.by_request.get(item.request_id)
                if job is None or not job.submitted or job.final_queued or job.lost:
                    continue  # ended here already; what was on the way is dropped
                try:
                    if isinstance(item, RequestOutput):
                        self._output(job, item)
                    else:
                        job.submitted = False
                        self._fail(job, item.error)
                except Exception as e:  # a bug here ends this job alone
                    self._fail(job, e)

    def _output(self, job: Job, out: RequestOutput) -> None:
        job.last = out
        c = out.outputs[0]
        delta = job.out(token_ids=list(c.token_ids), text=c.text)
        if c.logprobs is not None:
            delta.logprobs = logprobs_to_wire(c.logprobs)
            delta.logprob_tokens = logprob_tokens_to_wire(c.logprobs)
        job.completion_tokens += len(c.token_ids)
        self._observe_latency(job, out, len(delta.token_ids))
        if out.finished or out.error is not None:
            job.submitted = False
            delta.finished, delta.finish_reason = True, c.finish_reason or "error"
            if out.error is not None:
                delta.error = (out.error.code, out.error.message, None)
                delta.finish_reason = "error"
            delta.usage = self._usage(job, out)
            self._finish(job, delta)
        elif delta.token_ids or delta.text:
            self.publisher.put(delta)

    async def expire(self) -> None:
        """End jobs whose deadline passes (a task: sleeps until the earliest deadline)."""
        while True:
            self._deadline_changed = anyio.Event()
            while self._deadlines and (
                self._deadlines[0][2].final_queued or self._deadlines[0][2].lost
            ):
                heapq.heappop(self._deadlines)
            if not self._deadlines:
                await self._deadline_changed.wait()
                continue
            wait = self._deadlines[0][0] - time.time()
            if wait > 0:
                with anyio.move_on_after(wait):
                    await self._deadline_changed.wait()
                continue
            _, _, job = heapq.heappop(self._deadlines)
            if job.submitted:
                self._end(job, self._expired(job))

    def _expired(self, job: Job) -> Out:
        err = Expired(f"the request's deadline ({job.req.deadline_ms} ms since the epoch) passed")
        return job.out(finished=True, finish_reason="error", error=(err.code, err.message, None))

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

    def _usage(self, job: Job, out: RequestOutput) -> dict[str, float]:
        m = out.metrics
        resumed = job.resumed
        usage: dict[str, float] = {
            "prompt_tokens": len(out.prompt_token_ids) - resumed,
            "completion_tokens": resumed + job.completion_tokens,
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


__all__ = [
    "EngineClient",
    "EntryKey",
    "ErrorEvent",
    "Job",
    "Jobs",
    "entry_key",
    "next_seq",
    "plan_resume",
]
