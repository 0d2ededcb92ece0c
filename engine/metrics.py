"""Per-step engine statistics and the loggers that receive them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

logger = logging.getLogger("lorastream.engine")


@dataclass
class Stats:
    now: float
    num_waiting: int
    num_running: int
    kv_cache_usage: float
    """Fraction of KV-cache blocks in use."""
    num_prompt_tokens: int
    """Prompt tokens computed this step (prefill and recompute)."""
    num_generation_tokens: int
    """Tokens sampled this step."""
    num_preemptions: int
    """Preemptions this step."""
    step_time_s: float
    adapters_on_device: list[int] = field(default_factory=list)
    adapters_in_host: list[int] = field(default_factory=list)
    adapter_loads: int = 0
    """Total loads from disk so far."""
    adapter_load_time_s: float = 0.0
    adapter_host_evictions: int = 0
    adapter_device_loads: int = 0
    adapter_device_evictions: int = 0
    finished: list[tuple[str, str]] = field(default_factory=list)
    """(request_id, finish_reason) of requests that finished this step."""
    num_prefix_queried_tokens: int = 0
    """Tokens of the requests admitted this step, with prefix caching on."""
    num_prefix_hit_tokens: int = 0
    """Of those, the tokens found in the prefix cache (their KV reused, not computed)."""


class StatLogger(Protocol):
    def record(self, stats: Stats) -> None: ...


class LoggingStatLogger:
    """Logs throughput and queue sizes every ``interval_s`` seconds."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self._last = time.monotonic()
        self._prompt_tokens = 0
        self._gen_tokens = 0
        self._prefix_queried = 0
        self._prefix_hits = 0

    def record(self, stats: Stats) -> None:
        self._prompt_tokens += stats.num_prompt_tokens
        self._gen_tokens += stats.num_generation_tokens
        self._prefix_queried += stats.num_prefix_queried_tokens
        self._prefix_hits += stats.num_prefix_hit_tokens
        elapsed = stats.now - self._last
        if elapsed < self.interval_s:
            return
        logger.info(
            "prompt %.1f tok/s, generation %.1f tok/s, running %d, waiting %d, KV %.1f%%, "
            "prefix cache hit rate %.1f%%, adapters on device %d, in host %d, loads %d",
            self._prompt_tokens / elapsed,
            self._gen_tokens / elapsed,
            stats.num_running,
            stats.num_waiting,
            100 * stats.kv_cache_usage,
            100 * prefix_cache_hit_rate(self._prefix_hits, self._prefix_queried),
            len(stats.adapters_on_device),
            len(stats.adapters_in_host),
            stats.adapter_loads,
        )
        self._last = stats.now
        self._prompt_tokens = self._gen_tokens = 0
        self._prefix_queried = self._prefix_hits = 0


def prefix_cache_hit_rate(hit_tokens: int, queried_tokens: int) -> float:
    """Fraction of the admitted requests' tokens found in the prefix cache (0 when none
    were admitted)."""
    return hit_tokens / queried_tokens if queried_tokens else 0.0
