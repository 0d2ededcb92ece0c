"""Prefix caching on the tiny model: greedy outputs equal transformers + PEFT (which knows
nothing of caches) while requests reuse the KV blocks of earlier prompts — only under the
same adapter, never across adapters or between an adapter and the base model — and under
preemption and eviction; the cached-token counts reach ``RequestOutput`` in both modes."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import pytest

from engine import EngineArgs, LLMEngine, LoRARequest, SamplingParams
from engine.core_messages import CoreStats, EngineCoreOutputs, decode, encode
from engine.metrics import LoggingStatLogger, Stats
from engine.outputs import RequestOutput

from .test_matches_peft import MAX_TOKENS, Reference, lora_requests, make_engine

BLOCK_SIZE = 8
SYSTEM = (
    "You are a helpful assistant. Answer briefly and politely, and never reveal the secret word."
)
TURNS = [" What is the capital of France?", " Tell me a joke about cats.", " Count to ten."]
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)

Job = tuple[str, str, LoRARequest | None]


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Reference:
    return Reference(tiny_model_dir)


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def async_scheduling(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def run_waves(engine: LLMEngine, waves: list[list[Job]]) -> dict[str, RequestOutput]:
    """Each wave's requests are added together, once the previous wave has finished."""
    final: dict[str, RequestOutput] = {}
    for wave in waves:
        for rid, prompt, lora in wave:
            engine.add_request(rid, prompt, GREEDY, lora_request=lora)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    assert out.outputs[0].finish_reason == "length", out.error
                    final[out.request_id] = out
    return final


def run_staggered(engine: LLMEngine, jobs: list[Job], stagger: int) -> dict[str, RequestOutput]:
    """One request every ``stagger`` steps, so prompts join running decodes."""
    final: dict[str, RequestOutput] = {}
    pending, step = list(jobs), 0
    while pending or engine.has_unfinished_requests():
        if pending and step % stagger == 0:
            rid, prompt, lora = pending.pop(0)
            engine.add_request(rid, prompt, GREEDY, lora_request=lora)
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        step += 1
    return final


def check_peft(got: dict[str, RequestOutput], jobs: list[Job], reference: Reference) -> None:
    for rid, prompt, lora in jobs:
        expected = reference.greedy(prompt, lora.lora_name if lora else None)
        assert got[rid].outputs[0].token_ids == expected, rid


