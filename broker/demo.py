"""``lorastream demo``: a real model, a private Redis, one worker, adapters side by side.

Everything a user would run by hand, in one process: the model (SmolLM2-135M-Instruct as
GGUF, fetched once into the cache, with the demo adapters that ship in
``broker/demo_adapters``; or, for tests, a tiny random model built once), a private
redis-server, the adapters put in the registry, a worker serving the request stream, and a
raw producer sending the same question to the base model and to every adapter, whose
replies stream in as they arrive.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
import time
import unicodedata
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from engine.model.cache import cache_dir

# The worker's modules (redis, the engine, torch) are imported by run(): `demo --help` needs none.

PREFIX = "lorastream-demo"
DEMO_ADAPTERS = Path(__file__).resolve().parent / "demo_adapters"
"""caps, french, json, pirate: PEFT adapters of SmolLM2-135M-Instruct
(``scripts/train_demo_adapters.py``)."""
QUESTION = "How can I stay healthy in winter?"
BASE = "base model"


def add_args(p: argparse.ArgumentParser) -> None:
    def arg(*flags: str, **kw: Any) -> None:
        if "default" in kw and kw.get("action") != "store_true":
            kw["help"] += " (default: %(default)s)"
        p.add_argument(*flags, **kw)

    arg(
        "--model",
        choices=["smollm2", "tiny"],
        default="smollm2",
        help="smollm2: SmolLM2-135M-Instruct (GGUF, fetched once) with the demo adapters; "
        "tiny: a random tiny model with random adapters (fast, prints noise; for tests)",
    )
    arg("--question", default=QUESTION, help="what every model is asked")
    arg("--adapters", type=int, default=4, help="how many adapters answer too (1-8; smollm2 has 4)")
    arg("--max-tokens", type=int, default=64, help="longest reply, in tokens")
    arg("--temperature", type=float, default=0.0, help="0: greedy")
    arg("--cache-dir", default=str(cache_dir()), help="where the model is kept ($LORASTREAM_CACHE)")
    arg("--redis-url", default=None, help="use this Redis instead of a private redis-server")
    arg("--device", default="auto", help="auto | cpu | cuda")
    arg("--plain", action="store_true", help="print events as lines instead of a live table")
    arg(
        "--print-serve-args",
        action="store_true",
        help="fetch the model, print the `lorastream serve` flags that serve it with the demo "
        "adapters, and exit",
    )


@dataclass
class _Reply:
    title: str
    request_id: str
    text: str = ""
    tokens: int = 0
    events: int = 0
    status: str = "waiting"
    started: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None


@dataclass
class _Model:
    path: Path
    adapters_root: Path
    adapters: list[str]
    chat: bool
    """Ask with ``messages`` (the chat template); the tiny model takes the plain prompt."""
    max_rank: int


def demo_model(ns: argparse.Namespace) -> _Model:
    if ns.model == "tiny":
        out = Path(ns.cache_dir).expanduser() / f"tiny-llama-{ns.adapters}"
        if not (out / ".complete").exists():
            from engine.testing.tiny import make_tiny_model

            print(f"building the tiny model and {ns.adapters} adapters in {out} (once)", flush=True)
            make_tiny_model(out, num_adapters=ns.adapters)
            (out / ".complete").write_text("")
        root = out / "adapters"
        chat = False
    else:
        from engine.model.smollm2 import smollm2_gguf

        out = smollm2_gguf(ns.cache_dir)
        root = DEMO_ADAPTERS
        chat = True
    names = sorted(p.name for p in root.iterdir() if (p / "adapter_config.json").is_file())
    names = names[: ns.adapters]
    ranks = [int(json.loads((root / n / "adapter_config.json").read_text())["r"]) for n in names]
    return _Model(out, root, names, chat, max(ranks))


async def run(ns: argparse.Namespace) -> int:
    if not 1 <= ns.adapters <= 8:
        print("lorastream demo: --adapters must be in 1..8", file=sys.stderr)
        return 2
    if not ns.plain:
        # Log lines would tear the live table: only warnings and errors while it runs.
        logging.getLogger("lorastream").setLevel(logging.WARNING)
    model = demo_model(ns)
    from broker import producer
    from broker.embedded import RedisServer
    from broker.metrics import BrokerMetrics
    from broker.redis_conn import RedisSettings, connect
    from broker.registry import AdapterRegistry, registry_key
    from broker.service import Service, ServiceConfig
    from engine.config import LORA_RANKS, EngineArgs

    max_rank = next(r for r in LORA_RANKS if r >= model.max_rank)
    if ns.print_serve_args:
        modules = " ".join(f"{n}={model.adapters_root / n}" for n in model.adapters)
        print(
            f"--model {model.path} --enable-lora --max-loras {len(model.adapters)} "
            f"--max-lora-rank {max_rank} --lora-modules {modules}"
        )
        return 0
    embedded = None
    url = ns.redis_url
    if not url:
        embedded = RedisServer().start()
        url = embedded.url
    print(f"redis: {url}{' (private redis-server)' if embedded else ''}", flush=True)

    from engine.async_engine import AsyncLLMEngine

    args = EngineArgs(
        model=str(model.path),
        device=ns.device,
        enable_lora=True,
        max_loras=len(model.adapters),
        max_lora_rank=max_rank,
        max_num_seqs=len(model.adapters) + 1,
        # SmolLM2 reads 8,192 tokens; the demo needs far fewer, and a smaller KV cache.
        max_model_len=2048 if model.chat else None,
        disable_log_stats=True,
    )
    print(f"model: {model.path}", flush=True)
    metrics = BrokerMetrics()
    engine = AsyncLLMEngine.from_engine_args(args, stat_loggers=[metrics])
    client = connect(RedisSettings(url))
    cfg = ServiceConfig(prefix=PREFIX, consumer=f"demo-{uuid.uuid4().hex[:6]}", drain_timeout_s=10)
    registry = AdapterRegistry(key=registry_key(PREFIX), lora_root=model.adapters_root)
    try:
        await client.hset(registry_key(PREFIX), mapping={n: n for n in model.adapters})
        service = Service(engine, client, cfg, registry=registry, metrics=metrics)
        replies = [_Reply(BASE, f"demo-base-{uuid.uuid4().hex[:8]}")]
        replies += [_Reply(n, f"demo-{n}-{uuid.uuid4().hex[:8]}") for n in model.adapters]
        ask = (
            {"messages": [{"role": "user", "content": ns.question}]}
            if model.chat
            else {"prompt": ns.question}
        )
        print(f"question: {ns.question}", flush=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(service.run)
            with anyio.fail_after(60):
                await service.ready.wait()
            async with anyio.create_task_group() as streams:
                for reply in replies:
                    await streams.start(_follow, client, reply, ns.plain)
                    await producer.submit(
                        client, PREFIX,
                        {"id": reply.request_id, **ask,
                         "adapter": None if reply.title == BASE else reply.title,
                         "params": {"max_tokens": ns.max_tokens, "temperature": ns.temperature, "seed": 0}},
                    )  # fmt: skip
                if not ns.plain:
                    streams.start_soon(_live_table, replies, ns.question)
            service.drain()
        if ns.plain:
            _summary(replies)
        return 0 if all(r.status in ("stop", "length") for r in replies) else 1
    finally:
        await client.aclose()
        await engine.shutdown()
        if embedded is not None:
            embedded.close()


def printable(text: str) -> str:
    """``text`` with control characters other than newline shown as escapes (a model may
    emit any byte; a NUL or an escape sequence would garble the terminal)."""
    return "".join(
        c if c == "\n" or unicodedata.category(c) != "Cc" else f"\\x{ord(c):02x}" for c in text
    )


async def _follow(
    client: Any,
    reply: _Reply,
    plain: bool,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    from broker import producer
    from broker.protocol import ErrorEvent

    # events() subscribes, then replays the result stream: starting after the submit loses nothing.
    stream = producer.events(client, PREFIX, reply.request_id, timeout_s=300)
    task_status.started()
    reply.status = "running"
    async for event in stream:
        reply.events += 1
        reply.tokens += len(event.token_ids)
        reply.text += event.text
        if event.token_ids and reply.first_token_s is None:
            reply.first_token_s = time.monotonic() - reply.started
        if isinstance(event, ErrorEvent):
            reply.status = f"error: {event.code}"
        elif event.finished:
            reply.status = event.finish_reason or "done"
        if plain and event.text:
            print(f"{reply.title:>10} | {printable(event.text).replace(chr(10), ' ')}", flush=True)


async def _live_table(replies: list[_Reply], question: str) -> None:
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table
    from rich.text import Text

    def render() -> Table:
        table = Table(title=question, expand=True, show_lines=True)
        table.add_column("model", no_wrap=True)
        table.add_column("reply", ratio=1, overflow="fold")
        table.add_column("", no_wrap=True)
        for r in replies:
            table.add_row(r.title, Text(printable(r.text)), _stats(r).replace(", ", "\n"))
        return table

    with Live(render(), console=Console(), refresh_per_second=12) as live:
        while any(r.status in ("waiting", "running") for r in replies):
            live.update(render())
            await anyio.sleep(0.08)
        live.update(render())


def _stats(r: _Reply) -> str:
    ttft = f", first token {r.first_token_s * 1000:.0f} ms" if r.first_token_s else ""
    return f"{r.status}, {r.tokens} tokens{ttft}"


def _summary(replies: list[_Reply]) -> None:
    print()
    for r in replies:
        print(f"== {r.title} ({_stats(r)}) ==")
        for line in printable(r.text).strip().splitlines() or [""]:
            wrapped = textwrap.fill(line, 100, break_long_words=False, break_on_hyphens=False)
            print(wrapped if line else "")
