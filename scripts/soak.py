#!/usr/bin/env python3
"""Soak: minutes of mixed good and hostile traffic while workers are SIGKILLed and
SIGSTOPped and Redis restarts. Prints what RELIABILITY.md promises: nothing lost, nothing
finished twice, good outputs unchanged, and the workers' memory.

    python scripts/soak.py --minutes 5 --workers 2           # real workers, tiny model, CPU

Workers are ``lorastream serve`` processes on the tiny random model; Redis runs with AOF
(``appendfsync always``), the configuration under which a Redis restart loses nothing.
Hostile entries come from the property tests' generator (tests/broker/hostile.py).
Exit status 1 if anything was lost or finished twice, or a good output changed.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgpack
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' generator; this script is run from a checkout

from broker.embedded import RedisServer  # noqa: E402
from broker.protocol import decode_event  # noqa: E402
from broker.routing import Layout, Shard  # noqa: E402
from tests.broker.hostile import Entry, Tracker, good_request, hostile_entries  # noqa: E402

PREFIX = "soak"
GOOD = [("Once upon a time", None), ("The cat sat", "lora0"), ("Hello there", "lora1")]


@dataclass
class Worker:
    name: str
    cmd: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    peak_rss_kib: int = 0
    kills: int = 0
    stops: int = 0

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

    def sample_rss(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_rss_kib = max(self.peak_rss_kib, int(line.split()[1]))
        except OSError:
            pass


@dataclass
class Soak:
    redis: RedisServer
    workers: list[Worker]
    tracker: Tracker = field(default_factory=lambda: Tracker(PREFIX))
    goods: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    """Entry id -> (prompt, adapter) of the good requests."""
    layout: Layout = field(default_factory=lambda: Layout(PREFIX))
    """Where producers send: the one stream, or the shard streams of ``--routing affine``."""
    rejected_xadds: int = 0
    redis_restarts: int = 0


def worker_cmd(model: Path, url: str, name: str, ns: argparse.Namespace) -> list[str]:
    adapters = model / "adapters"
    routing = []
    if ns.routing == "affine":
        # A dead worker's record must expire (3 intervals) before its entries go idle.
        interval = min(2.0, ns.claim_idle_ms / 1000 / 4)
        routing = ["--routing", "affine", "--num-shards", str(ns.num_shards),
                   "--heartbeat-interval", str(interval)]  # fmt: skip
    return [
        sys.executable, "-m", "engine.cli", "serve",
        "--model", str(model), "--device", "cpu", "--enable-lora", "--max-lora-rank", "32",
        "--max-loras", "2", "--max-num-seqs", "32", "--disable-log-stats",
        "--lora-modules", f"lora0={adapters / 'lora0'}", f"lora1={adapters / 'lora1'}",
        "--redis-url", url, "--prefix", PREFIX, "--consumer-name", name,
        "--claim-idle-ms", str(ns.claim_idle_ms), "--block-ms", "200", *routing,
    ]  # fmt: skip


async def produce(soak: Soak, client: aioredis.Redis, until: float, hostile_share: float) -> None:
    rng = random.Random(0)
    while time.monotonic() < until:
        batch: list[tuple[Entry, tuple[str, str | None] | None, Shard]] = []
        for _ in range(20):
            if rng.random() < hostile_share:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    entry = hostile_entries(f"bad-{uuid.uuid4().hex}").example()
                # Hostile producers pick any stream; affine workers serve the single one too.
                batch.append((entry, None, rng.choice(soak.layout.shards)))
            else:
                prompt, adapter = rng.choice(GOOD)
                wire = good_request(f"good-{uuid.uuid4().hex}", prompt, adapter)
                entry = Entry({b"data": msgpack.packb(wire, use_bin_type=True)}, wire["id"])
                shard = soak.layout.shard_for(adapter, wire["id"])
                batch.append((entry, (prompt, adapter), shard))
        for entry, good, shard in batch:
            try:
                eid = (await client.xadd(shard.stream, entry.fields)).decode()
            except Exception:
                soak.rejected_xadds += 1  # Redis restarting: not accepted, not counted
                await anyio.sleep(0.05)
                continue
            key = soak.tracker.sent(eid, entry, shard.prefix)
            if good is not None:
                soak.goods[key] = good
        await anyio.sleep(0.05)


async def chaos(soak: Soak, until: float, claim_idle_s: float, every_s: float) -> None:
    rng = random.Random(1)
    while time.monotonic() < until:
        await anyio.sleep(every_s)
        action = rng.choice(["kill", "stop", "redis"])
        w = rng.choice(soak.workers)
        if action == "kill" and w.proc is not None:
            w.sample_rss()
            w.proc.send_signal(signal.SIGKILL)
            w.proc.wait()
            w.kills += 1
            w.start()
        elif action == "stop" and w.proc is not None:
            w.proc.send_signal(signal.SIGSTOP)
            w.stops += 1
            await anyio.sleep(claim_idle_s * rng.uniform(1.5, 3))  # past the claim time
            w.proc.send_signal(signal.SIGCONT)
        elif action == "redis":
            soak.redis.restart()
            soak.redis_restarts += 1


async def watch_rss(soak: Soak, until: float) -> None:
    while time.monotonic() < until:
        for w in soak.workers:
            w.sample_rss()
            if w.proc is not None and w.proc.poll() is not None:
                print(f"worker {w.name} exited by itself ({w.proc.returncode}): see {w.log}")
                w.start()
        await anyio.sleep(0.5)


async def drained(client: aioredis.Redis, layout: Layout) -> bool:
    """Every entry of every stream delivered and acked. (Not the group's ``lag``: Redis
    cannot always compute it after a restart from the AOF, and then reports a stale count.)"""
    for shard in layout.shards:
        try:
            if not await client.exists(shard.stream):
                continue  # nothing was ever sent there
            groups = await client.xinfo_groups(shard.stream)
            stream = await client.xinfo_stream(shard.stream)
        except Exception:
            return False
        if not (
            groups
            and groups[0]["last-delivered-id"] == stream["last-generated-id"]
            and groups[0]["pending"] == 0
        ):
            return False
    return True


async def reference(soak: Soak, client: aioredis.Redis) -> dict[tuple[str, str | None], list[int]]:
    """Each good request alone, before any hostile entry or fault."""
    ref = {}
    for prompt, adapter in GOOD:
        wire = good_request(f"ref-{uuid.uuid4().hex}", prompt, adapter)
        await client.xadd(f"{PREFIX}:requests", {"data": msgpack.packb(wire, use_bin_type=True)})
        with anyio.fail_after(300):
            while not await drained(client, soak.layout):
                await anyio.sleep(0.1)
        events = [
            decode_event(f[b"data"]) for _, f in await client.xrange(f"{PREFIX}:out:{wire['id']}")
        ]
        ref[(prompt, adapter)] = [t for e in events for t in e.token_ids]
    return ref


async def main(ns: argparse.Namespace) -> int:
    from engine.testing.tiny import make_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="lorastream-soak-"))
    model = make_tiny_model(tmp / "model", num_adapters=2, arch="llama", seed=0)
    (tmp / "redis").mkdir()
    with RedisServer(data_dir=tmp / "redis", appendonly=True) as server:
        workers = [
            Worker(f"w{i}", worker_cmd(model, server.url, f"w{i}", ns), tmp / f"w{i}.log")
            for i in range(ns.workers)
        ]
        layout = Layout(PREFIX, ns.num_shards, shared=True) if ns.routing == "affine" else None
        soak = Soak(server, workers, layout=layout or Layout(PREFIX))
        for w in workers:
            w.start()
        client = aioredis.Redis.from_url(server.url, socket_timeout=10)
        try:
            ref = await reference(soak, client)
            print(f"reference outputs taken; soaking for {ns.minutes} min", flush=True)
            start = time.monotonic()
            until = start + ns.minutes * 60
            async with anyio.create_task_group() as tg:
                tg.start_soon(produce, soak, client, until, ns.hostile_share)
                tg.start_soon(chaos, soak, until, ns.claim_idle_ms / 1000, ns.chaos_every)
                tg.start_soon(watch_rss, soak, until + 600)
                await anyio.sleep(ns.minutes * 60)
                with anyio.fail_after(600):
                    while not await drained(client, soak.layout):
                        await anyio.sleep(0.5)
                tg.cancel_scope.cancel()
            elapsed = time.monotonic() - start
            counts = await soak.tracker.check(client)
            changed = 0
            for entry_key, key in soak.goods.items():
                out = soak.tracker.out_key(entry_key)
                assert out is not None
                events = [decode_event(f[b"data"]) for _, f in await client.xrange(out)]
                tokens: list[int] = []
                for e in events:
                    if getattr(e, "restart", False):
                        tokens = []
                    tokens += e.token_ids
                if tokens != ref[key]:
                    changed += 1
        finally:
            await client.aclose()
            for w in workers:
                if w.proc is not None:
                    w.sample_rss()
                    w.proc.kill()
                    w.proc.wait()
    summary: dict[str, Any] = {
        "routing": ns.routing if ns.routing == "single" else f"affine, {ns.num_shards} shards",
        "minutes": round(elapsed / 60, 2),
        "accepted": counts["entries"],
        "good": len(soak.goods),
        "hostile": counts["entries"] - len(soak.goods),
        "completed": counts["finished"],
        "dead_lettered": counts["dead_lettered"],
        "lost": counts["lost"],
        "duplicate_finals": counts["duplicates"],
        "good_outputs_changed": changed,
        "worker_kills": sum(w.kills for w in workers),
        "worker_stops": sum(w.stops for w in workers),
        "redis_restarts": soak.redis_restarts,
        "xadds_refused_while_redis_restarted": soak.rejected_xadds,
        "peak_rss_mib": {w.name: round(w.peak_rss_kib / 1024, 1) for w in workers},
    }
    print(json.dumps(summary, indent=2))
    ok = counts["lost"] == 0 and counts["duplicates"] == 0 and changed == 0
    return 0 if ok else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--minutes", type=float, default=5.0, help="traffic duration (default 5)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument(
        "--hostile-share", type=float, default=0.5, help="fraction of hostile entries (default 0.5)"
    )
    p.add_argument(
        "--claim-idle-ms", type=int, default=2000, help="workers' --claim-idle-ms (default 2000)"
    )
    p.add_argument(
        "--chaos-every", type=float, default=8.0, help="seconds between faults (default 8)"
    )
    p.add_argument(
        "--routing",
        choices=["single", "affine"],
        default="single",
        help="workers' --routing; affine: producers send each request to its adapter's shard "
        "stream, hostile entries to any stream (default single)",
    )
    p.add_argument(
        "--num-shards", type=int, default=8, help="shard streams with --routing affine (default 8)"
    )
    sys.exit(anyio.run(main, p.parse_args()))
