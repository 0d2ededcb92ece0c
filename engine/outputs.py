"""What the engine returns each step, with vLLM's names."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import LoRAStreamError

# For each generated token: {token_id: logprob} over the sampled token and the top-n.
SampleLogprobs = list[dict[int, float]]


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
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    """"stop" | "length" | "abort" | "error" | None while running."""
    logprobs: SampleLogprobs | None = None
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended the sequence, if any."""


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    error: LoRAStreamError | None = None
    """Set when finish_reason is "error": why the request could not run."""
    metrics: dict[str, float] = field(default_factory=dict)
    """arrival_time, first_token_time, finished_time (time.monotonic seconds)."""
    lora_name: str | None = None
    num_cached_tokens: int | None = None
    """Prompt tokens found in the prefix cache (their KV was reused, not computed) when the
    request was first scheduled; None until then."""
