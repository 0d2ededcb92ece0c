"""The synchronous engine. One step is ``schedule()`` → ``execute_model()`` →
``update_from_output()``; the loop holds no policy of its own."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from engine.config import EngineArgs, EngineConfig
from engine.core.block_manager import BlockManager
from engine.core.scheduler import Scheduler
from engine.errors import AdapterError, InvalidRequest, LoRAStreamError, PromptTooLong
from engine.lora.request import LoRARequest
from engine.metrics import LoggingStatLogger, StatLogger, Stats
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling.detokenizer import IncrementalDetokenizer
from engine.sampling_params import SamplingParams
from engine.sequence import Request, RequestStatus
from engine.usage import UsageContext
from engine.worker.model_runner import ModelRunner

logger = logging.getLogger("lorastream.engine")

# A prompt: text, {"prompt": text}, or {"prompt_token_ids": [...]} (vLLM's TextPrompt / TokensPrompt).
PromptType = str | Mapping[str, Any]


@dataclass
class _RequestState:
    request: Request
    detokenizer: IncrementalDetokenizer
    logprobs: list[dict[int, float]] | None = None
    lora_name: str | None = None
    reported_tokens: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        stat_loggers: Sequence[StatLogger] | Mapping[str, StatLogger] | None = None,
        usage_context: UsageContext = UsageContext.ENGINE_CONTEXT,
    ) -> None:
        self.config = config
        self.usage_context = usage_context
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            config.tokenizer, local_files_only=True
        )
        self.runner = ModelRunner(config)
        self.block_manager = BlockManager(self.runner.num_blocks, config.cache.block_size)
        lora_ready = self.runner.lora_manager.is_ready if self.runner.lora_manager else None
        self.scheduler = Scheduler(
            config.scheduler,
            self.block_manager,
            **({"lora_ready": lora_ready} if lora_ready else {}),
        )
        eos_ids = _eos_token_ids(config, self.tokenizer)
        self.eos_token_id = eos_ids[0] if eos_ids else None
        # Further EOS ids (Llama 3's <|eot_id|>, ...) stop a request like stop_token_ids do.
        self.extra_eos_token_ids = eos_ids[1:]
        self._states: dict[str, _RequestState] = {}
        self._pending_outputs: list[RequestOutput] = []
        self._lora_ids: dict[str, LoRARequest] = {}
        if isinstance(stat_loggers, Mapping):
            stat_loggers = list(stat_loggers.values())
        self.stat_loggers: list[StatLogger] = list(stat_loggers or [])
        if stat_loggers is None and config.log_stats:
            self.stat_loggers.append(LoggingStatLogger())
        if config.lora is not None:
            for i, m in enumerate(config.lora.preload, start=1):
                self.add_lora(LoRARequest(m.name, i, m.path))

    @classmethod
    def from_engine_args(
        cls,
        engine_args: EngineArgs,
        usage_context: UsageContext = UsageContext.ENGINE_CONTEXT,
        stat_loggers: Sequence[StatLogger] | Mapping[str, StatLogger] | None = None,
        enable_multiprocessing: bool = False,
    ) -> LLMEngine:
        if enable_multiprocessing:
            logger.warning("enable_multiprocessing is not implemented yet; running in-process")
        return cls(engine_args.create_engine_config(), stat_loggers, usage_context)

    # ---------------------------------------------------------------- adapters
    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load an adapter now (synchronously) and keep its name for lookups."""
        manager = self._require_lora()
        manager.add_lora(lora_request)
        self._lora_ids[lora_request.lora_name] = lora_request
        return True

    def remove_lora(self, lora_id: int) -> bool:
        manager = self._require_lora()
        self._lora_ids = {k: v for k, v in self._lora_ids.items() if v.lora_int_id != lora_id}
        return manager.remove_lora(lora_id)

    def list_loras(self) -> set[int]:
        return set(self._require_lora().list_loras()) if self.runner.lora_manager else set()

    def get_lora_request(self, name: str) -> LoRARequest | None:
        """A preloaded adapter (``lora_modules``) by name."""
        return self._lora_ids.get(name)

    def _require_lora(self):
        if self.runner.lora_manager is None:
            raise InvalidRequest("LoRA is not enabled: start the engine with enable_lora=True")
        return self.runner.lora_manager

    # ---------------------------------------------------------------- requests
    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        lora_request: LoRARequest | None = None,
        priority: int = 0,
    ) -> None:
        """Validate and queue a request. Raises ``InvalidRequest`` / ``AdapterError`` naming what is wrong."""
        request = self.make_request(
            request_id, prompt, params, arrival_time, lora_request, priority
        )
        self.admit(request)

    def make_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        lora_request: LoRARequest | None = None,
        priority: int = 0,
    ) -> Request:
        """Everything in add_request that does not touch the scheduler (safe off the step thread)."""
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequest(
                f"request_id={request_id!r} is invalid: must be a non-empty string"
            )
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequest("params must be a SamplingParams")
        text, token_ids = self.tokenize(prompt)
        vocab = self.runner.vocab_size
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"prompt_token_ids has ids outside [0, {vocab}): {bad[:5]}")
        max_len = self.config.max_model_len
        if len(token_ids) >= max_len:
            raise PromptTooLong(
                f"prompt has {len(token_ids)} tokens; max_model_len is {max_len}, "
                "which leaves no room for any output token"
            )
        if lora_request is not None:
            manager = self._require_lora()
            manager.check_adapter(lora_request)
        if self.extra_eos_token_ids and not params.ignore_eos:
            extra = [t for t in self.extra_eos_token_ids if t not in params.stop_token_ids]
            if extra:
                params = dataclasses.replace(
                    params, stop_token_ids=[*params.stop_token_ids, *extra]
                )
        request = Request(
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling_params=params,
            lora_request=lora_request,
            prompt=text,
            eos_token_id=self.eos_token_id,
            priority=priority,
        )
        if arrival_time is not None:
            request.arrival_time = arrival_time
        return request

    def admit(self, request: Request) -> None:
        if request.request_id in self._states:
            raise InvalidRequest(f"request_id {request.request_id!r} is already running")
        self.scheduler.add_request(request)
        if request.lora_request is not None and self.runner.lora_manager is not None:
            # Pinned while the request lives, so its adapter is not evicted from host memory
            # between being loaded and being scheduled.
            self.runner.lora_manager.pin([request.lora_int_id])
            self.runner.lora_manager.request_load(request.lora_request)
        self._states[request.request_id] = _RequestState(
            request=request,
            detokenizer=IncrementalDetokenizer(
                self.tokenizer, request.prompt_token_ids, request.sampling_params
            ),
            logprobs=[] if request.sampling_params.logprobs is not None else None,
            lora_name=request.lora_request.lora_name if request.lora_request else None,
        )

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt, exactly as add_request tokenizes it."""
        if isinstance(prompt, str):
            text: str | None = prompt
        elif isinstance(prompt, Mapping) and "prompt_token_ids" in prompt:
            ids = list(prompt["prompt_token_ids"])
            if not ids:
                raise InvalidRequest("prompt_token_ids is empty")
            return prompt.get("prompt"), ids
        elif isinstance(prompt, Mapping) and isinstance(prompt.get("prompt"), str):
            text = prompt["prompt"]
        else:
            raise InvalidRequest(
                "prompt must be a string, {'prompt': str} or {'prompt_token_ids': [int, ...]}"
            )
        assert text is not None
        ids = self.tokenizer.encode(text)
        if not ids:
            raise InvalidRequest("prompt is empty")
        return text, ids

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for req in self.scheduler.abort_requests([i for i in ids if i in self._states]):
            self._finish(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._pending_outputs)

    def get_num_unfinished_requests(self) -> int:
        return len(self._states)

    # ---------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        t0 = time.monotonic()
        outputs, self._pending_outputs = self._pending_outputs, []
        self._fail_adapter_errors(outputs)
        sched = self.scheduler.schedule()
        num_prompt = num_gen = 0
        touched: list[Request] = []
        if sched.scheduled:
            result = self.runner.execute_model(sched)
            touched = self.scheduler.update_from_output(sched, result.sampled_token_ids)
            for s in sched.scheduled:
                if not s.sample:
                    num_prompt += s.num_new_tokens
                else:
                    num_gen += 1
                    num_prompt += s.num_new_tokens - 1
            for req_id, lp in result.logprobs.items():
                state = self._states.get(req_id)
                if state is not None and state.logprobs is not None:
                    state.logprobs.append(lp)
        finished: list[tuple[str, str]] = []
        for req in touched:
            state = self._states.get(req.request_id)
            if state is None:
                continue
            new = req.output_token_ids[state.reported_tokens :]
            if not new and not req.is_finished:
                continue
            state.detokenizer.update(
                new,
                finished=req.is_finished,
                # Finished here by EOS or a stop token id (stop strings are found just below).
                stop_terminated=req.status == RequestStatus.FINISHED_STOPPED,
            )
            if state.detokenizer.finished_by_stop_string:
                req.stop_reason = state.detokenizer.stop_reason
                if (
                    req.is_finished
                ):  # reached max_tokens on the very token that completed the stop string
                    req.status = RequestStatus.FINISHED_STOPPED
                else:
                    self.scheduler.finish_requests([req.request_id], RequestStatus.FINISHED_STOPPED)
            outputs.append(self._make_output(state))
            if req.is_finished:
                finished.append((req.request_id, req.status.value))
                self._drop(req.request_id)
        self._record_stats(t0, sched, num_prompt, num_gen, finished)
        return outputs

    def _fail_adapter_errors(self, outputs: list[RequestOutput]) -> None:
        manager = self.runner.lora_manager
        if manager is None:
            return
        for lora_id, err in manager.poll_errors():
            ids = [
                s.request.request_id
                for s in self._states.values()
                if s.request.lora_int_id == lora_id
            ]
            for req in self.scheduler.abort_requests(ids):
                req.status = RequestStatus.FINISHED_ERROR
                req.error = err
                state = self._drop(req.request_id)
                assert state is not None
                outputs.append(self._make_output(state))
                logger.warning("request %s failed: %s", req.request_id, err)

    def _finish(self, req: Request) -> None:
        state = self._drop(req.request_id)
        if state is not None:
            self._pending_outputs.append(self._make_output(state))

    def _drop(self, request_id: str) -> _RequestState | None:
        state = self._states.pop(request_id, None)
        manager = self.runner.lora_manager
        if state is not None and manager is not None and state.request.lora_int_id:
            manager.unpin([state.request.lora_int_id])
        return state

    def _make_output(self, state: _RequestState) -> RequestOutput:
        req = state.request
        state.reported_tokens = req.num_output_tokens
        det = state.detokenizer
        token_ids = list(req.output_token_ids)
        completion = CompletionOutput(
            index=0,
            text=det.output_text,
            token_ids=token_ids,
            finish_reason=req.status.finish_reason,
            logprobs=list(state.logprobs) if state.logprobs is not None else None,
            stop_reason=req.stop_reason,
        )
        metrics = {"arrival_time": req.arrival_time}
        if req.first_token_time is not None:
            metrics["first_token_time"] = req.first_token_time
        if req.is_finished:
            metrics["finished_time"] = time.monotonic()
        error: LoRAStreamError | None = req.error
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=[completion],
            finished=req.is_finished,
            error=error,
            metrics=metrics,
            lora_name=state.lora_name,
        )

    def _record_stats(
        self, t0: float, sched: Any, num_prompt: int, num_gen: int, finished: list[tuple[str, str]]
    ) -> None:
        if not self.stat_loggers:
            return
        s = self.scheduler.get_stats()
        m = self.runner.lora_manager
        ms = m.get_stats() if m is not None else None
        stats = Stats(
            now=time.monotonic(),
            num_waiting=s.num_waiting,
            num_running=s.num_running,
            kv_cache_usage=self.block_manager.usage,
            num_prompt_tokens=num_prompt,
            num_generation_tokens=num_gen,
            num_preemptions=len(sched.preempted),
            step_time_s=time.monotonic() - t0,
            finished=finished,
        )
        if ms is not None:
            stats.adapters_on_device = list(ms.on_device)
            stats.adapters_in_host = list(ms.in_host)
            stats.adapter_loads = ms.disk_loads
            stats.adapter_load_time_s = ms.load_time_s
            stats.adapter_host_evictions = ms.host_evictions
            stats.adapter_device_loads = ms.device_loads
            stats.adapter_device_evictions = ms.device_evictions
        for sl in self.stat_loggers:
            sl.record(stats)


def _eos_token_ids(config: EngineConfig, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ids from config.json, generation_config.json (Llama 3 lists several) and the tokenizer."""
    ids: list[int] = []
    sources: list[Any] = [getattr(config.hf_config, "eos_token_id", None)]
    try:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_pretrained(config.model, local_files_only=True)
        sources.append(gen.eos_token_id)
    except (OSError, ValueError):
        pass  # no generation_config.json
    sources.append(tokenizer.eos_token_id)
    for src in sources:
        for i in src if isinstance(src, list | tuple) else [src]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


__all__ = ["AdapterError", "LLMEngine", "PromptType"]
