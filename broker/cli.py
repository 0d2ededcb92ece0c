"""``lorastream serve | status | adapters | demo`` (registered in engine/cli.py)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import redis

from broker import heartbeat, routing
from broker.embedded import RedisServer
from broker.metrics import BrokerMetrics
from broker.redis_conn import (
    REDIS_ERRORS,
    Backoff,
    RedisSettings,
    connect,
    connect_sync,
    is_cluster,
)
from broker.registry import AdapterRegistry, registry_key
from broker.service import EngineClient, Service, ServiceConfig
from engine.cli import HelpFormatter, UsageError
from engine.lora.request import LoRARequest
from engine.metrics import Stats

logger = logging.getLogger("lorastream.broker")

# (parsed args, stat loggers) → engine; tests pass a fake.
EngineFactory = Callable[[argparse.Namespace, list[Any]], EngineClient]

_URL_ENV = "LORASTREAM_REDIS_URL"


def _add_redis_args(parser: argparse.ArgumentParser, *, serve: bool = False) -> None:
    g = parser.add_argument_group("redis")
    private = "; serve without one starts a private redis-server" if serve else ""
    g.add_argument(
        "--redis-url",
        default=os.environ.get(_URL_ENV),
        help="redis://[user:password@]host:port/db, rediss://... (TLS), unix:///path.sock or "
        f"redis+cluster://host:port (any node of a Redis Cluster) (default ${_URL_ENV}{private}). "
        "Prefer the environment variable for URLs with a "
        "password: argv is visible to other users",
    )
    g.add_argument("--redis-ca-file", default=None,
                   help="CA bundle for rediss:// URLs (default: the system's)")  # fmt: skip
    g.add_argument("--prefix", default="lorastream", help="key prefix of every stream and channel")
    if serve:
        g.add_argument("--redis-wait", type=float, default=10.0,
                       help="seconds to wait for Redis at start-up before giving up (once "
                       "serving, a worker rides out outages of any length)")  # fmt: skip


def _need_url(ns: argparse.Namespace) -> str:
    if not ns.redis_url:
        raise UsageError(f"no Redis given: pass --redis-url or set ${_URL_ENV}")
    return str(ns.redis_url)


# ----------------------------------------------------------------------------- serve
def add_serve_args(parser: argparse.ArgumentParser) -> None:
    from engine.config import EngineArgs

    EngineArgs.add_cli_args(parser)
    parser.add_argument("--enable-multiprocessing", action="store_true",
                        help="run the engine core (scheduler, model, adapters) in its own process")  # fmt: skip
    add_service_args(parser)


def add_service_args(parser: argparse.ArgumentParser) -> None:
    """The flags of the service alone (the test worker pairs them with a fake engine)."""
    _add_redis_args(parser, serve=True)
    d = ServiceConfig(consumer="_")
    g = parser.add_argument_group("service")
    g.add_argument("--consumer-name", default=None,
                   help="stable, unique consumer name (default host:device)")  # fmt: skip
    g.add_argument("--block-ms", type=int, default=d.block_ms,
                   help="longest XREADGROUP BLOCK, in milliseconds")  # fmt: skip
    g.add_argument("--claim-idle-ms", type=int, default=d.claim_idle_ms,
                   help="take over other workers' entries idle this long (XAUTOCLAIM)")  # fmt: skip
    g.add_argument("--max-deliveries", type=int, default=d.max_deliveries,
                   help="deliveries before an entry goes to the dead-letter stream")  # fmt: skip
    g.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s,
                   help="seconds to finish running requests on SIGTERM")  # fmt: skip
    g.add_argument("--result-ttl", type=int, default=d.result_ttl_s,
                   help="seconds a result stream lives after its last event; 0 disables them")  # fmt: skip
    g.add_argument("--result-maxlen", type=int, default=d.result_maxlen,
                   help="events kept per result stream")  # fmt: skip
    g.add_argument("--max-payload-bytes", type=int, default=d.max_payload_bytes,
                   help="larger request entries are refused (payload_too_large)")  # fmt: skip
    g.add_argument("--max-inflight", type=int, default=None,
                   help="requests held at once (default --max-num-seqs)")  # fmt: skip
    g.add_argument("--lora-root", default=None,
                   help="registry adapter paths must resolve inside this directory "
                   "(default: none, and the registry is refused)")  # fmt: skip
    g.add_argument("--heartbeat-interval", type=float, default=heartbeat.DEFAULT_INTERVAL_S,
                   help="seconds between heartbeat records ({prefix}:worker:{consumer}); a "
                   f"record expires after {heartbeat.EXPIRY_INTERVALS} intervals")  # fmt: skip
    r = parser.add_argument_group("routing")
    r.add_argument("--routing", choices=routing.ROUTINGS, default=d.routing,
                   help="single: every worker reads every request stream; affine: requests "
                   "go to shard streams by adapter, each owned by one live worker "
                   "(docs/architecture.md, 'Fleet')")  # fmt: skip
    r.add_argument("--num-shards", type=int, default=d.num_shards,
                   help="shard streams with --routing affine or on Redis Cluster; the same for "
                   "every worker of the fleet")  # fmt: skip
    r.add_argument("--steal-after-ms", type=int, default=d.steal_after_ms,
                   help="with --routing affine, a worker with free capacity takes requests of "
                   "another worker's shard that waited this long")  # fmt: skip
    r.add_argument("--cluster-poll-ms", type=int, default=d.poll_ms,
                   help="on Redis Cluster, the longest pause between reads of an idle "
                   "worker's shards (one XREADGROUP cannot block on several slots)")  # fmt: skip
    g.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on this port (default: no metrics server)")  # fmt: skip
    g.add_argument("--metrics-addr", default="0.0.0.0", help="address of the metrics server")
    g.add_argument("--embedded-unix-socket", action="store_true",
                   help="the private redis-server listens on a unix socket instead of a loopback port")  # fmt: skip


def run_serve(ns: argparse.Namespace) -> int:
    return anyio.run(serve, ns, None, backend="asyncio")


def _default_consumer(ns: argparse.Namespace) -> str:
    device = getattr(ns, "device", "auto") or "auto"
    if device == "auto":
        try:
            import torch

            device = "cuda:0" if torch.cuda.is_available() else "cpu"
        except ImportError:
            device = "cpu"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if device.startswith("cuda") and visible:
        device = f"{device}@{visible}"
    return f"{socket.gethostname()}:{device}"


def service_config(ns: argparse.Namespace) -> ServiceConfig:
    return ServiceConfig(
        prefix=ns.prefix,
        consumer=ns.consumer_name or _default_consumer(ns),
        block_ms=ns.block_ms,
        claim_idle_ms=ns.claim_idle_ms,
        max_deliveries=ns.max_deliveries,
        drain_timeout_s=ns.drain_timeout,
        result_ttl_s=ns.result_ttl,
        result_maxlen=ns.result_maxlen,
        max_payload_bytes=ns.max_payload_bytes,
        max_inflight=ns.max_inflight,
        routing=ns.routing,
        num_shards=ns.num_shards,
        steal_after_ms=ns.steal_after_ms,
        poll_ms=ns.cluster_poll_ms,
        # Owners change as heartbeat records do: look as often as they are written.
        routing_refresh_s=ns.heartbeat_interval if ns.heartbeat_interval > 0 else 1.0,
    )


def _real_engine(ns: argparse.Namespace, stat_loggers: list[Any]) -> EngineClient:
    from engine.async_engine import AsyncLLMEngine
    from engine.config import EngineArgs
    from engine.metrics import LoggingStatLogger

    args = EngineArgs.from_cli_args(ns)
    if not args.disable_log_stats:
        stat_loggers = [*stat_loggers, LoggingStatLogger()]
    return AsyncLLMEngine.from_engine_args(
        args,
        stat_loggers=stat_loggers,
        enable_multiprocessing=getattr(ns, "enable_multiprocessing", False),
    )


class LatestStats:
    """A stat logger that keeps the engine's latest step statistics (for the heartbeat)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: Stats | None = None

    def record(self, stats: Stats) -> None:
        with self._lock:
            self._stats = stats

    @property
    def latest(self) -> Stats | None:
        with self._lock:
            return self._stats


