"""``lorastream serve | adapters | demo`` (registered in engine/cli.py)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

import anyio

from broker.embedded import RedisServer
from broker.metrics import BrokerMetrics
from broker.redis_conn import RedisSettings, connect, connect_sync
from broker.registry import AdapterRegistry, registry_key
from broker.service import EngineClient, Service, ServiceConfig

logger = logging.getLogger("lorastream.broker")

# (parsed args, stat loggers) → engine; tests pass a fake.
EngineFactory = Callable[[argparse.Namespace, list[Any]], EngineClient]

_URL_ENV = "LORASTREAM_REDIS_URL"


def _add_redis_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("redis")
    g.add_argument(
        "--redis-url",
        default=os.environ.get(_URL_ENV),
        help="redis://[user:password@]host:port/db, rediss://... (TLS) or unix:///path.sock "
        f"(default ${_URL_ENV}; serve without one starts a private redis-server). Prefer the "
        "environment variable for URLs with a password: argv is visible to other users",
    )
    g.add_argument("--redis-ca-file", default=None, help="CA bundle for rediss:// URLs")
    g.add_argument("--prefix", default="lorastream", help="key prefix of every stream and channel")


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    from engine.config import EngineArgs

    EngineArgs.add_cli_args(parser)
    parser.add_argument("--enable-multiprocessing", action="store_true",
                        help="run the engine core (scheduler, model, adapters) in its own process")  # fmt: skip
    add_service_args(parser)


def add_service_args(parser: argparse.ArgumentParser) -> None:
    """The flags of the service alone (the test worker pairs them with a fake engine)."""
    _add_redis_args(parser)
    d = ServiceConfig(consumer="_")
    g = parser.add_argument_group("service")
    g.add_argument(
        "--consumer-name", default=None, help="stable consumer name (default host:device)"
    )
    g.add_argument("--block-ms", type=int, default=d.block_ms, help="XREADGROUP BLOCK")
    g.add_argument("--claim-idle-ms", type=int, default=d.claim_idle_ms,
                   help="take over other workers' entries idle this long (XAUTOCLAIM)")  # fmt: skip
    g.add_argument("--max-deliveries", type=int, default=d.max_deliveries,
                   help="deliveries before an entry goes to the dead-letter stream")  # fmt: skip
    g.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s,
                   help="seconds to finish running requests on SIGTERM")  # fmt: skip
    g.add_argument("--result-ttl", type=int, default=d.result_ttl_s,
                   help="seconds a result stream lives after its last event; 0 disables them")  # fmt: skip
    g.add_argument(
        "--result-maxlen", type=int, default=d.result_maxlen, help="events kept per result stream"
    )
    g.add_argument("--max-payload-bytes", type=int, default=d.max_payload_bytes)
    g.add_argument(
        "--max-inflight",
        type=int,
        default=None,
        help="requests held at once (default max-num-seqs)",
    )
    g.add_argument("--lora-root", default=None,
                   help="registry adapter paths must resolve inside this directory")  # fmt: skip
    g.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port"
    )
    g.add_argument("--metrics-addr", default="0.0.0.0")
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


async def serve(ns: argparse.Namespace, engine_factory: EngineFactory | None = None) -> int:
    """Run one worker until SIGTERM/SIGINT (a second signal stops at once)."""
    cfg = service_config(ns)
    embedded: RedisServer | None = None
    url = ns.redis_url
    if not url:
        embedded = RedisServer(unix_socket=ns.embedded_unix_socket).start()
        url = embedded.url
        print(f"lorastream: started a private redis-server at {url}", flush=True)
    settings = RedisSettings(url, ca_file=ns.redis_ca_file, block_ms=cfg.block_ms)
    metrics = BrokerMetrics()
    if ns.metrics_port is not None:
        port = metrics.serve(ns.metrics_port, ns.metrics_addr)
        logger.info("metrics on http://%s:%d/metrics", ns.metrics_addr, port)
    engine = (engine_factory or _real_engine)(ns, [metrics])
    registry = AdapterRegistry(
        _lora_modules(ns), key=registry_key(cfg.prefix), lora_root=ns.lora_root
    )
    client = connect(settings)
    logger.info(
        "serving %s:requests from %s as consumer %r",
        cfg.prefix,
        settings.redacted_url,
        cfg.consumer,
    )
    try:
        service = Service(engine, client, cfg, registry=registry, metrics=metrics)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_on_signals, service, tg.cancel_scope)
            rc = await service.run()
            tg.cancel_scope.cancel()
        return rc
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()
        shutdown = getattr(engine, "shutdown", None)
        if shutdown is not None:
            await shutdown()
        if embedded is not None:
            embedded.close()


def _lora_modules(ns: argparse.Namespace) -> list[tuple[str, str]]:
    """(name, path) of --lora-modules in order, as EngineArgs parses them (the engine preloads
    them as adapter ids 1..N and the registry must hand out the same ids)."""
    out = []
    for spec in getattr(ns, "lora_modules", None) or []:
        name, _, path = str(spec).partition("=")
        out.append((name.strip(), path.strip()))
    return out


async def _on_signals(service: Service, scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for sig in signals:
            if not service.draining:
                logger.info("%s: draining (send it again to stop now)", signal.Signals(sig).name)
                service.drain()
            else:
                logger.warning("stopping now: running requests stay pending for another worker")
                scope.cancel()
                return


# ----------------------------------------------------------------------------- adapters
def add_adapters_args(parser: argparse.ArgumentParser) -> None:
    _add_redis_args(parser)
    ops = parser.add_subparsers(dest="adapters_op", required=True)
    add = ops.add_parser("add", help="register or re-point an adapter")
    add.add_argument("name")
    add.add_argument(
        "path", help="adapter directory, relative to the workers' --lora-root or absolute inside it"
    )
    add.add_argument("--lora-root", default=None, help="check the path as the workers will")
    rm = ops.add_parser("rm", help="unregister an adapter")
    rm.add_argument("name")
    ops.add_parser("ls", help="list registered adapters")


def run_adapters(ns: argparse.Namespace) -> int:
    from broker import registry
    from engine.errors import AdapterError

    if not ns.redis_url:
        print(f"lorastream adapters: --redis-url (or ${_URL_ENV}) is required", file=sys.stderr)
        return 2
    client = connect_sync(RedisSettings(ns.redis_url, ca_file=ns.redis_ca_file))
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
    parser = argparse.ArgumentParser(prog="lorastream-broker")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_serve_args(sub.add_parser("serve"))
    add_adapters_args(sub.add_parser("adapters"))
    ns = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_serve(ns) if ns.cmd == "serve" else run_adapters(ns)


if __name__ == "__main__":
    sys.exit(main())
