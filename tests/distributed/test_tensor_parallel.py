"""tensor_parallel_size=N on CPU (gloo, float32): greedy tokens identical to transformers +
PEFT and to tensor_parallel_size=1, for the base model and adapters of ranks 8/16/32 on
different modules, through adapter swaps (max_loras=2), host-cache reloads (max_cpu_loras=2),
an adapter removed and loaded again, chunked prefill and preemption; with fully_sharded_loras
off and on. And a rank killed mid-run ends the engine with an error."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from engine import EngineArgs, LLMEngine, LoRARequest, SamplingParams
from engine.distributed.runner import TPModelRunner
from engine.errors import EngineDead, TensorParallelRankDied
from tests.engine.test_matches_peft import PROMPTS, Reference, lora_requests

MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, seed=7, max_tokens=MAX_TOKENS, ignore_eos=True)


def make_engine(
    model_dir: Path, tp: int, fully_sharded: bool = False, mp: bool = False, **kwargs
) -> LLMEngine:
    args = {
        "model": str(model_dir),
        "device": "cpu",
        "dtype": "float32",
        "tensor_parallel_size": tp,
        "enable_lora": True,
        "fully_sharded_loras": fully_sharded,
        "max_loras": 2,  # four adapters and the base model: slots are swapped
        "max_cpu_loras": 2,  # and adapters leave host memory and are read again
        "max_lora_rank": 32,
        "max_num_seqs": 8,
        "max_num_batched_tokens": 16,  # prompts are chunked
        "num_gpu_blocks_override": 10,  # eight sequences need more: some are preempted
        "disable_log_stats": True,
    }
    args.update(kwargs)
    return LLMEngine.from_engine_args(EngineArgs(**args), enable_multiprocessing=mp)


def jobs(loras: list[LoRARequest]) -> list[tuple[str, str, LoRARequest | None]]:
    a1, a2, a3, a4 = loras  # ranks 8, 16, 32, 8: q+v, attention, all seven, MLP of one layer
    return [
        ("base0", PROMPTS[0], None),
        ("a1-1", PROMPTS[1], a1),
        ("a2-2", PROMPTS[2], a2),
        ("a3-0", PROMPTS[0], a3),
        ("a4-1", PROMPTS[1], a4),
        ("base2", PROMPTS[2], None),
        ("a2-0", PROMPTS[0], a2),
        ("a3-1", PROMPTS[1], a3),
    ]


def run(engine: LLMEngine, work: list[tuple[str, str, LoRARequest | None]]) -> dict[str, list[int]]:
    """Add one job per step (prefills meet decodes), then run everything to the end."""
    pending = list(work)
    out: dict[str, list[int]] = {}
    while pending or engine.has_unfinished_requests():
        if pending:
            rid, prompt, lora = pending.pop(0)
            params = SEEDED if rid.startswith("seeded") else GREEDY
            engine.add_request(rid, prompt, params, lora_request=lora)
        for o in engine.step():
            if o.finished:
                assert o.outputs[0].finish_reason == "length", o.error
                out[o.request_id] = o.outputs[0].token_ids
    return out


def workload(engine: LLMEngine, loras: list[LoRARequest]) -> dict[str, list[int]]:
    out = run(engine, [*jobs(loras), ("seeded-a2", PROMPTS[1], loras[1])])
    # Removed, then requested again: read from disk again on every rank.
    assert engine.remove_lora(loras[0].lora_int_id)
    out |= {f"again-{k}": v for k, v in run(engine, jobs(loras)[:3]).items()}
    return out


@pytest.fixture(scope="module")
def expected(tiny_model_dir: Path) -> dict[str, list[int]]:
    """transformers + PEFT's greedy tokens of every job (seeded ones excluded)."""
    ref = Reference(tiny_model_dir)
    loras = lora_requests(tiny_model_dir)
    want = {
        rid: ref.greedy(p, lora.lora_name if lora else None, MAX_TOKENS)
        for rid, p, lora in jobs(loras)
    }
    return want | {f"again-{k}": want[k] for k in list(want)[:3]}