class NamedRegistry(AdapterRegistry):
    """The registry, remembering the name of every adapter id it hands out: the engine's
    statistics name adapters by id, the heartbeat by name."""

    def __init__(self, static: Sequence[tuple[str, str]], **kwargs: Any) -> None:
        # --lora-modules are ids 1..N in order (see AdapterRegistry).
        self.names: dict[int, str] = {i: name for i, (name, _) in enumerate(static, start=1)}
        super().__init__(static, **kwargs)

    def lora_request(self, name: str, path: str) -> LoRARequest:
        request = super().lora_request(name, path)
        self.names[request.lora_int_id] = name
        return request


class _Stop:
    """The signal that stopped the worker at once (the second one), if one did."""

    signum: int | None = None


async def serve(ns: argparse.Namespace, engine_factory: EngineFactory | None = None) -> int:
    """Run one worker until SIGTERM/SIGINT (a second signal stops at once: exit 128 + its
    number). Whatever was started is stopped on the way out, start-up failures included."""
    try:
        cfg = service_config(ns)
    except ValueError as e:
        raise UsageError(f"{e} (see lorastream serve --help)") from None
    if ns.heartbeat_interval <= 0:
        raise UsageError(f"--heartbeat-interval {ns.heartbeat_interval:g} is invalid: must be > 0")
    expiry_ms = heartbeat.EXPIRY_INTERVALS * ns.heartbeat_interval * 1000
    if cfg.routing == "affine" and expiry_ms > cfg.claim_idle_ms:
        raise UsageError(
            f"--heartbeat-interval {ns.heartbeat_interval:g} is too long for --claim-idle-ms "
            f"{cfg.claim_idle_ms}: a dead worker's shards move when its record expires "
            f"({heartbeat.EXPIRY_INTERVALS} intervals); make the interval at most "
            f"{cfg.claim_idle_ms / heartbeat.EXPIRY_INTERVALS / 1000:g} s"
        )
    async with contextlib.AsyncExitStack() as stack:
        url = ns.redis_url
        if not url:
            embedded = _private_redis(ns.embedded_unix_socket)
            stack.callback(embedded.close)
            url = embedded.url
            print(f"lorastream: started a private redis-server at {url}", flush=True)
        settings = RedisSettings(url, ca_file=ns.redis_ca_file, block_ms=cfg.block_ms)
        client = connect(settings)
        stack.push_async_callback(_close_quietly, client)
        await _wait_for_redis(client, settings, ns.redis_wait)
        await _check_routing(client, cfg)
        metrics = BrokerMetrics()
        if ns.metrics_port is not None:
            port = _serve_metrics(metrics, ns.metrics_port, ns.metrics_addr)
            logger.info("metrics on http://%s:%d/metrics", ns.metrics_addr, port)
        stats = LatestStats()
        engine = (engine_factory or _real_engine)(ns, [metrics, stats])
        stack.push_async_callback(_shutdown_engine, engine)
        registry = NamedRegistry(
            _lora_modules(ns), key=registry_key(cfg.prefix), lora_root=ns.lora_root
        )
        logger.info(
            "serving %s:requests from %s as consumer %r",
            cfg.prefix,
            settings.redacted_url,
            cfg.consumer,
        )
        service = Service(engine, client, cfg, registry=registry, metrics=metrics)
        stop = _Stop()
        done: list[int] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(_on_signals, service, tg.cancel_scope, stop)
            tg.start_soon(_heartbeat, service, engine, registry, stats, ns)
            done.append(await service.run())
            tg.cancel_scope.cancel()
        if done:
            return done[0]
        assert stop.signum is not None
        return 128 + stop.signum


