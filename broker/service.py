"""The worker: Redis streams in, the engine in the middle, events out.

One task group; the parts live in their own modules and meet here::

    intake ──start──▶ job (one per request) ──Out──▶ publisher ──fenced script──▶ Redis
      ▲ XREADGROUP / XPENDING / XAUTOCLAIM JUSTID, COUNT = free capacity
      │   (broker.intake: decode, deadline, adapter, resume; one bad entry ends alone)
    keepalive: our running entries stay ours (script: only while still ours)
    control:   SUBSCRIBE {prefix}:control → abort → cancel the job's scope
    metrics:   XINFO GROUPS → lag

Delivery is at-least-once: an entry is XACKed in the same atomic step that writes its
final event, and only by the worker that owns it (``broker.ownership``). A request run
again (our own pending entries after a restart, or an idle entry taken over from a dead
worker) resumes from what its result stream already holds: the tokens published so far are
appended to the prompt and ``seq`` continues, so the client's stream stays complete and
gapless and never shows a token twice (docs/protocol.md).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio
import redis.asyncio as aioredis

from broker.intake import Intake, IntakeSettings
from broker.jobs import EngineClient, Job, Jobs
from broker.metrics import BrokerMetrics
from broker.ownership import Ownership
from broker.protocol import AbortRequest, untrusted
from broker.publisher import Out, Publisher, PublishSettings
from broker.redis_conn import REDIS_ERRORS, Backoff
from broker.registry import AdapterRegistry
from engine.errors import EngineDead, LoRAStreamError

logger = logging.getLogger("lorastream.broker")

# Idle time given to entries we give up on while draining, so another worker's next
# XAUTOCLAIM takes them at once instead of after --claim-idle-ms.
_RELEASED_IDLE_MS = 10**12


@dataclass(frozen=True)
class ServiceConfig:
    prefix: str = "lorastream"
    consumer: str = field(default_factory=lambda: f"{socket.gethostname()}:cpu")
    """Stable per worker (host + device): a restarted worker finds its own pending entries."""
    block_ms: int = 1000
    claim_idle_ms: int = 30_000
    """Entries of other consumers idle this long are taken over; ours are kept alive at a third."""
    max_deliveries: int = 5
    drain_timeout_s: float = 30.0
    result_ttl_s: int = 3600
    """Lifetime of {prefix}:out:{id} after its last event; 0 disables result streams."""
    result_maxlen: int = 10_000
    max_payload_bytes: int = 1 << 20
    max_inflight: int | None = None
    """Requests held at once; defaults to the engine's max_num_seqs."""
    metrics_interval_s: float = 5.0
    publish_batch: int = 1024
    remembered_aborts: int = 10_000
    dlq_maxlen: int = 100_000

    def __post_init__(self) -> None:
        for name in (
            "block_ms",
            "claim_idle_ms",
            "max_deliveries",
            "result_maxlen",
            "max_payload_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be >= 1")
        if self.result_ttl_s < 0 or self.drain_timeout_s < 0:
            raise ValueError("result_ttl_s and drain_timeout_s must be >= 0")
        if not self.prefix or not self.consumer:
            raise ValueError("prefix and consumer must be non-empty")

    @property
    def stream(self) -> str:
        return f"{self.prefix}:requests"

    @property
    def group(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}:requests:dlq"

    @property
    def control(self) -> str:
        return f"{self.prefix}:control"

    def out_key(self, request_id: str) -> str:
        return f"{self.prefix}:out:{request_id}"


