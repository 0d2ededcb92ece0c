"""vLLM's request-level API: SamplingParams' rules, LoRARequest by name, outputs of n > 1
requests in every output kind, detokenize, truncate_prompt_tokens, abort of a parent."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LLMEngine, LoRARequest, RequestOutputKind, SamplingParams
from engine.errors import InvalidSamplingParams

from .test_matches_peft import make_engine


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> LLMEngine:
    return make_engine(tiny_model_dir, enable_lora=False)


def drain(engine: LLMEngine) -> list:
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    return outs


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n": 0}, "n"),
        ({"best_of": 2}, "best_of"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"logit_bias": {"x": 1.0}}, "logit_bias"),
        ({"logit_bias": {3: float("nan")}}, "logit_bias"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"bad_words": ["  "]}, "bad_words"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"detokenize": False, "stop": ["."]}, "stop"),
        ({"seed": 2**63 - 1, "n": 2}, "seed"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, name):
    with pytest.raises(InvalidSamplingParams, match=rf"SamplingParams\.{name}="):
        SamplingParams(**kwargs)


def test_best_of_gives_vllm_v1s_reason():
    with pytest.raises(ValueError, match="vLLM V1 does not support it either"):
        SamplingParams(best_of=3, n=3)
    assert SamplingParams(best_of=1).best_of == 1


def test_clone_is_deep_and_logit_bias_is_clamped_with_int_keys():
    p = SamplingParams(stop=["a"], logit_bias={"5": 300, 6: -1.5})
    assert p.logit_bias == {5: 100.0, 6: -1.5}
    q = p.clone()
    q.stop.append("b")
    assert p.stop == ["a"]
    assert q == SamplingParams(stop=["a", "b"], logit_bias={5: 100, 6: -1.5})


def test_lora_request_compares_by_name_and_assigns_ids():
    a = LoRARequest("sql", lora_path="/a")
    b = LoRARequest("sql", lora_path="/b")
    c = LoRARequest("other", lora_path="/a")
    assert a == b
    assert hash(a) == hash(b)
    assert a != c
    assert a.lora_int_id == b.lora_int_id != c.lora_int_id  # one id per name, assigned
    assert (a.name, a.path, a.adapter_id) == ("sql", "/a", a.lora_int_id)
    assert LoRARequest("x", 7, "/p", base_model_name="m").adapter_id == 7
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("x", 0, "/p")


@pytest.mark.parametrize("kind", list(RequestOutputKind))
def test_n_outputs_gather_the_children_in_every_output_kind(engine, kind):
    params = SamplingParams(
        n=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True, output_kind=kind
    )
    engine.add_request("p", "Once upon a time", params)
    outs = drain(engine)
    assert all(o.request_id == "p" for o in outs)
    assert [o.finished for o in outs].count(True) == 1
    assert outs[-1].finished
    final = outs[-1]
    if kind == RequestOutputKind.DELTA:
        tokens: dict[int, list[int]] = {0: [], 1: [], 2: []}
        for o in outs:
            for c in o.outputs:
                tokens[c.index] += c.token_ids
        got = [tokens[i] for i in range(3)]
    else:
        assert [c.index for c in final.outputs] == [0, 1, 2]
        got = [c.token_ids for c in final.outputs]
    if kind == RequestOutputKind.FINAL_ONLY:
        assert len(outs) == 1
    assert all(len(t) == 6 for t in got)
    # The same children as three requests seeded 5, 6, 7 (vLLM's rule).
    for i in range(3):
        engine.add_request(
            f"s{i}",
            "Once upon a time",
            SamplingParams(temperature=1.0, seed=5 + i, max_tokens=6, ignore_eos=True),
        )
    singles = {o.request_id: o.outputs[0].token_ids for o in drain(engine) if o.finished}
    assert got == [singles[f"s{i}"] for i in range(3)]


def test_aborting_a_parent_aborts_every_child(engine):
    engine.add_request("ab", "Once", SamplingParams(n=2, max_tokens=50, ignore_eos=True))
    engine.step()
    engine.abort_request("ab")
    outs = drain(engine)
    final = [o for o in outs if o.request_id == "ab" and o.finished]
    assert len(final) == 1
    assert [c.finish_reason for c in final[0].outputs] == ["abort", "abort"]
    assert engine.get_num_unfinished_requests() == 0
    assert not engine.scheduler.requests


def test_a_child_id_that_is_taken_refuses_the_whole_request(engine):
    engine.add_request("1_dup", "Once", SamplingParams(max_tokens=30, ignore_eos=True))
    with pytest.raises(ValueError, match="1_dup"):
        engine.add_request("dup", "Once", SamplingParams(n=2, max_tokens=3))
    engine.abort_request("1_dup")
    drain(engine)
    assert not engine.scheduler.requests


def test_detokenize_off_gives_ids_without_text(engine):
    engine.add_request(
        "d", "Once", SamplingParams(detokenize=False, max_tokens=4, ignore_eos=True, logprobs=1)
    )
    out = next(o for o in drain(engine) if o.finished).outputs[0]
    assert out.text == ""
    assert len(out.token_ids) == 4
    assert out.logprobs is not None
    assert all(lp.decoded_token is None for entry in out.logprobs for lp in entry.values())


def test_truncate_prompt_tokens_keeps_the_last_tokens(engine):
    prompt = "In the beginning the model said that the answer to everything was"
    ids = engine.tokenize(prompt)[1]
    greedy = SamplingParams(temperature=0.0, max_tokens=3)
    engine.add_request(
        "t", prompt, SamplingParams(temperature=0.0, max_tokens=3, truncate_prompt_tokens=5)
    )
    engine.add_request("u", {"prompt_token_ids": ids[-5:]}, greedy)
    outs = {o.request_id: o for o in drain(engine) if o.finished}
    assert outs["t"].prompt_token_ids == ids[-5:]
    assert outs["t"].outputs[0].token_ids == outs["u"].outputs[0].token_ids


def test_out_of_vocabulary_token_ids_are_refused(engine):
    v = engine.vocab_size
    for params in (SamplingParams(logit_bias={v: 1.0}), SamplingParams(allowed_token_ids=[v])):
        with pytest.raises(InvalidSamplingParams, match="outside the vocabulary"):
            engine.add_request("oov", "Once", params)
    assert engine.get_tokenizer() is engine.tokenizer


def test_pin_lora_keeps_an_added_adapter(tiny_model_dir):
    from .test_matches_peft import lora_requests

    eng = make_engine(tiny_model_dir, max_loras=1, max_cpu_loras=2)
    first, second, third = lora_requests(tiny_model_dir)[:3]
    eng.add_lora(first)
    assert eng.pin_lora(first.lora_int_id) is True
    assert eng.pin_lora(first.lora_int_id) is False  # pinned already
    with pytest.raises(ValueError, match="not loaded"):
        eng.pin_lora(999)
    eng.add_lora(second)
    with pytest.raises(ValueError, match="raise max_cpu_loras"):
        eng.pin_lora(second.lora_int_id)  # no host slot would be left for other adapters
    # Host memory holds two adapters: the unpinned one makes room, the pinned one stays.
    eng.add_request("a", "Once", SamplingParams(max_tokens=2), lora_request=third)
    drain(eng)
    assert eng.list_loras() == {first.lora_int_id, third.lora_int_id}