async def _check_routing(client: Any, cfg: ServiceConfig) -> None:
    """Refuse to join a fleet that routes otherwise (its producers would send requests where
    this worker does not read, or the other way round). With no live worker the record is
    stale: this worker's replaces it (the service writes it)."""
    cluster = is_cluster(client)
    ours = cfg.record(cluster=cluster)
    found = routing.decode_record(await client.get(routing.routing_key(cfg.prefix)))
    if found is None or (found.routing, found.num_shards) == (ours.routing, ours.num_shards):
        return
    others = [
        w for w in await heartbeat.live_workers(client, cfg.prefix) if w.consumer != cfg.consumer
    ]
    if others:
        raise UsageError(
            f"the workers under --prefix {cfg.prefix} route with --routing {found.routing} "
            f"--num-shards {found.num_shards or 1} ({routing.routing_key(cfg.prefix)}); start "
            "this one the same way, or stop them first"
        )
    if not ours.num_shards:
        await client.delete(routing.routing_key(cfg.prefix))


def _private_redis(unix_socket: bool) -> RedisServer:
    try:
        return RedisServer(unix_socket=unix_socket).start()
    except RuntimeError as e:
        raise UsageError(f"{e} (or pass --redis-url)") from e


async def _wait_for_redis(client: Any, settings: RedisSettings, wait_s: float) -> None:
    """PING until Redis answers, for up to ``wait_s``; then the last error propagates (the
    CLI turns it into one line)."""
    backoff = Backoff(max_s=1.0)
    deadline = anyio.current_time() + wait_s
    while True:
        try:
            await client.ping()
            return
        except REDIS_ERRORS as e:
            if anyio.current_time() >= deadline:
                raise
            if backoff.failures == 0:
                logger.warning(
                    "waiting for Redis at %s (%s: %s)", settings.redacted_url, type(e).__name__, e
                )
            await backoff.sleep()


