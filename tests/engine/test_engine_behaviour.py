"""Engine behaviour beyond greedy equality: adapter errors, seeds, stop strings, logprobs,
the async engine and the offline LLM class — on the tiny model, float32, CPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from engine import (
    AsyncLLMEngine,
    EngineArgs,
    LLMEngine,
    LoRARequest,
    RequestOutputKind,
    SamplingParams,
)
from engine.errors import (
    AdapterCorrupt,
    AdapterNotFound,
    AdapterRankTooLarge,
    AdapterShapeMismatch,
    AdapterUnsupported,
    InvalidRequest,
    InvalidSamplingParams,
    PromptTooLong,
)
from engine.llm import LLM
from engine.metrics import Stats
from engine.outputs import ResumedOutput

from .test_matches_peft import adapter_dirs, make_engine


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def engine(tiny_model_dir: Path, request: pytest.FixtureRequest) -> LLMEngine:
    return make_engine(
        tiny_model_dir,
        max_loras=2,
        max_cpu_loras=3,
        max_lora_rank=32,
        async_scheduling=request.param,
    )


def drain(engine: LLMEngine) -> dict[str, object]:
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


def copy_adapter(src: Path, dst: Path, **config_changes: object) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(config_changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda d: copy_adapter(d[0], d[1], r=64, rank_pattern={}), AdapterRankTooLarge),
        (lambda d: copy_adapter(d[0], d[1], use_dora=True), AdapterUnsupported),
        (lambda d: copy_adapter(d[0], d[1], bias="all"), AdapterUnsupported),
        (lambda d: copy_adapter(d[0], d[1], target_modules=["lm_head"]), AdapterUnsupported),
        (lambda d: d[1], AdapterNotFound),
    ],
    ids=["rank", "dora", "bias", "module", "missing"],
)
def test_bad_adapter_config_is_refused_at_add_request(
    engine, tiny_model_dir, tmp_path, mutate, error
):
    bad = mutate((adapter_dirs(tiny_model_dir)[2], tmp_path / "bad"))
    with pytest.raises(error) as info:
        engine.add_request("bad", "hello", GREEDY, lora_request=LoRARequest("bad", 90, str(bad)))
    assert str(bad) in str(info.value)
    assert not engine.has_unfinished_requests()


def test_corrupt_weights_fail_one_request_others_finish(engine, tiny_model_dir, tmp_path):
    good = adapter_dirs(tiny_model_dir)[0]
    corrupt = copy_adapter(good, tmp_path / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    wrong_shape = copy_adapter(good, tmp_path / "shape")
    from safetensors.torch import load_file, save_file

    tensors = load_file(wrong_shape / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)
    save_file(tensors, wrong_shape / "adapter_model.safetensors")

    engine.add_request("ok-base", "hello there", GREEDY)
    engine.add_request(
        "ok-lora", "hello there", GREEDY, lora_request=LoRARequest(good.name, 1, str(good))
    )
    engine.add_request(
        "corrupt", "hello there", GREEDY, lora_request=LoRARequest("c", 91, str(corrupt))
    )
    engine.add_request(
        "shape", "hello there", GREEDY, lora_request=LoRARequest("s", 92, str(wrong_shape))
    )
    final = drain(engine)
    assert final["ok-base"].outputs[0].finish_reason == "length"
    assert final["ok-lora"].outputs[0].finish_reason == "length"
    assert final["corrupt"].outputs[0].finish_reason == "error"
    assert isinstance(final["corrupt"].error, AdapterCorrupt)
    assert final["shape"].outputs[0].finish_reason == "error"
    assert isinstance(final["shape"].error, AdapterShapeMismatch)


def test_bad_requests_are_refused_with_named_errors(engine):
    with pytest.raises(PromptTooLong, match="max_model_len"):
        engine.add_request("long", {"prompt_token_ids": [5] * engine.config.max_model_len}, GREEDY)
    with pytest.raises(InvalidRequest, match="outside"):
        engine.add_request("vocab", {"prompt_token_ids": [1, 10**9]}, GREEDY)
    with pytest.raises(InvalidRequest, match="prompt"):
        engine.add_request("kind", 42, GREEDY)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    for bad in (ResumedOutput(0, ""), ResumedOutput(3, ""), ResumedOutput(1, None)):  # type: ignore[arg-type]
        with pytest.raises(InvalidRequest, match="resumed"):
            engine.add_request("resumed", {"prompt_token_ids": [1, 2, 3]}, GREEDY, resumed=bad)
    engine.add_request("dup", "hi", GREEDY)
    with pytest.raises(InvalidRequest, match="already"):
        engine.add_request("dup", "hi", GREEDY)
    drain(engine)


def test_seeded_sampling_is_independent_of_the_batch(engine, tiny_model_dir):
    lora = LoRARequest(
        adapter_dirs(tiny_model_dir)[1].name, 2, str(adapter_dirs(tiny_model_dir)[1])
    )
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    engine.add_request("alone", "Once upon a time", seeded, lora_request=lora)
    alone = drain(engine)["alone"].outputs[0].token_ids
    others = SamplingParams(temperature=1.3, max_tokens=14, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"other{i}", f"noise {i} noise", others)
    engine.add_request("batched", "Once upon a time", seeded, lora_request=lora)
    assert drain(engine)["batched"].outputs[0].token_ids == alone


def test_stop_string_ends_request_and_never_leaks(engine):
    engine.add_request(
        "free", "The quick brown fox", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    )
    text = drain(engine)["free"].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    engine.add_request(
        "stopped",
        "The quick brown fox",
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]),
    )
    out = drain(engine)["stopped"].outputs[0]
    assert out.finish_reason == "stop"
    assert out.stop_reason == stop
    assert out.text == text[: text.index(stop)]


def test_logprobs_hold_the_sampled_token(engine):
    engine.add_request(
        "lp", "Once", SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True)
    )
    out = drain(engine)["lp"].outputs[0]
    assert out.logprobs is not None
    assert len(out.logprobs) == 4
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert next(iter(lp)) == tok  # the sampled token first, as in vLLM
        # greedy: the sampled token is the most likely
        assert max(v.logprob for v in lp.values()) == lp[tok].logprob
        assert lp[tok].rank == 1
        assert lp[tok].decoded_token == engine.tokenizer.decode([tok])


def test_repetition_penalty_among_plain_requests_matches_transformers(
    engine, tiny_model_dir, monkeypatch
):
    """A penalty reads every generated token. With async scheduling the engine still runs
    ahead: the token in flight reaches the penalty on the device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompts = {"pen": "Once upon a time", "a": "The quick brown fox", "b": "In the beginning"}
    # Below 1 the penalty favours seen tokens: this prompt then repeats its last token.
    penalty = {"pen": 0.5, "a": 1.0, "b": 1.0}
    from engine.sampling.sampler import SamplingMetadata

    build = SamplingMetadata.build
    filled: list[bool] = []  # per build: did a penalised row take its last token in flight?

    def spy(rows, *args, **kwargs):
        filled.append(any(r.pending_row is not None for r in rows))
        return build(rows, *args, **kwargs)

    monkeypatch.setattr(SamplingMetadata, "build", spy)
    for rid, prompt in prompts.items():
        params = SamplingParams(
            temperature=0, max_tokens=10, ignore_eos=True, repetition_penalty=penalty[rid]
        )
        engine.add_request(rid, prompt, params)
    got = {rid: out.outputs[0].token_ids for rid, out in drain(engine).items()}
    assert any(filled) == engine.core.async_scheduling
    for rid, prompt in prompts.items():
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = model.generate(
                ids,
                do_sample=False,
                max_new_tokens=10,
                min_new_tokens=10,
                repetition_penalty=penalty[rid],
                pad_token_id=tok.eos_token_id,
            )
        assert got[rid] == ref[0, ids.shape[1] :].tolist(), rid
    assert got["pen"] != got["a"]


