"""``lorastream loadtest``: an open-loop load generator through the real Redis path.

Workloads (every one a list of ``Planned`` requests with their send times, fixed by a seed):

* ``slora`` — S-LoRA's synthetic workload: adapter popularity a power law of exponent
  ``alpha`` over N adapters, Gamma-distributed gaps of mean ``1/rate`` and coefficient of
  variation ``cv`` (cv=1 is Poisson), input and output lengths uniform in their ranges.
* ``punica`` — Punica's four adapter patterns: ``distinct`` (round robin: every request a
  different adapter from the last), ``uniform``, ``skewed`` (Zipf, alpha 1.5) and
  ``identical`` (one adapter), with Poisson arrivals.
* ``trace`` — a JSONL file, one request a line: ``{"t": seconds, "adapter": name|null,
  "prompt": str | "input_len": int, "output_len": int}``.

Open loop: a request is sent at its time whether or not earlier ones finished. Input lengths
are in words of a small vocabulary (about one token each). Latencies are measured at the
client (Redis included). The workers' view (requests, tokens, adapter loads) comes from their
Prometheus endpoints, scraped before and after the run; the report holds the difference.
Ctrl-C stops sending, aborts what runs and still writes the report of what was sent.
"""

from __future__ import annotations

import json
import math
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio

from broker.redis_conn import REDIS_ERRORS
from clients.sdk import AsyncClient, ClientError

PATTERNS = ("distinct", "uniform", "skewed", "identical")
BASE_LABEL = "base"
"""How reports name the base model (requests without an adapter)."""
INTERRUPTED = "interrupted"
"""The error of a request still running when the run was stopped."""
_WORDS = (
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "dogs",
    "ran",
    "far",
    "away",
    "into",
    "green",
    "fields",
    "under",
    "blue",
    "sky",
    "and",
    "old",
    "men",
    "told",
    "long",
    "stories",
    "about",
    "ships",
    "sailing",
    "over",
    "cold",
    "seas",
)


@dataclass(frozen=True)
class Planned:
    t: float
    """Send time, seconds after the start."""
    adapter: str | None
    prompt: str
    max_tokens: int


# ----------------------------------------------------------------------------- workloads
def _prompt(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(max(1, n_words)))


def _gamma_gaps(rng: random.Random, n: int, rate: float, cv: float) -> list[float]:
    """Arrival times with Gamma gaps: shape 1/cv², mean 1/rate."""
    if rate <= 0 or cv <= 0:
        raise ValueError("rate and cv must be > 0")
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(shape, scale)
    return out


def _power_law(n: int, alpha: float) -> list[float]:
    weights = [(i + 1) ** -alpha for i in range(n)]
    total = sum(weights)
    return [w / total for w in weights]


def slora_workload(
    adapters: Sequence[str | None],
    *,
    num_requests: int,
    alpha: float = 1.0,
    rate: float = 2.0,
    cv: float = 1.0,
    input_len: tuple[int, int] = (8, 32),
    output_len: tuple[int, int] = (8, 32),
    seed: int = 0,
) -> list[Planned]:
    rng = random.Random(seed)
    weights = _power_law(len(adapters), alpha)
    return [
        Planned(
            t,
            rng.choices(list(adapters), weights)[0],
            _prompt(rng, rng.randint(*input_len)),
            rng.randint(*output_len),
        )
        for t in _gamma_gaps(rng, num_requests, rate, cv)
    ]


def punica_workload(
    pattern: str,
    adapters: Sequence[str | None],
    *,
    num_requests: int,
    rate: float = 2.0,
    input_len: tuple[int, int] = (8, 32),
    output_len: tuple[int, int] = (8, 32),
    seed: int = 0,
) -> list[Planned]:
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}")
    rng = random.Random(seed)
    zipf = _power_law(len(adapters), 1.5)
    plan = []
    for i, t in enumerate(_gamma_gaps(rng, num_requests, rate, 1.0)):
        if pattern == "distinct":
            adapter = adapters[i % len(adapters)]
        elif pattern == "uniform":
            adapter = rng.choice(list(adapters))
        elif pattern == "skewed":
            adapter = rng.choices(list(adapters), zipf)[0]
        else:
            adapter = adapters[0]
        plan.append(
            Planned(t, adapter, _prompt(rng, rng.randint(*input_len)), rng.randint(*output_len))
        )
    return plan


