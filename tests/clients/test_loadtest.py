"""The load tester: workloads are what they claim (unit), and a short run on the tiny model
prints the table, writes the JSON and the plots, and counts what the worker counts."""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path

import pytest

from clients.loadtest import (
    Record,
    punica_workload,
    scrape,
    slora_workload,
    summarize,
    throughput_bins,
    trace_workload,
)
from engine.cli import main
from tests.clients.conftest import Stack

ADAPTERS: list[str | None] = ["a", "b", "c", "d"]


def test_slora_gaps_have_the_requested_rate_and_cv() -> None:
    plan = slora_workload(ADAPTERS, num_requests=4000, rate=10.0, cv=2.0, seed=1)
    gaps = [b.t - a.t for a, b in itertools.pairwise(plan)]
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(0.1, rel=0.1)
    assert statistics.pstdev(gaps) / mean == pytest.approx(2.0, rel=0.15)
    assert slora_workload(ADAPTERS, num_requests=50, seed=3) == slora_workload(
        ADAPTERS, num_requests=50, seed=3
    )


def test_slora_popularity_follows_the_power_law() -> None:
    plan = slora_workload(ADAPTERS, num_requests=4000, alpha=1.0, seed=2)
    counts = [sum(p.adapter == a for p in plan) for a in ADAPTERS]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] / counts[1] == pytest.approx(2.0, rel=0.15)  # (1/1) / (1/2)
    lengths = [len(p.prompt.split()) for p in plan]
    assert min(lengths) >= 8
    assert max(lengths) <= 32


def test_punica_patterns() -> None:
    def adapters(pattern: str) -> list[str | None]:
        return [p.adapter for p in punica_workload(pattern, ADAPTERS, num_requests=400, seed=0)]

    assert adapters("distinct")[:8] == ADAPTERS * 2
    assert set(adapters("identical")) == {"a"}
    uniform = adapters("uniform")
    assert all(60 < uniform.count(a) < 140 for a in ADAPTERS)
    skewed = adapters("skewed")
    assert skewed.count("a") > 2 * skewed.count("b")
    with pytest.raises(ValueError, match="pattern"):
        punica_workload("bursty", ADAPTERS, num_requests=1)


def test_trace_replay(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    trace.write_text(
        '{"t": 0.5, "adapter": "b", "prompt": "hello there", "output_len": 3}\n'
        '{"t": 0.1, "adapter": null, "input_len": 4, "output_len": 2}\n'
    )
    plan = trace_workload(trace)
    assert [(p.t, p.adapter, p.max_tokens) for p in plan] == [(0.1, None, 2), (0.5, "b", 3)]
    assert len(plan[0].prompt.split()) == 4
    trace.write_text('{"t": 1}\n')
    with pytest.raises(ValueError, match=r"trace\.jsonl:1"):
        trace_workload(trace)


def test_throughput_leaves_out_the_last_partial_second() -> None:
    # 3.5 s of a steady 10 tokens/s and one request done every second: the half second at
    # the end holds 5 tokens, which as a bin of its own would read as a drop to 5 tokens/s.
    rec = Record(0, None, 35, 0.0, first_token=0.05, end=3.5)
    rec.token_times = [(0.05 + 0.1 * i, 1) for i in range(35)]
    done = [Record(i, "a", 1, 0.0, end=i + 0.5) for i in range(1, 3)]
    tok, req, bins = throughput_bins([rec, *done], 3.5)
    assert bins == [(0.0, 1.0), (1.0, 1.0), (2.0, 1.0)]
    assert tok == [10.0, 10.0, 10.0]
    assert req == [0.0, 1.0, 1.0]
    # A run shorter than a second: one bin, scaled to per second.
    tok, _, bins = throughput_bins([Record(0, None, 2, 0.0, end=0.5, token_times=[(0.2, 2)])], 0.5)
    assert (tok, bins) == ([4.0], [(0.0, 0.5)])


def test_summary_names_the_base_model_base() -> None:
    records = [Record(0, None, 1, 0.0, end=1.0), Record(1, "sql", 1, 0.0, end=1.0)]
    summary = summarize(records, slo_ttft_s=1.0, slo_itl_s=0.1)
    assert summary["adapters"] == {"base": 1, "sql": 1}
    assert summary["interrupted"] is False


def _finished(samples: dict[str, float]) -> float:
    return sum(v for k, v in samples.items() if k.startswith("lorastream_requests_finished_total"))


def test_short_run_reports_table_json_plots_and_matches_the_worker(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lt"
    before = scrape(stack.metrics_url)
    rc = main([
        "loadtest", "--redis-url", stack.redis_url, "--prefix", stack.prefix,
        "--workload", "slora", "--adapters", "lora0,lora1,lora2,base", "--alpha", "1.0",
        "--num-requests", "16", "--rate", "20", "--cv", "2", "--input-len", "4,12",
        "--output-len", "4,10", "--seed", "7", "--metrics-url", stack.metrics_url,
        "--out", str(out),
    ])  # fmt: skip
    assert rc == 0
    after = scrape(stack.metrics_url)
    printed = capsys.readouterr().out
    for row in ("requests/s", "output tokens/s", "TTFT ms p50/p90/p99"):
        assert row in printed
    # The SLO row names its thresholds (the defaults: 1 s to first token, 200 ms per token).
    assert "SLO attainment (TTFT ≤ 1000 ms, ITL ≤ 200 ms)" in printed
    result = json.loads((out / "results.json").read_text())
    summary = result["summary"]
    assert summary["completed"] == summary["requests"] == 16
    assert summary["errors"] == {}
    assert all(summary["latency_s"][k]["p99"] > 0 for k in ("ttft", "inter_token", "e2e"))
    for plot in ("latency_cdf.png", "throughput.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    # The worker counted the same requests and tokens (ignore_eos: exact output lengths).
    worker = result["workers"][stack.metrics_url]
    assert worker["requests_finished"] == _finished(after) - _finished(before) == 16
    planned = sum(r["max_tokens"] for r in result["requests"])
    assert summary["output_tokens"] == planned == worker["generation_tokens"]
    assert worker["finished_by_reason"] == {"length": 16}
    assert 0.0 <= worker["adapter_cache_hit_rate"] <= 1.0
