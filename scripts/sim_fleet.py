#!/usr/bin/env python3
"""Extrapolate the fleet benchmark to a large fleet: adapter loads and Redis load.

Inputs are what ``scripts/bench_fleet.py`` measured (its ``bench_fleet.json``): seconds per
adapter load, Redis calls and Redis CPU microseconds per request (INFO commandstats, both
routings). The simulation then

1. replays an S-LoRA workload (power law ``--alpha`` over ``--adapters``) through
   ``--workers`` LRU host caches of ``--max-cpu-loras`` adapters, requests spread at random
   (one consumer group) or by shard owner (affine: the same CRC-32 shards and rendezvous
   owners as ``broker/routing.py``), and counts loads per 1,000 requests;
2. turns them into worker time spent loading, at ``--rate-per-worker`` requests/s;
3. adds up Redis work: per request (measured), plus what each worker does while idle or
   busy regardless of traffic (heartbeat, owner refresh, keepalive, XAUTOCLAIM, steal
   probes, cluster polling), per shard and per master, and names the first thing to
   saturate one Redis core.

    python scripts/sim_fleet.py --bench bench-fleet-out/bench_fleet.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from broker import routing  # noqa: E402
from broker.intake import STEAL_PROBES  # noqa: E402
from engine.cli import HelpFormatter  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--bench", required=True, help="bench_fleet.json of scripts/bench_fleet.py")
    p.add_argument("--workers", type=int, default=100, help="workers in the fleet")
    p.add_argument("--adapters", type=int, default=10_000, help="adapters")
    p.add_argument("--alpha", type=float, default=1.0, help="popularity power-law exponent")
    p.add_argument("--max-cpu-loras", type=int, default=4, help="host cache per worker")
    p.add_argument("--num-shards", type=int, default=1024, help="shard streams")
    p.add_argument("--masters", default="3,6,12", help="Redis Cluster masters to report")
    p.add_argument("--rate-per-worker", type=float, default=None,
                   help="requests/s per worker (default: the benchmark's)")  # fmt: skip
    p.add_argument("--requests", type=int, default=200_000, help="simulated requests")
    p.add_argument("--heartbeat-interval", type=float, default=2.0, help="seconds")
    p.add_argument("--claim-idle-ms", type=int, default=30_000, help="--claim-idle-ms")
    p.add_argument("--steal-after-ms", type=int, default=500, help="--steal-after-ms")
    p.add_argument("--cluster-poll-ms", type=int, default=20, help="--cluster-poll-ms")
    p.add_argument("--background-call-us", type=float, default=5.0,
                   help="Redis CPU per background call (assumed: small commands and "
                   "scripts that find nothing)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed")
    return p.parse_args(argv)


def loads_per_1k(ns: argparse.Namespace, affine: bool) -> float:
    rng = random.Random(ns.seed)
    names = [f"lora{i}" for i in range(ns.adapters)]
    weights = [(i + 1) ** -ns.alpha for i in range(ns.adapters)]
    consumers = [f"w{i}" for i in range(ns.workers)]
    owner = routing.owners(consumers, ns.num_shards)
    index = {c: i for i, c in enumerate(consumers)}
    caches: list[OrderedDict[int, None]] = [OrderedDict() for _ in consumers]
    loads = 0
    picks = rng.choices(range(ns.adapters), weights, k=ns.requests)
    for a in picks:
        if affine:
            w = index[owner[routing.shard_index(names[a], "", ns.num_shards)]]
        else:
            w = rng.randrange(ns.workers)
        cache = caches[w]
        if a in cache:
            cache.move_to_end(a)
        else:
            loads += 1
            cache[a] = None
            if len(cache) > ns.max_cpu_loras:
                cache.popitem(last=False)
    return 1000 * loads / ns.requests


def hottest_shard_share(ns: argparse.Namespace) -> float:
    weights = [(i + 1) ** -ns.alpha for i in range(ns.adapters)]
    total = sum(weights)
    per_shard = [0.0] * ns.num_shards
    for i, w in enumerate(weights):
        per_shard[routing.shard_index(f"lora{i}", "", ns.num_shards)] += w / total
    return max(per_shard)


INNER = frozenset({"xpending", "xrevrange", "expire", "publish", "spublish", "xack", "xclaim"})
"""Commands the fenced scripts run inside them: INFO commandstats counts them on their own
and again inside the script's time, so they are left out (XADD: all but the producer's)."""


def top_level(by_command: dict[str, dict[str, float]]) -> tuple[float, float]:
    """(Redis CPU microseconds, calls) per request, each command counted once."""
    usec = calls = 0.0
    for cmd, v in by_command.items():
        if cmd in INNER:
            continue
        if cmd == "xadd":  # the producer's one; the rest are result-stream writes in scripts
            per_call = v["usec_per_request"] / max(v["calls_per_request"], 1e-9)
            usec, calls = usec + per_call, calls + 1
            continue
        usec, calls = usec + v["usec_per_request"], calls + v["calls_per_request"]
    return usec, calls


def background_calls(ns: argparse.Namespace, cluster: bool) -> dict[str, float]:
    """Redis calls per second of the whole fleet that do not depend on traffic (each is
    one command or one script call), with every worker idle: the worst case of probes."""
    w, s = ns.workers, ns.num_shards
    out = {
        "heartbeat (MULTI SET+ZADD)": w * 2 / ns.heartbeat_interval,
        "owner refresh (ZRANGE+MGET, SET routing)": w * 3 / ns.heartbeat_interval,
        "XAUTOCLAIM every shard": w * s / (ns.claim_idle_ms / 2000),
        "steal probes (idle)": w * 2 * STEAL_PROBES / (ns.steal_after_ms / 2000),
    }
    if cluster:
        out["idle polling of own shards"] = s / (ns.cluster_poll_ms / 1000)
    return out


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    bench = json.loads(Path(ns.bench).read_text())
    rows = {r["routing"]: r for r in bench["rows"]}
    measured = rows.get("affine") or next(iter(rows.values()))
    args = bench["args"]
    rate_w = ns.rate_per_worker or measured["requests_per_s"] / args["workers"]
    loads_total = sum(r["adapter_loads"] for r in rows.values())
    load_s = sum(sum(r["adapter_load_s"]) for r in rows.values()) / max(loads_total, 1)
    usec_req, calls_req = top_level(measured["redis"]["by_command"])

    print(f"measured ({args['workers']} workers, {args['adapters']} adapters, CPU tiny model): "
          f"{load_s * 1000:.1f} ms per adapter load, {calls_req:.1f} Redis calls and "
          f"{usec_req:.0f} us of Redis CPU per request ({measured['routing']})\n")  # fmt: skip
    print(f"fleet: {ns.workers} workers, {ns.adapters} adapters (alpha {ns.alpha}), "
          f"{ns.max_cpu_loras} adapters in host memory each, {ns.num_shards} shards, "
          f"{rate_w:.2f} requests/s per worker\n")  # fmt: skip
    print("| routing | adapter loads / 1k req | worker time loading |")
    print("| --- | --- | --- |")
    sim: dict[str, Any] = {}
    for name, affine in (("single", False), ("affine", True)):
        per_1k = loads_per_1k(ns, affine)
        busy = rate_w * per_1k / 1000 * load_s
        sim[name] = {"loads_per_1k": per_1k, "loading_fraction": busy}
        print(f"| {name} | {per_1k:.0f} | {busy * 100:.1f} % |")
    fleet_rate = rate_w * ns.workers
    hot = hottest_shard_share(ns)
    print(f"\nfleet: {fleet_rate:.0f} requests/s; the hottest shard takes {hot * 100:.1f} % "
          f"of them ({fleet_rate * hot:.1f} requests/s on one slot)\n")  # fmt: skip
    print("| masters | request work, calls/s per master | background calls/s per master "
          "| Redis CPU per master | hottest shard's master |")  # fmt: skip
    print("| --- | --- | --- | --- | --- |")
    for m in (int(x) for x in ns.masters.split(",")):
        bg = sum(background_calls(ns, cluster=m > 1).values())
        per_master_calls = fleet_rate * calls_req / m
        cpu = (fleet_rate * usec_req / m + bg / m * ns.background_call_us) / 1e6
        hot_cpu = cpu + fleet_rate * hot * usec_req / 1e6 * (1 - 1 / m)
        print(f"| {m} | {per_master_calls:,.0f} | {bg / m:,.0f} | {cpu * 100:.0f} % of a core "
              f"| {hot_cpu * 100:.0f} % of a core |")  # fmt: skip
    tokens_req = measured["output_tokens"] / max(measured["completed"], 1)
    per_token = usec_req / max(tokens_req, 1)
    print(f"\nper output token (one event per request per step): {per_token:.0f} us of Redis "
          f"CPU, so one master carries about {1e6 / per_token:,.0f} tokens/s of events; the "
          f"fleet above makes {fleet_rate * tokens_req:,.0f} tokens/s")  # fmt: skip
    print("\nbackground calls/s of the whole fleet (cluster):")
    for k, v in background_calls(ns, cluster=True).items():
        print(f"- {k}: {v:,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
