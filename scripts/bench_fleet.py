#!/usr/bin/env python3
"""A fleet on one machine: one consumer group against adapter-affine routing, one run.

For each routing (``single``, then ``affine``) the script starts a private redis-server and
``--workers`` ``lorastream serve`` processes on the tiny random model (CPU, one torch thread
each), registers ``--adapters`` PEFT adapters, and drives them with ``lorastream loadtest``'s
S-LoRA workload (adapter popularity a power law of exponent ``--alpha``, Poisson arrivals
at ``--rate``, the same seed for both). The workers' Prometheus counters give adapter loads
(disk reads) and each worker's cache hit rate; the client gives requests/s and time to first
token. It prints one Markdown table and writes ``bench_fleet.json`` under ``--out``.

    python scripts/bench_fleet.py --workers 4 --adapters 64 --max-loras 2 --max-cpu-loras 4

``--num-requests 40 --adapters 8 --workers 2`` is a quick dry run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from broker import heartbeat  # noqa: E402
from broker.embedded import RedisServer, free_port  # noqa: E402
from clients.loadtest import LoadtestConfig, run_loadtest  # noqa: E402
from engine.cli import HelpFormatter  # noqa: E402

PREFIX = "fleet"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--workers", type=int, default=4, help="worker processes")
    p.add_argument("--adapters", type=int, default=64, help="PEFT adapters (lora0..)")
    p.add_argument("--max-loras", type=int, default=2, help="adapters per step (device slots)")
    p.add_argument("--max-cpu-loras", type=int, default=4, help="adapters in host memory")
    p.add_argument("--max-num-seqs", type=int, default=8, help="sequences per worker")
    p.add_argument("--num-requests", type=int, default=600, help="requests per routing")
    p.add_argument("--rate", type=float, default=12.0, help="requests per second (Poisson)")
    p.add_argument("--alpha", type=float, default=1.0, help="popularity power-law exponent")
    p.add_argument("--output-len", default="8,16", help="MIN,MAX tokens per request")
    p.add_argument("--num-shards", type=int, default=64, help="shard streams (affine)")
    p.add_argument("--steal-after-ms", type=int, default=300,
                   help="affine: idle workers take others' entries that waited this long")  # fmt: skip
    p.add_argument("--routings", default="single,affine", help="comma-separated, run in order")
    p.add_argument("--seed", type=int, default=0, help="workload seed (the same for each)")
    p.add_argument("--out", default="bench-fleet-out", help="output directory")
    return p.parse_args(argv)


def make_model(out: Path, num_adapters: int) -> Path:
    from engine.testing.tiny import make_tiny_model

    model = out / f"model-{num_adapters}"
    if not (model / "adapters" / f"lora{num_adapters - 1}").exists():
        make_tiny_model(model, num_adapters=num_adapters, arch="llama", seed=0)
    return model


def start_workers(
    ns: argparse.Namespace, routing: str, url: str, model: Path, logs: Path
) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs, metrics = [], []
    for i in range(ns.workers):
        port = free_port()
        cmd = [
            sys.executable, "-m", "engine.cli", "serve", "--model", str(model),
            "--device", "cpu", "--enable-lora", "--max-loras", str(ns.max_loras),
            "--max-cpu-loras", str(ns.max_cpu_loras), "--max-lora-rank", "32",
            "--max-num-seqs", str(ns.max_num_seqs), "--lora-root", str(model / "adapters"),
            "--redis-url", url, "--prefix", PREFIX, "--consumer-name", f"w{i}",
            "--metrics-port", str(port), "--routing", routing,
            "--num-shards", str(ns.num_shards), "--steal-after-ms", str(ns.steal_after_ms),
            "--heartbeat-interval", "0.5", "--disable-log-stats",
        ]  # fmt: skip
        log = (logs / f"{routing}-w{i}.log").open("wb")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()
        metrics.append(f"http://127.0.0.1:{port}/metrics")
    return procs, metrics


def wait_ready(url: str, procs: list[subprocess.Popen[bytes]], metrics: list[str]) -> None:
    """Every worker serves metrics and has a heartbeat record (with affine routing: the
    records split the shards between them)."""
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 300
    try:
        while True:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a worker exited during start-up (see its log)")
            if time.monotonic() > deadline:
                raise TimeoutError("the workers did not start within 300 s")
            try:
                for m in metrics:
                    urllib.request.urlopen(m, timeout=1).close()
            except OSError:
                time.sleep(0.5)
                continue
            workers = heartbeat.live_workers_sync(client, PREFIX)
            affine = [w for w in workers if w.routing == "affine"]
            shards = [s for w in affine for s in w.shards]
            split = all(w.shards for w in affine) and len(shards) == len(set(shards))
            if len(workers) == len(procs) and split:
                return
            time.sleep(0.2)
    finally:
        client.close()


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_one(ns: argparse.Namespace, routing: str, model: Path, out: Path) -> dict[str, Any]:
    adapters = [f"lora{i}" for i in range(ns.adapters)]
    lo, _, hi = ns.output_len.partition(",")
    with RedisServer() as server:
        r = redis.Redis.from_url(server.url)
        r.hset(f"{PREFIX}:adapters", mapping={a: a for a in adapters})
        r.close()
        procs, metrics = start_workers(ns, routing, server.url, model, out)
        try:
            wait_ready(server.url, procs, metrics)
            cfg = LoadtestConfig(
                redis_url=server.url, prefix=PREFIX, workload="slora",
                adapters=list(adapters), num_requests=ns.num_requests, alpha=ns.alpha,
                rate=ns.rate, input_len=(8, 24), output_len=(int(lo), int(hi or lo)),
                seed=ns.seed, metrics_urls=metrics, out_dir=str(out / routing),
                timeout_s=120, progress=False,
            )  # fmt: skip
            r = redis.Redis.from_url(server.url)
            r.config_resetstat()
            result = anyio.run(run_loadtest, cfg, backend="asyncio")
            commands = r.info("commandstats")
            r.close()
        finally:
            stop(procs)
    row = summarize(routing, result, metrics)
    row["redis"] = redis_cost(commands, row["completed"])
    return row


def redis_cost(commandstats: dict[str, Any], completed: int) -> dict[str, Any]:
    """Redis's own count of its work during the run (INFO commandstats, reset before it):
    calls and CPU microseconds per completed request, by command."""
    per: dict[str, dict[str, float]] = {}
    for name, stats in commandstats.items():
        cmd = name.removeprefix("cmdstat_")
        per[cmd] = {
            "calls_per_request": stats["calls"] / max(completed, 1),
            "usec_per_request": stats["usec"] / max(completed, 1),
        }
    return {
        "usec_per_request": sum(v["usec_per_request"] for v in per.values()),
        "calls_per_request": sum(v["calls_per_request"] for v in per.values()),
        "by_command": per,
    }


def summarize(routing: str, result: dict[str, Any], metrics: list[str]) -> dict[str, Any]:
    s = result["summary"]
    workers = [result["workers"][m] for m in metrics]
    loads = sum(w["adapter_loads"] for w in workers)
    done = s["completed"]
    return {
        "routing": routing,
        "completed": done,
        "sent": s["requests"],
        "errors": s["errors"],
        "requests_per_s": s["requests_per_s"],
        "ttft_p50_ms": 1000 * (s["latency_s"]["ttft"]["p50"] or 0),
        "ttft_p99_ms": 1000 * (s["latency_s"]["ttft"]["p99"] or 0),
        "adapter_loads": loads,
        "loads_per_1k": 1000 * loads / done if done else None,
        "output_tokens": s["output_tokens"],
        "inter_token_p50_ms": 1000 * (s["latency_s"]["inter_token"]["p50"] or 0),
        "adapter_load_s": [w.get("adapter_load_seconds", 0.0) for w in workers],
        "requests_per_worker": [w["requests_finished"] for w in workers],
        "hit_rate_per_worker": [w["adapter_cache_hit_rate"] for w in workers],
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| routing | completed | req/s | TTFT p50 ms | TTFT p99 ms | adapter loads / 1k req "
        "| requests per worker | cache hit rate per worker |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        hits = ", ".join("-" if h is None else f"{h:.2f}" for h in r["hit_rate_per_worker"])
        per = ", ".join(f"{n:.0f}" for n in r["requests_per_worker"])
        lines.append(
            f"| {r['routing']} | {r['completed']} / {r['sent']} | {r['requests_per_s']:.2f} "
            f"| {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['loads_per_1k']:.0f} "
            f"| {per} | {hits} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    model = make_model(out, ns.adapters)
    rows = [run_one(ns, routing, model, out) for routing in ns.routings.split(",")]
    text = table(rows)
    if len(rows) == 2 and rows[0]["loads_per_1k"]:
        ratio = (rows[1]["loads_per_1k"] or 0) / rows[0]["loads_per_1k"]
        speed = rows[1]["requests_per_s"] / rows[0]["requests_per_s"]
        text += (
            f"\n\n{rows[1]['routing']} / {rows[0]['routing']}: adapter loads x{ratio:.2f}, "
            f"requests/s x{speed:.2f}"
        )
    print(text)
    (out / "bench_fleet.json").write_text(json.dumps({"args": vars(ns), "rows": rows}, indent=2))
    (out / "bench_fleet.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