def trace_workload(path: str | Path, *, seed: int = 0) -> list[Planned]:
    rng = random.Random(seed)
    plan = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        try:
            prompt = row.get("prompt") or _prompt(rng, int(row["input_len"]))
            plan.append(
                Planned(float(row["t"]), row.get("adapter"), prompt, int(row["output_len"]))
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{path}:{n}: needs t, output_len and prompt or input_len ({e})"
            ) from None
    return sorted(plan, key=lambda p: p.t)


# ----------------------------------------------------------------------------- running
@dataclass
class Record:
    index: int
    adapter: str | None
    max_tokens: int
    sent: float
    first_token: float | None = None
    end: float | None = None
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    """Per token after the first: seconds since the previous one (a coalesced event's gap is
    spread over its tokens)."""
    error: str | None = None
    finish_reason: str | None = None
    token_times: list[tuple[float, int]] = field(default_factory=list)


async def run_plan(
    client: AsyncClient,
    plan: Sequence[Planned],
    *,
    sampling: dict[str, Any] | None = None,
    on_done: Any = None,
    stop: anyio.Event | None = None,
) -> list[Record]:
    """Send every request at its time (open loop); returns one record per request sent.

    When ``stop`` is set, nothing more is sent and the requests still running are aborted;
    their records end with the error ``interrupted``."""
    records: list[Record] = []
    t0 = anyio.current_time()

    async def one(i: int, p: Planned) -> None:
        rec = Record(i, p.adapter, p.max_tokens, anyio.current_time() - t0)
        records.append(rec)
        last = rec.sent
        try:
            params = {"ignore_eos": True, "temperature": 0.0, **(sampling or {})}
            async with client.generate(
                p.prompt, adapter=p.adapter, max_tokens=p.max_tokens, **params
            ) as stream:
                async for event in stream:
                    now = anyio.current_time() - t0
                    n = len(event.token_ids)
                    if event.restart:
                        rec.output_tokens, rec.itl, rec.first_token = 0, [], None
                    if n:
                        if rec.first_token is None:
                            rec.first_token = now
                            rec.itl += [(now - last) / n] * (n - 1)
                        else:
                            rec.itl += [(now - last) / n] * n
                        rec.token_times.append((now, n))
                        rec.output_tokens += n
                        last = now
                    if event.finished:
                        rec.finish_reason = event.finish_reason
        except ClientError as e:
            rec.error = e.code
        except REDIS_ERRORS as e:  # this request fails; the run goes on
            rec.error = f"redis: {type(e).__name__}"
        rec.end = anyio.current_time() - t0
        if on_done is not None:
            on_done(rec)

    async def send_all() -> None:
        async with anyio.create_task_group() as tg:
            for i, p in enumerate(plan):
                delay = t0 + p.t - anyio.current_time()
                if delay > 0:
                    await anyio.sleep(delay)
                tg.start_soon(one, i, p)

    async with anyio.create_task_group() as outer:
        if stop is not None:

            async def watch() -> None:
                await stop.wait()
                outer.cancel_scope.cancel()

            outer.start_soon(watch)
        await send_all()
        outer.cancel_scope.cancel()
    for rec in records:
        if rec.end is None:  # cancelled by stop: its stream was closed, which aborted it
            rec.error, rec.end = INTERRUPTED, anyio.current_time() - t0
    return sorted(records, key=lambda r: r.index)


