"""Prometheus metrics of one worker, fed by the service and by the engine's stat logger hook.

Each worker owns a ``CollectorRegistry`` (not the process-global one) so tests can run
several services in one process. ``record`` is called on the engine's step thread;
prometheus-client metrics are thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from engine.metrics import Stats

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class BrokerMetrics:
    def __init__(
        self, registry: CollectorRegistry | None = None, tokens_window_s: float = 10.0
    ) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.stream_lag = Gauge(
            "lorastream_stream_lag",
            "Request entries not yet delivered to the group (XINFO GROUPS lag)",
            registry=r,
        )
        self.stream_pending = Gauge(
            "lorastream_stream_pending",
            "Request entries delivered but not acked, all workers",
            registry=r,
        )
        self.inflight = Gauge(
            "lorastream_requests_inflight", "Requests this worker holds", registry=r
        )
        self.num_waiting = Gauge(
            "lorastream_num_requests_waiting", "Sequences waiting in the engine", registry=r
        )
        self.num_running = Gauge(
            "lorastream_num_requests_running", "Sequences running in the engine", registry=r
        )
        self.kv_cache_usage = Gauge(
            "lorastream_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", registry=r
        )
        self.adapters_resident = Gauge(
            "lorastream_adapters_resident", "Adapters in device slots", registry=r
        )
        self.adapters_in_host = Gauge(
            "lorastream_adapters_in_host", "Adapters cached in host memory", registry=r
        )
        self.adapter_loads = Counter(
            "lorastream_adapter_loads", "Adapter loads from disk", registry=r
        )
        self.adapter_load_seconds = Counter(
            "lorastream_adapter_load_seconds", "Time spent loading adapters from disk", registry=r
        )
        self.adapter_evictions = Counter(
            "lorastream_adapter_evictions", "Adapter evictions", ["tier"], registry=r
        )
        self.ttft = Histogram(
            "lorastream_time_to_first_token_seconds",
            "Engine arrival to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "lorastream_inter_token_latency_seconds",
            "Time between tokens of a request",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "lorastream_e2e_request_latency_seconds",
            "Engine arrival to the final token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.generation_tokens = Counter(
            "lorastream_generation_tokens", "Tokens generated", registry=r
        )
        self.prompt_tokens = Counter(
            "lorastream_prompt_tokens", "Prompt tokens computed", registry=r
        )
        self.tokens_per_second = Gauge(
            "lorastream_generation_tokens_per_second",
            "Generated tokens per second over a short window",
            registry=r,
        )
        self.requests = Counter(
            "lorastream_requests_finished",
            "Requests finished, by finish_reason",
            ["finish_reason"],
            registry=r,
        )
        self.errors = Counter(
            "lorastream_errors", "Error events sent, by code", ["code"], registry=r
        )
        self.dead_letters = Counter(
            "lorastream_dead_letters", "Entries moved to the DLQ", ["reason"], registry=r
        )
        self.claimed = Counter(
            "lorastream_entries_claimed", "Entries taken over from idle consumers", registry=r
        )
        self.stolen = Counter(
            "lorastream_entries_stolen",
            "Entries read from another worker's shard (affine routing, idle capacity)",
            registry=r,
        )
        self.shards_owned = Gauge(
            "lorastream_shards_owned", "Shard streams this worker owns", registry=r
        )
        self.entries_lost = Counter(
            "lorastream_entries_lost",
            "Running entries found taken over by another worker (their runs stopped here)",
            registry=r,
        )
        self.redis_errors = Counter(
            "lorastream_redis_errors", "Redis errors, by operation", ["op"], registry=r
        )
        self._lock = threading.Lock()
        self._window_s = tokens_window_s
        self._window: deque[tuple[float, int]] = deque()
        self._last_totals: dict[str, float] = {}

    # StatLogger: called once per engine step, on the engine's thread.
    def record(self, stats: Stats) -> None:
        self.num_waiting.set(stats.num_waiting)
        self.num_running.set(stats.num_running)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        self.adapters_resident.set(len(stats.adapters_on_device))
        self.adapters_in_host.set(len(stats.adapters_in_host))
        self.generation_tokens.inc(stats.num_generation_tokens)
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        with self._lock:
            # Stats carry running totals; counters take the increments.
            self._inc_total("loads", stats.adapter_loads, self.adapter_loads)
            self._inc_total("load_s", stats.adapter_load_time_s, self.adapter_load_seconds)
            self._inc_total(
                "dev_evict", stats.adapter_device_evictions, self.adapter_evictions.labels("device")
            )
            self._inc_total(
                "host_evict", stats.adapter_host_evictions, self.adapter_evictions.labels("host")
            )
            self._window.append((stats.now, stats.num_generation_tokens))
            while self._window and stats.now - self._window[0][0] > self._window_s:
                self._window.popleft()
            span = stats.now - self._window[0][0] if len(self._window) > 1 else 0.0
            tokens = sum(n for _, n in self._window)
            self.tokens_per_second.set(tokens / span if span > 0 else 0.0)

    def _inc_total(self, key: str, total: float, counter: Counter) -> None:
        previous = self._last_totals.get(key, 0.0)
        if total > previous:
            counter.inc(total - previous)
        self._last_totals[key] = total

    def idle(self) -> None:
        """No engine steps for a while: the throughput gauge must not freeze at its last value."""
        with self._lock:
            if self._window and time.monotonic() - self._window[-1][0] > self._window_s:
                self._window.clear()
                self.tokens_per_second.set(0.0)

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve /metrics on a daemon thread; returns the port (useful with port 0)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(server.server_port)
