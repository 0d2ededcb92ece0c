"""A fake ``AsyncLLMEngine`` with the real one's interface: deterministic tokens, no model.

Tokens are a function of the whole context (prompt + tokens so far + adapter name), so a
request resumed with its published tokens appended to the prompt continues exactly as an
uninterrupted run would: the kill tests compare every client's stream to ``expected_tokens``.
Like the real engine it steps all running requests together on one background task, raises
bad-input errors on the first ``__anext__``, ends a stream silently on ``abort``, reports an
adapter that fails to load as a finished output with ``error``, and feeds stat loggers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from engine.errors import (
    AdapterCorrupt,
    AdapterNotFound,
    EngineDead,
    InvalidRequest,
    LoRAStreamError,
    PromptTooLong,
)
from engine.lora.request import LoRARequest
from engine.metrics import StatLogger, Stats
from engine.outputs import CompletionOutput, Logprob, RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams

VOCAB = 1000


def next_token(context: Sequence[int], adapter: str | None) -> int:
    salt = sum((adapter or "").encode())
    return (31 * context[-1] + 7 * len(context) + 13 * salt) % VOCAB


def expected_tokens(prompt_ids: Sequence[int], n: int, adapter: str | None = None) -> list[int]:
    ctx = list(prompt_ids)
    out = []
    for _ in range(n):
        t = next_token(ctx, adapter)
        ctx.append(t)
        out.append(t)
    return out


class FakeTokenizer:
    chat_template = "{role}: {content}"
    eos_token_id: int | None = None

    def encode(self, text: str) -> list[int]:
        return [ord(c) % VOCAB for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(piece(t) for t in ids)

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        tokenize: bool = False,
        add_generation_prompt: bool = True,
    ) -> str:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant:" if add_generation_prompt else "")


def piece(t: int) -> str:
    return " " if t % 7 == 0 else chr(ord("a") + t % 26)


@dataclass
class _SchedulerConfig:
    max_num_seqs: int


@dataclass
class FakeConfig:
    max_num_seqs: int = 64
    max_model_len: int = 256
    model: str = "fake"
    enable_lora: bool = True

    @property
    def scheduler(self) -> _SchedulerConfig:
        return _SchedulerConfig(self.max_num_seqs)


@dataclass
class _FakeLLMEngine:
    """What ``AsyncLLMEngine.engine`` exposes to the service."""

    config: FakeConfig
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)

    def tokenize(self, prompt: str) -> tuple[str | None, list[int]]:
        return prompt, list(self.tokenizer.encode(prompt))


@dataclass
class _Req:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    lora: LoRARequest | None
    arrival: float
    out_ids: list[int] = field(default_factory=list)
    first_token_time: float | None = None
    error: LoRAStreamError | None = None
    sent_ids: int = 0  # what earlier DELTA outputs held
    sent_text: int = 0
    text: str = ""


class FakeAsyncEngine:
    def __init__(
        self,
        config: FakeConfig | None = None,
        *,
        step_delay_s: float = 0.002,
        stat_loggers: Sequence[StatLogger] = (),
        crash_on_token: int | None = None,
    ) -> None:
        self.engine = _FakeLLMEngine(config or FakeConfig())
        self.crash_on_token = crash_on_token
        """A prompt holding this token id kills the process (SIGKILL), as a native crash
        in a real engine would: nothing can catch it."""
        self.step_delay_s = step_delay_s
        self.stat_loggers = list(stat_loggers)
        self._streams: dict[str, MemoryObjectSendStream[RequestOutput | BaseException]] = {}
        self._running: dict[str, _Req] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._dead: BaseException | None = None
        self.generate_calls: list[tuple[str, Any, SamplingParams]] = []
        self._submitted: set[str] = set()
        self._batches: (
            tuple[MemoryObjectSendStream[list[Any]], MemoryObjectReceiveStream[list[Any]]] | None
        ) = None
        self.aborted: list[str] = []
        self.max_running = 0
        self.loads = 0

    # ----------------------------------------------------------------- interface
    @property
    def max_model_len(self) -> int:
        return self.engine.config.max_model_len

    @property
    def max_num_seqs(self) -> int:
        return self.engine.config.max_num_seqs

    def tokenize(self, text: str) -> list[int]:
        return list(self.engine.tokenizer.encode(text))

    def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        tok = self.engine.tokenizer
        return list(tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True)))

    def free_capacity(self) -> int:
        return max(0, self.engine.config.max_num_seqs - len(self._streams) - len(self._submitted))

    async def generate(
        self,
        prompt: Any,
        sampling_params: SamplingParams,
        request_id: str,
        lora_request: LoRARequest | None = None,
        priority: int = 0,
        resumed: Any = None,
    ) -> AsyncIterator[RequestOutput]:
        if self._dead is not None:
            raise EngineDead(f"the engine loop died: {self._dead!r}")
        if request_id in self._streams:
            raise InvalidRequest(f"request_id {request_id!r} is already running")
        req = self._make_request(request_id, prompt, sampling_params, lora_request)
        if self.crash_on_token is not None and self.crash_on_token in req.prompt_ids:
            os.kill(os.getpid(), signal.SIGKILL)
        self.generate_calls.append((request_id, prompt, sampling_params))
        send, receive = anyio.create_memory_object_stream[RequestOutput | BaseException](
            float("inf")
        )
        self._streams[request_id] = send
        self._running[request_id] = req
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
        prompt: Any,
        sampling_params: SamplingParams,
        request_id: str,
        lora_request: LoRARequest | None = None,
        priority: int = 0,
        resumed: Any = None,
    ) -> None:
        """As ``AsyncLLMEngine.submit``: outputs come from ``step_outputs()``."""
        if self._dead is not None:
            raise EngineDead(f"the engine loop died: {self._dead!r}")
        if request_id in self._streams or request_id in self._submitted:
            raise InvalidRequest(f"request_id {request_id!r} is already running")
        req = self._make_request(request_id, prompt, sampling_params, lora_request)
        if self.crash_on_token is not None and self.crash_on_token in req.prompt_ids:
            os.kill(os.getpid(), signal.SIGKILL)
        self.generate_calls.append((request_id, prompt, sampling_params))
        self._batch_streams()
        self._submitted.add(request_id)
        self._running[request_id] = req
        self._ensure_loop()

    async def step_outputs(self) -> AsyncIterator[list[Any]]:
        _, receive = self._batch_streams()
        async for batch in receive:
            yield batch
        raise EngineDead(f"the engine loop died: {self._dead!r}")

    def _batch_streams(
        self,
    ) -> tuple[MemoryObjectSendStream[list[Any]], MemoryObjectReceiveStream[list[Any]]]:
        if self._batches is None:
            self._batches = anyio.create_memory_object_stream[list[Any]](float("inf"))
        return self._batches

    async def abort(self, request_id: str) -> None:
        self.abort_nowait(request_id)

    def abort_nowait(self, request_id: str) -> None:
        if request_id in self._submitted:
            self._submitted.discard(request_id)
            self._running.pop(request_id, None)
            self.aborted.append(request_id)
            return
        stream = self._streams.pop(request_id, None)
        self._running.pop(request_id, None)
        if stream is not None:
            stream.close()
            self.aborted.append(request_id)

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def die(self, reason: str = "injected failure") -> None:
        """Make the step loop fail as a real engine would on a CUDA error."""
        self._dead = RuntimeError(reason)
        for stream in self._streams.values():
            stream.send_nowait(EngineDead(f"the engine loop died: {self._dead!r}"))
            stream.close()
        self._streams.clear()
        self._running.clear()
        self._submitted.clear()
        if self._batches is not None:
            self._batches[0].close()

    # ----------------------------------------------------------------- internals
    def _make_request(
        self, request_id: str, prompt: Any, params: SamplingParams, lora: LoRARequest | None
    ) -> _Req:
        tok = self.engine.tokenizer
        if isinstance(prompt, str):
            text: str | None = prompt
            ids = tok.encode(prompt)
        elif isinstance(prompt, Mapping) and "prompt_token_ids" in prompt:
            text, ids = None, list(prompt["prompt_token_ids"])
        else:
            raise InvalidRequest("prompt must be a string or {'prompt_token_ids': [...]}")
        if not ids:
            raise InvalidRequest("prompt is empty")
        bad = [t for t in ids if not 0 <= t < VOCAB]
        if bad:
            raise InvalidRequest(f"prompt_token_ids has ids outside [0, {VOCAB}): {bad[:5]}")
        if len(ids) >= self.engine.config.max_model_len:
            raise PromptTooLong(
                f"prompt has {len(ids)} tokens; max_model_len is {self.engine.config.max_model_len}"
            )
        req = _Req(request_id, text, ids, params, lora, time.monotonic())
        if lora is not None:
            if not self.engine.config.enable_lora:
                raise InvalidRequest("LoRA is not enabled: start the engine with enable_lora=True")
            if not os.path.isdir(lora.lora_path):
                raise AdapterNotFound(
                    f"adapter {lora.lora_name!r}: no directory at {lora.lora_path}"
                )
            if os.path.exists(os.path.join(lora.lora_path, "CORRUPT")):
                # Found at load time, off the request path: reported as an output, as the engine does.
                req.error = AdapterCorrupt(
                    f"adapter {lora.lora_name!r}: adapter_model.safetensors is corrupt"
                )
            self.loads += 1
        return req

    def _ensure_loop(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            if not self._running:
                self._wake.clear()
                await self._wake.wait()
                continue
            await asyncio.sleep(self.step_delay_s)
            t0 = time.monotonic()
            self.max_running = max(self.max_running, len(self._running))
            outputs = [self._step_one(r) for r in list(self._running.values())]
            batch = []
            for out in outputs:
                if out.request_id in self._submitted:
                    batch.append(out)
                    if out.finished:
                        self._submitted.discard(out.request_id)
                        self._running.pop(out.request_id, None)
                    continue
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                stream.send_nowait(out)
                if out.finished:
                    del self._streams[out.request_id]
                    self._running.pop(out.request_id, None)
                    stream.close()
            if batch and self._batches is not None:
                self._batches[0].send_nowait(batch)
            stats = Stats(
                now=time.monotonic(), num_waiting=0, num_running=len(self._running),
                kv_cache_usage=len(self._running) / self.engine.config.max_num_seqs,
                num_prompt_tokens=0, num_generation_tokens=len(outputs), num_preemptions=0,
                step_time_s=time.monotonic() - t0, adapter_loads=self.loads,
            )  # fmt: skip
            for sl in self.stat_loggers:
                sl.record(stats)

    def _step_one(self, r: _Req) -> RequestOutput:
        p = r.params
        reason: str | None = None
        if r.error is not None:
            reason = "error"
        else:
            t = next_token(r.prompt_ids + r.out_ids, r.lora.lora_name if r.lora else None)
            r.out_ids.append(t)
            r.text += piece(t)
            if r.first_token_time is None:
                r.first_token_time = time.monotonic()
            n = len(r.out_ids)
            eos = self.engine.tokenizer.eos_token_id
            if n >= p.min_tokens and (t in p.stop_token_ids or (t == eos and not p.ignore_eos)):
                reason = "stop"
            elif (p.max_tokens is not None and n >= p.max_tokens) or len(
                r.prompt_ids
            ) + n >= self.engine.config.max_model_len:
                reason = "length"
        text = r.text
        for s in p.stop:
            if s in text and reason != "error":
                text, reason = text[: text.index(s)], "stop"
        metrics = {"arrival_time": r.arrival}
        if r.first_token_time is not None:
            metrics["first_token_time"] = r.first_token_time
        if reason is not None:
            metrics["finished_time"] = time.monotonic()
        logprobs = None
        if p.logprobs is not None:
            logprobs = [{t: Logprob(-0.5, 1, str(t))} for t in r.out_ids]
        ids = list(r.out_ids)
        if p.output_kind == RequestOutputKind.DELTA:  # as the real engine: only what is new
            ids, text = ids[r.sent_ids :], text[r.sent_text :]
            logprobs = logprobs[r.sent_ids :] if logprobs is not None else None
            r.sent_ids, r.sent_text = len(r.out_ids), r.sent_text + len(text)
        return RequestOutput(
            request_id=r.request_id,
            prompt=r.prompt,
            prompt_token_ids=r.prompt_ids,
            outputs=[CompletionOutput(0, text, ids, finish_reason=reason, logprobs=logprobs)],
            finished=reason is not None,
            error=r.error,
            metrics=metrics,
            lora_request=r.lora,
        )


async def _iterate(
    receive: MemoryObjectReceiveStream[RequestOutput | BaseException],
) -> AsyncIterator[RequestOutput | BaseException]:
    try:
        while True:
            yield await receive.receive()
    except anyio.EndOfStream:
        return