def collect(engine: LLMEngine) -> dict[str, list]:
    """Every output of every request, in order."""
    seen: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out)
    return seen


def test_output_kinds_delta_and_final_only_match_cumulative(engine):
    """DELTA outputs add up to the CUMULATIVE ones (ids, text, logprobs, stop string cut);
    FINAL_ONLY gives one output, the final one."""
    params = {
        kind: SamplingParams(
            temperature=0, max_tokens=12, ignore_eos=True, logprobs=2, output_kind=kind
        )
        for kind in RequestOutputKind
    }
    engine.add_request("probe", "Once upon a time", params[RequestOutputKind.CUMULATIVE])
    text = collect(engine)["probe"][-1].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    for kind, p in params.items():
        p.stop = [stop]
        engine.add_request(kind.name, "Once upon a time", p)
    seen = collect(engine)
    full = seen["CUMULATIVE"][-1].outputs[0]
    assert full.finish_reason == "stop"
    assert len(seen["CUMULATIVE"]) > 2
    deltas = [o.outputs[0] for o in seen["DELTA"]]
    assert len(deltas) == len(seen["CUMULATIVE"])
    assert [t for d in deltas for t in d.token_ids] == full.token_ids
    assert "".join(d.text for d in deltas) == full.text
    assert [lp for d in deltas for lp in d.logprobs or []] == full.logprobs
    assert all(len(d.token_ids) == 1 for d in deltas)  # one new token per step, no more
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].stop_reason == stop
    (final,) = seen["FINAL_ONLY"]
    assert final.finished
    assert final.outputs[0] == full