# ----------------------------------------------------------------------------- workers' view
def scrape(url: str) -> dict[str, float]:
    """One worker's Prometheus samples: ``name{labels}`` → value."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as res:
        text = res.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def _sum(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def worker_report(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    def delta(name: str) -> float:
        return _sum(after, name) - _sum(before, name)

    finished = delta("lorastream_requests_finished_total")
    loads = delta("lorastream_adapter_loads_total")
    by_reason = {
        k.split('"')[1]: v - before.get(k, 0.0)
        for k, v in after.items()
        if k.startswith("lorastream_requests_finished_total{") and v - before.get(k, 0.0) > 0
    }
    return {
        "requests_finished": finished,
        "finished_by_reason": by_reason,
        "generation_tokens": delta("lorastream_generation_tokens_total"),
        "prompt_tokens": delta("lorastream_prompt_tokens_total"),
        "adapter_loads": loads,
        "adapter_load_seconds": delta("lorastream_adapter_load_seconds_total"),
        "adapter_evictions": delta("lorastream_adapter_evictions_total"),
        "adapters_resident": _sum(after, "lorastream_adapters_resident"),
        "adapters_in_host": _sum(after, "lorastream_adapters_in_host"),
        # Every request needs its adapter; one that was not loaded from disk was a hit.
        "adapter_cache_hit_rate": (1.0 - loads / finished) if finished else None,
    }


# ----------------------------------------------------------------------------- summary
def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(records: Sequence[Record], *, slo_ttft_s: float, slo_itl_s: float) -> dict[str, Any]:
    ok = [r for r in records if r.error is None and r.end is not None]
    duration = max((r.end or 0.0) for r in records) if records else 0.0
    ttft = [r.first_token - r.sent for r in ok if r.first_token is not None]
    e2e = [(r.end or 0.0) - r.sent for r in ok]
    itl = [g for r in ok for g in r.itl]
    tokens = sum(r.output_tokens for r in ok)

    def meets_slo(r: Record) -> bool:
        if r.error is not None or r.first_token is None:
            return False
        mean_itl = sum(r.itl) / len(r.itl) if r.itl else 0.0
        return r.first_token - r.sent <= slo_ttft_s and mean_itl <= slo_itl_s

    return {
        "requests": len(records),
        "completed": len(ok),
        "errors": dict(Counter(r.error for r in records if r.error is not None)),
        "duration_s": duration,
        "requests_per_s": len(ok) / duration if duration else 0.0,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / duration if duration else 0.0,
        "latency_s": {
            name: {f"p{q}": _pct(values, q) for q in (50, 90, 99)}
            for name, values in (("ttft", ttft), ("inter_token", itl), ("e2e", e2e))
        },
        "slo": {"ttft_s": slo_ttft_s, "inter_token_s": slo_itl_s},
        "slo_attainment": sum(map(meets_slo, records)) / len(records) if records else 0.0,
        "adapters": dict(Counter(BASE_LABEL if r.adapter is None else r.adapter for r in records)),
        "interrupted": any(r.error == INTERRUPTED for r in records),
    }


def print_table(summary: dict[str, Any], workers: dict[str, dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.1f}"

    t = Table(title="lorastream loadtest")
    t.add_column("metric", no_wrap=True)
    t.add_column("value", justify="right")
    t.add_row("requests (completed / sent)", f"{summary['completed']} / {summary['requests']}")
    t.add_row("duration s", f"{summary['duration_s']:.2f}")
    t.add_row("requests/s", f"{summary['requests_per_s']:.2f}")
    t.add_row("output tokens/s", f"{summary['output_tokens_per_s']:.1f}")
    for name, label in (("ttft", "TTFT"), ("inter_token", "inter-token"), ("e2e", "end-to-end")):
        p = summary["latency_s"][name]
        t.add_row(f"{label} ms p50/p90/p99", " / ".join(ms(p[k]) for k in ("p50", "p90", "p99")))
    slo = summary["slo"]
    t.add_row(
        f"SLO attainment (TTFT ≤ {slo['ttft_s'] * 1000:g} ms, "
        f"ITL ≤ {slo['inter_token_s'] * 1000:g} ms)",
        f"{summary['slo_attainment'] * 100:.1f} %",
    )
    t.add_row("errors", ", ".join(f"{k}: {v}" for k, v in summary["errors"].items()) or "0")
    for url, w in workers.items():
        hit = w["adapter_cache_hit_rate"]
        t.add_row(
            f"worker {url}",
            f"{w['requests_finished']:.0f} req, {w['generation_tokens']:.0f} tok, "
            f"{w['adapter_loads']:.0f} adapter loads, "
            f"hit rate {'-' if hit is None else f'{hit * 100:.0f} %'}, "
            f"{w['adapters_resident']:.0f} resident",
        )
    Console().print(t)


def plot(records: Sequence[Record], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.error is None]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    series = {
        "TTFT": [r.first_token - r.sent for r in ok if r.first_token is not None],
        "end-to-end": [(r.end or 0.0) - r.sent for r in ok],
        "inter-token": [g for r in ok for g in r.itl],
    }
    for label, values in series.items():
        if values:
            xs = sorted(v * 1000 for v in values)
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests / tokens")
    ax.set_title("latency CDF")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "latency_cdf.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    end = max(((r.end or 0.0) for r in records), default=0.0)
    tok, done, bins = throughput_bins(ok, end)
    edges = [b for b, _ in bins] + [bins[-1][0] + bins[-1][1]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.stairs(tok, edges, baseline=None, label="output tokens/s")
    ax2 = ax.twinx()
    ax2.stairs(done, edges, baseline=None, color="tab:orange", label="requests completed/s")
    ax.set_xlabel(
        "time (s)" + ("" if whole_seconds(end) else "; the last partial second is left out")
    )
    ax.set_ylabel("output tokens/s")
    ax2.set_ylabel("requests completed/s")
    ax.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    ax.set_title("throughput over time")
    # Below the axes, where no curve runs.
    fig.legend(loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    paths.append(out_dir / "throughput.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def whole_seconds(end: float) -> bool:
    return end < 1.0 or math.isclose(end, round(end))


def throughput_bins(
    records: Sequence[Record], end: float
) -> tuple[list[float], list[float], list[tuple[float, float]]]:
    """Output tokens and completed requests per second, in bins of one second.

    A last bin shorter than a second would show fewer events than the rate it stood for, a
    drop that never happened: it is left out (unless the run is shorter than a second; then
    its one bin is scaled to per second). Returns (tokens/s, requests/s, [(start, width)])."""
    if end <= 0:
        return [0.0], [0.0], [(0.0, 1.0)]
    full = [(float(i), 1.0) for i in range(math.floor(end + 1e-9))]
    bins = full or [(0.0, end)]
    tok = [0.0] * len(bins)
    done = [0.0] * len(bins)

    def index(t: float) -> int | None:
        i = 0 if end < 1.0 else int(t)
        return i if i < len(bins) else None

    for r in records:
        for t, n in r.token_times:
            if (i := index(t)) is not None:
                tok[i] += n
        if (i := index(r.end or 0.0)) is not None:
            done[i] += 1
    widths = [w for _, w in bins]
    return (
        [v / w for v, w in zip(tok, widths, strict=True)],
        [v / w for v, w in zip(done, widths, strict=True)],
        bins,
    )


# ----------------------------------------------------------------------------- command
@dataclass
class LoadtestConfig:
    redis_url: str
    prefix: str = "lorastream"
    workload: str = "slora"
    pattern: str = "uniform"
    trace: str | None = None
    adapters: list[str | None] | None = None
    """Adapter names (None for the base model); default: the registry's adapters."""
    num_requests: int = 50
    alpha: float = 1.0
    rate: float = 2.0
    cv: float = 1.0
    input_len: tuple[int, int] = (8, 32)
    output_len: tuple[int, int] = (8, 32)
    seed: int = 0
    slo_ttft_s: float = 1.0
    slo_itl_s: float = 0.2
    metrics_urls: list[str] = field(default_factory=list)
    out_dir: str = "loadtest-out"
    timeout_s: float = 300.0
    progress: bool = True


