"""``enable_multiprocessing=True``: the engine core in a spawned process behaves like the
in-process engine (and so like transformers + PEFT, which that one is checked against):
same tokens, same text, same errors; a dead core fails requests instead of hanging them.

Each spawned core imports torch (seconds on a shared CPU), so the module reuses one."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import (
    AsyncLLMEngine,
    EngineArgs,
    LLMEngine,
    LoRARequest,
    RequestOutputKind,
    SamplingParams,
)
from engine.core_messages import (
    AddRequest,
    CoreStats,
    EngineCoreOutputs,
    FailedRequest,
    decode,
    encode,
)
from engine.errors import (
    AdapterCorrupt,
    AdapterNotFound,
    EngineDead,
    InvalidRequest,
    LoRAStreamError,
    PromptTooLong,
)
from engine.metrics import Stats
from engine.outputs import RequestOutput

from .test_engine_behaviour import copy_adapter
from .test_matches_peft import PROMPTS, adapter_dirs, lora_requests

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


class Recorder:
    def __init__(self) -> None:
        self.stats: list[Stats] = []

    def record(self, stats: Stats) -> None:
        self.stats.append(stats)


def engine_args(model_dir: Path, **kwargs: Any) -> EngineArgs:
    defaults: dict[str, Any] = {
        "model": str(model_dir),
        "device": "cpu",
        "dtype": "float32",
        "enable_lora": True,
        "max_loras": 4,
        "max_cpu_loras": 8,
        "max_lora_rank": 32,
        "max_num_seqs": 16,
        "disable_log_stats": True,
    }
    defaults.update(kwargs)
    return EngineArgs(**defaults)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def recorder() -> Recorder:
    return Recorder()


# Kernel settings other than the defaults that change nothing on CPU (where every kernel is
# a torch reference anyway), so the core process's outputs still equal the in-process ones.
MP_KERNEL_ARGS: dict[str, Any] = {
    "kernel_backend": "torch",
    "lora_fused_silu": False,
    "lora_stack_a_max": 4096,
    "kernel_launch": {"attention_decode_num_warps": 4, "lora_shrink_programs_per_sm": 6},
}


@pytest.fixture(scope="module")
def mp_engine(tiny_model_dir: Path, recorder: Recorder) -> Iterator[LLMEngine]:
    engine = LLMEngine.from_engine_args(
        engine_args(tiny_model_dir, **MP_KERNEL_ARGS),
        stat_loggers=[recorder],
        enable_multiprocessing=True,
    )
    yield engine
    engine.shutdown()
    assert engine.engine_core.process.exitcode == 0  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def inproc_engine(tiny_model_dir: Path) -> LLMEngine:
    return LLMEngine.from_engine_args(engine_args(tiny_model_dir))


def drain(engine: LLMEngine, timeout_s: float = 60.0) -> dict[str, RequestOutput]:
    final: dict[str, RequestOutput] = {}
    deadline = time.monotonic() + timeout_s
    while engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "requests did not finish"
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


def run(engine: LLMEngine, jobs: list[tuple[str, Any, SamplingParams, LoRARequest | None]]):
    for rid, prompt, params, lora in jobs:
        engine.add_request(rid, prompt, params, lora_request=lora)
    return drain(engine)


def completion(out: RequestOutput) -> tuple[Any, ...]:
    c = out.outputs[0]
    return (c.token_ids, c.text, c.finish_reason, c.stop_reason, out.error)


def assert_same_logprobs(got: RequestOutput, expected: RequestOutput) -> None:
    # The core in its own process batches requests as they arrive, so float32 rounding
    # may differ in the last bits; the tokens and text above must not.
    a, b = got.outputs[0].logprobs, expected.outputs[0].logprobs
    assert (a is None) == (b is None)
    for x, y in zip(a or [], b or [], strict=True):
        assert x.keys() == y.keys()
        assert [v.logprob for v in x.values()] == pytest.approx(
            [v.logprob for v in y.values()], abs=1e-4
        )
        assert [(v.rank, v.decoded_token) for v in x.values()] == [
            (v.rank, v.decoded_token) for v in y.values()
        ]


def test_messages_round_trip_without_pickle():
    params = SamplingParams(
        temperature=0.5, stop=["x"], logprobs=2, seed=3, output_kind=RequestOutputKind.DELTA
    )
    lora = LoRARequest("a", 1, "/p")
    add = AddRequest("7", [1, 2], params, lora, 2, 0, 12.5)
    assert decode(encode(add)) == add
    assert decode(encode(add)).sampling_params.output_kind is RequestOutputKind.DELTA
    out = EngineCoreOutputs(
        ["7", "8"],
        [5, 6],
        [None, "stop"],
        [None, 6],
        [1.5, None],
        [([5, 9], [-0.1, -2.0], [1, 2]), None],
        [FailedRequest("9", AdapterCorrupt("bad"))],
        CoreStats(1, 2, 0.5, 3, 2, 1, 0, 0.01, 0.001, 0.008, 0.001),
        prompt_logprobs=[[None, ([3], [-1.5], [4])], None],
    )
    back = decode(encode(out))
    # msgpack has no tuples: they come back as lists, which the front reads alike.
    assert back.logprobs == [[[5, 9], [-0.1, -2.0], [1, 2]], None]
    assert back.prompt_logprobs == [[None, [[3], [-1.5], [4]]], None]
    back.logprobs, back.prompt_logprobs = out.logprobs, out.prompt_logprobs
    assert isinstance(back.failed[0].error, AdapterCorrupt)
    assert back.failed[0].error.message == "bad"
    back.failed[0].error = out.failed[0].error  # exceptions compare by identity
    assert back == out


def test_greedy_outputs_equal_the_in_process_engine(mp_engine, inproc_engine, tiny_model_dir):
    loras: list[LoRARequest | None] = [None, *lora_requests(tiny_model_dir)]
    with_logprobs = SamplingParams(temperature=0.0, max_tokens=5, logprobs=2, ignore_eos=True)
    jobs = [
        (f"{i}-{j}", prompt, GREEDY, lora)
        for i, lora in enumerate(loras)
        for j, prompt in enumerate(PROMPTS)
    ]
    jobs.append(("lp", "Once upon a time", with_logprobs, loras[2]))
    jobs.append(("ids", {"prompt_token_ids": [5, 6, 7, 8]}, GREEDY, loras[1]))
    expected = run(inproc_engine, jobs)
    got = run(mp_engine, jobs)
    assert set(got) == set(expected)
    for rid, out in expected.items():
        assert completion(got[rid]) == completion(out), rid
        assert_same_logprobs(got[rid], out)
        assert got[rid].prompt == out.prompt
        assert got[rid].prompt_token_ids == out.prompt_token_ids
        assert got[rid].lora_name == out.lora_name
        assert got[rid].metrics["first_token_time"] <= got[rid].metrics["finished_time"]
    # The adapters change the output, so the comparison above covers them.
    assert completion(expected["0-0"]) != completion(expected["1-0"])


def test_stop_string_ends_the_request_as_in_process(mp_engine, inproc_engine):
    free = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    text = run(inproc_engine, [("free", "The quick brown fox", free, None)])["free"].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    stopped = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop])
    job = [("stopped", "The quick brown fox", stopped, None)]
    expected = run(inproc_engine, job)["stopped"]
    got = run(mp_engine, job)["stopped"]
    assert completion(got) == completion(expected)
    assert got.outputs[0].finish_reason == "stop"
    assert got.outputs[0].text == text[: text.index(stop)]
    assert not mp_engine.has_unfinished_requests()


def wait_for_idle_core(engine: LLMEngine, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while engine.get_load().num_running or engine.get_load().kv_cache_usage:
        assert time.monotonic() < deadline, engine.get_load()
        time.sleep(0.01)


def test_abort_reports_abort_and_frees_the_core(mp_engine):
    long = SamplingParams(max_tokens=500, ignore_eos=True)
    mp_engine.add_request("a", "Once upon a time", long)
    while not any(o.request_id == "a" for o in mp_engine.step()):
        pass
    mp_engine.abort_request("a")
    outs = mp_engine.step()
    assert [o.outputs[0].finish_reason for o in outs if o.request_id == "a"] == ["abort"]
    assert not mp_engine.has_unfinished_requests()
    wait_for_idle_core(mp_engine)
    # The id may be used again at once: outputs of the aborted request never leak into it.
    short = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    assert len(run(mp_engine, [("a", "Once", short, None)])["a"].outputs[0].token_ids) == 3


@pytest.mark.parametrize(
    "bad",
    [
        {"prompt": {"prompt_token_ids": [5] * 1024}},
        {"prompt": {"prompt_token_ids": [1, 10**9]}},
        {"prompt": 42},
        {"prompt": {"prompt_token_ids": []}},
        {"lora": lambda d, tmp: LoRARequest("missing", 90, str(tmp / "missing"))},
        {"lora": lambda d, tmp: LoRARequest("r", 91, str(copy_adapter(d, tmp / "r", r=64)))},
        {"lora": lambda d, tmp: LoRARequest("u", 92, str(copy_adapter(d, tmp / "u", bias="all")))},
    ],
    ids=["too-long", "vocab", "kind", "empty", "missing-adapter", "rank", "bias"],
)
def test_bad_requests_raise_the_same_errors(
    mp_engine, inproc_engine, tiny_model_dir, tmp_path, bad
):
    lora = bad["lora"](adapter_dirs(tiny_model_dir)[0], tmp_path) if "lora" in bad else None
    prompt = bad.get("prompt", "hello")
    with pytest.raises(LoRAStreamError) as expected:
        inproc_engine.add_request("bad", prompt, GREEDY, lora_request=lora)
    with pytest.raises(type(expected.value)) as got:
        mp_engine.add_request("bad", prompt, GREEDY, lora_request=lora)
    assert str(got.value) == str(expected.value)
    assert not mp_engine.has_unfinished_requests()


def test_duplicate_request_id_is_refused(mp_engine):
    mp_engine.add_request("dup", "hi", GREEDY)
    with pytest.raises(InvalidRequest, match="already"):
        mp_engine.add_request("dup", "hi", GREEDY)
    drain(mp_engine)


def test_adapter_load_errors_fail_only_that_request(mp_engine, tiny_model_dir, tmp_path):
    good = adapter_dirs(tiny_model_dir)[0]
    corrupt = copy_adapter(good, tmp_path / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    final = run(
        mp_engine,
        [
            ("ok-base", "hello there", GREEDY, None),
            ("ok-lora", "hello there", GREEDY, LoRARequest(good.name, 1, str(good))),
            ("corrupt", "hello there", GREEDY, LoRARequest("c", 93, str(corrupt))),
        ],
    )
    assert final["ok-base"].outputs[0].finish_reason == "length"
    assert final["ok-lora"].outputs[0].finish_reason == "length"
    assert final["corrupt"].outputs[0].finish_reason == "error"
    assert isinstance(final["corrupt"].error, AdapterCorrupt)


def test_adapters_are_managed_in_the_core(mp_engine, tiny_model_dir):
    d = adapter_dirs(tiny_model_dir)[3]
    assert mp_engine.add_lora(LoRARequest("preloaded", 40, str(d)))
    assert 40 in mp_engine.list_loras()
    assert mp_engine.get_lora_request("preloaded") is not None
    with pytest.raises(AdapterNotFound):
        mp_engine.add_lora(LoRARequest("nope", 41, "/nonexistent"))
    assert mp_engine.remove_lora(40)
    assert 40 not in mp_engine.list_loras()


def test_stats_and_step_timings_come_from_the_core(mp_engine, recorder):
    recorder.stats.clear()
    params = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    run(mp_engine, [("s", "Once upon a time", params, None)])
    assert sum(s.num_generation_tokens for s in recorder.stats) == 7
    assert ("s", "length") in [f for s in recorder.stats for f in s.finished]
    timings = mp_engine.get_step_timings()
    assert timings["core_steps"] > 0
    assert timings["core_execute_ms"] > 0
    assert timings["front_process_ms"] > 0
    with pytest.raises(AttributeError, match="own process"):
        _ = mp_engine.scheduler


def test_the_core_process_runs_the_kernel_config_it_was_given(mp_engine, inproc_engine):
    """The kernel settings travel with the engine's arguments into the core's own process,
    and its model runs with them (what it reports is what its layers hold)."""
    got = mp_engine.get_kernel_config()
    assert got["backend"] == "torch"
    assert got["lora_fused_silu"] is False
    assert got["lora_stack_a_max"] == 4096
    assert got["launch"]["attention_decode_num_warps"] == 4
    assert got["launch"]["lora_shrink_programs_per_sm"] == 6
    default = inproc_engine.get_kernel_config()
    assert (default["backend"], default["lora_fused_silu"]) == ("auto", True)
    assert default["launch"]["attention_decode_num_warps"] == 2
    assert (
        got["launch"]["lora_expand_decode_block_n"]
        == default["launch"]["lora_expand_decode_block_n"]
    )


def child_pids() -> set[int]:
    return {p.pid for p in multiprocessing.active_children() if p.pid is not None}


@pytest.mark.anyio
async def test_async_engine_streams_with_multiprocessing(tiny_model_dir, inproc_engine):
    before = child_pids()
    engine = AsyncLLMEngine.from_engine_args(
        engine_args(tiny_model_dir, max_num_seqs=4, num_gpu_blocks_override=36),
        enable_multiprocessing=True,
    )
    process = engine.engine.engine_core.process  # type: ignore[attr-defined]
    try:
        # The scheduler's KV-cache check, made by the front: it still raises at once.
        with pytest.raises(PromptTooLong, match="KV-cache blocks of 16; the cache has 36"):
            async for _ in engine.generate({"prompt_token_ids": [5] * 600}, GREEDY, "big"):
                pass
        lora = lora_requests(tiny_model_dir)[0]
        seen = []
        async for out in engine.generate("Once upon a time", GREEDY, "full", lora_request=lora):
            seen.append(len(out.outputs[0].token_ids))
        assert out.finished
        assert seen == sorted(set(seen))
        assert seen[-1] == GREEDY.max_tokens
        expected = run(inproc_engine, [("full", "Once upon a time", GREEDY, lora)])["full"]
        assert completion(out) == completion(expected)

        long = SamplingParams(max_tokens=500, ignore_eos=True)
        stream = engine.generate("Once upon a time", long, "early")
        async with contextlib.aclosing(stream):  # type: ignore[type-var]
            async for out in stream:
                if len(out.outputs[0].token_ids) >= 2:
                    break
        assert engine.engine.get_num_unfinished_requests() == 0
        for _ in range(3000):
            if engine.engine.get_load().num_running == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.free_capacity() == 4

        with pytest.raises(AdapterNotFound):
            async for _ in engine.generate(
                "x", GREEDY, "bad", lora_request=LoRARequest("nope", 5, "/nonexistent")
            ):
                pass
        assert await engine.add_lora(lora_requests(tiny_model_dir)[1])
    finally:
        await engine.shutdown()
    assert process.exitcode == 0  # stopped, not terminated or crashed
    assert child_pids() <= before


@pytest.mark.anyio
async def test_killed_core_fails_pending_requests_with_engine_dead(tiny_model_dir):
    import anyio

    engine = AsyncLLMEngine.from_engine_args(
        engine_args(tiny_model_dir, enable_lora=False, max_cpu_loras=None),
        enable_multiprocessing=True,
    )
    process = engine.engine.engine_core.process  # type: ignore[attr-defined]
    long = SamplingParams(max_tokens=None, ignore_eos=True)
    results: dict[str, BaseException | None] = {}

    async def consume(rid: str, started: anyio.Event) -> None:
        try:
            async for _ in engine.generate("Once upon a time", long, rid):
                started.set()
            results[rid] = None
        except BaseException as e:
            results[rid] = e

    try:
        async with anyio.create_task_group() as tg:
            events = [anyio.Event(), anyio.Event()]
            for i, ev in enumerate(events):
                tg.start_soon(consume, f"r{i}", ev)
            for ev in events:
                await ev.wait()
            assert process.pid is not None
            os.kill(process.pid, signal.SIGKILL)
            with anyio.fail_after(10):  # both fail promptly instead of hanging
                while len(results) < 2:
                    await anyio.sleep(0.01)
        assert all(isinstance(e, EngineDead) for e in results.values()), results
        assert "exit code -9" in str(results["r0"])
        with pytest.raises(EngineDead):
            async for _ in engine.generate("hi", GREEDY, "after"):
                pass
        with pytest.raises(EngineDead):
            engine.engine.add_request("sync", "hi", GREEDY)
    finally:
        await engine.shutdown()
    assert not process.is_alive()


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; nobody may be left to reap it


def test_core_exits_when_its_parent_is_killed(tiny_model_dir):
    """Also the offline ``LLM`` with the core in its own process, in a script of its own."""
    script = f"""
import time
from engine import LLM, SamplingParams

if __name__ == "__main__":
    llm = LLM({str(tiny_model_dir)!r}, device="cpu", enable_multiprocessing=True)
    outs = llm.generate(["Once", "upon"], SamplingParams(max_tokens=3, ignore_eos=True))
    print(llm.llm_engine.engine_core.process.pid, [len(o.outputs[0].token_ids) for o in outs])
    print(flush=True)
    time.sleep(300)
"""
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=repo, env=env, text=True
    )
    try:
        assert parent.stdout is not None
        pid, lengths = parent.stdout.readline().split(" ", 1)
        core_pid = int(pid)
        assert lengths.strip() == "[3, 3]"
        assert is_running(core_pid)
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    deadline = time.monotonic() + 20
    while is_running(core_pid):
        assert time.monotonic() < deadline, "the engine core outlived its parent"
        time.sleep(0.05)
