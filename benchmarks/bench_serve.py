#!/usr/bin/env python3
"""The service against the engine: the same requests offline and through Redis, one run.

One command starts everything in one process tree: the random checkpoint and adapters
(benchmarks/bench.py's), the offline run (``LLM`` in this process: the engine's own
throughput), then a private redis-server, a ``lorastream serve`` worker with the same engine
settings, and a load generator that submits every request at once (``XADD``) and follows
every reply (one SUBSCRIBE per generator process: its requests' ``reply_to``). It prints
both runs with their ratio, time to first token and inter-token latency percentiles, and
writes ``bench_serve.json`` / ``bench_serve.md`` under ``--out``.

    python -m benchmarks.bench_serve --shape llama-3.1-8b --num-prompts 1024 --input-len 100 \\
        --output-len 128 --num-adapters 32 --rank 16 --max-loras 32 --max-num-seqs 256

``--device cpu --shape tiny`` is a dry run (tests/docs/test_bench_serve.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks import utils  # the checkpoints, prompts and adapter patterns

log = logging.getLogger("bench_serve")
PREFIX = "bench"
ROOT = Path(__file__).resolve().parents[1]  # the repository: its packages import from here


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--shape", default="llama-3.2-1b", help="checkpoint shape (engine.testing.tiny.SHAPES)"
    )
    p.add_argument("--device", default="cuda", help="cpu: a dry run (with --shape tiny)")
    p.add_argument("--dtype", default="bfloat16", help="model dtype (float32 for CPU profiles)")
    p.add_argument("--num-prompts", type=int, default=1024, help="requests, all submitted at once")
    p.add_argument("--input-len", type=int, default=100, help="prompt tokens per request")
    p.add_argument(
        "--output-len", type=int, default=128, help="output tokens per request (EOS ignored)"
    )
    p.add_argument("--num-adapters", type=int, default=32, help="adapters (0: the base model)")
    p.add_argument("--rank", type=int, default=16, help="adapter rank")
    p.add_argument("--max-loras", type=int, default=32, help="adapters per step")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences per step")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192, help="tokens per step")
    p.add_argument(
        "--pattern", default="distinct", choices=utils.PATTERNS, help="Punica's adapter pattern"
    )
    p.add_argument("--engine-arg", action="append", default=[], metavar="FLAG[=VALUE]",
                   help="an extra engine flag for both runs, e.g. --engine-arg=--max-num-mixed-prefill-tokens=512")  # fmt: skip
    p.add_argument("--serve-mp", action=argparse.BooleanOptionalAction, default=True,
                   help="the worker runs with --enable-multiprocessing")  # fmt: skip
    p.add_argument("--clients", type=int, default=4, help="load generator processes")
    p.add_argument("--skip-offline", action="store_true", help="only the service run")
    p.add_argument("--workload", choices=("burst", "chat"), default="burst",
                   help="burst: --num-prompts random prompts; chat: conversations whose turns "
                   "share a system prompt per adapter and their history")  # fmt: skip
    p.add_argument("--chat-system-len", type=int, default=1000, help="chat: system prompt tokens")
    p.add_argument("--chat-turns", type=int, default=3, help="chat: turns per conversation")
    p.add_argument(
        "--chat-adapters", type=int, default=4, help="chat: adapters the conversations use"
    )
    p.add_argument("--compare-prefix-caching", action="store_true",
                   help="run the service twice, prefix caching on and off, and check the "
                   "greedy outputs are identical")  # fmt: skip
    p.add_argument("--profile-serve", default=None, metavar="DIR",
                   help="run py-spy on the worker's processes during the timed run, SVGs into DIR")  # fmt: skip
    p.add_argument("--workdir", default="/tmp/lorastream-bench", help="checkpoints are cached here")
    p.add_argument("--out", default="bench-out", help="results directory")
    p.add_argument("--seed", type=int, default=0, help="prompts and adapter draws")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- workload
def engine_flags(args: argparse.Namespace, model: Path) -> list[str]:
    """``lorastream serve`` flags; the offline run gets the same through ``EngineArgs``."""
    flags = [
        "--model", str(model), "--device", args.device, "--dtype", args.dtype,
        "--max-num-seqs", str(args.max_num_seqs),
        "--max-model-len", str(args.max_prompt_len + args.output_len),
        "--max-num-batched-tokens", str(max(args.max_num_batched_tokens, args.max_num_seqs)),
        "--gpu-memory-utilization", "0.85", "--seed", str(args.seed),
    ]  # fmt: skip
    if args.num_adapters:
        flags += ["--enable-lora", "--max-loras", str(args.max_loras),
                  "--max-lora-rank", str(max(args.rank, 8)),
                  "--max-cpu-loras", str(max(args.num_adapters, args.max_loras))]  # fmt: skip
    for extra in args.engine_arg:
        flags += extra.split("=", 1)
    return flags


def adapter_names(args: argparse.Namespace) -> list[str]:
    return [f"a{i}" for i in range(args.num_adapters)]


def workload(args: argparse.Namespace) -> list[tuple[list[int], str | None]]:
    if args.workload == "chat":
        return chat_workload(args)
    prompts = utils.make_prompts(args.num_prompts, args.input_len, args.seed)
    if not args.num_adapters:
        return [(p, None) for p in prompts]
    names = adapter_names(args)
    which = utils.assign_adapters(args.pattern, len(prompts), args.num_adapters, args.seed)
    return [(p, names[a]) for p, a in zip(prompts, which, strict=True)]


def chat_workload(args: argparse.Namespace) -> list[tuple[list[int], str | None]]:
    """Chat frontends: conversations of ``--chat-turns`` turns; every turn sends the
    adapter's system prompt and the whole history again (the assistant's earlier replies
    are random tokens here, so turns do not wait for each other). ``--num-prompts`` is the
    number of requests; user turns are 50-200 tokens."""
    import random

    rng = random.Random(args.seed)
    names: list[str | None] = list(adapter_names(args)[: args.chat_adapters]) or [None]
    system = {
        n: utils.make_prompts(1, args.chat_system_len, args.seed + i)[0]
        for i, n in enumerate(names)
    }
    out: list[tuple[list[int], str | None]] = []
    conversation = 0
    while len(out) < args.num_prompts:
        adapter = names[conversation % len(names)]
        history = list(system[adapter])
        for _ in range(args.chat_turns):
            history += [rng.randrange(*utils.PROMPT_VOCAB) for _ in range(rng.randint(50, 200))]
            out.append((list(history), adapter))
            history += [rng.randrange(*utils.PROMPT_VOCAB) for _ in range(args.output_len)]
            if len(out) == args.num_prompts:
                break
        conversation += 1
    return out


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"p50": q[49], "p90": q[89], "p99": q[98]}


def summarize(
    name: str, n_tokens: int, elapsed: float, ttft: list[float], itl: list[float]
) -> dict[str, Any]:
    return {
        "config": name,
        "output_tokens": n_tokens,
        "elapsed_s": elapsed,
        "output_tok_s": n_tokens / elapsed,
        "ttft_ms": {k: 1e3 * v for k, v in percentiles(ttft).items()},
        "itl_ms": {k: 1e3 * v for k, v in percentiles(itl).items()},
    }


# ----------------------------------------------------------------------------- offline
def run_offline(
    args: argparse.Namespace, model: Path, work: list[tuple[list[int], str | None]]
) -> dict[str, Any]:
    """The engine alone, as benchmarks/bench.py runs it: ``LLM.generate`` in this process, every
    request at once, outputs only at the end. Time to first token from each request's
    metrics; inter-token latency as each request's mean (no per-token outputs here)."""
    from engine.config import EngineArgs
    from engine.llm import LLM
    from engine.lora.request import LoRARequest
    from engine.sampling_params import SamplingParams

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    engine_args = EngineArgs.from_cli_args(parser.parse_args(engine_flags(args, model)))
    fields = dataclasses.asdict(engine_args)
    llm = LLM(fields.pop("model"), **fields)
    try:
        paths = utils.adapter_paths(model, args.rank, args.num_adapters)
        loras = {
            n: LoRARequest(n, i + 1, str(p))
            for i, (n, p) in enumerate(zip(adapter_names(args), paths, strict=True))
        }
        params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)

        def run(items: list[tuple[list[int], str | None]]) -> tuple[list[Any], float]:
            llm.llm_engine.core.reset_prefix_cache()
            t0 = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": p} for p, _ in items], params,
                                [loras[a] if a else None for _, a in items], use_tqdm=False)  # fmt: skip
            return outs, time.perf_counter() - t0

        run(work[: min(len(work), args.max_num_seqs)])  # adapters loaded, kernels compiled
        outs, elapsed = run(work)
    finally:
        llm.shutdown()
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n == len(work) * args.output_len, (
        f"offline: {n} tokens, expected {len(work) * args.output_len}"
    )
    ttft, itl = [], []
    for o in outs:
        m = o.metrics
        ttft.append(m["first_token_time"] - m["arrival_time"])
        k = len(o.outputs[0].token_ids)
        if k > 1:
            itl += [(m["finished_time"] - m["first_token_time"]) / (k - 1)] * (k - 1)
    return summarize("offline (LLM.generate)", n, elapsed, ttft, itl)