def _serve_metrics(metrics: BrokerMetrics, port: int, addr: str) -> int:
    try:
        return metrics.serve(port, addr)
    except OSError as e:
        raise UsageError(
            f"cannot serve metrics on {addr}:{port} ({e.strerror}): choose another --metrics-port"
        ) from e


async def _close_quietly(client: Any) -> None:
    with contextlib.suppress(Exception):
        await client.aclose()


async def _shutdown_engine(engine: EngineClient) -> None:
    shutdown = getattr(engine, "shutdown", None)
    if shutdown is not None:
        await shutdown()


def _lora_modules(ns: argparse.Namespace) -> list[tuple[str, str]]:
    """(name, path) of --lora-modules in order, as EngineArgs parses them (the engine preloads
    them as adapter ids 1..N and the registry must hand out the same ids)."""
    out = []
    for spec in getattr(ns, "lora_modules", None) or []:
        name, _, path = str(spec).partition("=")
        out.append((name.strip(), path.strip()))
    return out


async def _on_signals(service: Service, scope: anyio.CancelScope, stop: _Stop) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for sig in signals:
            if not service.draining:
                logger.info("%s: draining (send it again to stop now)", signal.Signals(sig).name)
                service.drain()
            else:
                logger.warning("stopping now: running requests stay pending for another worker")
                stop.signum = int(sig)
                scope.cancel()
                return