def build_plan(cfg: LoadtestConfig, adapters: list[str | None]) -> list[Planned]:
    common: dict[str, Any] = {
        "num_requests": cfg.num_requests,
        "rate": cfg.rate,
        "seed": cfg.seed,
        "input_len": cfg.input_len,
        "output_len": cfg.output_len,
    }
    if cfg.workload == "trace":
        if not cfg.trace:
            raise ValueError("--trace is required with --workload trace")
        return trace_workload(cfg.trace, seed=cfg.seed)
    if not adapters:
        raise ValueError("no adapters: pass --adapters or register some")
    if cfg.workload == "punica":
        return punica_workload(cfg.pattern, adapters, **common)
    if cfg.workload == "slora":
        return slora_workload(adapters, alpha=cfg.alpha, cv=cfg.cv, **common)
    raise ValueError(f"unknown workload {cfg.workload!r} (slora, punica, trace)")


def _settled(urls: Sequence[str]) -> dict[str, dict[str, float]]:
    """Scrape until two reads agree: a final event reaches the client just before the worker
    counts it."""
    last = {u: scrape(u) for u in urls}
    for _ in range(15):
        time.sleep(0.2)
        now = {u: scrape(u) for u in urls}
        if now == last:
            break
        last = now
    return last


async def run_loadtest(cfg: LoadtestConfig) -> dict[str, Any]:
    """Run one load test; writes results.json and the plots into ``out_dir``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    async with AsyncClient(cfg.redis_url, cfg.prefix, timeout_s=cfg.timeout_s) as client:
        await client.redis.ping()  # an unreachable Redis fails the run here, not per request
        adapters = cfg.adapters or sorted(await client.adapters())
        plan = build_plan(cfg, list(adapters))
        before = {u: await anyio.to_thread.run_sync(scrape, u) for u in cfg.metrics_urls}
        errors = 0
        with Progress(
            TextColumn("[bold]loadtest"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[errors]} errors"), TimeElapsedColumn(),
            disable=not cfg.progress, transient=False,
        ) as progress:  # fmt: skip
            task = progress.add_task("requests", total=len(plan), errors=0)

            def on_done(rec: Record) -> None:
                nonlocal errors
                errors += rec.error is not None
                progress.update(task, advance=1, errors=errors)

            stop = anyio.Event()
            async with anyio.create_task_group() as tg:
                if threading.current_thread() is threading.main_thread():
                    tg.start_soon(_stop_on_sigint, stop)
                records = await run_plan(client, plan, on_done=on_done, stop=stop)
                tg.cancel_scope.cancel()
    after = await anyio.to_thread.run_sync(_settled, cfg.metrics_urls)
    workers = {u: worker_report(before[u], after[u]) for u in cfg.metrics_urls}
    summary = summarize(records, slo_ttft_s=cfg.slo_ttft_s, slo_itl_s=cfg.slo_itl_s)
    plots = plot(records, out)
    result = {
        "config": {k: v for k, v in asdict(cfg).items() if k != "redis_url"},
        "summary": summary,
        "workers": workers,
        "plots": [str(p) for p in plots],
        "requests": [{k: v for k, v in asdict(r).items() if k != "token_times"} for r in records],
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print_table(summary, workers)
    if summary["interrupted"]:
        print(f"interrupted: {len(records)} of {len(plan)} requests were sent", file=sys.stderr)
    print(f"results: {out / 'results.json'}; plots: {', '.join(map(str, plots))}")
    return result


async def _stop_on_sigint(stop: anyio.Event) -> None:
    """The first Ctrl-C ends the run early (the report is still written); once it has, a
    second one is Python's usual KeyboardInterrupt."""
    with anyio.open_signal_receiver(signal.SIGINT) as signals:
        async for _ in signals:
            print("\ninterrupted: aborting running requests, writing the results so far "
                  "(Ctrl-C again to quit at once)", file=sys.stderr, flush=True)  # fmt: skip
            stop.set()
            return
