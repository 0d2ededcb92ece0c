"""What the front (tokenizer, detokenizer, ``RequestOutput``s) and the engine core
(scheduler, model runner, adapters) say to each other, and the one codec that carries it.

The same dataclasses flow in memory when the core runs in-process and over a pipe when it
runs in its own process (``enable_multiprocessing=True``). On the pipe each message is
msgpack, never pickle: a registered dataclass travels as an ``ExtType`` whose code names
the class and whose payload is its fields in declaration order; a ``LoRAStreamError``
travels as its stable ``code`` and message. Only token ids cross: text stays in the front.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import msgpack

from engine import errors
from engine.errors import LoRAStreamError
from engine.lora.request import LoRARequest
from engine.outputs import ResumedOutput
from engine.sampling_params import GuidedDecodingParams, SamplingParams
from engine.sequence import Request

# (token ids, logprobs, ranks) of one position (``engine.sampling.sampler.TokenLogprobs``;
# not imported from there, which would load torch in every process that reads messages).
TokenLogprobs = tuple[list[int], list[float], list[int]]

# Bumped when a message changes shape, so a mismatched core fails at start-up, not mid-run.
PROTOCOL_VERSION = 5  # 2: SamplingParams.output_kind; 3: prefix-cache counts; 4: vLLM's
# sampling fields (n, logit_bias, ...), ranked logprobs and prompt logprobs; 5: structured
# output (guided_* fields, GuidedDecodingParams, the resumed tokens a constraint replays)


# ------------------------------------------------------------------------- front → core
@dataclass
class AddRequest:
    request_id: str
    """The core's id for the request (the front maps it to the caller's id)."""
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    lora_request: LoRARequest | None
    eos_token_id: int | None
    priority: int
    arrival_time: float
    """time.monotonic() in the front: one clock for every process of the host."""
    num_resumed_tokens: int = 0
    """The prompt's last tokens that are an earlier run's output (``ResumedOutput``): a
    structured-output constraint is replayed over them."""

    @classmethod
    def of(cls, request: Request, core_id: str) -> AddRequest:
        """The message that hands ``request`` to the core under the core's id."""
        return cls(
            request_id=core_id,
            prompt_token_ids=request.prompt_token_ids,
            sampling_params=request.sampling_params,
            lora_request=request.lora_request,
            eos_token_id=request.eos_token_id,
            priority=request.priority,
            arrival_time=request.arrival_time,
            num_resumed_tokens=request.resumed.num_tokens if request.resumed else 0,
        )

    def to_request(self) -> Request:
        """The core's ``Request`` for this message."""
        return Request(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            sampling_params=self.sampling_params,
            lora_request=self.lora_request,
            eos_token_id=self.eos_token_id,
            priority=self.priority,
            arrival_time=self.arrival_time,
            resumed=ResumedOutput(self.num_resumed_tokens, "") if self.num_resumed_tokens else None,
        )


@dataclass
class AbortRequests:
    """Finish these requests without an output: the front already reported them."""

    request_ids: list[str]


@dataclass
class UtilityCall:
    """A call answered by one ``UtilityResult`` with the same ``call_id``."""

    call_id: int
    method: str
    """add_lora | remove_lora | list_loras | timings."""
    args: list[Any]


@dataclass
class Shutdown:
    pass


# ------------------------------------------------------------------------- core → front
@dataclass
class CoreReady:
    protocol_version: int
    num_blocks: int
    """KV-cache blocks: the front refuses prompts that could never fit, as the scheduler does."""
    module_shapes: dict[str, list[Any]] | None
    """PEFT module name → [layer_key, slice, in, out]: lets the front check adapter configs."""


@dataclass
class CoreFailed:
    """The core could not start, or its step loop raised; the process exits after this."""

    error: LoRAStreamError


@dataclass
class FailedRequest:
    """A request the core could not run (an adapter whose weights did not load)."""

    request_id: str
    error: LoRAStreamError


@dataclass
class AdapterStats:
    on_device: list[int]
    in_host: list[int]
    disk_loads: int
    load_time_s: float
    host_evictions: int
    device_loads: int
    device_evictions: int


@dataclass
class CoreStats:
    """The core's side of one step: load for ``free_capacity``, counts for stat loggers,
    host seconds per phase for the timing split."""

    num_waiting: int
    num_running: int
    kv_cache_usage: float
    num_scheduled_tokens: int
    num_prompt_tokens: int
    num_generation_tokens: int
    num_preemptions: int
    step_time_s: float
    schedule_s: float
    execute_s: float
    update_s: float
    lora_ids: list[int] = field(default_factory=list)
    """Adapters in host or device memory: their configs are not re-checked at add_request."""
    adapters: AdapterStats | None = None
    """Only when stats are logged (it takes the adapter manager's lock)."""
    num_prefix_queried_tokens: int = 0
    """Tokens of the requests admitted this step, with prefix caching on."""
    num_prefix_hit_tokens: int = 0
    """Of those, the tokens found in the prefix cache."""


