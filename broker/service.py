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
from typing import Any

import anyio
import redis.asyncio as aioredis

from broker import heartbeat
from broker.intake import Intake, IntakeSettings
from broker.jobs import EngineClient, Job, Jobs
from broker.metrics import BrokerMetrics
from broker.ownership import Ownership
from broker.protocol import AbortRequest, untrusted
from broker.publisher import Out, Publisher, PublishSettings
from broker.redis_conn import REDIS_ERRORS, Backoff, is_cluster
from broker.registry import AdapterRegistry
from broker.routing import (
    DEFAULT_NUM_SHARDS,
    MAX_NUM_SHARDS,
    ROUTINGS,
    Layout,
    Router,
    RoutingRecord,
    encode_record,
    ranges,
    routing_key,
)
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
    routing: str = "single"
    """``single``: every worker reads every stream (the one ``{prefix}:requests``, or on Redis
    Cluster every shard). ``affine``: shard streams by adapter, owned by rendezvous over the
    live workers (``broker.routing``)."""
    num_shards: int = DEFAULT_NUM_SHARDS
    """Shard streams with affine routing, or on Redis Cluster; the same for the whole fleet."""
    steal_after_ms: int = 500
    """Affine routing: a worker with nothing of its own to do takes entries of another's
    shard that waited this long."""
    routing_refresh_s: float = 1.0
    """How often the shard owners are recomputed from the heartbeat records."""
    poll_ms: int = 20
    """Redis Cluster: the longest pause between polls of an idle worker's shards."""

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
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing={self.routing!r} is invalid: {' or '.join(ROUTINGS)}")
        if not 1 <= self.num_shards <= MAX_NUM_SHARDS:
            raise ValueError(
                f"num_shards={self.num_shards} is invalid: must be 1..{MAX_NUM_SHARDS}"
            )
        for name in ("steal_after_ms", "poll_ms"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be >= 1")
        if self.routing_refresh_s <= 0:
            raise ValueError(
                f"routing_refresh_s={self.routing_refresh_s!r} is invalid: must be > 0"
            )

    @property
    def group(self) -> str:
        return f"{self.prefix}:workers"

    def layout(self, *, cluster: bool) -> Layout:
        """The streams of this fleet: the single stream, unless routing is affine or Redis
        is a cluster (where one stream would put every request on one master)."""
        if self.routing == "single" and not cluster:
            return Layout(self.prefix)
        return Layout(self.prefix, self.num_shards, shared=not cluster)

    def record(self, *, cluster: bool) -> RoutingRecord:
        return RoutingRecord(
            routing=self.routing, num_shards=self.layout(cluster=cluster).num_shards
        )

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
        self.cluster = is_cluster(client)
        self.layout = cfg.layout(cluster=self.cluster)
        self.router = Router(self.layout, cfg.consumer, cfg.routing)
        self.shards = {
            shard.prefix: Ownership(
                client, shard, group=cfg.group, consumer=cfg.consumer, cluster=self.cluster
            )
            for shard in self.layout.shards
        }
        self.publisher = Publisher(
            PublishSettings(
                result_ttl_s=cfg.result_ttl_s,
                result_maxlen=cfg.result_maxlen,
                dlq_maxlen=cfg.dlq_maxlen,
                batch=cfg.publish_batch,
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
                group=cfg.group,
                consumer=cfg.consumer,
                block_ms=cfg.block_ms,
                claim_idle_ms=cfg.claim_idle_ms,
                max_deliveries=cfg.max_deliveries,
                max_payload_bytes=cfg.max_payload_bytes,
                result_streams=bool(cfg.result_ttl_s),
                steal_after_ms=cfg.steal_after_ms,
                poll_ms=cfg.poll_ms,
            ),
            shards=self.shards,
            router=self.router,
            cluster=self.cluster,
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
            tg.start_soon(self._routing_loop)
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
                await self._release(list(self.jobs.abandoned.values()))
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

    async def _release(self, jobs: list[Job]) -> None:
        """Leave entries we could not finish pending, idle enough for the next XAUTOCLAIM
        (only those still ours: the keepalive script's check, then an idle XCLAIM)."""
        logger.warning("%d unfinished request(s) left pending for another worker", len(jobs))
        for shard, entry_ids in _by_shard(jobs):
            with contextlib.suppress(*REDIS_ERRORS):
                lost = await shard.keepalive(entry_ids)
                mine = [e for e in entry_ids if e not in lost]
                if mine:
                    await self.redis.xclaim(
                        shard.stream, self.cfg.group, self.cfg.consumer, 0, list[Any](mine),
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

    def _on_lost(self, shard: Ownership, entry_ids: Sequence[str]) -> None:
        self.jobs.lose(shard, entry_ids)

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
            held = _by_shard(list(self.jobs.by_entry.values()))
            if not held:
                continue
            try:
                lost = [(shard, await shard.keepalive(ids)) for shard, ids in held]
                backoff.reset()
            except REDIS_ERRORS as e:
                self.metrics.redis_errors.labels("keepalive").inc()
                if backoff.failures == 0:
                    logger.warning("keepalive failed (%s: %s)", type(e).__name__, e)
                backoff.failures += 1
                continue
            for shard, ids in lost:
                if ids:
                    # We were presumed dead (stopped, or cut off from Redis past
                    # --claim-idle-ms) and another worker runs these now: stop ours so the
                    # client gets one stream.
                    self.jobs.lose(shard, sorted(ids))

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
            owned = [self.shards[s.prefix].stream for s in self.router.owned]
            try:
                pipe = self.redis.pipeline(transaction=False)
                for stream in owned:
                    pipe.xinfo_groups(stream)
                replies = await pipe.execute(raise_on_error=False)
            except REDIS_ERRORS:
                continue
            lag = pending = 0.0
            for groups in replies:
                if isinstance(groups, Exception):
                    continue
                for g in groups:
                    if _s(g.get("name", b"")) == self.cfg.group:
                        lag += float(g.get("lag") or 0)
                        pending += float(g.get("pending", 0))
            self.metrics.stream_lag.set(lag)
            self.metrics.stream_pending.set(pending)

    # ------------------------------------------------------------------ routing
    async def _routing_loop(self) -> None:
        """Publish the layout for producers (again after a Redis restart), and with affine
        routing recompute the shards we own from the live workers' heartbeat records."""
        backoff = Backoff(max_s=self.cfg.routing_refresh_s)
        record = encode_record(self.cfg.record(cluster=self.cluster))
        key = routing_key(self.cfg.prefix)
        self.metrics.shards_owned.set(len(self.router.owned))
        while True:
            try:
                if self.layout.num_shards:
                    await self.redis.set(key, record)
                if self.router.affine:
                    workers = await heartbeat.live_workers(self.redis, self.cfg.prefix)
                    live = [w.consumer for w in workers if not w.draining]
                    if self.router.update(live):
                        mine = [s.index for s in self.router.owned if s.index is not None]
                        logger.info("now own %d shard(s): %s", len(mine), ranges(mine))
                        self.metrics.shards_owned.set(len(mine))
                        self._notify()
                backoff.reset()
                await anyio.sleep(self.cfg.routing_refresh_s)
            except REDIS_ERRORS as e:
                self.metrics.redis_errors.labels("routing").inc()
                if backoff.failures == 0:
                    logger.warning("routing refresh failed (%s: %s)", type(e).__name__, e)
                await backoff.sleep()

    def owned_shards(self) -> list[int]:
        """Indices of the shards this worker owns (for its heartbeat record)."""
        return [s.index for s in self.router.owned if s.index is not None]


def _s(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _by_shard(jobs: Sequence[Job]) -> list[tuple[Ownership, list[str]]]:
    groups: dict[int, tuple[Ownership, list[str]]] = {}
    for job in jobs:
        groups.setdefault(id(job.shard), (job.shard, []))[1].append(job.entry_id)
    return list(groups.values())
