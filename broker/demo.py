"""``lorastream demo``: tiny model, private Redis, one worker, several adapters side by side.

Everything a user would run by hand, in one process: the tiny checkpoint and its adapters
are built once and cached, a private redis-server is started, the adapters are put in the
registry, a worker serves the request stream, and a raw producer sends one request per
adapter (and one without) whose event streams are shown as they arrive.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from broker import producer
from broker.embedded import RedisServer
from broker.metrics import BrokerMetrics
from broker.protocol import ErrorEvent
from broker.redis_conn import RedisSettings, connect
from broker.registry import AdapterRegistry, registry_key
from broker.service import Service, ServiceConfig

PREFIX = "lorastream-demo"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapters", type=int, default=3, help="adapters to stream at once (1-8)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--cache-dir",
        default=os.environ.get("LORASTREAM_CACHE", str(Path("~/.cache/lorastream").expanduser())),
        help="where the tiny model is built once",
    )
    p.add_argument("--redis-url", default=None, help="use this Redis instead of a private one")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--plain", action="store_true", help="print events as lines instead of a live table"
    )


@dataclass
class _Column:
    title: str
    request_id: str
    text: str = ""
    tokens: int = 0
    events: int = 0
    status: str = "waiting"
    started: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None


def tiny_model(cache_dir: str | Path, num_adapters: int) -> Path:
    """The tiny checkpoint with ``num_adapters`` adapters, built on first use."""
    out = Path(cache_dir).expanduser() / f"tiny-llama-{num_adapters}"
    if not (out / ".complete").exists():
        from engine.model.tiny import make_tiny_model

        print(f"building the tiny model and {num_adapters} adapters in {out} (once)", flush=True)
        make_tiny_model(out, num_adapters=num_adapters)
        (out / ".complete").write_text("")
    return out


async def run(ns: argparse.Namespace) -> int:
    if not 1 <= ns.adapters <= 8:
        print("lorastream demo: --adapters must be in 1..8", file=sys.stderr)
        return 2
    if not ns.plain:
        # Log lines would tear the live table: only warnings and errors while it runs.
        logging.getLogger("lorastream").setLevel(logging.WARNING)
    model_dir = tiny_model(ns.cache_dir, ns.adapters)
    adapters_root = model_dir / "adapters"
    names = sorted(p.name for p in adapters_root.iterdir() if p.is_dir())[: ns.adapters]
    embedded = None
    url = ns.redis_url
    if not url:
        embedded = RedisServer().start()
        url = embedded.url
    print(f"redis: {url}{' (private redis-server)' if embedded else ''}", flush=True)

    from engine.async_engine import AsyncLLMEngine
    from engine.config import EngineArgs

    args = EngineArgs(
        model=str(model_dir),
        device=ns.device,
        enable_lora=True,
        max_loras=len(names),
        max_lora_rank=32,
        max_num_seqs=16,
        disable_log_stats=True,
    )
    metrics = BrokerMetrics()
    engine = AsyncLLMEngine.from_engine_args(args, stat_loggers=[metrics])
    client = connect(RedisSettings(url))
    cfg = ServiceConfig(prefix=PREFIX, consumer=f"demo-{uuid.uuid4().hex[:6]}", drain_timeout_s=10)
    registry = AdapterRegistry(key=registry_key(PREFIX), lora_root=adapters_root)
    try:
        await client.hset(registry_key(PREFIX), mapping={n: n for n in names})
        service = Service(engine, client, cfg, registry=registry, metrics=metrics)
        columns = [_Column("base model", f"demo-base-{uuid.uuid4().hex[:8]}")]
        columns += [_Column(n, f"demo-{n}-{uuid.uuid4().hex[:8]}") for n in names]
        async with anyio.create_task_group() as tg:
            tg.start_soon(service.run)
            with anyio.fail_after(30):
                await service.ready.wait()
            async with anyio.create_task_group() as streams:
                for col in columns:
                    await streams.start(_follow, client, col, ns.plain)
                    adapter = None if col.title == "base model" else col.title
                    await producer.submit(
                        client, PREFIX,
                        {"id": col.request_id, "prompt": ns.prompt, "adapter": adapter,
                         "params": {"max_tokens": ns.max_tokens, "temperature": ns.temperature, "seed": 0}},
                    )  # fmt: skip
                if not ns.plain:
                    streams.start_soon(_live_table, columns, ns.prompt)
            service.drain()
        _summary(columns)
        return 0 if all(c.status in ("stop", "length") for c in columns) else 1
    finally:
        await client.aclose()
        await engine.shutdown()
        if embedded is not None:
            embedded.close()


async def _follow(
    client: Any,
    col: _Column,
    plain: bool,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    # events() subscribes, then replays the result stream: starting after the submit loses nothing.
    stream = producer.events(client, PREFIX, col.request_id, timeout_s=120)
    task_status.started()
    col.status = "running"
    async for event in stream:
        col.events += 1
        col.tokens += len(event.token_ids)
        col.text += event.text
        if event.token_ids and col.first_token_s is None:
            col.first_token_s = time.monotonic() - col.started
        if isinstance(event, ErrorEvent):
            col.status = f"error: {event.code}"
        elif event.finished:
            col.status = event.finish_reason or "done"
        if plain:
            print(f"[{col.title:>10}] seq={event.seq:<3} {event.text!r}", flush=True)


async def _live_table(columns: list[_Column], prompt: str) -> None:
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    def render() -> Table:
        table = Table(title=f"prompt: {prompt!r}", expand=True, show_lines=True)
        for col in columns:
            table.add_column(col.title, ratio=1, overflow="fold")
        table.add_row(*(c.text for c in columns))
        table.add_row(*(
            f"{c.status} · {c.tokens} tok · {c.events} ev"
            + (f" · ttft {c.first_token_s * 1000:.0f} ms" if c.first_token_s else "")
            for c in columns
        ))  # fmt: skip
        return table

    with Live(render(), console=Console(), refresh_per_second=20) as live:
        while not all(c.status not in ("waiting", "running") for c in columns):
            live.update(render())
            await anyio.sleep(0.05)
        live.update(render())


def _summary(columns: list[_Column]) -> None:
    print()
    for c in columns:
        print(f"{c.title:>10}: {c.status}, {c.tokens} tokens in {c.events} events")
