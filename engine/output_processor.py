"""Token ids from the engine core → ``RequestOutput``s: incremental detokenization, stop
strings, logprobs and metrics, one ``RequestState`` per unfinished request.

A request with ``n > 1`` runs in the core as ``n`` child requests (``ParentRequest``); their
states are this module's as any other, and each output of the request gathers its
children's completions (``CompletionOutput.index``), as vLLM's parallel sampling does.

It runs in the caller's process whether the core runs there too or in its own process, so
both modes build their outputs with this one piece of code.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.core_messages import EngineCoreOutputs, TokenLogprobs
from engine.errors import LoRAStreamError
from engine.lora.request import LoRARequest
from engine.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput
from engine.sampling.detokenizer import IncrementalDetokenizer
from engine.sampling_params import RequestOutputKind
from engine.sequence import Request


@dataclass(eq=False)
class ParentRequest:
    """A request with ``n > 1``: its children are states of their own, in index order."""

    request_id: str
    output_kind: RequestOutputKind
    children: list[RequestState] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.children)


@dataclass(eq=False)
class RequestState:
    request_id: str
    """The core's id: the caller's, or ``"{index}_{parent id}"`` for a child."""
    prompt: str | None
    prompt_token_ids: list[int]
    lora_request: LoRARequest | None
    arrival_time: float
    detokenizer: IncrementalDetokenizer | None
    """None with ``detokenize=False``: no text."""
    logprobs: list[dict[int, Logprob]] | None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    index: int = 0
    parent: ParentRequest | None = None
    output_token_ids: list[int] = field(default_factory=list)
    # What earlier DELTA outputs held: token ids, characters of text, logprobs entries.
    sent_tokens: int = 0
    sent_text: int = 0
    sent_logprobs: int = 0
    sent_prompt_logprobs: bool = False
    cumulative_logprob: float = 0.0
    prompt_logprobs: PromptLogprobs | None = None
    first_token_time: float | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: LoRAStreamError | None = None
    num_cached_tokens: int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def output_id(self) -> str:
        """The id the caller knows: the parent's for a child."""
        return self.parent.request_id if self.parent is not None else self.request_id


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
        """Unfinished requests by the core's id (children of ``n > 1`` requests each)."""
        self.parents: dict[str, ParentRequest] = {}
        """Unfinished ``n > 1`` requests by the caller's id."""
        self._token_text: dict[int, str] = {}

    def add_request(self, request: Request, parent: ParentRequest | None = None) -> None:
        """Track ``request``; a child of ``parent`` (``n > 1``) joins its children in order."""
        params = request.sampling_params
        state = RequestState(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            lora_request=request.lora_request,
            arrival_time=request.arrival_time,
            detokenizer=IncrementalDetokenizer(
                self.tokenizer, request.prompt_token_ids, params, request.resumed
            )
            if params.detokenize
            else None,
            logprobs=[] if params.logprobs is not None else None,
            output_kind=params.output_kind,
        )
        if parent is not None:
            state.parent = parent
            state.index = len(parent.children)
            parent.children.append(state)
            self.parents[parent.request_id] = parent
        self.states[request.request_id] = state

    def is_known(self, request_id: str) -> bool:
        """Whether ``request_id`` names an unfinished request (or an ``n > 1`` one)."""
        return request_id in self.states or request_id in self.parents

    def core_ids(self, request_ids: Iterable[str]) -> list[str]:
        """The core's ids of unfinished requests named by the caller's ids."""
        out = []
        for request_id in request_ids:
            parent = self.parents.get(request_id)
            if parent is not None:
                out += [c.request_id for c in parent.children if c.request_id in self.states]
            elif request_id in self.states:
                out.append(request_id)
        return out

    def abort_requests(self, request_ids: Iterable[str]) -> list[RequestOutput]:
        """Finish the known unfinished requests as aborted (caller's ids); returns their
        final outputs."""
        aborted: list[RequestState] = []
        for core_id in self.core_ids(request_ids):
            state = self.states.pop(core_id)
            state.finish_reason = "abort"
            aborted.append(state)
        return self.make_outputs(aborted)

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
        prompt_logprobs = batch.prompt_logprobs
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
            if prompt_logprobs is not None and (plp := prompt_logprobs[i]) is not None:
                state.prompt_logprobs = [
                    None if e is None else self._logprob_dict(e, state) for e in plp
                ]
            state.output_token_ids.append(token)
            if state.logprobs is not None and logprobs is not None:
                lp = logprobs[i]
                if lp is not None:
                    state.logprobs.append(self._logprob_dict(lp, state))
                    state.cumulative_logprob += lp[1][0]
            det = state.detokenizer
            if det is None:
                state.finish_reason = finish_reason
                state.stop_reason = batch.stop_reasons[i]
            else:
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

    def _logprob_dict(self, entry: TokenLogprobs, state: RequestState) -> dict[int, Logprob]:
        """{token_id: Logprob} of one position, the sampled (or prompt) token first."""
        ids, values, ranks = entry
        decode = state.detokenizer is not None
        out: dict[int, Logprob] = {}
        for tid, value, rank in zip(ids, values, ranks, strict=True):
            if tid not in out:
                out[tid] = Logprob(value, rank, self._decoded(tid) if decode else None)
        return out

    def _decoded(self, token_id: int) -> str:
        # A token's own text, as vLLM gives it (decode([id])); the vocabulary is finite.
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._token_text[token_id] = text
        return text

    def make_outputs(self, states: Iterable[RequestState]) -> list[RequestOutput]:
        """The outputs of requests with news (``states``, in order), one per caller's
        request, as each ``output_kind`` asks: none for a FINAL_ONLY request still running.
        Children of one ``n > 1`` request are gathered into its output."""
        groups: dict[str, list[RequestState]] = {}
        for state in states:
            group = groups.setdefault(state.output_id, [])
            if state not in group:
                group.append(state)
        outputs = []
        for group in groups.values():
            parent = group[0].parent
            out = (
                self.make_output(group[0]) if parent is None else self._parent_output(parent, group)
            )
            if out is not None:
                outputs.append(out)
        return outputs

    def make_output(self, state: RequestState) -> RequestOutput | None:
        """The request's output now, as its ``output_kind`` asks: None for a FINAL_ONLY
        request that is still running."""
        if state.output_kind == RequestOutputKind.FINAL_ONLY and not state.finished:
            return None
        return self._request_output(state, [self._completion(state)], state.finished)

    def _parent_output(
        self, parent: ParentRequest, touched: Sequence[RequestState]
    ) -> RequestOutput | None:
        finished = parent.finished
        if finished:
            del self.parents[parent.request_id]
        kind = parent.output_kind
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        # DELTA: the children with news; otherwise all of them, in index order.
        children = (
            sorted(touched, key=lambda c: c.index)
            if kind == RequestOutputKind.DELTA
            else parent.children
        )
        completions = [self._completion(c) for c in children]
        first = parent.children[0]
        out = self._request_output(first, completions, finished)
        out.request_id = parent.request_id
        # Every child scores the same prompt; the first child's scores are the request's.
        out.prompt_logprobs = self._prompt_logprobs_of(
            next((c for c in parent.children if c.prompt_logprobs is not None), first)
        )
        errors = [c.error for c in parent.children if c.error is not None]
        out.error = errors[0] if errors else None
        cached = [c.num_cached_tokens for c in parent.children if c.num_cached_tokens is not None]
        out.num_cached_tokens = min(cached) if cached else None
        times = [c.first_token_time for c in parent.children if c.first_token_time is not None]
        if times:
            out.metrics["first_token_time"] = min(times)
        return out

    def _completion(self, state: RequestState) -> CompletionOutput:
        det = state.detokenizer
        if state.output_kind == RequestOutputKind.DELTA:
            # Only what is new: no copy of everything so far, whatever the length.
            text = det.text_since(state.sent_text) if det is not None else ""
            token_ids = state.output_token_ids[state.sent_tokens :]
            logprobs = None
            if state.logprobs is not None:
                logprobs = state.logprobs[state.sent_logprobs :]
                state.sent_logprobs = len(state.logprobs)
            state.sent_text += len(text)
            state.sent_tokens = len(state.output_token_ids)
        else:
            text = det.output_text if det is not None else ""
            token_ids = list(state.output_token_ids)
            logprobs = list(state.logprobs) if state.logprobs is not None else None
        return CompletionOutput(
            index=state.index,
            text=text,
            token_ids=token_ids,
            cumulative_logprob=state.cumulative_logprob if state.logprobs is not None else None,
            logprobs=logprobs,
            finish_reason=state.finish_reason,
            stop_reason=state.stop_reason,
            lora_request=state.lora_request,
        )

    def _prompt_logprobs_of(self, state: RequestState) -> PromptLogprobs | None:
        if state.output_kind == RequestOutputKind.DELTA:
            # Sent once, with the first output that has them.
            if state.sent_prompt_logprobs or state.prompt_logprobs is None:
                return None
            state.sent_prompt_logprobs = True
        return state.prompt_logprobs

    def _request_output(
        self, state: RequestState, completions: list[CompletionOutput], finished: bool
    ) -> RequestOutput:
        metrics = {"arrival_time": state.arrival_time}
        if state.first_token_time is not None:
            metrics["first_token_time"] = state.first_token_time
        if finished:
            metrics["finished_time"] = time.monotonic()
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=completions,
            finished=finished,
            prompt_logprobs=self._prompt_logprobs_of(state) if state.parent is None else None,
            error=state.error,
            metrics=metrics,
            lora_request=state.lora_request,
            num_cached_tokens=state.num_cached_tokens,
        )