@dataclass
class EngineCoreOutputs:
    """One step's news, token ids only, in columns: request ``request_ids[i]`` sampled
    ``new_token_ids[i]`` (``update_from_output`` adds exactly one token to each request it
    returns). Lists of plain values cost the core little to build and msgpack little to
    encode (in C), even for hundreds of requests a step; one object per request would cost
    the core's GIL microseconds each."""

    request_ids: list[str]
    new_token_ids: list[int]
    finish_reasons: list[str | None]
    """"stop" | "length" | None while running."""
    stop_reasons: list[int | None]
    """The stop token id that ended the request (stop strings are found by the front)."""
    first_token_times: list[float | None]
    """Set with the request's first token."""
    logprobs: list[TokenLogprobs | None] | None
    """Per request: (token ids, logprobs, ranks), the sampled token first; None when no
    request of the step asked for logprobs."""
    failed: list[FailedRequest]
    stats: CoreStats
    num_cached_tokens: list[int] = field(default_factory=list)
    """Per ``request_ids[i]``: the tokens it found in the prefix cache at its first
    admission (empty from a core that does not report them)."""
    prompt_logprobs: list[list[TokenLogprobs | None] | None] | None = None
    """Per ``request_ids[i]``, with its first output token when it asked for them: one
    entry per prompt token (None for the first); None when no request of the step has any."""

    @classmethod
    def empty(cls, stats: CoreStats) -> EngineCoreOutputs:
        return cls([], [], [], [], [], None, [], stats, [])


@dataclass
class UtilityResult:
    call_id: int
    result: Any
    error: LoRAStreamError | None = None


@dataclass(frozen=True)
class EngineLoad:
    """What ``AsyncLLMEngine.free_capacity`` needs to know about the core."""

    num_waiting: int
    num_running: int
    kv_cache_usage: float


# ----------------------------------------------------------------------------- codec
_TYPES: tuple[type, ...] = (
    AddRequest,
    AbortRequests,
    UtilityCall,
    Shutdown,
    CoreReady,
    CoreFailed,
    FailedRequest,
    AdapterStats,
    CoreStats,
    EngineCoreOutputs,
    UtilityResult,
    SamplingParams,
    LoRARequest,
    GuidedDecodingParams,
)
_TAGS = {cls: tag for tag, cls in enumerate(_TYPES)}
_FIELDS = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in _TYPES}
_ERROR_TAG = len(_TYPES)


def _default(obj: Any) -> Any:
    tag = _TAGS.get(type(obj))
    if tag is not None:
        return msgpack.ExtType(tag, encode([getattr(obj, name) for name in _FIELDS[type(obj)]]))
    if isinstance(obj, LoRAStreamError):
        return msgpack.ExtType(_ERROR_TAG, encode([obj.code, obj.message]))
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    raise TypeError(f"cannot send {type(obj).__name__} between the front and the engine core")


def _ext_hook(code: int, data: bytes) -> Any:
    values = decode(data)
    if code == _ERROR_TAG:
        return error_from_code(*values)
    return _TYPES[code](*values)


def encode(message: Any) -> bytes:
    return msgpack.packb(message, default=_default, use_bin_type=True)


def decode(data: bytes) -> Any:
    # strict_map_key=False: logprobs are keyed by token id.
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


def _error_classes() -> dict[str, type[LoRAStreamError]]:
    classes: dict[str, type[LoRAStreamError]] = {}
    for value in vars(errors).values():
        if isinstance(value, type) and issubclass(value, LoRAStreamError):
            classes.setdefault(value.code, value)
    return classes


_ERRORS_BY_CODE = _error_classes()


def error_from_code(code: str, message: str) -> LoRAStreamError:
    """The engine error named by ``code`` (``AdapterCorrupt`` for "adapter_corrupt", ...);
    a code from elsewhere keeps its code on a plain ``LoRAStreamError``."""
    cls = _ERRORS_BY_CODE.get(code)
    if cls is not None:
        return cls(message)
    error = LoRAStreamError(message)
    error.code = code
    return error


def as_error(exc: BaseException) -> LoRAStreamError:
    """``exc`` as something the codec carries: engine errors as they are, others named."""
    if isinstance(exc, LoRAStreamError):
        return exc
    return LoRAStreamError(f"{type(exc).__name__}: {exc}")