@pytest.fixture(scope="module")
def single(tiny_model_dir: Path) -> dict[str, list[int]]:
    engine = make_engine(tiny_model_dir, tp=1)
    return workload(engine, lora_requests(tiny_model_dir))


def test_one_rank_matches_peft(expected, single):
    """The baseline the tensor-parallel runs are held to is itself right."""
    assert {k: single[k] for k in expected} == expected


@pytest.mark.parametrize(
    ("tp", "fully_sharded"),
    [(2, False), (2, True), (4, True)],
    ids=["tp2", "tp2-fully-sharded", "tp4-fully-sharded"],
)
def test_tokens_match_peft_and_one_rank(tiny_model_dir, expected, single, tp, fully_sharded):
    engine = make_engine(tiny_model_dir, tp, fully_sharded)
    assert isinstance(engine.runner, TPModelRunner)
    try:
        got = workload(engine, lora_requests(tiny_model_dir))
        stats = engine.runner.lora_manager.get_stats()
    finally:
        engine.engine_core.core.close()
    assert {k: got[k] for k in expected} == expected
    assert got == single  # seeded sampling included: rank 0 samples, as one rank does
    # The workload did swap and reload adapters (else it would prove less).
    assert stats.device_evictions > 0
    assert stats.disk_loads > len(lora_requests(tiny_model_dir))


def test_qwen2_bias_and_tied_embeddings_match_peft(tiny_qwen_dir):
    """q/k/v bias (column-parallel, sliced with the rows) and lm_head tied to the
    vocabulary-parallel embedding."""
    ref = Reference(tiny_qwen_dir)
    a1, a2, a3 = lora_requests(tiny_qwen_dir)
    work = [("base", PROMPTS[0], None), ("a1", PROMPTS[1], a1), ("a2", PROMPTS[2], a2)]
    work.append(("a3", PROMPTS[0], a3))
    engine = make_engine(tiny_qwen_dir, 2, fully_sharded=True)
    try:
        got = run(engine, work)
    finally:
        engine.engine_core.core.close()
    for rid, prompt, lora in work:
        assert got[rid] == ref.greedy(prompt, lora.lora_name if lora else None, MAX_TOKENS), rid


def step_until_done(engine: LLMEngine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def test_a_killed_rank_ends_the_engine_with_an_error(tiny_model_dir):
    engine = make_engine(tiny_model_dir, tp=2)
    runner = engine.runner
    assert isinstance(runner, TPModelRunner)
    assert runner.ranks is not None
    long = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, long)
    while not any(o.outputs[0].token_ids for o in engine.step()):
        pass  # running: tokens come out
    victim = runner.ranks.procs[0]
    os.kill(victim.pid, signal.SIGKILL)
    with pytest.raises(
        TensorParallelRankDied, match=f"rank 1 \\(pid {victim.pid}\\) was killed by SIGKILL"
    ):
        step_until_done(engine)
    # The engine stays dead, and says so at once.
    engine.add_request("after", PROMPTS[0], long)
    with pytest.raises(EngineDead, match="rank 1"):
        engine.step()
    engine.engine_core.core.close()


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_engine_core_process_runs_the_ranks_and_takes_them_down(tiny_model_dir, expected):
    """enable_multiprocessing: the core process is rank 0 and starts the others; when it is
    killed, they exit too (no orphan waits for a step that never comes)."""
    engine = make_engine(tiny_model_dir, 2, mp=True)
    core = engine.engine_core.process
    assert core.pid is not None
    ranks = children(core.pid)
    assert len(ranks) == 1
    work = jobs(lora_requests(tiny_model_dir))[:3]
    assert run(engine, work) == {rid: expected[rid] for rid, _, _ in work}
    os.kill(core.pid, signal.SIGKILL)
    while running(ranks[0]):
        time.sleep(0.05)  # waiting for the condition; the test's timeout bounds it
    engine.shutdown()
