"""Greedy outputs token for token equal to Hugging Face transformers + PEFT (float32, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import EngineArgs, LLMEngine, LoRARequest, SamplingParams

PROMPTS = [
    "The quick brown fox jumps over the lazy dog",
    "Once upon a time",
    "In the beginning the model said that the answer to everything was",
]
MAX_TOKENS = 12


def adapter_dirs(model_dir: Path) -> list[Path]:
    return sorted(p for p in (model_dir / "adapters").iterdir() if p.is_dir())


class Reference:
    """Greedy decoding by full recomputation with transformers (+ PEFT): no generate() quirks."""

    def __init__(self, model_dir: Path) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        adapters = adapter_dirs(model_dir)
        self.model = PeftModel.from_pretrained(base, adapters[0], adapter_name=adapters[0].name)
        for a in adapters[1:]:
            self.model.load_adapter(a, adapter_name=a.name)
        self.cache: dict[tuple[str | None, str], list[int]] = {}

    @torch.no_grad()
    def greedy(self, prompt: str, adapter: str | None, n: int = MAX_TOKENS) -> list[int]:
        key = (adapter, prompt)
        if key not in self.cache:
            ids = self.tokenizer.encode(prompt)
            out: list[int] = []
            if adapter is None:
                ctx = self.model.disable_adapter()
            else:
                self.model.set_adapter(adapter)
                ctx = torch.no_grad()
            with ctx:
                for _ in range(n):
                    logits = self.model(torch.tensor([ids + out])).logits[0, -1]
                    out.append(int(logits.argmax()))
            self.cache[key] = out
        return self.cache[key]


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Reference:
    return Reference(tiny_model_dir)


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def async_scheduling(request: pytest.FixtureRequest) -> bool:
    """Each engine test runs with steps collected before the next is scheduled, and with
    the next step launched before the previous one's tokens reach the host."""
    return bool(request.param)


def make_engine(model_dir: Path, **kwargs) -> LLMEngine:
    defaults = {
        "model": str(model_dir),
        "device": "cpu",
        "dtype": "float32",
        "enable_lora": True,
        "max_loras": 4,
        "max_lora_rank": 32,
        "max_num_seqs": 16,
        "disable_log_stats": True,
    }
    defaults.update(kwargs)
    return LLMEngine.from_engine_args(EngineArgs(**defaults))


def lora_requests(model_dir: Path) -> list[LoRARequest]:
    return [LoRARequest(p.name, i, str(p)) for i, p in enumerate(adapter_dirs(model_dir), start=1)]


def run_all(engine: LLMEngine, jobs: list[tuple[str, str, LoRARequest | None]], stagger: int = 0):
    """Add jobs (id, prompt, lora); with stagger > 0 add one job every `stagger` steps."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    pending = list(jobs)
    results: dict[str, list[int]] = {}
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and (stagger == 0 or step % stagger == 0):
            batch = pending if stagger == 0 else pending[:1]
            for rid, prompt, lora in batch:
                engine.add_request(rid, prompt, params, lora_request=lora)
            pending = pending[len(batch) :]
        for out in engine.step():
            if out.finished:
                assert out.outputs[0].finish_reason == "length", out.error
                results[out.request_id] = out.outputs[0].token_ids
        step += 1
    return results


def test_base_model_matches_transformers(tiny_model_dir, reference, async_scheduling):
    engine = make_engine(tiny_model_dir, enable_lora=False, async_scheduling=async_scheduling)
    launch = engine.runner.launch
    ran_ahead: list[bool] = []

    def spy(sched, previous=None):
        ran_ahead.append(previous is not None)
        return launch(sched, previous)

    engine.runner.launch = spy
    got = run_all(engine, [(str(i), p, None) for i, p in enumerate(PROMPTS)])
    for i, p in enumerate(PROMPTS):
        assert got[str(i)] == reference.greedy(p, None)
    # With async scheduling every step after the first was launched behind another.
    assert ran_ahead == [False] + [async_scheduling] * (len(ran_ahead) - 1)


def test_each_adapter_matches_peft(tiny_model_dir, reference, async_scheduling):
    loras = lora_requests(tiny_model_dir)
    assert len(loras) >= 4
    engine = make_engine(tiny_model_dir, async_scheduling=async_scheduling)
    for lora in loras:
        got = run_all(engine, [(f"{lora.lora_name}-{i}", p, lora) for i, p in enumerate(PROMPTS)])
        for i, p in enumerate(PROMPTS):
            expected = reference.greedy(p, lora.lora_name)
            assert got[f"{lora.lora_name}-{i}"] == expected, lora.lora_name
    # The adapters really change the output (else this test proves nothing about LoRA).
    assert any(
        reference.greedy(p, lora.lora_name) != reference.greedy(p, None)
        for lora in loras
        for p in PROMPTS
    )


def mixed_jobs(model_dir: Path):
    loras: list[LoRARequest | None] = [None, *lora_requests(model_dir)]
    return [
        (f"{(lora.lora_name if lora else 'base')}-{i}", p, lora)
        for i, p in enumerate(PROMPTS)
        for lora in loras
    ]


def check(got, jobs, reference):
    assert set(got) == {rid for rid, _, _ in jobs}
    for rid, prompt, lora in jobs:
        assert got[rid] == reference.greedy(prompt, lora.lora_name if lora else None), rid


def test_mixed_adapters_with_swaps_and_disk_reloads(tiny_model_dir, reference, async_scheduling):
    # Two sequences at a time, a new request every 8 steps: adapters take turns in the two
    # device slots, and an adapter comes back after the host cache (2 entries) dropped it.
    engine = make_engine(
        tiny_model_dir,
        max_loras=2,
        max_cpu_loras=2,
        max_num_seqs=2,
        async_scheduling=async_scheduling,
    )
    jobs = mixed_jobs(tiny_model_dir)
    got = run_all(engine, jobs, stagger=8)
    check(got, jobs, reference)
    stats = engine.runner.lora_manager.get_stats()
    assert stats.device_loads > len(lora_requests(tiny_model_dir))  # slots were swapped
    assert stats.disk_loads > len(lora_requests(tiny_model_dir))  # host cache evicted and reloaded


def test_preemption_gives_identical_output(tiny_model_dir, reference, async_scheduling):
    # 8 blocks of 8 tokens: only two or three of the ~25-token sequences fit at once.
    engine = make_engine(
        tiny_model_dir,
        block_size=8,
        num_gpu_blocks_override=8,
        max_num_seqs=8,
        async_scheduling=async_scheduling,
    )
    jobs = mixed_jobs(tiny_model_dir)
    preemptions = []
    engine.stat_loggers.append(
        type("L", (), {"record": lambda self, s: preemptions.append(s.num_preemptions)})()
    )
    got = run_all(engine, jobs)
    check(got, jobs, reference)
    assert sum(preemptions) > 0


def test_chunked_prefill_gives_identical_output(tiny_model_dir, reference, async_scheduling):
    engine = make_engine(
        tiny_model_dir,
        max_num_batched_tokens=5,
        max_num_seqs=4,
        async_scheduling=async_scheduling,
    )
    jobs = mixed_jobs(tiny_model_dir)
    got = run_all(engine, jobs, stagger=3)
    check(got, jobs, reference)


def test_qwen2_with_bias_matches_peft(tiny_qwen_dir):
    reference = Reference(tiny_qwen_dir)
    engine = make_engine(tiny_qwen_dir, max_loras=2, max_cpu_loras=3, max_num_batched_tokens=16)
    jobs = mixed_jobs(tiny_qwen_dir)
    got = run_all(engine, jobs, stagger=1)
    check(got, jobs, reference)