# ----------------------------------------------------------------------------- service
def start_worker(
    args: argparse.Namespace, model: Path, url: str, out: Path, extra: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "engine.cli", "serve", *engine_flags(args, model), *extra,
           "--redis-url", url, "--prefix", PREFIX, "--consumer-name", "bench-worker",
           "--block-ms", "100"]  # fmt: skip
    if args.serve_mp:
        cmd.append("--enable-multiprocessing")
    if args.num_adapters:
        paths = utils.adapter_paths(model, args.rank, args.num_adapters)
        cmd += [
            "--lora-modules",
            *(f"{n}={p}" for n, p in zip(adapter_names(args), paths, strict=True)),
        ]
    log.info("worker: %s", " ".join(cmd))
    log_file = (out / "worker.log").open("wb")
    return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT)


def client_main() -> None:
    """One load generator process (``bench_serve.py --as-client``, its job as JSON on stdin):
    submit its requests at ``start_at``, follow their events on one channel, and print
    {tokens, ttft, itl, end} as JSON."""
    import msgpack
    import redis

    from broker.protocol import decode_event

    job = json.loads(sys.stdin.readline())
    client = redis.Redis.from_url(job["url"])
    inbox = f"{PREFIX}:inbox:{job['tag']}"
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(inbox)
    payloads = [
        msgpack.packb({"v": 1, "id": f"{job['tag']}-{i}", "prompt_token_ids": prompt,
                       "reply_to": inbox, **({"adapter": adapter} if adapter else {}),
                       "params": {"max_tokens": job["output_len"], "temperature": 0.0,
                                  "ignore_eos": True}})
        for i, prompt, adapter in job["items"]
    ]  # fmt: skip
    # A barrier: every generator is up (imports, subscription, payloads built) before any
    # submits, so the run measures the service, not Python's start-up.
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":
        return
    sent = time.perf_counter()
    sent_wall = time.time()
    pipe = client.pipeline(transaction=False)
    for data in payloads:
        pipe.xadd(f"{PREFIX}:requests", {"data": data})
    pipe.execute()
    last: dict[str, float] = {}
    ttft: list[float] = []
    itl: list[float] = []
    events: dict[str, int] = {}
    ends: list[float] = []
    timeline: dict[int, int] = {}
    kept: dict[str, list[int]] = {}
    tokens = 0
    done = 0
    while done < len(payloads):
        msg = pubsub.get_message(timeout=60)
        if msg is None:
            continue
        now = time.perf_counter()
        event = decode_event(msg["data"])
        k = len(event.token_ids)
        events[event.id] = events.get(event.id, 0) + 1
        if job.get("keep_tokens"):
            kept.setdefault(event.id, []).extend(event.token_ids)
        if k:
            tokens += k
            second = int(now - sent)
            timeline[second] = timeline.get(second, 0) + k
            prev = last.get(event.id)
            if prev is None:
                ttft.append(now - sent)
            else:
                itl.extend([(now - prev) / k] * k)
            last[event.id] = now
        if event.finished:
            if event.finish_reason != "length":
                raise RuntimeError(f"{event.id} ended with {event.finish_reason}: {event}")
            done += 1
            ends.append(now - sent)
    print(json.dumps({"tokens": tokens, "ttft": ttft, "itl": itl, "end": time.time(),
                      "start": sent_wall,
                      "events_per_request": list(events.values()), "ends": ends,
                      "timeline": timeline, "outputs": kept}))  # fmt: skip


