"""A request's state inside the engine: token ids, counters, block table, adapter id.

Pure Python (no torch): the scheduler and block manager work on these alone.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from engine.errors import LoRAStreamError
from engine.lora.request import LoRARequest
from engine.outputs import ResumedOutput
from engine.sampling_params import SamplingParams

PLACEHOLDER = -1
"""An output token sampled by a launched step and not yet known on the host (async
scheduling; see ``engine.core.scheduler``)."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return self.value if self in _FINISHED else None


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
    RequestStatus.FINISHED_ERROR,
}


@dataclass(eq=False)
class Request:
    """One generation. ``num_computed_tokens`` catches up to ``num_tokens`` step by step:
    a prefill is just a request far behind, so chunked prefill is only a token budget."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    lora_request: LoRARequest | None = None
    prompt: str | None = None
    eos_token_id: int | None = None
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)

    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: str | int | None = None
    error: LoRAStreamError | None = None
    num_preemptions: int = 0
    # Steps this request waited at the head of the queue while later requests were admitted.
    num_bypassed_steps: int = 0
    first_token_time: float | None = None
    num_cached_tokens: int | None = None
    """Tokens found in the prefix cache when the request was first admitted (None before)."""
    block_hashes: list[bytes] = field(default_factory=list)
    """Hashes of its full blocks of known tokens, each chaining the one before (prefix
    caching, ``engine.core.kv_cache_utils``); grown as blocks fill."""
    num_hashed_blocks: int = 0
    """Leading blocks of ``block_table`` the block manager is done with for the prefix cache
    (entered there, found there, or left out because another block holds their tokens)."""
    prompt_logprobs: list[Any] | None = None
    """Core only, with ``SamplingParams.prompt_logprobs``: the prompt positions' logprobs
    computed so far (``TokenLogprobs``; None for the first token), sent with the first
    output token and then dropped (None)."""
    grammar: Any = None
    """Core only, with a structured-output constraint: its ``GrammarState``
    (``engine.structured_output``); the scheduler admits the request once it is ready."""
    # The prompt's tail is an earlier run's output. The front detokenizes after it; the core
    # reads only ``num_tokens``, to replay a constraint over them.
    resumed: ResumedOutput | None = None

    @property
    def lora_int_id(self) -> int:
        """0 means the base model."""
        return self.lora_request.lora_int_id if self.lora_request else 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished
