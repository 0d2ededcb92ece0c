"""vLLM's sampling parameters against Hugging Face transformers on the tiny model (float32,
greedy or seeded): ``n``, ``prompt_logprobs``, ``logit_bias``, ``allowed_token_ids``,
``bad_words``, ``min_tokens`` and the penalties. Every request runs among others, with the
next step launched before the previous one's tokens are known (async) and without."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from engine import LLMEngine, RequestOutput, SamplingParams

from .test_matches_peft import make_engine

PROMPTS = ["Once upon a time", "The quick brown fox", "In the beginning the model said"]
MAX_TOKENS = 8


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def engine(tiny_model_dir: Path, request: pytest.FixtureRequest) -> LLMEngine:
    return make_engine(
        tiny_model_dir, enable_lora=False, async_scheduling=request.param, block_size=8
    )


class HF:
    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def ids(self, prompt: str) -> torch.Tensor:
        return self.tok(prompt, return_tensors="pt").input_ids

    @torch.no_grad()
    def greedy(self, prompt: str, max_new_tokens: int = MAX_TOKENS, **kw: Any) -> list[int]:
        ids = self.ids(prompt)
        kw.setdefault("min_new_tokens", max_new_tokens)  # no early EOS: ignore_eos below
        out = self.model.generate(
            ids,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.tok.pad_token_id,
            **kw,
        )
        return out[0, ids.shape[1] :].tolist()

    @torch.no_grad()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), V]: log-softmax of the logits at every position."""
        return torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), -1)


@pytest.fixture(scope="module")
def hf(tiny_model_dir: Path) -> HF:
    return HF(tiny_model_dir)


def run(engine: LLMEngine, requests: dict[str, tuple[str, SamplingParams]]) -> dict[str, Any]:
    """Add every request at once (one batch), step to the end; final outputs by id."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    final: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


def greedy(**kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, **kw)


def plain_neighbours() -> dict[str, tuple[str, SamplingParams]]:
    """Requests without the feature under test, in the same steps."""
    return {f"plain{i}": (p, greedy()) for i, p in enumerate(PROMPTS)}


def test_logit_bias_matches_sequence_bias(engine, hf):
    base = hf.greedy(PROMPTS[0])
    # Push a token the model never picks to the top, and push the first greedy token down.
    bias = {17: 9.0, base[0]: -50.0}
    got = run(engine, {"b": (PROMPTS[0], greedy(logit_bias=bias)), **plain_neighbours()})
    ref = hf.greedy(PROMPTS[0], sequence_bias={(t,): v for t, v in bias.items()})
    assert got["b"].outputs[0].token_ids == ref
    assert ref != base
    assert got["plain0"].outputs[0].token_ids == base


def test_allowed_token_ids_match_a_prefix_allowed_tokens_fn(engine, hf):
    allowed = [5, 40, 41, 300, 512]
    got = run(engine, {"a": (PROMPTS[1], greedy(allowed_token_ids=allowed)), **plain_neighbours()})
    ref = hf.greedy(PROMPTS[1], prefix_allowed_tokens_fn=lambda batch, ids: allowed)
    assert got["a"].outputs[0].token_ids == ref
    assert set(ref) <= set(allowed)
    assert got["plain1"].outputs[0].token_ids == hf.greedy(PROMPTS[1])


def _bad_words_ids(hf: HF, words: list[str]) -> list[list[int]]:
    """vLLM's documented rule, written here for the reference: each word's tokens, and those
    of the word after a space when that gives other tokens of the same count."""
    out = []
    for w in words:
        plain = hf.tok.encode(w.lstrip(), add_special_tokens=False)
        spaced = hf.tok.encode(" " + w.lstrip(), add_special_tokens=False)
        out.append(plain)
        if spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    return out


def test_bad_words_match_transformers_bad_words_ids(engine, hf):
    prompt = PROMPTS[2]
    base = hf.greedy(prompt, max_new_tokens=12)
    # A one-token word the model says, and a two-token one it says later (after a space).
    one = hf.tok.decode([base[1]]).strip()
    two = None
    for a, b in itertools.pairwise(base[3:]):
        text = hf.tok.decode([a, b])
        if text.startswith(" ") and hf.tok.encode(text, add_special_tokens=False) == [a, b]:
            two = text.strip()
            break
    assert one, "the tiny model's greedy output has no usable one-token word"
    assert two, "the tiny model's greedy output has no usable two-token word"
    words = [one, two]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, bad_words=words)
    got = run(engine, {"w": (prompt, params), **plain_neighbours()})
    ref = hf.greedy(prompt, max_new_tokens=12, bad_words_ids=_bad_words_ids(hf, words))
    assert got["w"].outputs[0].token_ids == ref
    assert ref != base


def test_min_tokens_matches_min_new_tokens(engine, hf):
    prompt = PROMPTS[0]
    base = hf.greedy(prompt)
    stop = base[1]  # a token the model says early: it may end the request only after 5
    params = SamplingParams(
        temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=5, stop_token_ids=[stop]
    )
    got = run(engine, {"m": (prompt, params), **plain_neighbours()})
    ref = hf.greedy(prompt, min_new_tokens=5, eos_token_id=[stop])
    if stop in ref:  # generate pads after EOS
        ref = ref[: ref.index(stop) + 1]
    out = got["m"].outputs[0]
    assert out.token_ids == ref
    assert stop not in out.token_ids[:5]
    assert base.index(stop) < 5


def test_repetition_presence_and_frequency_penalties_match_the_reference(engine, hf):
    """Repetition through generate(); presence and frequency (OpenAI's, which generate lacks)
    by their formula on transformers' logits, one token at a time."""
    prompt = PROMPTS[0]
    rep, pres, freq = 1.3, 0.8, 0.6
    params = greedy(repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq)
    got = run(engine, {"p": (prompt, params), **plain_neighbours()})
    ids = hf.ids(prompt)[0].tolist()
    out: list[int] = []
    for _ in range(MAX_TOKENS):
        logits = hf.model(torch.tensor([ids + out])).logits[0, -1].detach().clone()
        seen = set(ids + out)
        for t in seen:  # Hugging Face's repetition penalty
            logits[t] = logits[t] / rep if logits[t] > 0 else logits[t] * rep
        for t in set(out):  # OpenAI: mu[j] -= c[j] * freq + (c[j] > 0) * pres
            logits[t] -= out.count(t) * freq + pres
        out.append(int(logits.argmax()))
    assert got["p"].outputs[0].token_ids == out
    assert out != hf.greedy(prompt)


def test_prompt_logprobs_are_transformers_log_softmax(engine, hf):
    """Entry j scores prompt token j given the tokens before it: its logprob, its rank among
    the vocabulary, and the top-n; None for the first token. A prompt longer than a block is
    also cached by a request before it, yet scored in full."""
    prompt = PROMPTS[2] + " and the fox said"
    run(engine, {"warm": (prompt, greedy())})  # its blocks are in the prefix cache now
    got = run(engine, {"lp": (prompt, greedy(prompt_logprobs=3)), **plain_neighbours()})
    out = got["lp"]
    ids = out.prompt_token_ids
    ref = hf.logprobs(ids)
    assert out.prompt_logprobs is not None
    assert len(out.prompt_logprobs) == len(ids)
    assert out.prompt_logprobs[0] is None
    for j in range(1, len(ids)):
        entry = out.prompt_logprobs[j]
        assert entry is not None
        row = ref[j - 1]
        assert next(iter(entry)) == ids[j]  # the prompt token first
        top = row.topk(3).indices.tolist()
        assert set(entry) == {ids[j], *top}
        for t, lp in entry.items():
            assert lp.logprob == pytest.approx(float(row[t]), abs=1e-4)
            assert lp.rank == int((row >= row[t]).sum())
            assert lp.decoded_token == hf.tok.decode([t])
    assert out.num_cached_tokens == 0  # scored from the start, as in vLLM


def test_prompt_logprobs_survive_chunked_prefill_and_preemption(tiny_model_dir, hf):
    """Chunks of 8 tokens and a cache so small that requests are preempted: every prompt
    position is scored once, equal to transformers."""
    engine = make_engine(
        tiny_model_dir,
        enable_lora=False,
        block_size=8,
        max_num_batched_tokens=16,
        max_num_seqs=4,
        num_gpu_blocks_override=8,
    )
    prompt = PROMPTS[2] + " and then the quick brown fox jumps over the lazy dog"
    reqs = {
        f"r{i}": (
            prompt if i == 0 else PROMPTS[i % 3],
            SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, prompt_logprobs=1),
        )
        for i in range(4)
    }
    got = run(engine, reqs)
    assert engine.scheduler.num_preemptions > 0
    for out in got.values():
        ids = out.prompt_token_ids
        ref = hf.logprobs(ids)
        assert out.prompt_logprobs is not None
        assert len(out.prompt_logprobs) == len(ids)
        for j in range(1, len(ids)):
            entry = out.prompt_logprobs[j]
            assert entry is not None
            assert entry[ids[j]].logprob == pytest.approx(float(ref[j - 1, ids[j]]), abs=1e-4)
        assert out.outputs[0].token_ids == hf.greedy(out.prompt or "", max_new_tokens=12)


def test_n_greedy_samples_all_match_transformers_and_share_the_prompt_blocks(engine, hf):
    prompt = PROMPTS[2] + " and the fox said that the answer was"  # full blocks of 8 tokens
    got = run(engine, {"n": (prompt, greedy(n=3, logprobs=1)), **plain_neighbours()})
    out = got["n"]
    ref = hf.greedy(prompt)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(c.token_ids == ref for c in out.outputs)
    assert all(c.cumulative_logprob is not None for c in out.outputs)
    ref_lp = hf.logprobs(out.prompt_token_ids + ref)
    n = len(out.prompt_token_ids)
    expected = sum(float(ref_lp[n - 1 + i, t]) for i, t in enumerate(ref))
    assert out.outputs[0].cumulative_logprob == pytest.approx(expected, abs=1e-3)


def test_n_children_hit_the_first_childs_prompt_blocks(engine):
    prompt = PROMPTS[2] + " and the fox said that the answer was"
    engine.core.reset_prefix_cache()
    seen: dict[str, int | None] = {}
    engine.add_request("c", prompt, greedy(n=3))
    while engine.has_unfinished_requests():
        engine.step()
        for r in engine.scheduler.running:
            seen[r.request_id] = r.num_cached_tokens
    num_prompt = len(engine.tokenize(prompt)[1])
    full = (num_prompt - 1) // 8 * 8  # full blocks before the last token
    assert full >= 8
    assert seen["0_c"] == 0
    assert seen["1_c"] == seen["2_c"] == full


def test_seeded_n_children_are_requests_seeded_seed_plus_index(engine):
    """vLLM's rule: child i of a seeded request samples as a request with seed + i; and a
    seeded request keeps its tokens whatever runs beside it, with every feature on."""
    params = SamplingParams(
        temperature=0.9,
        top_p=0.9,
        seed=11,
        max_tokens=MAX_TOKENS,
        ignore_eos=True,
        logit_bias={17: 2.0},
        bad_words=["the"],
        allowed_token_ids=list(range(2, 900)),
        presence_penalty=0.5,
        repetition_penalty=1.1,
        min_tokens=3,
    )
    got = run(engine, {"n": (PROMPTS[0], params.clone()), **plain_neighbours()})
    n_out = got["n"].outputs
    assert len(n_out) == 1
    params.n = 3
    multi = run(engine, {"m": (PROMPTS[0], params)})["m"].outputs
    singles = run(
        engine,
        {
            f"s{i}": (PROMPTS[0], SamplingParams(**{**vars(params), "n": 1, "seed": 11 + i}))
            for i in range(3)
        },
    )
    assert [c.token_ids for c in multi] == [singles[f"s{i}"].outputs[0].token_ids for i in range(3)]
    assert multi[0].token_ids == n_out[0].token_ids  # alone or among plain requests
    assert len({tuple(c.token_ids) for c in multi}) == 3