def run_service(
    args: argparse.Namespace,
    model: Path,
    work: list[tuple[list[int], str | None]],
    warm: list[tuple[list[int], str | None]],
    out: Path,
    extra: tuple[str, ...] = (),
) -> tuple[dict[str, Any], dict[int, list[int]]]:
    """The service run: returns its row and, with --compare-prefix-caching, each request's
    tokens by its index in ``work``."""
    from broker.embedded import RedisServer

    (out / "redis").mkdir(parents=True, exist_ok=True)
    with RedisServer(data_dir=out / "redis") as server:
        proc = start_worker(args, model, server.url, out, extra)
        try:

            def wave(
                items: list[tuple[list[int], str | None]], tag: str, profile: bool
            ) -> tuple[int, float, list[float], list[float], dict[int, list[int]]]:
                procs = []
                for c in range(args.clients):
                    shard = [(i, p, a) for i, (p, a) in enumerate(items) if i % args.clients == c]
                    if not shard:
                        continue
                    job = {"url": server.url, "items": shard, "output_len": args.output_len,
                           "tag": f"{tag}{c}", "keep_tokens": args.compare_prefix_caching}  # fmt: skip
                    client = subprocess.Popen(
                        [sys.executable, "-m", "benchmarks.bench_serve", "--as-client"],
                        text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
                    )  # fmt: skip
                    assert client.stdin is not None
                    client.stdin.write(json.dumps(job) + "\n")
                    client.stdin.flush()
                    procs.append(client)
                for client in procs:
                    assert client.stdout is not None
                    if client.stdout.readline().strip() != "READY":
                        raise RuntimeError("a load generator failed to start")
                for client in procs:
                    assert client.stdin is not None
                    client.stdin.write("GO\n")
                    client.stdin.close()
                spy = start_py_spy(args, proc, out) if profile else []
                got = []
                for client in procs:
                    assert client.stdout is not None
                    got.append(json.loads(client.stdout.read()))
                    if client.wait() != 0:
                        raise RuntimeError("a load generator failed")
                for s in spy:
                    s.send_signal(signal.SIGINT)  # py-spy writes its profile and exits
                    s.wait(timeout=60)
                n = sum(g["tokens"] for g in got)
                elapsed = max(g["end"] for g in got) - min(g["start"] for g in got)
                per_req = sorted(x for g in got for x in g["events_per_request"])
                ends = sorted(x for g in got for x in g["ends"])
                timeline: dict[str, int] = {}
                for g in got:
                    for sec, k in g["timeline"].items():
                        timeline[sec] = timeline.get(sec, 0) + k
                print(f"{tag}: events per request p0/p50/p100 {[per_req[0], per_req[len(per_req) // 2], per_req[-1]]}; request end s p10/p50/p90/p100 {[round(ends[int(q * (len(ends) - 1))], 2) for q in (0.1, 0.5, 0.9, 1.0)]}; "
                         f"tokens per second of the run {[timeline[k] for k in sorted(timeline, key=int)]}", flush=True)  # fmt: skip
                outputs = {
                    int(rid.rsplit("-", 1)[1]): toks
                    for g in got
                    for rid, toks in g["outputs"].items()
                }
                return (
                    n,
                    elapsed,
                    [t for g in got for t in g["ttft"]],
                    [t for g in got for t in g["itl"]],
                    outputs,
                )

            wait_ready(server.url, proc, out)
            # Warm-up on other prompts of the same shapes: the timed run finds no cached KV
            # but its own.
            wave(warm, f"w{uuid.uuid4().hex[:6]}", False)
            n, elapsed, ttft, itl, outputs = wave(
                work, f"r{uuid.uuid4().hex[:6]}", bool(args.profile_serve)
            )
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert n == len(work) * args.output_len, (
        f"service: {n} tokens, expected {len(work) * args.output_len}"
    )
    name = "service (serve" + (" --enable-multiprocessing" if args.serve_mp else "")
    name += "".join(f" {x}" for x in extra) + " + Redis)"
    return summarize(name, n, elapsed, ttft, itl), outputs


