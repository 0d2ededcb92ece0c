"""Token ids from the engine core → ``RequestOutput``s: incremental detokenization, stop
strings, logprobs and metrics, one ``RequestState`` per unfinished request.

It runs in the caller's process whether the core runs there too or in its own process, so
both modes build their outputs with this one piece of code.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from engine.core_messages import EngineCoreOutputs
from engine.errors import LoRAStreamError
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling.detokenizer import IncrementalDetokenizer
from engine.sampling_params import RequestOutputKind
from engine.sequence import Request


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    lora_name: str | None
    arrival_time: float
    detokenizer: IncrementalDetokenizer
    logprobs: list[dict[int, float]] | None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    output_token_ids: list[int] = field(default_factory=list)
    # What earlier DELTA outputs held: token ids, characters of text, logprobs entries.
    sent_tokens: int = 0
    sent_text: int = 0
    sent_logprobs: int = 0
    first_token_time: float | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: LoRAStreamError | None = None
    num_cached_tokens: int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class ProcessedOutputs:
    touched: list[RequestState] = field(default_factory=list)
    """States with news this batch, in the core's order (finished ones already dropped)."""
    stopped: list[str] = field(default_factory=list)
    """Requests a stop string ended while the core still runs them: abort them there."""
    finished: list[tuple[str, str]] = field(default_factory=list)
    """(request_id, finish_reason) of requests that finished by a token (for stat loggers)."""


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}

    def add_request(self, request: Request) -> None:
        params = request.sampling_params
        self.states[request.request_id] = RequestState(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            lora_name=request.lora_request.lora_name if request.lora_request else None,
            arrival_time=request.arrival_time,
            detokenizer=IncrementalDetokenizer(
                self.tokenizer, request.prompt_token_ids, params, request.resumed
            ),
            logprobs=[] if params.logprobs is not None else None,
            output_kind=params.output_kind,
        )

    def abort_requests(self, request_ids: Iterable[str]) -> list[RequestOutput]:
        """Finish the known unfinished requests as aborted; returns their final outputs."""
        outputs = []
        for request_id in request_ids:
            state = self.states.pop(request_id, None)
            if state is not None:
                state.finish_reason = "abort"
                out = self.make_output(state)
                assert out is not None  # finished: every kind gives an output
                outputs.append(out)
        return outputs

    def process_outputs(self, batch: EngineCoreOutputs) -> ProcessedOutputs:
        result = ProcessedOutputs()
        states = self.states
        for f in batch.failed:
            state = states.pop(f.request_id, None)
            if state is not None:
                # Failed in the core (an adapter that did not load): report what was shown
                # so far; held-back text is not flushed, as for an abort.
                state.finish_reason = "error"
                state.error = f.error
                result.touched.append(state)
        logprobs = batch.logprobs
        num_cached = batch.num_cached_tokens
        for i, request_id in enumerate(batch.request_ids):
            state = states.get(request_id)
            if state is None:  # aborted or stopped in the front while the core ran on
                continue
            result.touched.append(state)
            token = batch.new_token_ids[i]
            finish_reason = batch.finish_reasons[i]
            first_token_time = batch.first_token_times[i]
            if first_token_time is not None:
                state.first_token_time = first_token_time
            if num_cached:
                state.num_cached_tokens = num_cached[i]
            state.output_token_ids.append(token)
            if state.logprobs is not None and logprobs is not None:
                lp = logprobs[i]
                if lp is not None:
                    state.logprobs.append(lp)
            det = state.detokenizer
            det.update(
                [token],
                finished=finish_reason is not None,
                # Finished by EOS or a stop token id (stop strings are found just below).
                stop_terminated=finish_reason == "stop",
            )
            if det.finished_by_stop_string:
                if finish_reason is None:
                    result.stopped.append(request_id)
                # Also when max_tokens came on the very token that completed the stop string.
                state.finish_reason = "stop"
                state.stop_reason = det.stop_reason
            else:
                state.finish_reason = finish_reason
                state.stop_reason = batch.stop_reasons[i]
            if state.finish_reason is not None:
                result.finished.append((request_id, state.finish_reason))
                del states[request_id]
        return result

    def make_output(self, state: RequestState) -> RequestOutput | None:
        """The request's output now, as its ``output_kind`` asks: None for a FINAL_ONLY
        request that is still running."""
        kind = state.output_kind
        if kind == RequestOutputKind.FINAL_ONLY and not state.finished:
            return None
        det = state.detokenizer
        if kind == RequestOutputKind.DELTA:
            # Only what is new: no copy of everything so far, whatever the length.
            text = det.text_since(state.sent_text)
            token_ids = state.output_token_ids[state.sent_tokens :]
            logprobs = None
            if state.logprobs is not None:
                logprobs = state.logprobs[state.sent_logprobs :]
                state.sent_logprobs = len(state.logprobs)
            state.sent_text += len(text)
            state.sent_tokens = len(state.output_token_ids)
        else:
            text = det.output_text
            token_ids = list(state.output_token_ids)
            logprobs = list(state.logprobs) if state.logprobs is not None else None
        completion = CompletionOutput(
            index=0,
            text=text,
            token_ids=token_ids,
            finish_reason=state.finish_reason,
            logprobs=logprobs,
            stop_reason=state.stop_reason,
        )
        metrics = {"arrival_time": state.arrival_time}
        if state.first_token_time is not None:
            metrics["first_token_time"] = state.first_token_time
        if state.finished:
            metrics["finished_time"] = time.monotonic()
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=[completion],
            finished=state.finished,
            error=state.error,
            metrics=metrics,
            lora_name=state.lora_name,
            num_cached_tokens=state.num_cached_tokens,
        )
