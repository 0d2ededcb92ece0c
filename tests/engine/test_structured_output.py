"""Structured output on the tiny random model, whose unconstrained output is noise: every
constrained output validates (``jsonschema``) / matches / is one of its choices, for a dozen
schemas of increasing difficulty mixed with unconstrained requests and several adapters,
with preemption and chunked prefill forced; greedy constrained output equals transformers'
``generate`` with xgrammar's own Hugging Face ``LogitsProcessor``; a schema that does not
compile, a budget too short, a resumed request, ``n > 1`` and the core in its own process."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from engine import LLMEngine, RequestOutput, SamplingParams
from engine.outputs import ResumedOutput
from engine.sampling_params import GuidedDecodingParams

from .test_matches_peft import lora_requests, make_engine

SCHEMAS: list[dict[str, Any]] = [
    {"type": "boolean"},
    {"type": "integer", "minimum": -5, "maximum": 5},
    {"enum": ["red", "green", "blue"]},
    {"type": "string", "maxLength": 6},
    {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"}},
        "required": ["name", "ok"],
        "additionalProperties": False,
    },
    {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 9},
        "minItems": 1,
        "maxItems": 4,
    },
    {"type": "number", "minimum": 0, "maximum": 1},
    {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
    {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 999},
                    "tags": {
                        "type": "array",
                        "items": {"enum": ["a", "b", "c"]},
                        "maxItems": 3,
                    },
                },
                "required": ["id", "tags"],
                "additionalProperties": False,
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "minimum": 0, "maximum": 3},
            "b": {"const": "fixed"},
            "c": {"type": "null"},
        },
        "required": ["b"],
        "additionalProperties": False,
    },
    {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "k": {"enum": ["x", "y"]},
                "v": {"type": "number", "minimum": -10, "maximum": 10},
            },
            "required": ["k", "v"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 2,
    },
    {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^[a-f0-9]{4}$"},
            "value": {
                "anyOf": [
                    {"type": "integer", "minimum": 0, "maximum": 9},
                    {"type": "string", "maxLength": 3},
                ]
            },
            "items": {
                "type": "array",
                "items": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
                "maxItems": 2,
            },
        },
        "required": ["id", "value", "items"],
        "additionalProperties": False,
    },
]
REGEX = r"[A-Z]{3}-\d{4}"
CHOICES = ["yes", "no", "it depends"]
PROMPTS = ["Once upon a time", "The quick brown fox", "Give me JSON:", "In the beginning"]


def run(
    engine: LLMEngine, requests: list[tuple[str, Any, SamplingParams, Any]]
) -> dict[str, RequestOutput]:
    for rid, prompt, params, lora in requests:
        engine.add_request(rid, prompt, params, lora_request=lora)
    final: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def async_scheduling(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def test_every_constrained_output_is_valid_among_adapters_with_preemption(
    tiny_model_dir: Path, async_scheduling: bool
):
    # A cache too small for every request at once, and chunks of 16 prompt tokens.
    engine = make_engine(
        tiny_model_dir,
        async_scheduling=async_scheduling,
        block_size=8,
        num_gpu_blocks_override=24,
        max_num_batched_tokens=16,
        max_num_seqs=16,
    )
    loras = [None, *lora_requests(tiny_model_dir)[:3]]
    reqs: list[tuple[str, Any, SamplingParams, Any]] = []
    for i, schema in enumerate(SCHEMAS):
        params = SamplingParams(
            guided_json=schema if i % 2 else json.dumps(schema),
            temperature=1.0,
            seed=i,
            max_tokens=120,
        )
        reqs.append((f"json{i}", PROMPTS[i % 4] + " " * (i % 3), params, loras[i % 4]))
        plain = SamplingParams(temperature=1.0, seed=100 + i, max_tokens=20, ignore_eos=True)
        reqs.append((f"plain{i}", PROMPTS[(i + 1) % 4], plain, loras[(i + 1) % 4]))
    reqs.append(
        ("regex", "Code:", SamplingParams(guided_regex=REGEX, seed=1, max_tokens=30), loras[1])
    )
    reqs.append(("choice", "Answer:", SamplingParams(guided_choice=CHOICES, seed=2), loras[2]))
    reqs.append(
        (
            "object",
            "JSON:",
            SamplingParams(guided_json_object=True, temperature=0.0, max_tokens=200),
            None,
        )
    )
    got = run(engine, reqs)
    assert engine.scheduler.num_preemptions > 0
    for i, schema in enumerate(SCHEMAS):
        out = got[f"json{i}"].outputs[0]
        assert out.finish_reason == "stop", (i, out.text)
        jsonschema.validate(json.loads(out.text), schema)
        assert len(got[f"plain{i}"].outputs[0].token_ids) == 20
    assert re.fullmatch(REGEX, got["regex"].outputs[0].text)
    assert got["choice"].outputs[0].text in CHOICES
    obj = got["object"].outputs[0]
    if obj.finish_reason == "stop":  # any JSON object: complete ones parse
        assert isinstance(json.loads(obj.text), dict)
    else:
        assert obj.finish_reason == "length"
    # The unconstrained output of the random model is noise: the constraint did the work.
    assert any(not _is_json(got[f"plain{i}"].outputs[0].text) for i in range(len(SCHEMAS)))


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


class _NoControlCharacters:
    """JSON has no raw control characters: tokens whose text holds one are banned (the
    engine's JSON constraints add this to xgrammar's mask)."""

    def __init__(self, tok: Any) -> None:
        self.banned = [i for i in range(len(tok)) if any(ord(c) < 0x20 for c in tok.decode([i]))]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.banned] = float("-inf")
        return scores


def _hf_constrained_greedy(
    model_dir: Path, prompt: str, compile_fn, max_new_tokens: int, json_text: bool
) -> list[int]:
    """transformers' generate, masked by xgrammar's own Hugging Face LogitsProcessor."""
    import xgrammar as xgr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    info = xgr.TokenizerInfo.from_huggingface(
        tok, vocab_size=model.config.vocab_size, stop_token_ids=[tok.eos_token_id]
    )
    compiled = compile_fn(xgr.GrammarCompiler(info))
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            logits_processor=[
                xgr.contrib.hf.LogitsProcessor(compiled),
                *([_NoControlCharacters(tok)] if json_text else []),
            ],
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("which", ["nested", "regex", "choice"])
def test_greedy_constrained_output_equals_transformers_with_xgrammars_processor(
    tiny_model_dir: Path, async_scheduling: bool, which: str
):
    schema = SCHEMAS[8]
    kinds = {
        "nested": (
            SamplingParams(guided_json=schema),
            lambda c: c.compile_json_schema(json.dumps(schema), any_whitespace=False),
        ),
        "regex": (SamplingParams(guided_regex=REGEX), lambda c: c.compile_regex(REGEX)),
        "choice": (
            SamplingParams(guided_decoding=GuidedDecodingParams(choice=CHOICES)),
            lambda c: c.compile_grammar("root ::= " + " | ".join(json.dumps(x) for x in CHOICES)),
        ),
    }
    params, compile_fn = kinds[which]
    params.temperature, params.max_tokens = 0.0, 100
    engine = make_engine(tiny_model_dir, enable_lora=False, async_scheduling=async_scheduling)
    prompt = "Give me JSON:"
    plain = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    got = run(engine, [("c", prompt, params, None), ("p", "Once upon a time", plain, None)])
    ref = _hf_constrained_greedy(tiny_model_dir, prompt, compile_fn, 100, which == "nested")
    out = got["c"].outputs[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == ref  # the final EOS included, as generate() returns it


def test_deferred_sampling_overlaps_the_forward_pass_with_async_scheduling(tiny_model_dir: Path):
    """With async scheduling a constrained row's mask waits for its last token: the step's
    sampling is launched after that token is known, while the forward pass runs."""
    engine = make_engine(tiny_model_dir, enable_lora=False, async_scheduling=True)
    deferred: list[bool] = []
    sample = engine.runner.sample_deferred

    def spy(handle):
        deferred.append(handle.deferred is not None)
        return sample(handle)

    engine.runner.sample_deferred = spy  # type: ignore[method-assign]
    params = SamplingParams(guided_json=SCHEMAS[4], temperature=0.0, max_tokens=60)
    got = run(engine, [("c", "JSON:", params, None)])
    assert any(deferred)
    jsonschema.validate(json.loads(got["c"].outputs[0].text), SCHEMAS[4])


def test_a_schema_that_does_not_compile_ends_only_its_request(tiny_model_dir: Path):
    engine = make_engine(tiny_model_dir, enable_lora=False)
    bad = SamplingParams(guided_json={"type": "objectx"}, max_tokens=10)
    bad_regex = SamplingParams(guided_regex="(unclosed", max_tokens=10)
    good = SamplingParams(temperature=0.0, max_tokens=5)
    got = run(
        engine, [("bad", "x", bad, None), ("re", "x", bad_regex, None), ("ok", "x", good, None)]
    )
    for rid, field in (("bad", "guided_json"), ("re", "guided_regex")):
        out = got[rid]
        assert out.outputs[0].finish_reason == "error"
        assert out.error is not None
        assert out.error.code == "invalid_sampling_params"
        assert f"SamplingParams.{field}=" in out.error.message
        assert "does not compile" in out.error.message
    assert got["ok"].outputs[0].finish_reason == "length"
    with pytest.raises(ValueError, match="guided_json"):
        SamplingParams(guided_json="{not json")
    with pytest.raises(ValueError, match="one constraint per request"):
        SamplingParams(guided_regex="a", guided_choice=["a"])


def test_a_constraint_unmet_at_max_tokens_ends_with_length(tiny_model_dir: Path):
    engine = make_engine(tiny_model_dir, enable_lora=False)
    params = SamplingParams(guided_json=SCHEMAS[8], temperature=0.0, max_tokens=5)
    out = run(engine, [("short", "JSON:", params, None)])["short"].outputs[0]
    assert out.finish_reason == "length"
    assert len(out.token_ids) == 5
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.text)


def test_a_resumed_request_replays_its_output_through_the_matcher(
    tiny_model_dir: Path, async_scheduling: bool
):
    """The broker resumes a request with its published tokens appended to the prompt: the
    constraint continues from there, and the whole output is the uninterrupted one."""
    engine = make_engine(tiny_model_dir, enable_lora=False, async_scheduling=async_scheduling)
    params = SamplingParams(guided_json=SCHEMAS[8], temperature=0.0, max_tokens=100)
    whole = run(engine, [("w", "JSON:", params, None)])["w"].outputs[0]
    k = len(whole.token_ids) // 2
    prompt_ids = engine.tokenize("JSON:")[1]
    engine.add_request(
        "r",
        {"prompt_token_ids": prompt_ids + whole.token_ids[:k]},
        SamplingParams(guided_json=SCHEMAS[8], temperature=0.0, max_tokens=100 - k),
        resumed=ResumedOutput(k, engine.tokenizer.decode(whole.token_ids[:k])),
    )
    rest = run(engine, [])["r"].outputs[0]
    assert whole.token_ids[:k] + rest.token_ids == whole.token_ids
    assert rest.finish_reason == "stop"
    # An earlier output the constraint cannot have produced ends the request with an error.
    engine.add_request(
        "x",
        {"prompt_token_ids": [*prompt_ids, *engine.tokenize("hello")[1][1:]]},
        SamplingParams(guided_json=SCHEMAS[8], max_tokens=10),
        resumed=ResumedOutput(len(engine.tokenize("hello")[1]) - 1, "hello"),
    )
    failed = run(engine, [])["x"]
    assert failed.outputs[0].finish_reason == "error"
    assert failed.error is not None
    assert "does not match" in failed.error.message


def test_n_samples_each_follow_the_constraint(tiny_model_dir: Path):
    engine = make_engine(tiny_model_dir, enable_lora=False)
    params = SamplingParams(n=4, guided_json=SCHEMAS[4], temperature=1.0, seed=3, max_tokens=80)
    out = run(engine, [("n", "JSON:", params, None)])["n"]
    texts = [c.text for c in out.outputs]
    assert len(set(texts)) > 1
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMAS[4])


def test_constraints_cross_the_process_boundary(tiny_model_dir: Path):
    engine = make_engine(tiny_model_dir, enable_lora=False)
    mp = LLMEngine.from_engine_args(
        __import__("engine").EngineArgs(
            model=str(tiny_model_dir), device="cpu", dtype="float32", disable_log_stats=True
        ),
        enable_multiprocessing=True,
    )
    try:
        reqs = [
            (
                "j",
                "JSON:",
                SamplingParams(guided_json=SCHEMAS[9], temperature=0.0, max_tokens=80),
                None,
            ),
            ("c", "Answer:", SamplingParams(guided_choice=CHOICES, temperature=0.0), None),
        ]
        a = run(engine, reqs)
        b = run(mp, reqs)
        for rid in ("j", "c"):
            assert a[rid].outputs[0].token_ids == b[rid].outputs[0].token_ids
        jsonschema.validate(json.loads(b["j"].outputs[0].text), SCHEMAS[9])
    finally:
        mp.shutdown()


@pytest.mark.gpu
def test_on_cuda_graph_steps_with_async_scheduling_equal_eager_steps(tiny_model_dir: Path):
    """On the device: constrained rows beside plain ones and adapters, CUDA graphs and
    async scheduling (deferred sampling), against the same requests run eagerly without
    async scheduling; every constrained output validates."""
    loras = [None, *lora_requests(tiny_model_dir)[:2]]

    def requests() -> list[tuple[str, Any, SamplingParams, Any]]:
        reqs = []
        for i, schema in enumerate(SCHEMAS):
            params = SamplingParams(guided_json=schema, temperature=0.0, max_tokens=120)
            reqs.append((f"json{i}", PROMPTS[i % 4], params, loras[i % 3]))
            plain = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
            reqs.append((f"plain{i}", PROMPTS[(i + 1) % 4], plain, loras[(i + 1) % 3]))
        return reqs

    fast = make_engine(tiny_model_dir, device="cuda", dtype="float32", max_loras=3)
    slow = make_engine(
        tiny_model_dir,
        device="cuda",
        dtype="float32",
        max_loras=3,
        enforce_eager=True,
        async_scheduling=False,
    )
    a, b = run(fast, requests()), run(slow, requests())
    assert fast.runner.timings.graph_steps > 0
    for rid in a:
        assert a[rid].outputs[0].token_ids == b[rid].outputs[0].token_ids, rid
    for i, schema in enumerate(SCHEMAS):
        jsonschema.validate(json.loads(a[f"json{i}"].outputs[0].text), schema)