def wait_ready(url: str, proc: subprocess.Popen[bytes], out: Path) -> None:
    import redis

    client = redis.Redis.from_url(url)
    deadline = time.time() + 1800
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the worker exited ({proc.returncode}): {(out / 'worker.log').read_text()[-3000:]}"
            )
        if client.exists(f"{PREFIX}:worker:bench-worker"):
            return
        time.sleep(0.2)
    raise RuntimeError("the worker did not start")


def start_py_spy(
    args: argparse.Namespace, proc: subprocess.Popen[bytes], out: Path
) -> list[subprocess.Popen[bytes]]:
    """py-spy on the worker and its children (the engine core) until SIGINT: collapsed
    stacks (``--format raw``), one file per process, into ``--profile-serve``."""
    target = Path(args.profile_serve)
    target.mkdir(parents=True, exist_ok=True)
    pids = [proc.pid]
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    if children.exists():
        pids += [int(x) for x in children.read_text().split()]
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return [subprocess.Popen([py_spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
                              "--threads", "--output", str(target / f"serve-{pid}.txt"), "--nonblocking"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pid in pids]  # fmt: skip


# ----------------------------------------------------------------------------- report
def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| run | output tok/s | vs offline | TTFT ms p50 / p90 / p99 | inter-token ms p50 / p90 / p99 |",
             "|---|---|---|---|---|"]  # fmt: skip
    base = next((r["output_tok_s"] for r in rows if r["config"].startswith("offline")), None)
    for r in rows:
        ratio = f"{r['output_tok_s'] / base:.3f}" if base else "-"
        t, i = r["ttft_ms"], r["itl_ms"]
        lines.append(f"| {r['config']} | {r['output_tok_s']:,.0f} | {ratio} | "
                     f"{t['p50']:.1f} / {t['p90']:.1f} / {t['p99']:.1f} | "
                     f"{i['p50']:.2f} / {i['p90']:.2f} / {i['p99']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = utils.make_checkpoint(Path(args.workdir), args.shape, args.num_adapters, args.rank)
    work = workload(args)
    warm = workload(argparse.Namespace(**{**vars(args), "seed": args.seed + 1000}))
    warm = warm[: min(len(warm), args.max_num_seqs)]
    args.max_prompt_len = max(len(p) for p, _ in work + warm)
    rows = []
    status = 0
    if not args.skip_offline:
        rows.append(run_offline(args, model, work))
    if args.compare_prefix_caching:
        row_on, on = run_service(args, model, work, warm, out, ("--enable-prefix-caching",))
        row_off, off = run_service(args, model, work, warm, out, ("--no-enable-prefix-caching",))
        changed = [i for i in range(len(work)) if on.get(i) != off.get(i)]
        row_on["outputs_identical_with_caching_off"] = not changed
        rows += [row_on, row_off]
        if changed:
            print(f"prefix caching changed {len(changed)} greedy outputs (requests {changed[:10]})")
            status = 1
    else:
        rows.append(run_service(args, model, work, warm, out)[0])
    result = {"args": vars(args), "versions": utils.versions(), "rows": rows}
    (out / "bench_serve.json").write_text(json.dumps(result, indent=2))
    text = table(rows)
    (out / "bench_serve.md").write_text(text + "\n")
    print(text)
    return status


if __name__ == "__main__":
    if sys.argv[1:] == ["--as-client"]:
        client_main()
    else:
        sys.exit(main())