# ----------------------------------------------------------------------------- heartbeat
async def _heartbeat(
    service: Service,
    engine: EngineClient,
    registry: NamedRegistry,
    stats: LatestStats,
    ns: argparse.Namespace,
) -> None:
    """Keep this worker's heartbeat record from the moment it reads the stream."""
    await service.ready.wait()
    cfg = service.cfg
    host, pid = heartbeat.this_host()
    base = heartbeat.WorkerInfo(
        consumer=cfg.consumer,
        host=host,
        pid=pid,
        version=heartbeat.package_version(),
        model=str(ns.model),
        adapters_served=sorted(registry.static),
        max_num_seqs=int(ns.max_num_seqs),
        started_ms=heartbeat.now_ms(),
    )

    def info() -> heartbeat.WorkerInfo:
        latest = stats.latest
        names = registry.names
        free = min(engine.free_capacity(), service.max_inflight - service.inflight)
        return _replace(
            base,
            adapters_resident=_named(latest.adapters_on_device if latest else [], names),
            adapters_host=_named(latest.adapters_in_host if latest else [], names),
            free_slots=0 if service.draining else max(0, free),
            inflight=service.inflight,
            draining=service.draining,
            routing=cfg.routing,
            shards=service.owned_shards() if service.router.affine else [],
        )

    await heartbeat.heartbeat_loop(
        service.redis, cfg.prefix, cfg.consumer, info, ns.heartbeat_interval
    )


def _replace(info: heartbeat.WorkerInfo, **changes: Any) -> heartbeat.WorkerInfo:
    import msgspec

    return msgspec.structs.replace(info, **changes)


def _named(ids: Sequence[int], names: dict[int, str]) -> list[str]:
    return [names.get(i, f"#{i}") for i in ids]


# ----------------------------------------------------------------------------- status
def add_status_args(parser: argparse.ArgumentParser) -> None:
    _add_redis_args(parser)
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of tables")  # fmt: skip


def collect_status(client: Any, prefix: str) -> dict[str, Any]:
    """What ``lorastream status`` shows, as data."""
    from broker import registry

    stream, group = f"{prefix}:requests", f"{prefix}:workers"
    workers = heartbeat.live_workers_sync(client, prefix)
    length = int(client.xlen(stream))
    try:
        groups: Any = client.xinfo_groups(stream)
    except redis.ResponseError:
        groups = []  # no stream yet
    found = next((g for g in groups if _text(g.get("name")) == group), None)
    queue: dict[str, Any] = {"stream": stream, "group": group, "length": length}
    if found is None:
        # No worker ever joined: every entry waits.
        queue |= {"group_exists": False, "lag": length, "pending": 0, "consumers": 0}
    else:
        lag = found.get("lag")
        queue |= {
            "group_exists": True,
            "lag": None if lag is None else int(lag),
            "pending": int(found.get("pending", 0)),
            "consumers": int(found.get("consumers", 0)),
        }
    dlq = f"{stream}:dlq"
    return {
        "prefix": prefix,
        "time_ms": heartbeat.now_ms(),
        "workers": [json.loads(_encode(w)) for w in workers],
        "queue": queue,
        "dead_letters": {"stream": dlq, "length": int(client.xlen(dlq))},
        "adapters": registry.list_all(client, registry_key(prefix)),
        "routing": _routing_status(client, prefix, workers),
        "residency": residency(workers),
    }