def expected_cached(
    engine: LLMEngine, prompt: str, earlier: list[str], block_size: int = BLOCK_SIZE
) -> int:
    """Tokens a request finds cached when the ``earlier`` prompts (same adapter) ran before
    it: the longest common start of the token ids, in whole blocks, short of its last token."""
    ids = engine.tokenizer.encode(prompt)
    best = 0
    for other in map(engine.tokenizer.encode, earlier):
        common = 0
        while common < min(len(ids), len(other)) and ids[common] == other[common]:
            common += 1
        best = max(best, min(common, len(ids) - 1) // block_size * block_size)
    return best


def test_shared_prefixes_are_reused_only_within_an_adapter(
    tiny_model_dir, reference, async_scheduling
):
    loras = lora_requests(tiny_model_dir)
    engine = make_engine(tiny_model_dir, block_size=BLOCK_SIZE, async_scheduling=async_scheduling)
    assert engine.config.cache.enable_prefix_caching  # on by default
    owners: list[LoRARequest | None] = [None, loras[0], loras[1]]

    def name(lora: LoRARequest | None) -> str:
        return lora.lora_name if lora else "base"

    waves: list[list[Job]] = [
        # The same prompt under three owners in one step: nothing to share across them.
        [(f"{name(o)}-0", SYSTEM + TURNS[0], o) for o in owners],
        # Later turns find their owner's system prompt; a new adapter finds nothing, though
        # three others hold the same tokens.
        [(f"{name(o)}-1", SYSTEM + TURNS[1], o) for o in owners]
        + [(f"{name(loras[2])}-1", SYSTEM + TURNS[1], loras[2])],
        [(f"{name(o)}-2", SYSTEM + TURNS[2], o) for o in owners],
        # A prompt cached whole: its last block is computed again, for the logits.
        [(f"{name(loras[0])}-again", SYSTEM + TURNS[0], loras[0])],
    ]
    got = run_waves(engine, waves)
    jobs = [job for wave in waves for job in wave]
    check_peft(got, jobs, reference)

    seen: dict[str, list[str]] = {}
    for wave in waves:
        for rid, prompt, lora in wave:
            earlier = seen.get(name(lora), [])
            assert got[rid].num_cached_tokens == expected_cached(engine, prompt, earlier), rid
        for _, prompt, lora in wave:
            seen.setdefault(name(lora), []).append(prompt)
    assert all(got[f"{name(o)}-0"].num_cached_tokens == 0 for o in owners)
    assert got[f"{name(loras[2])}-1"].num_cached_tokens == 0
    assert all(got[f"{name(o)}-1"].num_cached_tokens >= 32 for o in owners)  # 4 blocks
    again = got[f"{name(loras[0])}-again"].num_cached_tokens
    assert again == (len(engine.tokenizer.encode(SYSTEM + TURNS[0])) - 1) // 8 * 8
    # The adapters change the output, so sharing across them would show.
    assert len({tuple(got[f"{name(o)}-0"].outputs[0].token_ids) for o in owners}) == 3


def test_outputs_match_peft_under_preemption_and_eviction(
    tiny_model_dir, reference, async_scheduling
):
    # 16 blocks of 8 tokens: two ~66-token sequences at most, so sequences are preempted
    # and cached blocks evicted, while requests of one adapter share their system prompt.
    engine = make_engine(
        tiny_model_dir,
        block_size=BLOCK_SIZE,
        num_gpu_blocks_override=16,
        max_num_seqs=8,
        async_scheduling=async_scheduling,
    )
    preemptions: list[int] = []
    engine.stat_loggers.append(
        type("L", (), {"record": lambda self, s: preemptions.append(s.num_preemptions)})()
    )
    loras: list[LoRARequest | None] = [None, *lora_requests(tiny_model_dir)[:2]]
    jobs: list[Job] = [
        (f"{i}-{j}", SYSTEM + turn, lora)
        for j, turn in enumerate(TURNS)
        for i, lora in enumerate(loras)
    ]
    got = run_waves(engine, [jobs[:5], jobs[5:]])
    check_peft(got, jobs, reference)
    assert sum(preemptions) > 0
    assert engine.block_manager.num_evictions > 0
    assert any(out.num_cached_tokens for out in got.values())


def test_chunked_prefill_and_the_mixed_step_cap_with_shared_prefixes(
    tiny_model_dir, reference, async_scheduling
):
    # 16 tokens a step, at most 6 prompt tokens while decodes run; three requests one at a
    # time, then six at once, which start after their cached blocks, in chunks, beside decodes.
    engine = make_engine(
        tiny_model_dir,
        block_size=BLOCK_SIZE,
        max_num_batched_tokens=16,
        max_num_mixed_prefill_tokens=6,
        max_num_seqs=4,
        async_scheduling=async_scheduling,
    )
    assert engine.scheduler.config.max_num_mixed_prefill_tokens == 6
    loras: list[LoRARequest | None] = [None, *lora_requests(tiny_model_dir)[:2]]
    jobs: list[Job] = [
        (f"{i}-{j}", SYSTEM + turn, lora)
        for j, turn in enumerate(TURNS)
        for i, lora in enumerate(loras)
    ]
    got = run_waves(engine, [[job] for job in jobs[:3]] + [jobs[3:]])
    check_peft(got, jobs, reference)
    assert all(got[rid].num_cached_tokens for rid, _, _ in jobs[3:])


def test_no_reuse_with_prefix_caching_off(tiny_model_dir, reference):
    engine = make_engine(tiny_model_dir, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    lora = lora_requests(tiny_model_dir)[0]
    waves: list[list[Job]] = [[("a", SYSTEM + TURNS[0], lora)], [("b", SYSTEM + TURNS[1], lora)]]
    got = run_waves(engine, waves)
    check_peft(got, [job for wave in waves for job in wave], reference)
    assert [got["a"].num_cached_tokens, got["b"].num_cached_tokens] == [0, 0]
    assert engine.block_manager.num_cached_blocks == 0


def test_a_removed_adapters_blocks_are_not_found_when_its_id_comes_back(tiny_model_dir, reference):
    engine = make_engine(tiny_model_dir, block_size=BLOCK_SIZE)
    one, two = lora_requests(tiny_model_dir)[:2]
    got = run_waves(engine, [[("first", SYSTEM + TURNS[0], one)]])
    engine.remove_lora(one.lora_int_id)
    # The id now names other weights: reusing the old KV would give the old adapter's output.
    reused = LoRARequest(two.lora_name, one.lora_int_id, two.lora_path)
    got.update(run_waves(engine, [[("second", SYSTEM + TURNS[1], reused)]]))
    assert got["second"].num_cached_tokens == 0
    assert got["second"].outputs[0].token_ids == reference.greedy(SYSTEM + TURNS[1], two.lora_name)


def test_cached_tokens_cross_the_process_boundary(tiny_model_dir, reference):
    lora = lora_requests(tiny_model_dir)[0]
    waves: list[list[Job]] = [[("a", SYSTEM + TURNS[0], lora)], [("b", SYSTEM + TURNS[1], lora)]]
    args = EngineArgs(
        model=str(tiny_model_dir),
        device="cpu",
        dtype="float32",
        enable_lora=True,
        max_loras=2,
        max_lora_rank=32,
        block_size=BLOCK_SIZE,
        disable_log_stats=True,
    )
    with LLMEngine.from_engine_args(args, enable_multiprocessing=True) as engine:
        got = run_waves(engine, waves)
        expected = expected_cached(engine, SYSTEM + TURNS[1], [SYSTEM + TURNS[0]])
    check_peft(got, [job for wave in waves for job in wave], reference)
    assert got["a"].num_cached_tokens == 0
    assert got["b"].num_cached_tokens == expected >= 32  # the system prompt's full blocks


def test_a_step_that_fails_to_launch_leaves_no_cached_blocks(tiny_model_dir):
    engine = make_engine(tiny_model_dir, block_size=BLOCK_SIZE, enable_lora=False)
    run_waves(engine, [[("a", SYSTEM + TURNS[0], None)]])
    assert engine.block_manager.num_cached_blocks > 0
    launch = engine.runner.launch

    def fail(*args: Any) -> Any:
        raise RuntimeError("launch failed")

    engine.runner.launch = fail  # type: ignore[method-assign]
    engine.add_request("b", SYSTEM + TURNS[1], GREEDY)
    with pytest.raises(RuntimeError, match="launch failed"):
        engine.step()
    # Its blocks were entered when it was scheduled, and no step will fill them.
    assert engine.block_manager.num_cached_blocks == 0
    engine.runner.launch = launch  # type: ignore[method-assign]


@pytest.mark.gpu  # CUDA graphs
def test_cuda_graph_steps_that_start_after_cached_blocks_equal_eager_without_caching(
    tiny_model_dir,
):
    """On a GPU, prompts that start after their cached blocks run in the decode graphs (one
    token left) and in the mixed-step graphs beside decodes: the same tokens as eager
    steps with nothing cached (float32)."""
    loras: list[LoRARequest | None] = [None, *lora_requests(tiny_model_dir)[:2]]
    prompts = [SYSTEM + turn for turn in TURNS] + [SYSTEM + TURNS[0]]
    jobs: list[Job] = [
        (f"{i}-{j}", prompt, lora)
        for j, prompt in enumerate(prompts)
        for i, lora in enumerate(loras)
    ]
    got = {}
    for caching in (True, False):
        engine = make_engine(
            tiny_model_dir,
            device="cuda",
            dtype="float32",
            block_size=BLOCK_SIZE,
            enforce_eager=not caching,
            enable_prefix_caching=caching,
        )
        got[caching] = run_staggered(engine, jobs, stagger=2)
        if caching:
            assert engine.runner.timings.mixed_graph_steps > 0
            assert sum(out.num_cached_tokens or 0 for out in got[caching].values()) > 0
    for rid, _, _ in jobs:
        assert got[True][rid].outputs[0].token_ids == got[False][rid].outputs[0].token_ids, rid


def test_core_stats_count_the_admitted_and_the_cached_tokens(tiny_model_dir):
    engine = make_engine(tiny_model_dir, block_size=BLOCK_SIZE, enable_lora=False)
    core = engine.core
    stats: list[CoreStats] = []
    step = core.step

    def spy() -> EngineCoreOutputs:
        out = step()
        stats.append(out.stats)
        return out

    core.step = spy  # type: ignore[method-assign]
    got = run_waves(engine, [[("a", SYSTEM + TURNS[0], None)], [("b", SYSTEM + TURNS[1], None)]])
    queried = sum(s.num_prefix_queried_tokens for s in stats)
    hits = sum(s.num_prefix_hit_tokens for s in stats)
    lengths = [len(out.prompt_token_ids) for out in got.values()]
    assert queried == sum(lengths)
    assert hits == got["b"].num_cached_tokens > 0


def test_core_outputs_carry_cached_tokens_through_the_codec():
    stats = CoreStats(1, 2, 0.5, 3, 2, 1, 0, 0.01, 0.001, 0.008, 0.001)
    stats.num_prefix_queried_tokens, stats.num_prefix_hit_tokens = 100, 64
    out = EngineCoreOutputs(["7"], [5], [None], [None], [1.5], None, [], stats, [64])
    back = decode(encode(out))
    assert back == out
    assert back.num_cached_tokens == [64]
    assert (back.stats.num_prefix_queried_tokens, back.stats.num_prefix_hit_tokens) == (100, 64)


def test_logging_stat_logger_reports_the_prefix_cache_hit_rate(caplog):
    logger = LoggingStatLogger(interval_s=0.0)

    def stats(queried: int, hits: int) -> Stats:
        fields: dict[str, Any] = {
            "now": 1e12,
            "num_waiting": 0,
            "num_running": 1,
            "kv_cache_usage": 0.1,
            "num_prompt_tokens": 0,
            "num_generation_tokens": 1,
            "num_preemptions": 0,
            "step_time_s": 0.01,
        }
        return Stats(**fields, num_prefix_queried_tokens=queried, num_prefix_hit_tokens=hits)

    with caplog.at_level(logging.INFO, logger="lorastream.engine"):
        logger.record(stats(200, 50))
    assert "prefix cache hit rate 25.0%" in caplog.text


def test_flags_turn_prefix_caching_off_and_on():
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    assert EngineArgs.from_cli_args(parser.parse_args(["--model", "m"])).enable_prefix_caching
    off = parser.parse_args(["--model", "m", "--no-enable-prefix-caching"])
    assert EngineArgs.from_cli_args(off).enable_prefix_caching is False
    assert "--no-enable-prefix-caching" in parser.format_help()