def test_output_kind_is_validated_and_read_from_ints():
    assert SamplingParams(output_kind=1).output_kind is RequestOutputKind.DELTA
    with pytest.raises(InvalidSamplingParams, match="output_kind"):
        SamplingParams(output_kind="delta")  # type: ignore[arg-type]
    with pytest.raises(InvalidSamplingParams, match="output_kind"):
        SamplingParams(output_kind=7)  # type: ignore[arg-type]


def test_abort_frees_everything(engine):
    engine.add_request("a", "Once upon a time", SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.abort_request("a")
    outs = engine.step()
    assert [o.outputs[0].finish_reason for o in outs if o.request_id == "a"] == ["abort"]
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.usage == 0


def test_stat_loggers_receive_every_step(tiny_model_dir):
    got: list[Stats] = []

    class Recorder:
        def record(self, stats: Stats) -> None:
            got.append(stats)

    engine = LLMEngine.from_engine_args(
        EngineArgs(model=str(tiny_model_dir), device="cpu", enable_lora=True, max_lora_rank=32),
        stat_loggers=[Recorder()],
    )
    lora = adapter_dirs(tiny_model_dir)[0]
    engine.add_request("r", "hi", GREEDY, lora_request=LoRARequest(lora.name, 1, str(lora)))
    drain(engine)
    assert sum(s.num_generation_tokens for s in got) == GREEDY.max_tokens
    assert got[-1].adapter_loads == 1
    assert got[-1].finished == [("r", "length")]


def test_llm_generate_with_one_lora_request_per_prompt(tiny_model_dir):
    dirs = adapter_dirs(tiny_model_dir)
    llm = LLM(
        model=str(tiny_model_dir), device="cpu", enable_lora=True, max_loras=2, max_lora_rank=32
    )
    loras = [
        None,
        LoRARequest(dirs[0].name, 1, str(dirs[0])),
        LoRARequest(dirs[1].name, 2, str(dirs[1])),
    ]
    outs = llm.generate(["Once upon a time"] * 3, GREEDY, lora_request=loras)
    assert [len(o.outputs[0].token_ids) for o in outs] == [6, 6, 6]
    # generate asks the engine for final outputs only, on copies of the caller's params.
    assert GREEDY.output_kind is RequestOutputKind.CUMULATIVE
    single = llm.generate("Once upon a time", GREEDY, lora_request=loras[1])
    assert single[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids


@pytest.mark.anyio
async def test_async_generate_streams_and_early_exit_aborts(tiny_model_dir):
    engine = AsyncLLMEngine.from_engine_args(
        EngineArgs(
            model=str(tiny_model_dir),
            device="cpu",
            enable_lora=True,
            max_lora_rank=32,
            disable_log_stats=True,
        )
    )
    try:
        lora = adapter_dirs(tiny_model_dir)[0]
        lreq = LoRARequest(lora.name, 1, str(lora))
        seen = []
        async for out in engine.generate("Once upon a time", GREEDY, "full", lora_request=lreq):
            seen.append(len(out.outputs[0].token_ids))
        assert seen == list(range(1, 7))
        assert out.finished

        long = SamplingParams(max_tokens=200, ignore_eos=True)
        async for out in engine.generate("Once upon a time", long, "early"):
            if len(out.outputs[0].token_ids) == 2:
                break
        # The abort reaches the engine between steps.
        for _ in range(100):
            if not engine.engine.has_unfinished_requests():
                break
            import asyncio

            await asyncio.sleep(0.01)
        assert not engine.engine.has_unfinished_requests()
        assert engine.engine.block_manager.usage == 0

        with pytest.raises(AdapterNotFound):
            async for _ in engine.generate(
                "x", GREEDY, "bad", lora_request=LoRARequest("nope", 5, "/nonexistent")
            ):
                pass
    finally:
        await engine.shutdown()


def test_cold_adapter_load_never_stalls_running_sequences(tiny_model_dir, monkeypatch):
    """While an adapter is read from disk (held back here), running sequences keep stepping."""
    import threading

    import engine.lora.manager as manager_mod

    gate = threading.Event()
    real_load = manager_mod.load_adapter
    slow = adapter_dirs(tiny_model_dir)[3]

    def held_load(path, *args, **kwargs):
        if str(path) == str(slow):
            assert gate.wait(30)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(manager_mod, "load_adapter", held_load)
    engine = make_engine(tiny_model_dir, max_loras=2)
    fast = adapter_dirs(tiny_model_dir)[0]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine.add_request(
        "warm", "Once upon a time", params, lora_request=LoRARequest(fast.name, 1, str(fast))
    )
    engine.add_request(
        "cold", "Once upon a time", params, lora_request=LoRARequest(slow.name, 4, str(slow))
    )
    engine.add_request("base", "Once upon a time", params)
    finished = {}
    for _ in range(200):
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if "warm" in finished and "base" in finished:
            break
    # Both finished while the cold adapter was still loading, and it had generated nothing.
    assert set(finished) == {"warm", "base"}
    assert engine.scheduler.requests["cold"].num_output_tokens == 0
    gate.set()
    finished.update(drain(engine))
    assert finished["cold"].outputs[0].finish_reason == "length"
    assert len(finished["cold"].outputs[0].token_ids) == 8


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_adapters_beyond_a_full_host_cache_still_run(tiny_model_dir, async_scheduling):
    """Host memory holds max_cpu_loras = max_loras = 2 adapters (the default) and requests
    need 4. When the first two adapters' requests finish together, the waiting requests'
    adapters must still be read in: the last step's adapters may not keep their entries."""
    import time

    engine = make_engine(tiny_model_dir, max_loras=2, async_scheduling=async_scheduling)
    dirs = adapter_dirs(tiny_model_dir)
    assert len(dirs) == 4
    loras = [LoRARequest(d.name, i, str(d)) for i, d in enumerate(dirs, start=1)]
    for i in range(8):
        engine.add_request(f"r{i}", "Once upon a time", GREEDY, lora_request=loras[i % 4])
    finished: dict[str, object] = {}
    deadline = time.monotonic() + 60
    while engine.has_unfinished_requests():
        assert time.monotonic() < deadline, f"stalled; finished: {sorted(finished)}"
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert sorted(finished) == [f"r{i}" for i in range(8)]
    for out in finished.values():
        assert len(out.outputs[0].token_ids) == GREEDY.max_tokens
    # Same adapter, same prompt, greedy: the same tokens, whichever batch each ran in.
    for i in range(4):
        assert finished[f"r{i}"].outputs[0].token_ids == finished[f"r{i + 4}"].outputs[0].token_ids


def test_bfloat16_on_cpu_runs_and_mostly_agrees_with_float32(tiny_model_dir):
    lora = adapter_dirs(tiny_model_dir)[2]
    lreq = LoRARequest(lora.name, 3, str(lora))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tokens = {}
    for dtype in ("float32", "bfloat16"):
        engine = make_engine(tiny_model_dir, dtype=dtype)
        engine.add_request("r", "The quick brown fox", params, lora_request=lreq)
        tokens[dtype] = drain(engine)["r"].outputs[0].token_ids
        assert engine.runner.kv_caches[0].dtype == getattr(torch, dtype)
    # bf16 rounding may flip a near-tie late in the sequence, not the first token.
    assert tokens["bfloat16"][0] == tokens["float32"][0]


@pytest.mark.parametrize("priority", [2**63, -(2**63) - 1, True, 1.5])
def test_priority_outside_int64_is_refused_in_the_front_before_any_core_sees_it(
    tiny_model_dir, priority
):
    from engine.errors import InvalidRequest

    engine = LLMEngine.from_engine_args(
        EngineArgs(model=str(tiny_model_dir), device="cpu", disable_log_stats=True)
    )
    with pytest.raises(InvalidRequest, match="priority"):
        engine.add_request("r", "hello", SamplingParams(max_tokens=1), priority=priority)
