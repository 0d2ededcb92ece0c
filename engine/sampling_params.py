"""Per-request sampling parameters, with vLLM's names and defaults."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from engine.errors import InvalidSamplingParams

_MAX_LOGPROBS = 20


class RequestOutputKind(enum.IntEnum):
    """What each ``RequestOutput`` of a request holds, as vLLM names it."""

    CUMULATIVE = 0
    """Everything so far: the token ids and text since the start (the default)."""
    DELTA = 1
    """Only what is new since the request's previous output."""
    FINAL_ONLY = 2
    """No output until the request finishes, then everything (``LLM.generate`` uses it)."""


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. Validated at construction."""

    n: int = 1
    """Completions per prompt. Only 1 is supported."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 or -1 disables top-k."""
    min_p: float = 0.0
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever else is in the batch."""
    max_tokens: int | None = 16
    """None means up to the model's context length."""
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    """Number of top log-probabilities returned per generated token (the sampled one is always included)."""
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if _is_int(self.output_kind) and self.output_kind in RequestOutputKind._value2member_map_:
            self.output_kind = RequestOutputKind(self.output_kind)  # an int off the wire
        self._check()

    def _fail(self, name: str, allowed: str) -> None:
        raise InvalidSamplingParams(
            f"SamplingParams.{name}={getattr(self, name)!r} is invalid: must be {allowed}"
        )

    def _check(self) -> None:
        if not _is_int(self.n) or self.n != 1:
            self._fail("n", "1 (several completions per prompt are not supported)")
        if not _is_num(self.temperature) or self.temperature < 0:
            self._fail("temperature", "a number >= 0")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            self._fail("top_p", "a number in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            self._fail("top_k", "an integer >= -1 (0 or -1 disable it)")
        if not _is_num(self.min_p) or not 0 <= self.min_p <= 1:
            self._fail("min_p", "a number in [0, 1]")
        if self.seed is not None and not _is_int(self.seed):
            self._fail("seed", "an integer or None")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            self._fail("max_tokens", "an integer >= 1 or None")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            self._fail("min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            self._fail("min_tokens", f"<= max_tokens ({self.max_tokens})")
        if not all(isinstance(s, str) and s for s in self.stop):
            self._fail("stop", "a list of non-empty strings")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            self._fail("stop_token_ids", "a list of non-negative integers")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= _MAX_LOGPROBS
        ):
            self._fail("logprobs", f"an integer in [0, {_MAX_LOGPROBS}] or None")
        if not _is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            self._fail("repetition_penalty", "a number > 0")
        if not _is_num(self.presence_penalty) or not -2 <= self.presence_penalty <= 2:
            self._fail("presence_penalty", "a number in [-2, 2]")
        if not _is_num(self.frequency_penalty) or not -2 <= self.frequency_penalty <= 2:
            self._fail("frequency_penalty", "a number in [-2, 2]")
        if not isinstance(self.output_kind, RequestOutputKind):
            self._fail("output_kind", "a RequestOutputKind (CUMULATIVE, DELTA or FINAL_ONLY)")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        """A penalty reads the tokens generated so far."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _is_int(v: object) -> bool:
    # int64: what the engine core's msgpack pipe and the sampler's tensors carry, so a value
    # is accepted in-process exactly when it is accepted with the core in its own process.
    return isinstance(v, int) and not isinstance(v, bool) and _INT64_MIN <= v <= _INT64_MAX


def _is_num(v: object) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    return _is_int(v)
