"""What the engine returns each step, with vLLM's names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.errors import LoRAStreamError

if TYPE_CHECKING:
    from engine.lora.request import LoRARequest


@dataclass
class Logprob:
    """One token's log-probability, as vLLM gives it."""

    logprob: float
    rank: int | None = None
    """1 for the most likely token: how many tokens are at least as likely (ties count)."""
    decoded_token: str | None = None
    """The token's own text (``tokenizer.decode([id])``); None when ``detokenize`` is off."""


# Per generated token: {token_id: Logprob}, the sampled token first, then the top-n by rank.
SampleLogprobs = list[dict[int, Logprob]]
# Per prompt token, the same; None for the first (nothing predicts it).
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass(frozen=True)
class ResumedOutput:
    """A request run again after an earlier run's output reached the client in part (the
    Redis service, after a worker died): the prompt ends with the earlier run's
    ``num_tokens`` output tokens, of which the client holds ``text``.

    The new run's text continues the earlier one's: it starts with what the earlier run held
    back (a possible start of a stop string, an incomplete character), and a stop string
    that begins before the resume point and ends after it is found. Its outputs hold only
    the new run's tokens and text.
    """

    num_tokens: int
    text: str


@dataclass
class CompletionOutput:
    index: int
    """Which of the request's ``n`` samples this is."""
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    """Sum of the sampled tokens' logprobs; None unless ``SamplingParams.logprobs`` is set."""
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None
    """"stop" | "length" | "abort" | "error" | None while running."""
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended the sequence, if any."""
    lora_request: LoRARequest | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: PromptLogprobs | None = None
    """With ``SamplingParams.prompt_logprobs``: per prompt token (None for the first)."""
    error: LoRAStreamError | None = None
    """Set when finish_reason is "error": why the request could not run."""
    metrics: dict[str, float] = field(default_factory=dict)
    """arrival_time, first_token_time, finished_time (time.monotonic seconds)."""
    lora_request: LoRARequest | None = None
    num_cached_tokens: int | None = None
    """Prompt tokens found in the prefix cache (their KV was reused, not computed) when the
    request was first scheduled; None until then."""

    @property
    def lora_name(self) -> str | None:
        return self.lora_request.lora_name if self.lora_request is not None else None
