"""Per-request sampling parameters, with vLLM's names and defaults."""

from __future__ import annotations

import copy
import enum
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.errors import InvalidSamplingParams

MAX_LOGPROBS = 20
"""Most top log-probabilities per token (vLLM's default ``max_logprobs``)."""


@dataclass
class GuidedDecodingParams:
    """vLLM's structured-output parameters: exactly one of them (``SamplingParams`` takes
    each as its ``guided_*`` field). ``backend`` and ``whitespace_pattern`` are accepted and
    ignored: lorastream has one grammar engine (xgrammar) and emits JSON without free
    whitespace."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    backend: str | None = None
    whitespace_pattern: str | None = None


GUIDED_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
    "guided_json_object": "json_object",
}
"""SamplingParams' structured-output fields → GuidedDecodingParams' names."""


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
    """How to pick tokens and when to stop, with vLLM's names, defaults and meanings.
    Validated at construction (``InvalidSamplingParams``, a ``ValueError``, naming the field)."""

    n: int = 1
    """Completions per prompt: independent samples of the same prompt, run as ``n`` child
    requests whose prompt KV blocks the prefix cache shares. A seeded request's child ``i``
    uses ``seed + i``, as vLLM's do."""
    best_of: int | None = None
    """Refused above 1, as vLLM V1 refuses it: sample ``n`` and rank them yourself."""
    presence_penalty: float = 0.0
    """OpenAI's: subtracted once from the logit of every token already generated."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted from a token's logit per time it was generated."""
    repetition_penalty: float = 1.0
    """Hugging Face's: tokens of the prompt and output have positive logits divided by it,
    negative ones multiplied."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 or -1 disables top-k."""
    min_p: float = 0.0
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever else is in the batch."""
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    max_tokens: int | None = 16
    """None means up to the model's context length."""
    min_tokens: int = 0
    """EOS and ``stop_token_ids`` are banned until this many tokens were generated."""
    logprobs: int | None = None
    """Number of top log-probabilities returned per generated token (the sampled one is
    always included): ``CompletionOutput.logprobs``, one ``{token_id: Logprob}`` per token."""
    prompt_logprobs: int | None = None
    """Top log-probabilities per prompt token (and the prompt token's own):
    ``RequestOutput.prompt_logprobs``, None for the first token. Such a request computes its
    whole prompt (it takes nothing from the prefix cache), as in vLLM."""
    detokenize: bool = True
    """False: no text, only token ids (and no stop strings)."""
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    """Accepted for vLLM's code; fast (Rust) tokenizers, the only ones the engine loads,
    decide this themselves, as in vLLM."""
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = None
    """Keep only the last k prompt tokens (-1: as many as ``max_model_len`` leaves room for)."""
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    logit_bias: dict[int, float] | None = None
    """Added to the logits of these token ids (clamped to [-100, 100], OpenAI's range)."""
    allowed_token_ids: list[int] | None = None
    """Only these tokens may be sampled."""
    bad_words: list[str] | None = None
    """Words never generated: each word's tokens (with and without a leading space) are
    banned as a sequence, its last token whenever the output ends with the others."""
    guided_json: dict[str, Any] | str | None = None
    """Structured output: a JSON schema (an object, or its JSON text) the output must match."""
    guided_regex: str | None = None
    """Structured output: a regular expression the whole output must match."""
    guided_choice: list[str] | None = None
    """Structured output: the output is exactly one of these strings."""
    guided_grammar: str | None = None
    """Structured output: an EBNF grammar (GBNF, llama.cpp's dialect; the rule ``root`` starts)."""
    guided_json_object: bool = False
    """Structured output: any JSON object."""
    guided_decoding: GuidedDecodingParams | None = None
    """vLLM's way to give one of the above: ``GuidedDecodingParams(json=...)``."""
    _bad_words_token_ids: list[list[int]] | None = field(default=None, repr=False)
    """``bad_words`` as token ids: set by the engine's front, which has the tokenizer."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if _is_int(self.output_kind) and self.output_kind in RequestOutputKind._value2member_map_:
            self.output_kind = RequestOutputKind(self.output_kind)  # an int off the wire
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        if isinstance(self.logit_bias, dict):
            self.logit_bias = _normalized_bias(self.logit_bias)
        if isinstance(self.guided_decoding, GuidedDecodingParams):
            self._take_guided_decoding(self.guided_decoding)
        self._check()

    def _take_guided_decoding(self, g: GuidedDecodingParams) -> None:
        for ours, theirs in GUIDED_FIELDS.items():
            value = getattr(g, theirs)
            if value is None or value is False:
                continue
            current = getattr(self, ours)
            if current not in (None, False) and current != value:
                self._fail(ours, f"unset when guided_decoding.{theirs} is given")
            setattr(self, ours, value)

    def _fail(self, name: str, allowed: str) -> None:
        raise InvalidSamplingParams(
            f"SamplingParams.{name}={getattr(self, name)!r} is invalid: must be {allowed}"
        )

    def _check(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            self._fail("n", "an integer >= 1")
        if self.best_of is not None and (not _is_int(self.best_of) or self.best_of != 1):
            self._fail(
                "best_of",
                "None or 1: best_of is not supported (vLLM V1 does not support it either); "
                "use n and rank the samples yourself",
            )
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
        if self.seed is not None and self.n > 1 and self.seed + self.n - 1 > _INT64_MAX:
            self._fail("seed", f"at most {_INT64_MAX} - (n - 1): child i uses seed + i")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            self._fail("max_tokens", "an integer >= 1 or None")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            self._fail("min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            self._fail("min_tokens", f"<= max_tokens ({self.max_tokens})")
        if not all(isinstance(s, str) and s for s in self.stop):
            self._fail("stop", "a list of non-empty strings")
        if self.stop and not self.detokenize:
            self._fail("stop", "empty when detokenize is False (stop strings need the text)")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            self._fail("stop_token_ids", "a list of non-negative integers")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                self._fail(name, f"an integer in [0, {MAX_LOGPROBS}] or None")
        if not _is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            self._fail("repetition_penalty", "a number > 0")
        if not _is_num(self.presence_penalty) or not -2 <= self.presence_penalty <= 2:
            self._fail("presence_penalty", "a number in [-2, 2]")
        if not _is_num(self.frequency_penalty) or not -2 <= self.frequency_penalty <= 2:
            self._fail("frequency_penalty", "a number in [-2, 2]")
        for name in (
            "ignore_eos",
            "detokenize",
            "skip_special_tokens",
            "spaces_between_special_tokens",
            "include_stop_str_in_output",
        ):
            if not isinstance(getattr(self, name), bool):
                self._fail(name, "true or false")
        t = self.truncate_prompt_tokens
        if t is not None and (not _is_int(t) or not (t >= 1 or t == -1)):
            self._fail("truncate_prompt_tokens", "an integer >= 1, -1 (max_model_len) or None")
        if not isinstance(self.output_kind, RequestOutputKind):
            self._fail("output_kind", "a RequestOutputKind (CUMULATIVE, DELTA or FINAL_ONLY)")
        if self.logit_bias is not None and not isinstance(self.logit_bias, dict):
            self._fail("logit_bias", "a map of token id to a number, or None")
        ids = self.allowed_token_ids
        if ids is not None and (
            not isinstance(ids, list) or not ids or not all(_is_int(t) and t >= 0 for t in ids)
        ):
            self._fail("allowed_token_ids", "a non-empty list of non-negative integers, or None")
        words = self.bad_words
        if words is not None and (
            not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words)
        ):
            self._fail("bad_words", "a list of non-blank strings, or None")
        self._check_guided()
        bw = self._bad_words_token_ids
        if bw is not None and not all(
            isinstance(w, list) and w and all(_is_int(t) and t >= 0 for t in w) for w in bw
        ):
            self._fail("_bad_words_token_ids", "lists of non-negative token ids")

    def _check_guided(self) -> None:
        if self.guided_decoding is not None and not isinstance(
            self.guided_decoding, GuidedDecodingParams
        ):
            self._fail("guided_decoding", "a GuidedDecodingParams or None")
        given = [name for name in GUIDED_FIELDS if getattr(self, name) not in (None, False)]
        if len(given) > 1:
            self._fail(given[1], f"unset: {given[0]} is given (one constraint per request)")
        schema = self.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                self._fail("guided_json", f"a JSON schema: the text is not JSON ({e})")
        if schema is not None and not isinstance(schema, dict | bool):
            self._fail("guided_json", "a JSON schema (an object or its JSON text)")
        for name in ("guided_regex", "guided_grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                self._fail(name, "a non-empty string or None")
        choice = self.guided_choice
        if choice is not None and (
            not isinstance(choice, list)
            or not choice
            or not all(isinstance(c, str) and c for c in choice)
        ):
            self._fail("guided_choice", "a non-empty list of non-empty strings, or None")
        if not isinstance(self.guided_json_object, bool):
            self._fail("guided_json_object", "true or false")

    @property
    def constraint(self) -> tuple[str, str] | None:
        """The structured-output constraint as (kind, canonical text), kind one of json,
        json_object, regex, choice, grammar; None without one. Equal texts compile alike."""
        if self.guided_json is not None:
            schema = self.guided_json
            if isinstance(schema, str):
                schema = json.loads(schema)
            # Key order kept: xgrammar emits properties in the schema's order.
            return "json", json.dumps(schema, separators=(",", ":"))
        if self.guided_json_object:
            return "json_object", ""
        if self.guided_regex is not None:
            return "regex", self.guided_regex
        if self.guided_choice is not None:
            return "choice", json.dumps(self.guided_choice)
        if self.guided_grammar is not None:
            return "grammar", self.guided_grammar
        return None

    def clone(self) -> SamplingParams:
        """A deep copy (vLLM's ``clone``)."""
        return copy.deepcopy(self)

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

    @property
    def bad_words_token_ids(self) -> list[list[int]]:
        """``bad_words`` as token id sequences (empty until the front tokenized them)."""
        return self._bad_words_token_ids or []

    @property
    def changes_logits(self) -> bool:
        """Whether anything besides temperature and the filters changes the logits."""
        return (
            self.has_penalties
            or bool(self.logit_bias)
            or self.allowed_token_ids is not None
            or bool(self._bad_words_token_ids)
            or self.has_constraint
        )

    @property
    def has_constraint(self) -> bool:
        """Whether a structured-output constraint is set (cheap: no schema is read)."""
        return any(getattr(self, name) not in (None, False) for name in GUIDED_FIELDS)


def _normalized_bias(bias: Mapping[Any, Any]) -> dict[int, float]:
    """Token ids as ints (JSON keys are strings, as in OpenAI's API) and biases clamped to
    [-100, 100], as vLLM does."""
    out: dict[int, float] = {}
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else key
        if not _is_int(token) or token < 0 or not _is_num(value):
            raise InvalidSamplingParams(
                f"SamplingParams.logit_bias={{{key!r}: {value!r}}} is invalid: must map "
                "non-negative token ids to finite numbers"
            )
        out[token] = min(100.0, max(-100.0, float(value)))
    return out


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _is_int(v: object) -> bool:
    # int64: what the engine core's msgpack pipe and the sampler's tensors carry, so a value
    # is accepted in-process exactly when it is accepted with the core in its own process.
    return isinstance(v, int) and not isinstance(v, bool) and _INT64_MIN <= v <= _INT64_MAX


def _is_num(v: object) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    return _is_int(v)
