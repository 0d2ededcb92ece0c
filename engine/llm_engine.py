"""The synchronous engine: the front of the engine.

``LLMEngine`` keeps the tokenizer, validates and tokenizes requests, and turns the core's
token ids into ``RequestOutput``s (``OutputProcessor``: detokenization, stop strings). The
``EngineCore`` (scheduler, model runner, adapters; one step is ``schedule()`` →
``execute_model()`` → ``update_from_output()``, no policy here) runs in this process by
default, or in its own process with ``enable_multiprocessing=True`` so that detokenizing,
building outputs and the caller's I/O never hold the GIL the step loop needs.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from engine.config import EngineArgs, EngineConfig
from engine.core.block_manager import BlockManager
from engine.core.scheduler import Scheduler
from engine.core_client import EngineCoreClient, InprocClient, MPClient
from engine.core_messages import CoreStats, EngineCoreOutputs, EngineLoad
from engine.engine_core import LORA_DISABLED, EngineCore
from engine.errors import (
    AdapterError,
    EngineDead,
    InvalidRequest,
    InvalidSamplingParams,
    PromptTooLong,
)
from engine.lora.request import LoRARequest
from engine.metrics import LoggingStatLogger, StatLogger, Stats
from engine.output_processor import OutputProcessor, ParentRequest, RequestState
from engine.outputs import RequestOutput, ResumedOutput
from engine.sampling_params import SamplingParams
from engine.sequence import Request
from engine.usage import UsageContext
from engine.worker.model_runner import ModelRunner

logger = logging.getLogger("lorastream.engine")


class TextPrompt(TypedDict):
    """vLLM's: a prompt as text."""

    prompt: str


class TokensPrompt(TypedDict, total=False):
    """vLLM's: a prompt as token ids (``prompt``, the text, is optional)."""

    prompt_token_ids: list[int]
    prompt: str