def _routing_status(
    client: Any, prefix: str, workers: list[heartbeat.WorkerInfo]
) -> dict[str, Any]:
    """The layout producers see, and per shard stream: its owner (rendezvous over the live
    affine workers, as they compute it), length, lag, pending entries and dead letters."""
    record = routing.decode_record(client.get(routing.routing_key(prefix)))
    if record is None or not record.num_shards:
        return {"routing": "single", "num_shards": 0, "shards": []}
    layout = routing.Layout(prefix, record.num_shards)
    live = [w.consumer for w in workers if not w.draining]
    if record.routing == "affine":
        owners = routing.owners(live, record.num_shards)
    else:
        owners = dict.fromkeys(range(record.num_shards), "any")
    shards = [layout.shard(i) for i in range(record.num_shards)]
    pipe = client.pipeline(transaction=False)
    for shard in shards:
        pipe.xlen(shard.stream)
        pipe.xinfo_groups(shard.stream)
        pipe.xlen(shard.dlq)
    replies = pipe.execute(raise_on_error=False)
    rows = []
    for i, shard in enumerate(shards):
        length, groups, dead = replies[3 * i : 3 * i + 3]
        found = None
        if not isinstance(groups, Exception):
            found = next((g for g in groups if _text(g.get("name")) == f"{prefix}:workers"), None)
        lag = length if found is None else found.get("lag")
        rows.append({
            "index": i, "stream": shard.stream, "owner": owners.get(i),
            "length": 0 if isinstance(length, Exception) else int(length),
            "lag": None if lag is None or isinstance(lag, Exception) else int(lag),
            "pending": 0 if found is None else int(found.get("pending", 0)),
            "dead_letters": 0 if isinstance(dead, Exception) else int(dead),
        })  # fmt: skip
    return {"routing": record.routing, "num_shards": record.num_shards, "shards": rows}


def residency(workers: list[heartbeat.WorkerInfo]) -> dict[str, dict[str, list[str]]]:
    """Adapter → the workers that hold it in device slots and in host memory."""
    out: dict[str, dict[str, list[str]]] = {}
    for w in workers:
        for tier, names in (("device", w.adapters_resident), ("host", w.adapters_host)):
            for name in names:
                out.setdefault(name, {"device": [], "host": []})[tier].append(w.consumer)
    return dict(sorted(out.items()))


def _encode(info: heartbeat.WorkerInfo) -> bytes:
    import msgspec

    return msgspec.json.encode(info)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def run_status(ns: argparse.Namespace) -> int:
    client = connect_sync(RedisSettings(_need_url(ns), ca_file=ns.redis_ca_file))
    try:
        status = collect_status(client, ns.prefix)
    finally:
        client.close()
    if ns.json:
        print(json.dumps(status, indent=2))
    else:
        print_status(status)
    return 0


