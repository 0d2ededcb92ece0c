"""``AsyncLLMEngine``: the synchronous engine driven by a background task.

``LLMEngine.step`` runs on one worker thread, never on the event loop. With the core in
this process, all engine state is touched by that thread only: requests and aborts from the
event loop are queued and applied between steps, so the step loop never races the callers.
With the core in its own process (``enable_multiprocessing=True``) the worker thread only
waits for and processes the core's outputs, while requests and aborts go to the core at
once from the event loop (the front is thread-safe then): a new request never waits for a
step to end before the core sees it.

Preparing a request (tokenizing, reading its adapter's config: files written by whoever can
write under ``--lora-root``) runs on a worker thread too, under ``prepare_timeout_s``: a slow
or hostile file fails that request alone and never holds the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections.abc import AsyncIterator, Generator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from engine.config import EngineArgs
from engine.errors import AdapterLoadTimeout, EngineDead, InvalidRequest, RequestTimeout
from engine.llm_engine import LLMEngine, PromptType
from engine.lora.request import LoRARequest
from engine.metrics import StatLogger
from engine.outputs import RequestOutput, ResumedOutput
from engine.sampling_params import SamplingParams
from engine.sequence import Request
from engine.usage import UsageContext

logger = logging.getLogger("lorastream.async_engine")

PREPARE_TIMEOUT_S = 30.0
"""Default limit on preparing one request (tokenizing it, reading its adapter's config)."""
PREPARE_THREADS = 4
"""Requests prepared at once; more wait for a thread (within their time limit)."""


@dataclass(frozen=True)
class RequestFailed:
    """In ``step_outputs()``: a submitted request the engine refused when it was admitted."""

    request_id: str
    error: BaseException


StepItem = RequestOutput | RequestFailed


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, *, prepare_timeout_s: float = PREPARE_TIMEOUT_S) -> None:
        """``prepare_timeout_s``: a request whose preparation (``LLMEngine.make_request``:
        tokenizing, reading its adapter's config) takes longer fails with
        ``AdapterLoadTimeout`` (with an adapter) or ``RequestTimeout``; its thread is left to
        finish on its own."""
        self.engine = engine
        self.prepare_timeout_s = prepare_timeout_s
        self._prepare_limiter = anyio.CapacityLimiter(PREPARE_THREADS)
        self._preparing: set[str] = set()
        self._streams: dict[str, MemoryObjectSendStream[RequestOutput | BaseException]] = {}
        self._submitted: set[str] = set()
        """Requests whose outputs go to ``step_outputs()`` (``submit``), not to a stream each."""
        self._batches: (
            tuple[MemoryObjectSendStream[list[StepItem]], MemoryObjectReceiveStream[list[StepItem]]]
            | None
        ) = None
        self._new: list[Request] = []
        self._aborts: list[str] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorastream-step")
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._dead: BaseException | None = None

    @classmethod
    def from_engine_args(
        cls,
        engine_args: EngineArgs,
        usage_context: UsageContext = UsageContext.ENGINE_CONTEXT,
        stat_loggers: Sequence[StatLogger] | Mapping[str, StatLogger] | None = None,
        enable_multiprocessing: bool = False,
    ) -> AsyncLLMEngine:
        return cls(
            LLMEngine.from_engine_args(
                engine_args, usage_context, stat_loggers, enable_multiprocessing
            )
        )

    @property
    def is_running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    @property
    def errored(self) -> bool:
        return self._dead is not None

    @property
    def num_unfinished(self) -> int:
        return len(self._streams) + len(self._submitted) + len(self._preparing)

    @property
    def max_model_len(self) -> int:
        return int(self.engine.config.max_model_len)

    @property
    def max_num_seqs(self) -> int:
        return int(self.engine.config.scheduler.max_num_seqs)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a prompt string, as ``generate`` tokenizes it."""
        return self.engine.tokenize(text)[1]

    def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation under the model's chat template, with the generation
        prompt. The rendered text already holds the template's special tokens (``{{
        bos_token }}``), so none are added again, as vLLM does."""
        tok = self.engine.tokenizer
        if getattr(tok, "chat_template", None) is None:
            raise InvalidRequest("messages: the model has no chat template; send prompt instead")
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tok.encode(text, add_special_tokens=False))

    def free_capacity(self) -> int:
        """How many more requests the engine can admit now without queueing them in memory:
        free sequence slots, and none while the KV cache is nearly full and requests wait."""
        load = self.engine.get_load()
        free = self.engine.config.scheduler.max_num_seqs - self.num_unfinished
        if load.num_waiting > 0 and load.kv_cache_usage > 0.95:
            return 0
        return max(free, 0)

    async def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams,
        request_id: str,
        lora_request: LoRARequest | None = None,
        priority: int = 0,
        resumed: ResumedOutput | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield a RequestOutput per step until the request finishes. Leaving early aborts it.
        ``resumed``: the prompt ends with an earlier run's output (``ResumedOutput``)."""
        request = await self._make_request(
            prompt, sampling_params, request_id, lora_request, priority, resumed
        )
        send, receive = anyio.create_memory_object_stream[RequestOutput | BaseException](math.inf)
        self._streams[request_id] = send
        if self.engine.is_multiprocess:
            try:
                self.engine.admit(request)
            except BaseException:
                del self._streams[request_id]
                send.close()
                receive.close()
                raise
        else:
            self._new.append(request)
        self._ensure_loop()
        finished = False
        try:
            async with receive:
                async for item in _iterate(receive):
                    if isinstance(item, BaseException):
                        raise item
                    finished = item.finished
                    yield item
                    if finished:
                        return
        finally:
            if not finished:
                await self.abort(request_id)

    async def submit(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams,
        request_id: str,
        lora_request: LoRARequest | None = None,
        priority: int = 0,
        resumed: ResumedOutput | None = None,
    ) -> None:
        """Add a request whose outputs come from ``step_outputs()`` with every other submitted
        request's: one list per engine step, instead of a stream and a task per request (a
        server with hundreds of requests in flight wakes once per step, not once per request).
        Raises what ``generate`` raises before its first output; a request refused later, at
        admission, comes as a ``RequestFailed``. ``abort`` ends it; no output of it follows."""
        request = await self._make_request(
            prompt, sampling_params, request_id, lora_request, priority, resumed
        )
        self._batch_streams()
        self._submitted.add(request_id)
        if self.engine.is_multiprocess:
            try:
                self.engine.admit(request)
            except BaseException:
                self._submitted.discard(request_id)
                raise
        else:
            self._new.append(request)
        self._ensure_loop()

    async def step_outputs(self) -> AsyncIterator[list[StepItem]]:
        """The outputs of submitted requests, a list per engine step, for one consumer.
        Raises EngineDead when the engine loop dies."""
        _, receive = self._batch_streams()
        async for batch in receive:
            yield batch
        raise EngineDead(f"the engine loop died: {self._dead!r}")

    def _batch_streams(
        self,
    ) -> tuple[MemoryObjectSendStream[list[StepItem]], MemoryObjectReceiveStream[list[StepItem]]]:
        if self._batches is None:
            # Unbounded: one list per step, taken by a consumer that never awaits anything
            # else between lists.
            self._batches = anyio.create_memory_object_stream[list[StepItem]](math.inf)
        return self._batches

    async def _make_request(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams,
        request_id: str,
        lora_request: LoRARequest | None,
        priority: int,
        resumed: ResumedOutput | None,
    ) -> Request:
        """``LLMEngine.make_request`` on a worker thread (``_prepare``), the id reserved
        meanwhile so a second request with it is refused."""
        if self._dead is not None:
            raise EngineDead(f"the engine loop died: {self._dead!r}")
        if (
            request_id in self._streams
            or request_id in self._submitted
            or (request_id in self._preparing)
        ):
            raise InvalidRequest(f"request_id {request_id!r} is already running")
        self._preparing.add(request_id)
        try:
            request = await self._prepare(
                functools.partial(
                    self.engine.make_request, request_id, prompt, sampling_params,
                    lora_request=lora_request, priority=priority, resumed=resumed,
                ),
                request_id,
                lora_request,
            )  # fmt: skip
        finally:
            self._preparing.discard(request_id)
        if self._dead is not None:
            raise EngineDead(f"the engine loop died: {self._dead!r}")
        return request

    async def _prepare(
        self,
        make_request: functools.partial[Request],
        request_id: str,
        lora_request: LoRARequest | None,
    ) -> Request:
        # abandon_on_cancel: a request that times out or is cancelled returns at once; its
        # thread finishes (reading nothing more than the size caps allow) and is dropped.
        with anyio.move_on_after(self.prepare_timeout_s):
            return await anyio.to_thread.run_sync(
                make_request, abandon_on_cancel=True, limiter=self._prepare_limiter
            )
        logger.warning(
            "request %r: not prepared within %g s (adapter %r)",
            request_id,
            self.prepare_timeout_s,
            lora_request.lora_path if lora_request else None,
        )
        if lora_request is not None:
            raise AdapterLoadTimeout(
                f"adapter {lora_request.lora_name!r}: reading its config and tokenizing the prompt "
                f"took longer than {self.prepare_timeout_s:g} s"
            )
        raise RequestTimeout(f"tokenizing the prompt took longer than {self.prepare_timeout_s:g} s")

    async def abort(self, request_id: str) -> None:
        self.abort_nowait(request_id)

    def abort_nowait(self, request_id: str) -> None:
        """``abort`` from synchronous code on the event loop's thread."""
        if request_id in self._submitted:
            self._submitted.discard(request_id)
        else:
            stream = self._streams.pop(request_id, None)
            if stream is None:
                return
            stream.close()
        if self.engine.is_multiprocess:
            self.engine.abort_request(request_id)
        else:
            self._aborts.append(request_id)
        self._ensure_loop()

    def _utility_executor(self) -> ThreadPoolExecutor | None:
        # In-process, adapter device buffers belong to the step thread; with the core in its
        # own process the step thread may be waiting for outputs, so a default-pool thread
        # sends the call.
        return None if self.engine.is_multiprocess else self._executor

    async def add_lora(self, lora_request: LoRARequest) -> bool:
        # Loading touches host memory only (behind the manager's lock), so it reads from disk
        # on a thread of its own rather than holding up the step thread.
        return await anyio.to_thread.run_sync(self.engine.add_lora, lora_request)

    async def remove_lora(self, lora_id: int) -> bool:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._utility_executor(), self.engine.remove_lora, lora_id
        )

    def _ensure_loop(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if not self.is_running and self._dead is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not (self._new or self._aborts or self.engine.has_unfinished_requests()):
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                new, self._new = self._new, []
                aborts, self._aborts = self._aborts, []
                outputs = await loop.run_in_executor(self._executor, self._step, new, aborts)
                batch: list[StepItem] = []
                for out in outputs:
                    if out.request_id in self._submitted:
                        batch.append(out)
                        if isinstance(out, RequestFailed) or out.finished:
                            self._submitted.discard(out.request_id)
                        continue
                    stream = self._streams.get(out.request_id)
                    if isinstance(out, RequestFailed):
                        if stream is not None:
                            stream.send_nowait(out.error)
                        continue
                    if stream is None:
                        continue
                    stream.send_nowait(out)
                    if out.finished:
                        del self._streams[out.request_id]
                        stream.close()
                if batch and self._batches is not None:
                    self._batches[0].send_nowait(batch)
                await asyncio.sleep(0)  # let callers add work between steps
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            logger.exception("engine loop died")
            self._dead = e
            dead = e if isinstance(e, EngineDead) else EngineDead(f"the engine loop died: {e!r}")
            for stream in self._streams.values():
                stream.send_nowait(dead)
                stream.close()
            self._streams.clear()
            self._submitted.clear()
            if self._batches is not None:
                self._batches[0].close()

    def _step(self, new: list[Request], aborts: list[str]) -> list[StepItem]:
        outputs: list[StepItem] = []
        for request in new:
            if request.request_id in aborts:
                continue
            try:
                self.engine.admit(request)
            except Exception as e:
                # Told on the loop's side: streams are not thread-safe.
                outputs.append(RequestFailed(request.request_id, e))
        if aborts:
            self.engine.abort_request(aborts)
        outputs.extend(self.engine.step())
        return outputs

    def shutdown(self) -> _Done:
        """Stop the engine now, as vLLM's synchronous ``shutdown()`` does: the step loop is
        cancelled, a step in progress ends, the core (and its process) stops, and every
        unfinished stream ends. Returns an already finished awaitable, so code that awaits
        it (``await engine.shutdown()``) works too."""
        if self._loop_task is not None:
            self._loop_task.cancel()
        # Stops the core process first: a step waiting for its outputs then returns.
        self.engine.shutdown()
        self._executor.shutdown(wait=True)
        for stream in self._streams.values():
            stream.close()
        self._streams.clear()
        self._submitted.clear()
        if self._batches is not None:
            self._batches[0].close()
        return _Done()


AsyncLLM = AsyncLLMEngine
"""vLLM V1's name for the asynchronous engine."""


class _Done:
    """An awaitable that is already finished."""

    def __await__(self) -> Generator[None, None, None]:
        yield from ()


async def _iterate(
    receive: MemoryObjectReceiveStream[RequestOutput | BaseException],
) -> AsyncIterator[RequestOutput | BaseException]:
    try:
        while True:
            yield await receive.receive()
    except anyio.EndOfStream:
        return