class Service:
    """``await Service(...).run()`` serves until ``drain()`` (SIGTERM) and returns an exit code."""

    def __init__(
        self,
        engine: EngineClient,
        client: aioredis.Redis,
        config: ServiceConfig | None = None,
        *,
        registry: AdapterRegistry | None = None,
        metrics: BrokerMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.redis = client
        self.cfg = cfg = config or ServiceConfig()
        self.registry = registry or AdapterRegistry(key=f"{cfg.prefix}:adapters")
        self.metrics = metrics or BrokerMetrics()
        self.max_inflight = cfg.max_inflight or int(engine.max_num_seqs)
        self._aborted: OrderedDict[str, None] = OrderedDict()
        self._changed = anyio.Event()
        self._draining = anyio.Event()
        self._starts_tg: anyio.abc.TaskGroup | None = None
        self._fatal: BaseException | None = None
        self.ownership = Ownership(
            client, stream=cfg.stream, group=cfg.group, consumer=cfg.consumer, dlq=cfg.dlq
        )
        self.publisher = Publisher(
            self.ownership,
            PublishSettings(
                result_ttl_s=cfg.result_ttl_s,
                result_maxlen=cfg.result_maxlen,
                dlq_maxlen=cfg.dlq_maxlen,
                batch=cfg.publish_batch,
                prefix=cfg.prefix,
            ),
            self.metrics,
            on_lost=self._on_lost,
            on_written=self._on_written,
        )
        self.jobs = Jobs(
            engine, self.publisher, self.metrics,
            on_change=self._notify,
        )  # fmt: skip
        self.intake = Intake(
            client,
            IntakeSettings(
                prefix=cfg.prefix,
                stream=cfg.stream,
                group=cfg.group,
                consumer=cfg.consumer,
                block_ms=cfg.block_ms,
                claim_idle_ms=cfg.claim_idle_ms,
                max_deliveries=cfg.max_deliveries,
                max_payload_bytes=cfg.max_payload_bytes,
                result_streams=bool(cfg.result_ttl_s),
            ),
            ownership=self.ownership,
            jobs=self.jobs,
            publisher=self.publisher,
            registry=self.registry,
            metrics=self.metrics,
            capacity=self._capacity,
            start_job=self._start_job,
            aborted=lambda request_id: request_id in self._aborted,
        )
        self.high_water = 0
        """Most requests held at once (tests check backpressure with it)."""

    @property
    def ready(self) -> anyio.Event:
        """Set once the group exists and intake runs."""
        return self.intake.ready

    # ------------------------------------------------------------------ lifecycle
    def drain(self) -> None:
        """Stop reading; finish what runs within drain_timeout_s; then return from run()."""
        if not self._draining.is_set():
            logger.info("draining: %d request(s) running", len(self.jobs))
        self._draining.set()
        self._notify()

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    @property
    def inflight(self) -> int:
        return len(self.jobs)

    async def run(self) -> int:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.publisher.run)
            tg.start_soon(self._outputs_loop)
            tg.start_soon(self.jobs.expire)
            tg.start_soon(self._keepalive_loop)
            tg.start_soon(self._control_loop)
            tg.start_soon(self._metrics_loop)
            async with anyio.create_task_group() as starts:
                self._starts_tg = starts
                await self.intake.run(self._draining, self._wait_changed)
                timeout = 0.0 if self._fatal is not None else self.cfg.drain_timeout_s
                with anyio.move_on_after(timeout):
                    while len(self.jobs):
                        await self._wait_changed(1.0)
                starts.cancel_scope.cancel()
            # Whatever still runs stays pending for another worker (not acked).
            self.jobs.abandon_all()
            # No more puts: the publisher writes what is waiting, then ends.
            self.publisher.close()
            with anyio.move_on_after(max(5.0, self.cfg.block_ms / 1000)):
                await self.publisher.done.wait()
            if self.jobs.abandoned:
                await self._release(sorted(self.jobs.abandoned))
            tg.cancel_scope.cancel()
        if self._fatal is not None:
            logger.error("worker stopped: %s", self._fatal)
            return 1
        logger.info("drained")
        return 0

    async def _outputs_loop(self) -> None:
        try:
            await self.jobs.run()
        except EngineDead as e:
            self._on_engine_dead(e)

    async def _release(self, entry_ids: list[str]) -> None:
        """Leave entries we could not finish pending, idle enough for the next XAUTOCLAIM
        (only those still ours: the keepalive script's check, then an idle XCLAIM)."""
        logger.warning("%d unfinished request(s) left pending for another worker", len(entry_ids))
        with contextlib.suppress(*REDIS_ERRORS):
            lost = await self.ownership.keepalive(entry_ids)
            mine = [e for e in entry_ids if e not in lost]
            if mine:
                await self.redis.xclaim(
                    self.cfg.stream, self.cfg.group, self.cfg.consumer, 0, list(mine),
                    idle=_RELEASED_IDLE_MS, justid=True,
                )  # fmt: skip

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _wait_changed(self, timeout_s: float) -> None:
        with anyio.move_on_after(timeout_s):
            await self._changed.wait()

    def _capacity(self) -> int:
        return max(0, min(self.engine.free_capacity(), self.max_inflight - len(self.jobs)))

    def _start_job(self, job: Job) -> None:
        self.high_water = max(self.high_water, len(self.jobs))
        assert self._starts_tg is not None
        self._starts_tg.start_soon(self._start, job)

    async def _start(self, job: Job) -> None:
        try:
            await self.jobs.start(job)
        except EngineDead as e:
            self._on_engine_dead(e)

    def _on_engine_dead(self, err: BaseException) -> None:
        self._fatal = err
        self.drain()

    def _on_lost(self, entry_ids: Sequence[str]) -> None:
        self.jobs.lose(entry_ids)

    def _on_written(self, out: Out) -> None:
        job = out.job
        if job is not None and job.final_queued and out.ack:
            self.jobs.forget(job)

    # ------------------------------------------------------------------ keepalive, control, metrics
    async def _keepalive_loop(self) -> None:
        backoff = Backoff()
        interval = self.cfg.claim_idle_ms / 3000
        while True:
            await anyio.sleep(interval if not backoff.failures else backoff.next_delay())
            ids = list(self.jobs.by_entry)
            if not ids:
                continue
            try:
                lost = await self.ownership.keepalive(ids)
                backoff.reset()
            except REDIS_ERRORS as e:
                self.metrics.redis_errors.labels("keepalive").inc()
                if backoff.failures == 0:
                    logger.warning("keepalive failed (%s: %s)", type(e).__name__, e)
                backoff.failures += 1
                continue
            if lost:
                # We were presumed dead (stopped, or cut off from Redis past --claim-idle-ms)
                # and another worker runs these now: stop ours so the client gets one stream.
                self.jobs.lose(sorted(lost))

    async def _control_loop(self) -> None:
        backoff = Backoff()
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.cfg.control)
                backoff.reset()
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        self._on_control(msg["data"])
            except REDIS_ERRORS as e:
                # Aborts published while we are disconnected are lost: clients may resend.
                self.metrics.redis_errors.labels("control").inc()
                if backoff.failures == 0:
                    logger.warning(
                        "control channel lost (%s: %s); resubscribing", type(e).__name__, e
                    )
                await backoff.sleep()
            finally:
                with contextlib.suppress(*REDIS_ERRORS):
                    await pubsub.aclose()

    def _on_control(self, raw: object) -> None:
        if not isinstance(raw, bytes):
            return
        try:
            msg = AbortRequest.decode(raw)
        except LoRAStreamError as e:
            logger.warning("ignored control message: %s", untrusted(e.message, 300))
            return
        # Remembered for entries not read yet (bounded: memory must not grow with traffic).
        self._aborted[msg.id] = None
        while len(self._aborted) > self.cfg.remembered_aborts:
            self._aborted.popitem(last=False)
        if self.jobs.request_abort(msg.id):
            logger.info("aborting %s", untrusted(msg.id))

    async def _metrics_loop(self) -> None:
        while True:
            await anyio.sleep(self.cfg.metrics_interval_s)
            self.metrics.idle()
            try:
                groups = await self.redis.xinfo_groups(self.cfg.stream)
            except REDIS_ERRORS:
                continue
            for g in groups:
                if _s(g.get("name", b"")) == self.cfg.group:
                    if g.get("lag") is not None:
                        self.metrics.stream_lag.set(float(g["lag"]))
                    self.metrics.stream_pending.set(float(g.get("pending", 0)))


def _s(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


__all__ = ["EngineClient", "Service", "ServiceConfig"]