def print_status(status: dict[str, Any]) -> None:
    """The status as tables. Names come from Redis (anyone may write there): they are shown
    as plain text, never as rich markup or terminal control codes."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)

    def say(line: str) -> None:
        console.print(Text(line))

    now = status["time_ms"]
    workers = Table(title=Text(f"live workers ({status['prefix']})"), title_justify="left")
    for column in ("worker", "model", "adapters", "free / max", "running", "last seen"):
        workers.add_column(column, overflow="fold")
    for w in status["workers"]:
        adapters = ", ".join(w["adapters_served"]) or "-"
        if w["adapters_resident"]:
            adapters += f" (on device: {', '.join(w['adapters_resident'])})"
        cells = (
            w["consumer"] + (" (draining)" if w["draining"] else ""),
            w["model"],
            adapters,
            f"{w['free_slots']} / {w['max_num_seqs']}",
            str(w["inflight"]),
            f"{max(0, now - w['last_seen_ms']) / 1000:.1f} s ago",
        )
        workers.add_row(*map(Text, cells))
    if status["workers"]:
        console.print(workers)
    else:
        say(f"live workers ({status['prefix']}): none")
    q = status["queue"]
    lag = "unknown" if q["lag"] is None else q["lag"]
    group = (
        f"group {q['group']}: {q['consumers']} consumer(s)"
        if q["group_exists"]
        else f"group {q['group']}: not created yet (no worker has started)"
    )
    say(f"queue {q['stream']}: {q['length']} entries, lag {lag}, pending {q['pending']} ({group})")
    d = status["dead_letters"]
    say(f"dead letters {d['stream']}: {d['length']}")
    _print_routing(console, say, status)
    if status["adapters"]:
        table = Table(title="registered adapters", title_justify="left")
        table.add_column("name")
        table.add_column("path", overflow="fold")
        for name, path in status["adapters"].items():
            table.add_row(Text(name), Text(path))
        console.print(table)
    else:
        say("registered adapters: none")


def _print_routing(console: Any, say: Callable[[str], None], status: dict[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    r = status["routing"]
    if r["num_shards"]:
        owned: dict[str, list[int]] = {}
        for row in r["shards"]:
            owned.setdefault(str(row["owner"]), []).append(row["index"])
        table = Table(
            title=Text(f"shards ({r['routing']}, {r['num_shards']})"), title_justify="left"
        )
        for column in ("owner", "shards", "entries", "lag", "pending", "dead letters"):
            table.add_column(column, overflow="fold")
        for owner, indices in sorted(owned.items()):
            rows = [row for row in r["shards"] if row["index"] in indices]
            table.add_row(
                Text(owner), Text(routing.ranges(indices)),
                *(Text(str(sum(row[k] or 0 for row in rows)))
                  for k in ("length", "lag", "pending", "dead_letters")),
            )  # fmt: skip
        console.print(table)
    else:
        say("routing: single (one stream)")
    if status["residency"]:
        table = Table(title="adapter residency", title_justify="left")
        for column in ("adapter", "on device", "in host memory"):
            table.add_column(column, overflow="fold")
        for name, where in status["residency"].items():
            table.add_row(Text(name), Text(", ".join(where["device"]) or "-"),
                          Text(", ".join(where["host"]) or "-"))  # fmt: skip
        console.print(table)


# ----------------------------------------------------------------------------- adapters
def add_adapters_args(parser: argparse.ArgumentParser) -> None:
    _add_redis_args(parser)
    fmt = HelpFormatter
    ops = parser.add_subparsers(dest="adapters_op", required=True, metavar="OP")
    add = ops.add_parser("add", help="register or re-point an adapter", formatter_class=fmt)
    add.add_argument("name", help="the adapter's name (what requests put in 'adapter')")
    add.add_argument(
        "path", help="adapter directory, relative to the workers' --lora-root or absolute inside it"
    )
    add.add_argument("--lora-root", default=None,
                     help="check the path as the workers will (default: not checked)")  # fmt: skip
    rm = ops.add_parser("rm", help="unregister an adapter", formatter_class=fmt)
    rm.add_argument("name", help="the adapter's name")
    ops.add_parser("ls", help="list registered adapters", formatter_class=fmt)


def run_adapters(ns: argparse.Namespace) -> int:
    from broker import registry
    from engine.errors import AdapterError

    client = connect_sync(RedisSettings(_need_url(ns), ca_file=ns.redis_ca_file))
    key = registry_key(ns.prefix)
    try:
        if ns.adapters_op == "add":
            registry.add(client, key, ns.name, ns.path, ns.lora_root)
            print(f"{ns.name} -> {ns.path}")
        elif ns.adapters_op == "rm":
            if not registry.remove(client, key, ns.name):
                print(f"lorastream adapters: {ns.name!r} is not registered", file=sys.stderr)
                return 1
        else:
            for name, path in registry.list_all(client, key).items():
                print(f"{name}\t{path}")
        return 0
    except AdapterError as e:
        print(f"lorastream adapters: {e.message}", file=sys.stderr)
        return 2
    finally:
        client.close()


# ----------------------------------------------------------------------------- demo
def add_demo_args(parser: argparse.ArgumentParser) -> None:
    from broker.demo import add_args

    add_args(parser)


def run_demo(ns: argparse.Namespace) -> int:
    from broker.demo import run

    return anyio.run(run, ns, backend="asyncio")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m broker.cli serve ...`` without the engine's CLI (for debugging)."""
    parser = argparse.ArgumentParser(prog="lorastream-broker", formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_serve_args(sub.add_parser("serve", formatter_class=HelpFormatter))
    add_adapters_args(sub.add_parser("adapters", formatter_class=HelpFormatter))
    ns = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_serve(ns) if ns.cmd == "serve" else run_adapters(ns)


if __name__ == "__main__":
    sys.exit(main())
