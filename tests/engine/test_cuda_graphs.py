"""CUDA graphs of decode-only and of mixed prefill + decode steps: bucket choice, input
packing and the padded layouts on CPU; on a CUDA device, graph replay gives what eager
execution gives."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.core.scheduler import PLACEHOLDER, ScheduledRequest
from engine.sampling_params import SamplingParams
from engine.sequence import Request
from engine.worker.model_runner import (
    graph_batch_sizes,
    mixed_graph_sizes,
    pack_step,
    padded_batch_size,
)

from .test_matches_peft import PROMPTS, lora_requests, make_engine, mixed_jobs, run_all

CUDA = torch.cuda.is_available()


def assert_buckets_cover(sizes: list[int], lo: int, hi: int, most: Callable[[int], int]) -> None:
    """Sorted, distinct buckets ending at ``hi``; every count from ``lo`` to ``hi`` gets one
    of at most ``most(count)``, and a count above ``hi`` none."""
    assert sizes == sorted(set(sizes))
    assert sizes[-1] == hi
    for n in range(lo, hi + 1):
        b = padded_batch_size(n, sizes)
        assert b is not None
        assert n <= b <= most(n)
    assert padded_batch_size(hi + 1, sizes) is None


def test_buckets_cover_every_batch_size_up_to_max_num_seqs():
    for max_num_seqs in (1, 3, 8, 17, 64, 256, 300):
        sizes = graph_batch_sizes(max_num_seqs)
        assert_buckets_cover(sizes, 1, max_num_seqs, lambda n: max(n + 7, 2 * n))
    assert graph_batch_sizes(256)[:6] == [1, 2, 4, 8, 16, 24]


def test_mixed_buckets_cover_every_token_count_up_to_the_capture_size():
    for max_tokens in (2, 15, 16, 100, 300, 512, 1000, 1024, 8192):
        sizes = mixed_graph_sizes(max_tokens)
        # Padding is at most 1/8 of the bucket above 256 tokens, 15 tokens below.
        assert_buckets_cover(sizes, 2, max_tokens, lambda t: max(t + 15, t * 9 // 8 + 1))
    assert mixed_graph_sizes(1) == mixed_graph_sizes(0) == []
    assert mixed_graph_sizes(1024)[:3] == [16, 32, 48]


def scheduled_request(rng: random.Random, block_size: int, decode: bool) -> ScheduledRequest:
    prompt = [rng.randrange(1000) for _ in range(rng.randrange(1, 40))]
    req = Request(
        request_id=str(rng.random()), prompt_token_ids=prompt, sampling_params=SamplingParams()
    )
    req.output_token_ids = [rng.randrange(1000) for _ in range(rng.randrange(0, 5))]
    total = req.num_tokens
    start = total - 1 if decode else rng.randrange(0, total)
    n = 1 if decode else rng.randrange(1, total - start + 1)
    req.block_table = rng.sample(range(200), -(-(start + n) // block_size))
    return ScheduledRequest(req, start, n, sample=start + n == total)


def reference_inputs(scheduled: list[ScheduledRequest], block_size: int) -> dict[str, list]:
    """The per-token Python loop the packed layout replaces."""
    ids, pos, slots, qsl, seq_lens, rows = [], [], [], [0], [], []
    for s in scheduled:
        table, end = s.request.block_table, s.start_position + s.num_new_tokens
        ids += s.request.token_ids_slice(s.start_position, end)
        pos += range(s.start_position, end)
        slots += [
            table[p // block_size] * block_size + p % block_size
            for p in range(s.start_position, end)
        ]
        qsl.append(qsl[-1] + s.num_new_tokens)
        seq_lens.append(end)
        if s.sample:
            rows.append(qsl[-1] - 1)
    return {"ids": ids, "pos": pos, "slots": slots, "qsl": qsl, "seq_lens": seq_lens, "rows": rows}


@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("pad_to", [None, 13])
def test_pack_step_matches_per_token_loop(decode, pad_to):
    rng = random.Random(int(decode) * 10 + (pad_to or 0))
    block_size = 4
    scheduled = [scheduled_request(rng, block_size, decode) for _ in range(9)]
    lora = [rng.choice([-1, 0, 1, 2]) for _ in scheduled]
    buf = np.full(10_000, -7, dtype=np.int64)
    p = pack_step(buf, scheduled, block_size, num_seqs=pad_to, seq_lora_slots=lora)
    ref = reference_inputs(scheduled, block_size)
    t, n, b = p.num_tokens, p.num_real_tokens, p.num_seqs
    assert p.num_real_seqs == len(scheduled)
    assert b == (pad_to or len(scheduled))
    assert buf[:n].tolist() == ref["ids"]
    assert buf[t : t + n].tolist() == ref["pos"]
    assert buf[2 * t : 2 * t + n].tolist() == ref["slots"]
    assert buf[3 * t : 3 * t + p.num_logits].tolist() == ref["rows"]
    o = p.int32_offset
    qsl = buf[o : o + b + 1].tolist()
    seq_lens = buf[o + p.seq_lens_offset : o + p.seq_lens_offset + b].tolist()
    assert qsl[: len(scheduled) + 1] == ref["qsl"]
    assert seq_lens[: len(scheduled)] == ref["seq_lens"]
    assert (o + p.seq_lens_offset) % 4 == (o + p.block_tables_offset) % 4 == o % 4
    tables = buf[o + p.block_tables_offset : p.total].reshape(b, p.width)
    for s, row in zip(scheduled, tables, strict=False):
        table = s.request.block_table
        assert row[: len(table)].tolist() == table
        assert not row[len(table) :].any()
    # Padding sequences: one token, position 0, no KV write, context 1, zero block table.
    pad = b - len(scheduled)
    assert buf[n:t].tolist() == [0] * pad
    assert buf[2 * t + n : 3 * t].tolist() == [-1] * pad
    assert np.diff(qsl[len(scheduled) :]).tolist() == [1] * pad
    assert seq_lens[len(scheduled) :] == [1] * pad
    assert not tables[len(scheduled) :].any()
    assert p.token_slots_lora is not None
    per_token = [lo for s, lo in zip(scheduled, lora, strict=True) for _ in range(s.num_new_tokens)]
    assert p.token_slots_lora.tolist() == per_token + [-1] * pad
    assert p.max_seq_len == max(ref["seq_lens"])


@pytest.mark.parametrize(("pad_to", "num_tokens"), [(None, None), (13, None), (13, 20)])
def test_pack_step_lists_placeholder_tokens_with_their_previous_rows(pad_to, num_tokens):
    """With async scheduling a decode's input token may still be on the device: its row is
    listed with the row of the previous step's samples that holds it (in a mixed-step
    graph's layout too: ``num_tokens``)."""
    rng = random.Random(5)
    scheduled = [scheduled_request(rng, 4, decode=True) for _ in range(9)]
    pending = [1, 4, 8]
    for i in pending:
        scheduled[i].request.output_token_ids.append(PLACEHOLDER)
        scheduled[i].start_position += 1
        table = scheduled[i].request.block_table
        table += [200 + i] * (-(-scheduled[i].request.num_tokens // 4) - len(table))
    previous = {scheduled[i].request_id: row for row, i in zip([6, 0, 3], pending, strict=True)}
    previous["elsewhere"] = 1
    buf = np.full(10_000, -7, dtype=np.int64)
    p = pack_step(buf, scheduled, 4, num_seqs=pad_to, previous_rows=previous, num_tokens=num_tokens)
    assert p.num_fills == 3
    assert p.num_tokens == (num_tokens or pad_to or 9)
    o, f = p.fills_offset, p.num_fills
    assert buf[o : o + f].tolist() == pending  # one token per sequence: token row = sequence
    assert buf[o + f : o + 2 * f].tolist() == [6, 0, 3]
    assert p.total == o + 2 * f
    assert buf[pending].tolist() == [0, 0, 0]  # no -1 reaches the embedding
    assert (buf[: p.num_real_tokens] >= 0).all()
    with pytest.raises(ValueError, match="placeholder tokens"):
        pack_step(buf, scheduled, 4, num_seqs=pad_to, previous_rows={"elsewhere": 0})
    with pytest.raises(ValueError, match="placeholder tokens"):
        pack_step(buf, scheduled, 4, num_seqs=pad_to)


@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("pad", [0, 61])
def test_pack_step_pads_a_mixed_graph_with_one_sequence_then_empty_ones(decode, pad):
    """A mixed-step graph's layout: the step's sequences as packed without padding, one
    sequence of ``pad`` padding tokens (more than any block table here covers), then
    sequences with no tokens and no context."""
    rng = random.Random(7 + pad)
    block_size = 4
    scheduled = [scheduled_request(rng, block_size, decode) for _ in range(9)]
    lora = [rng.choice([-1, 0, 1]) for _ in scheduled]
    real = sum(s.num_new_tokens for s in scheduled)
    buf = np.full(10_000, -7, dtype=np.int64)
    p = pack_step(
        buf, scheduled, block_size, num_seqs=14, seq_lora_slots=lora, num_tokens=real + pad
    )
    ref = reference_inputs(scheduled, block_size)
    t, n, b = p.num_tokens, p.num_real_tokens, p.num_seqs
    assert (t, n, b, p.num_real_seqs) == (real + pad, real, 14, 9)
    assert buf[:n].tolist() == ref["ids"]
    assert buf[t : t + n].tolist() == ref["pos"]
    assert buf[2 * t : 2 * t + n].tolist() == ref["slots"]
    assert buf[3 * t : 3 * t + p.num_logits].tolist() == ref["rows"]
    assert buf[n:t].tolist() == [0] * pad
    assert buf[t + n : 2 * t].tolist() == list(range(pad))
    assert buf[2 * t + n : 3 * t].tolist() == [-1] * pad
    o = p.int32_offset
    qsl = buf[o : o + b + 1].tolist()
    seq_lens = buf[o + p.seq_lens_offset : o + p.seq_lens_offset + b].tolist()
    assert qsl == ref["qsl"] + [real + pad] * 5
    assert seq_lens == ref["seq_lens"] + [pad] + [0] * 4
    tables = buf[o + p.block_tables_offset : p.total].reshape(b, p.width)
    assert not tables[9:].any()
    assert p.token_slots_lora is not None
    per_token = [lo for s, lo in zip(scheduled, lora, strict=True) for _ in range(s.num_new_tokens)]
    assert p.token_slots_lora.tolist() == per_token + [-1] * pad
    with pytest.raises(ValueError, match="num_tokens"):
        pack_step(buf, scheduled, block_size, num_seqs=14, num_tokens=real - 1)
    with pytest.raises(ValueError, match="no padding sequence"):
        pack_step(buf, scheduled, block_size, num_seqs=9, num_tokens=real + 1)


def test_padded_mixed_step_gives_the_unpadded_rows(tiny_model_dir: Path):
    """The model (on CPU, adapters on) computes the real rows of a step packed in a mixed
    graph's layout as it does unpadded, and the padding writes no KV."""
    engine = make_engine(tiny_model_dir, max_num_seqs=8)
    runner = engine.runner
    loras = lora_requests(tiny_model_dir)[:3]
    for lora in loras:
        engine.add_lora(lora)
    assert runner.lora_manager is not None
    slots = runner.lora_manager.activate([lo.lora_int_id for lo in loras])
    rng = random.Random(3)
    bs = runner.block_size
    free = iter(rng.sample(range(1, runner.num_blocks), 40))
    scheduled = []
    for i, (cached, new) in enumerate([(12, 1), (0, 23), (20, 5), (33, 1), (0, 2)]):
        req = Request(
            request_id=f"r{i}",
            prompt_token_ids=[rng.randrange(10, 900) for _ in range(cached + new)],
            sampling_params=SamplingParams(),
        )
        req.block_table = [next(free) for _ in range(-(-(cached + new) // bs))]
        scheduled.append(ScheduledRequest(req, cached, new, sample=True))
    seq_lora = [slots[loras[i % 3].lora_int_id] if i != 3 else -1 for i in range(5)]
    real = sum(s.num_new_tokens for s in scheduled)

    def forward(**pad) -> torch.Tensor:
        p = pack_step(runner._stage_np, scheduled, bs, seq_lora_slots=seq_lora, **pad)
        batch, _ = runner._eager_inputs(p, None)
        with torch.inference_mode():
            return runner.model(batch)

    plain = forward()
    cache = [c.clone() for c in runner.kv_caches]
    padded = forward(num_seqs=runner.max_num_seqs + 1, num_tokens=real + 19)
    assert padded.shape[0] == real + 19
    torch.testing.assert_close(padded[:real], plain, rtol=1e-5, atol=1e-5)
    for before, after in zip(cache, runner.kv_caches, strict=True):
        assert torch.equal(before, after)


def test_pack_step_refuses_a_bucket_too_small():
    rng = random.Random(0)
    scheduled = [scheduled_request(rng, 4, True) for _ in range(5)]
    with pytest.raises(ValueError, match="num_seqs"):
        pack_step(np.zeros(1000, dtype=np.int64), scheduled, 4, num_seqs=4)


# ----------------------------------------------------------------------------- CUDA


def test_static_lora_metadata_is_rebuilt_only_when_the_slots_change():
    """A decode batch keeps its adapters from step to step: the graph's LoRA metadata is
    built (and copied to the device) again only when its token slots change."""
    from engine.lora import allocate_static_lora_metadata
    from engine.worker.model_runner import ModelRunner

    runner = ModelRunner.__new__(ModelRunner)  # only what _copy_static_lora uses
    runner.device = torch.device("cpu")
    runner._static_lora_slots = {}
    statics = {b: allocate_static_lora_metadata(b, 4, "cpu") for b in (4, 8)}

    def rebuilt(slots: list[int], static, size: int) -> bool:
        """Whether copying ``slots`` wrote the static buffers (poisoned beforehand)."""
        static.packed.fill_(-7)
        runner._copy_static_lora(np.array(slots, dtype=np.int64), static, size)
        return not bool((static.packed == -7).all())

    step = [0, 1, 1, -1]
    assert rebuilt(step, statics[4], 4)
    expected = statics[4].token_slots.clone()
    assert not rebuilt(list(step), statics[4], 4)
    assert torch.equal(expected, torch.tensor(step))
    assert rebuilt([0, 1, 2, -1], statics[4], 4)
    assert statics[4].token_slots.tolist() == [0, 1, 2, -1]
    assert rebuilt([0] * 8, statics[8], 8)
    assert not rebuilt([0, 1, 2, -1], statics[4], 4)  # each graph size remembers its own


cuda_only = pytest.mark.gpu  # CUDA graphs


@cuda_only
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_replay_equals_eager(tiny_model_dir: Path, dtype: str):
    jobs = mixed_jobs(tiny_model_dir)
    got = {}
    for eager in (True, False):
        engine = make_engine(tiny_model_dir, device="cuda", dtype=dtype, enforce_eager=eager)
        got[eager] = run_all(engine, jobs, stagger=2)
        if not eager:
            assert engine.runner.graphs
            assert engine.runner.mixed_graphs
            # Staggered arrivals: prompts join running decodes, in mixed-step graphs.
            assert engine.runner.timings.mixed_graph_steps > 0
            assert engine.runner.timings.graph_steps > engine.runner.timings.mixed_graph_steps
    if dtype == "float32":
        assert got[True] == got[False]
    else:  # batch shapes differ (padding), so bf16 matmuls may round differently
        same = sum(
            a == b for k in got[True] for a, b in zip(got[True][k], got[False][k], strict=True)
        )
        total = sum(len(v) for v in got[True].values())
        assert same >= 0.9 * total


@cuda_only
def test_mixed_step_graphs_can_be_turned_off(tiny_model_dir: Path):
    jobs = mixed_jobs(tiny_model_dir)
    engine = make_engine(
        tiny_model_dir, device="cuda", dtype="float32", max_cudagraph_capture_size=0
    )
    got = run_all(engine, jobs, stagger=2)
    assert engine.runner.graphs
    assert not engine.runner.mixed_graphs
    assert engine.runner.timings.mixed_graph_steps == 0
    assert engine.runner.timings.graph_steps > 0
    eager = make_engine(tiny_model_dir, device="cuda", dtype="float32", enforce_eager=True)
    assert run_all(eager, jobs, stagger=2) == got


@cuda_only
def test_changing_adapters_needs_no_recapture(tiny_model_dir: Path):
    engine = make_engine(tiny_model_dir, device="cuda", dtype="float32", max_loras=2)
    graphs = dict(engine.runner.graphs)
    loras = lora_requests(tiny_model_dir)
    first = run_all(engine, [(f"a{i}", p, loras[0]) for i, p in enumerate(PROMPTS)])
    second = run_all(engine, [(f"b{i}", p, loras[3]) for i, p in enumerate(PROMPTS)])
    assert engine.runner.graphs == graphs
    eager = make_engine(
        tiny_model_dir, device="cuda", dtype="float32", max_loras=2, enforce_eager=True
    )
    assert run_all(eager, [(f"a{i}", p, loras[0]) for i, p in enumerate(PROMPTS)]) == first
    assert run_all(eager, [(f"b{i}", p, loras[3]) for i, p in enumerate(PROMPTS)]) == second


@cuda_only
def test_async_scheduling_with_graphs_equals_sync(tiny_model_dir: Path):
    """Steps launched before the previous one's tokens reach the host take those tokens on
    the device, through the graphs' static inputs as through eager steps."""
    jobs = mixed_jobs(tiny_model_dir)
    got = {}
    for on in (False, True):
        engine = make_engine(tiny_model_dir, device="cuda", dtype="float32", async_scheduling=on)
        launch = engine.runner.launch
        ahead: list[bool] = []

        def spy(sched, previous=None, launch=launch, ahead=ahead):
            ahead.append(previous is not None)
            return launch(sched, previous)

        engine.runner.launch = spy
        got[on] = run_all(engine, jobs, stagger=2)
        assert engine.runner.timings.graph_steps > 0
        assert any(ahead) == on
    assert got[False] == got[True]


@cuda_only
def test_async_launches_never_wait_for_the_device(tiny_model_dir: Path):
    """Launching a step (adapters copied into their slots, packing, copies, graph or eager
    forward, sampling of every kind) must not wait for the steps still in flight: CUDA's
    sync debug mode turns any such wait into an error. Two slots for four adapters, so
    adapters are swapped in while earlier steps run."""
    engine = make_engine(
        tiny_model_dir, device="cuda", dtype="float32", async_scheduling=True, max_loras=2
    )
    loras = lora_requests(tiny_model_dir)
    assert len(loras) > 2
    params = [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.8, seed=5, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.7, top_k=4, logprobs=2, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.0, min_tokens=3, max_tokens=12),
    ]
    jobs = list(zip(params * 2, PROMPTS * 4, strict=False))
    for i, (p, prompt) in enumerate(jobs):
        engine.add_request(f"r{i}", prompt, p, lora_request=loras[i % len(loras)])
    engine.step()  # the first prefill: graphs and kernels already built, adapters read
    manager = engine.runner.lora_manager
    loads = manager.num_device_loads
    launch = engine.runner.launch

    def strict(sched, previous=None):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(sched, previous)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    engine.runner.launch = strict
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    assert steps >= 8
    assert manager.num_device_loads >= loads + 2  # slots were refilled under strict launches
    assert engine.runner.timings.graph_steps > 0