# A prompt: text, {"prompt": text}, or {"prompt_token_ids": [...]} (vLLM's TextPrompt / TokensPrompt).
PromptType = str | Mapping[str, Any]


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        stat_loggers: Sequence[StatLogger] | Mapping[str, StatLogger] | None = None,
        usage_context: UsageContext = UsageContext.ENGINE_CONTEXT,
        *,
        engine_args: EngineArgs | None = None,
        enable_multiprocessing: bool = False,
    ) -> None:
        self.config = config
        self.usage_context = usage_context
        if isinstance(stat_loggers, Mapping):
            stat_loggers = list(stat_loggers.values())
        self.stat_loggers: list[StatLogger] = list(stat_loggers or [])
        if stat_loggers is None and config.log_stats:
            self.stat_loggers.append(LoggingStatLogger())
        log_stats = bool(self.stat_loggers)
        self.engine_core: EngineCoreClient
        if enable_multiprocessing:
            if engine_args is None:
                raise ValueError("enable_multiprocessing needs engine_args: use from_engine_args")
            # Started first: the child loads the model while this process loads the tokenizer.
            self.engine_core = MPClient(engine_args, config, log_stats)
        else:
            self.engine_core = InprocClient(EngineCore(config, log_stats=log_stats))
        self.is_multiprocess = enable_multiprocessing
        try:
            self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(config.tokenizer)
        except BaseException:
            self.engine_core.shutdown()
            raise
        self.vocab_size = int(config.hf_config.vocab_size)
        eos_ids = _eos_token_ids(config, self.tokenizer)
        self.eos_token_id = eos_ids[0] if eos_ids else None
        # Further EOS ids (Llama 3's <|eot_id|>, ...) stop a request like stop_token_ids do.
        self.extra_eos_token_ids = eos_ids[1:]
        self.output_processor = OutputProcessor(self.tokenizer)
        self._pending_outputs: list[RequestOutput] = []
        self._lora_ids: dict[str, LoRARequest] = {}
        # With the core in another process, requests may be added and aborted from other
        # threads while step() waits for outputs; in-process the lock is never contended.
        self._lock = threading.Lock()
        self._front_s = 0.0  # host seconds of output processing, for get_step_timings
        self._front_batches = 0
        if config.lora is not None:
            try:
                for i, m in enumerate(config.lora.preload, start=1):
                    self.add_lora(LoRARequest(m.name, i, m.path))
            except BaseException:
                self.engine_core.shutdown()  # a core process must not wait for GC to stop
                raise

    @classmethod
    def from_engine_args(
        cls,
        engine_args: EngineArgs,
        usage_context: UsageContext = UsageContext.ENGINE_CONTEXT,
        stat_loggers: Sequence[StatLogger] | Mapping[str, StatLogger] | None = None,
        enable_multiprocessing: bool = False,
    ) -> LLMEngine:
        """``enable_multiprocessing``: run the engine core (scheduler, model, adapters) in a
        spawned process; this one keeps the tokenizer and builds the outputs."""
        return cls(
            engine_args.create_engine_config(),
            stat_loggers,
            usage_context,
            engine_args=engine_args,
            enable_multiprocessing=enable_multiprocessing,
        )

    # ------------------------------------------------------------ in-process parts
    @property
    def core(self) -> EngineCore:
        """The in-process core (tests and benchmarks look inside it)."""
        if not isinstance(self.engine_core, InprocClient):
            raise AttributeError(
                "the engine core runs in its own process (enable_multiprocessing=True)"
            )
        return self.engine_core.core

    @property
    def runner(self) -> ModelRunner:
        return self.core.runner

    @property
    def scheduler(self) -> Scheduler:
        return self.core.scheduler

    @property
    def block_manager(self) -> BlockManager:
        return self.core.block_manager

    # ---------------------------------------------------------------- adapters
    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load an adapter now (synchronously) and keep its name for lookups."""
        self._require_lora()
        self.engine_core.add_lora(lora_request)
        self._lora_ids[lora_request.lora_name] = lora_request
        return True

    def remove_lora(self, lora_id: int) -> bool:
        self._require_lora()
        self._lora_ids = {k: v for k, v in self._lora_ids.items() if v.lora_int_id != lora_id}
        return self.engine_core.remove_lora(lora_id)

    def list_loras(self) -> set[int]:
        return self.engine_core.list_loras() if self.config.lora is not None else set()

    def pin_lora(self, lora_id: int) -> bool:
        """Keep an added adapter in host memory until ``remove_lora`` (vLLM's name)."""
        self._require_lora()
        return self.engine_core.pin_lora(lora_id)

    def get_lora_request(self, name: str) -> LoRARequest | None:
        """A preloaded adapter (``lora_modules``) by name."""
        return self._lora_ids.get(name)

    def _require_lora(self) -> None:
        if self.config.lora is None:
            raise InvalidRequest(LORA_DISABLED)

    # ---------------------------------------------------------------- requests
    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        lora_request: LoRARequest | None = None,
        priority: int = 0,
        resumed: ResumedOutput | None = None,
    ) -> None:
        """Validate and queue a request. Raises ``InvalidRequest`` / ``AdapterError`` naming what is wrong."""
        request = self.make_request(
            request_id, prompt, params, arrival_time, lora_request, priority, resumed
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
        resumed: ResumedOutput | None = None,
    ) -> Request:
        """Everything in add_request that does not touch the scheduler (safe off the step thread).

        ``resumed``: the prompt ends with an earlier run's output (``ResumedOutput``)."""
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequest(
                f"request_id={request_id!r} is invalid: must be a non-empty string"
            )
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequest("params must be a SamplingParams")
        if (
            not isinstance(priority, int)
            or isinstance(priority, bool)
            or not -(2**63) <= priority < 2**63
        ):
            # int64: what the engine core's pipe carries, so in-process and multiprocess agree.
            raise InvalidRequest(f"priority={priority!r} is invalid: must be an int64 integer")
        text, token_ids = self.tokenize(prompt)
        vocab = self.vocab_size
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"prompt_token_ids has ids outside [0, {vocab}): {bad[:5]}")
        max_len = self.config.max_model_len
        keep = params.truncate_prompt_tokens
        if keep is not None:
            # vLLM's: the last tokens are kept; -1 keeps what leaves room for one output token.
            keep = max_len - 1 if keep == -1 else keep
            if keep < len(token_ids):
                token_ids = token_ids[len(token_ids) - keep :]
        params = self._resolve_token_params(params)
        if len(token_ids) >= max_len:
            raise PromptTooLong(
                f"prompt has {len(token_ids)} tokens; max_model_len is {max_len}, "
                "which leaves no room for any output token"
            )
        if resumed is not None and not (
            isinstance(resumed, ResumedOutput)
            and 0 < resumed.num_tokens < len(token_ids)
            and isinstance(resumed.text, str)
        ):
            raise InvalidRequest(
                f"resumed={resumed!r} is invalid: num_tokens must be in [1, {len(token_ids)}) "
                "(the earlier output ends the prompt) and text a string"
            )
        if lora_request is not None:
            self._require_lora()
            self.engine_core.check_adapter(lora_request)
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
            resumed=resumed,
        )
        if arrival_time is not None:
            request.arrival_time = arrival_time
        return request

    def _resolve_token_params(self, params: SamplingParams) -> SamplingParams:
        """Check the token ids ``params`` names against the vocabulary and tokenize its
        ``bad_words`` (vLLM's rule: each word alone and after a space, when that makes
        other tokens of the same count)."""
        vocab = self.vocab_size
        for name, ids in (
            ("logit_bias", list(params.logit_bias or ())),
            ("allowed_token_ids", params.allowed_token_ids or []),
        ):
            outside = [t for t in ids if t >= vocab]
            if outside:
                raise InvalidSamplingParams(
                    f"SamplingParams.{name}={outside[:5]} is invalid: token ids outside the "
                    f"vocabulary [0, {vocab})"
                )
        if not params.bad_words or params._bad_words_token_ids is not None:
            return params
        words: list[list[int]] = []
        for word in params.bad_words:
            plain = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            if plain:
                words.append(plain)
            if spaced and (not plain or (spaced[0] != plain[0] and len(spaced) == len(plain))):
                words.append(spaced)
        outside = [t for w in words for t in w if t >= vocab]
        if outside:
            raise InvalidSamplingParams(
                f"SamplingParams.bad_words={params.bad_words!r} is invalid: they tokenize to "
                f"ids outside the vocabulary [0, {vocab}): {outside[:5]}"
            )
        return dataclasses.replace(params, _bad_words_token_ids=words)

    def admit(self, request: Request) -> None:
        """Hand a request made by ``make_request`` to the core (thread-safe with the core in
        its own process; in-process, the step thread's job). A request with ``n > 1``
        becomes ``n`` child requests ``"{i}_{request_id}"``, as in vLLM: the prefix cache
        gives the later ones the first one's full prompt blocks."""
        params = request.sampling_params
        children = [request] if params.n == 1 else _children(request)
        with self._lock:
            taken = [
                r.request_id
                for r in [request, *children]
                if self.output_processor.is_known(r.request_id)
            ]
            if taken:
                raise InvalidRequest(f"request_id {taken[0]!r} is already running")
            parent = None
            if params.n > 1:
                parent = ParentRequest(request.request_id, params.output_kind)
            added: list[str] = []
            try:
                for child in children:
                    self.engine_core.add_request(child)
                    added.append(child.request_id)
                    self.output_processor.add_request(child, parent)
            except BaseException:
                # All or nothing: a child the core refused ends the others it took.
                self.output_processor.abort_requests(added)
                self.engine_core.abort_requests(added)
                self.output_processor.parents.pop(request.request_id, None)
                raise

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

    def tokenize_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> tuple[str, list[int]]:
        """(text, token ids) of ``messages`` rendered by the model's chat template. The
        template writes every special token it wants (a BOS among them), so the text is
        tokenized without adding any, as vLLM does: a template that starts with
        ``{{ bos_token }}`` gives one BOS, not two. Pass the result to ``add_request`` as
        ``{"prompt": text, "prompt_token_ids": ids}``."""
        from jinja2 import TemplateError

        tok = self.tokenizer
        if getattr(tok, "chat_template", None) is None:
            raise InvalidRequest("messages: the model has no chat template; send prompt instead")
        try:
            text = tok.apply_chat_template(
                [dict(m) for m in messages],
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except (TemplateError, ValueError, TypeError, KeyError) as e:
            raise InvalidRequest(f"messages: the chat template refused them: {e}") from e
        assert isinstance(text, str)
        ids = tok.encode(text, add_special_tokens=False)
        if not ids:
            raise InvalidRequest("messages: the chat template rendered an empty prompt")
        return text, ids

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Finish requests now; their final outputs (finish_reason "abort") come with the next step."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        with self._lock:
            core_ids = self.output_processor.core_ids(ids)
            if not core_ids:
                return
            outputs = self.output_processor.abort_requests(ids)
            self.engine_core.abort_requests(core_ids)
            self._pending_outputs.extend(outputs)
        self.engine_core.wake()

    def has_unfinished_requests(self) -> bool:
        return bool(self.output_processor.states) or bool(self._pending_outputs)

    def get_num_unfinished_requests(self) -> int:
        """Unfinished requests, a request with ``n > 1`` counted once."""
        return len({s.output_id for s in self.output_processor.states.values()})

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        return self.tokenizer

    def get_load(self) -> EngineLoad:
        """Waiting and running requests and KV-cache use in the core (with the core in its
        own process: as of its latest step)."""
        return self.engine_core.get_load()

    # ---------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Outputs of the requests that progressed. In-process this runs one core step; with
        the core in its own process it returns what the core sent since the last call,
        waiting only while there are unfinished requests and nothing has come yet."""
        with self._lock:
            outputs, self._pending_outputs = self._pending_outputs, []
            block = not outputs and bool(self.output_processor.states)
        try:
            batches = self.engine_core.get_outputs(block)
        except EngineDead:
            with self._lock:
                self.output_processor.states.clear()
                self.output_processor.parents.clear()
                self._pending_outputs.clear()
            raise
        with self._lock:
            outputs.extend(self._process(batches))
        return outputs

    def _process(self, batches: list[EngineCoreOutputs]) -> list[RequestOutput]:
        # One output per request per call, built once after all batches: a request that
        # advanced in several core steps gets one output (cumulative, or one delta of all
        # that is new), and FINAL_ONLY requests none until they finish.
        touched: dict[str, RequestState] = {}
        for batch in batches:
            t0 = time.perf_counter()
            processed = self.output_processor.process_outputs(batch)
            if processed.stopped:
                self.engine_core.abort_requests(processed.stopped)
            for state in processed.touched:
                touched.setdefault(state.request_id, state)
            self._front_s += time.perf_counter() - t0
            self._front_batches += 1
            if self.stat_loggers:
                self._record_stats(batch.stats, processed.finished, time.perf_counter() - t0)
        t0 = time.perf_counter()
        outputs = self.output_processor.make_outputs(touched.values())
        self._front_s += time.perf_counter() - t0
        return outputs

    def _record_stats(self, s: CoreStats, finished: list[tuple[str, str]], front_s: float) -> None:
        stats = Stats(
            now=time.monotonic(),
            num_waiting=s.num_waiting,
            num_running=s.num_running,
            kv_cache_usage=s.kv_cache_usage,
            num_prompt_tokens=s.num_prompt_tokens,
            num_generation_tokens=s.num_generation_tokens,
            num_preemptions=s.num_preemptions,
            num_prefix_queried_tokens=s.num_prefix_queried_tokens,
            num_prefix_hit_tokens=s.num_prefix_hit_tokens,
            step_time_s=s.step_time_s + front_s,
            finished=finished,
        )
        if s.adapters is not None:
            a = s.adapters
            stats.adapters_on_device = list(a.on_device)
            stats.adapters_in_host = list(a.in_host)
            stats.adapter_loads = a.disk_loads
            stats.adapter_load_time_s = a.load_time_s
            stats.adapter_host_evictions = a.host_evictions
            stats.adapter_device_loads = a.device_loads
            stats.adapter_device_evictions = a.device_evictions
        for sl in self.stat_loggers:
            sl.record(stats)

    def get_step_timings(self) -> dict[str, float]:
        """Host milliseconds per step: the core's phases (``core_*``: schedule, execute with
        the runner's prepare / launch / sample-and-wait, update) and the front's output
        processing (``front_process_ms``: detokenization, stop strings, RequestOutputs)."""
        timings = self.engine_core.get_timings()
        timings["front_batches"] = float(self._front_batches)
        timings["front_process_ms"] = 1e3 * self._front_s / max(self._front_batches, 1)
        return timings

    def get_kernel_config(self) -> dict[str, Any]:
        """The kernel settings the model runs with, as the core reports them (in its own
        process with ``enable_multiprocessing``): ``KernelConfig``'s fields and the launch
        settings resolved for the device."""
        return self.engine_core.get_kernel_config()

    # ---------------------------------------------------------------- lifetime
    def shutdown(self) -> None:
        """Stop the core process (with ``enable_multiprocessing``), or in-process the other
        tensor-parallel ranks (nothing else runs on its own)."""
        self.engine_core.shutdown()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a checkpoint directory or of a GGUF file (built from its metadata)."""
    if path.endswith(".gguf"):
        from engine.model.gguf import gguf_tokenizer

        return gguf_tokenizer(path)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _children(request: Request) -> list[Request]:
    """The ``n`` child requests of a ``n > 1`` request, as vLLM makes them: ids
    ``"{i}_{request_id}"``, ``n=1``, child i seeded ``seed + i`` when the request is seeded."""
    params = request.sampling_params
    out = []
    for i in range(params.n):
        seed = params.seed + i if params.seed is not None else None
        out.append(
            Request(
                request_id=f"{i}_{request.request_id}",
                prompt_token_ids=request.prompt_token_ids,
                sampling_params=dataclasses.replace(params, n=1, seed=seed),
                lora_request=request.lora_request,
                prompt=request.prompt,
                eos_token_id=request.eos_token_id,
                priority=request.priority,
                arrival_time=request.arrival_time,
                resumed=request.resumed,
            )
        )
    return out


def _eos_token_ids(config: EngineConfig, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ids from config.json, generation_config.json (Llama 3 lists several) and the tokenizer."""
    ids: list[int] = []
    sources: list[Any] = [getattr(config.hf_config, "eos_token_id", None)]
    if not config.model.endswith(".gguf"):  # a GGUF's EOS ids are in its config already
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
