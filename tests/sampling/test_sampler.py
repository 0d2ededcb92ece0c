"""Sampler: greedy, filters against Hugging Face's warpers, distributions, seeds, penalties,
logprobs, min_tokens."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from engine.sampling.sampler import (
    Sampler,
    SamplingMetadata,
    SamplingRow,
    apply_penalties,
    filter_logits,
)
from engine.sampling_params import SamplingParams
from engine.sequence import PLACEHOLDER

V = 64


def _row(
    params: SamplingParams,
    prompt: list[int] | None = None,
    outputs: list[int] | None = None,
    **kw: Any,
) -> SamplingRow:
    return SamplingRow(params, list(prompt or [1, 2, 3]), list(outputs or []), **kw)


def _sample(logits: torch.Tensor, rows: list[SamplingRow], seed: int = 0) -> Any:
    gen = torch.Generator().manual_seed(seed)
    md = SamplingMetadata.build(rows, logits.shape[1], "cpu", gen)
    return Sampler()(logits, md)


def _hf_filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The reference: Hugging Face's warpers, one row at a time, in generate()'s order."""
    scores = logits.unsqueeze(0).clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    warpers: list[LogitsProcessor] = [TemperatureLogitsWarper(p.temperature)]
    if p.top_k_enabled:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        warpers.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0.0:
        warpers.append(MinPLogitsWarper(p.min_p))
    for w in warpers:
        scores = w(ids, scores)
    return scores[0]


def _random_params(gen: torch.Generator, n: int) -> list[SamplingParams]:
    def rand() -> float:
        return float(torch.rand((), generator=gen))

    out = []
    for i in range(n):
        out.append(
            SamplingParams(
                temperature=0.3 + 1.5 * rand(),
                top_k=[0, -1, 1, 5, 20, V, V + 10][i % 7],
                top_p=[1.0, 0.9, 0.5, 0.05][i % 4],
                min_p=[0.0, 0.05, 0.3][i % 3],
            )
        )
    return out


def test_greedy_is_argmax_of_logits() -> None:
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(1))
    out = _sample(logits, [_row(SamplingParams(temperature=0.0)) for _ in range(8)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs is None


def test_greedy_rows_stay_argmax_beside_random_rows() -> None:
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(2))
    params = [
        SamplingParams(temperature=0.0 if i % 2 else 1.5, top_k=3 if i % 2 else 0) for i in range(6)
    ]
    out = _sample(logits, [_row(p) for p in params])
    argmax = logits.argmax(-1).tolist()
    assert [t for i, t in enumerate(out.token_ids) if i % 2] == argmax[1::2]


def test_sampler_does_not_modify_the_callers_logits() -> None:
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(3))
    before = logits.clone()
    _sample(logits, [_row(SamplingParams(top_k=2, top_p=0.5, repetition_penalty=1.3))] * 3)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("top_p", [True, False], ids=["with_top_p", "top_k_only"])
def test_filter_masks_match_transformers_warpers(top_p: bool) -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(28, V, generator=gen) * 3
    params = _random_params(gen, 28)
    if not top_p:
        params = [dataclasses.replace(p, top_p=1.0, min_p=0.0) for p in params]
    md = SamplingMetadata.build([_row(p) for p in params], V, "cpu")
    ours = filter_logits(logits, md)
    for i, p in enumerate(params):
        ref = _hf_filter(logits[i], p)
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(ref)), f"row {i}: {p}"
        kept = ~torch.isinf(ref)
        torch.testing.assert_close(ours[i][kept], ref[kept])


def test_filtered_out_tokens_are_never_sampled() -> None:
    gen = torch.Generator().manual_seed(5)
    params = _random_params(gen, 7)
    logits = torch.randn(len(params), V, generator=gen) * 2
    draws = 600
    rows = [_row(p) for p in params for _ in range(draws)]
    out = _sample(logits.repeat_interleave(draws, 0), rows, seed=6)
    for i, p in enumerate(params):
        allowed = set(torch.nonzero(~torch.isinf(_hf_filter(logits[i], p))).flatten().tolist())
        got = set(out.token_ids[i * draws : (i + 1) * draws])
        assert got <= allowed, f"row {i}: sampled {got - allowed} outside {allowed}"


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=6),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=1.0, min_p=0.1),
        SamplingParams(temperature=0.9, top_k=8, top_p=0.9, min_p=0.05, seed=11),
    ],
)
def test_sampled_frequencies_match_the_filtered_distribution(params: SamplingParams) -> None:
    vocab, draws = 12, 12_000
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(7)) * 1.5
    expected = torch.softmax(_hf_filter(logits, params), -1).double()
    rows = [_row(params)] * draws
    if params.seed is not None:
        # 40 seeded requests over 300 output positions each: every draw is reseeded.
        rows = [
            _row(dataclasses.replace(params, seed=seed), outputs=[0] * pos)
            for seed in range(40)
            for pos in range(draws // 40)
        ]
    md = SamplingMetadata.build(rows, vocab, "cpu", torch.Generator().manual_seed(8))
    tokens = torch.tensor(Sampler()(logits.expand(draws, vocab), md).token_ids)
    counts = torch.bincount(tokens, minlength=vocab).double()
    support = expected > 0
    assert counts[~support].sum() == 0
    exp_counts = expected[support] * draws
    chi2 = float(((counts[support] - exp_counts) ** 2 / exp_counts).sum())
    # 99.99th percentile of chi-square with <= 11 degrees of freedom is about 37.
    assert chi2 < 37.0, (chi2, counts, exp_counts)


def test_seeded_request_gets_the_same_tokens_alone_and_in_any_batch() -> None:
    gen = torch.Generator().manual_seed(9)
    target = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    target_logits = torch.randn(5, 1000, generator=gen)  # one row per output position
    others = [
        (SamplingParams(temperature=0.8, seed=99), torch.randn(1000, generator=gen)),
        (SamplingParams(temperature=1.2, top_k=50), torch.randn(1000, generator=gen)),
        (SamplingParams(temperature=0.0), torch.randn(1000, generator=gen)),
        (SamplingParams(temperature=1.0, seed=1234, min_p=0.01), torch.randn(1000, generator=gen)),
    ]
    history: list[int] = []
    for pos in range(5):
        alone = _sample(target_logits[pos : pos + 1], [_row(target, outputs=history)], seed=pos)
        token = alone.token_ids[0]
        for order in itertools.permutations(range(len(others) + 1), 3):
            batch_rows: list[SamplingRow] = []
            batch_logits: list[torch.Tensor] = []
            where = -1
            for j in order:
                if j == len(others):
                    where = len(batch_rows)
                    batch_rows.append(_row(target, outputs=history))
                    batch_logits.append(target_logits[pos])
                else:
                    batch_rows.append(_row(others[j][0], outputs=[7] * (j + pos)))
                    batch_logits.append(others[j][1])
            if where < 0:
                continue
            out = _sample(torch.stack(batch_logits), batch_rows, seed=100 + pos)
            assert out.token_ids[where] == token, (pos, order)
        history.append(token)
    # Resuming after preemption: same history length, same token.
    resumed = _sample(target_logits[2:3], [_row(target, outputs=history[:2])], seed=42)
    assert resumed.token_ids[0] == history[2]
    # The position reseeds each step: a flat distribution does not repeat one token.
    flat = torch.zeros(8, 1000)
    steps = [_sample(flat[:1], [_row(target, outputs=[0] * k)]).token_ids[0] for k in range(8)]
    assert len(set(steps)) > 1


def test_unseeded_rows_follow_the_engine_generator() -> None:
    logits = torch.randn(16, V, generator=torch.Generator().manual_seed(10))
    rows = [_row(SamplingParams(temperature=1.0))] * 16
    assert _sample(logits, rows, seed=3).token_ids == _sample(logits, rows, seed=3).token_ids
    assert _sample(logits, rows, seed=3).token_ids != _sample(logits, rows, seed=4).token_ids


def test_repetition_penalty_matches_transformers() -> None:
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(4, V, generator=gen) * 4
    rows = [
        _row(SamplingParams(repetition_penalty=pen), prompt=[1, 5, 5, 9], outputs=out)
        for pen, out in [(1.3, [2, 9, 40]), (0.7, [3]), (1.0, [4, 4]), (2.0, [])]
    ]
    md = SamplingMetadata.build(rows, V, "cpu")
    assert md.penalties is not None
    ours = apply_penalties(logits.clone(), md.penalties)
    for i, r in enumerate(rows):
        ids = torch.tensor([r.prompt_token_ids + r.output_token_ids])
        proc = RepetitionPenaltyLogitsProcessor(r.sampling_params.repetition_penalty)
        torch.testing.assert_close(ours[i], proc(ids, logits[i : i + 1].clone())[0], rtol=0, atol=0)


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    logits = torch.zeros(1, V)
    row = _row(
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        prompt=[1, 2],
        outputs=[2, 3, 3, 3],
    )
    md = SamplingMetadata.build([row], V, "cpu")
    assert md.penalties is not None
    out = apply_penalties(logits, md.penalties)[0]
    expected = torch.zeros(V)
    expected[2] = -(0.5 + 0.25)
    expected[3] = -(0.5 + 3 * 0.25)
    assert torch.equal(out, expected)


def test_greedy_uses_penalised_logits() -> None:
    logits = torch.zeros(1, V)
    logits[0, 10] = 2.0
    logits[0, 11] = 1.9
    greedy = SamplingParams(temperature=0.0, repetition_penalty=1.2)
    assert _sample(logits, [_row(greedy, outputs=[10])]).token_ids == [11]
    assert _sample(logits, [_row(greedy, outputs=[12])]).token_ids == [10]


def test_min_tokens_bans_eos_and_stop_token_ids_until_reached() -> None:
    logits = torch.zeros(1, V)
    logits[0, 0] = 5.0  # eos
    logits[0, 1] = 4.0  # a stop token id
    logits[0, 2] = 3.0
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[1])
    assert _sample(logits, [_row(params, outputs=[9], eos_token_id=0)]).token_ids == [2]
    assert _sample(logits, [_row(params, outputs=[9, 9], eos_token_id=0)]).token_ids == [0]
    ignore = SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True)
    assert _sample(logits, [_row(ignore, eos_token_id=0)]).token_ids == [0]


def test_logprobs_are_raw_top_n_plus_the_sampled_token() -> None:
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(40, V, generator=gen) * 2
    params = [
        SamplingParams(temperature=2.0, logprobs=[1, 3, 0, None][i % 4], repetition_penalty=1.5)
        for i in range(40)
    ]
    out = _sample(logits, [_row(p, prompt=[0, 1, 2, 3]) for p in params], seed=13)
    assert out.logprobs is not None
    raw = torch.log_softmax(logits, -1)
    saw_sampled_outside_top = False
    for i, (p, lp, tok) in enumerate(zip(params, out.logprobs, out.token_ids, strict=True)):
        if p.logprobs is None:
            assert lp is None
            continue
        assert lp is not None
        ids, values, ranks = lp
        top = raw[i].topk(p.logprobs).indices.tolist()
        assert ids == [tok, *top]  # the sampled token first, then the top-n by rank
        saw_sampled_outside_top |= tok not in top
        for t, v in zip(ids, values, strict=True):
            assert v == pytest.approx(float(raw[i, t]), abs=1e-6)
        # vLLM's rank: how many tokens are at least as likely as this one.
        assert ranks == [int((raw[i] >= raw[i, tok]).sum()), *range(1, p.logprobs + 1)]
    assert saw_sampled_outside_top


def test_greedy_logprobs_of_sampled_token_is_the_max() -> None:
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(14))
    out = _sample(logits, [_row(SamplingParams(temperature=0.0, logprobs=0))] * 2)
    assert out.logprobs is not None
    for i, lp in enumerate(out.logprobs):
        assert lp is not None
        ids, values, ranks = lp
        assert (ids, ranks) == ([out.token_ids[i]], [1])
        assert values == [pytest.approx(float(torch.log_softmax(logits[i], -1).max()))]


def test_penalties_take_a_placeholder_token_from_the_pending_samples() -> None:
    """With async scheduling a row's last output token may still be on the device: the
    penalties read it from the previous step's samples and equal those of the known token."""
    params = SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.4)
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(1))
    known = [_row(params, outputs=[4, 9, 7]), _row(params, outputs=[5]), _row(params)]
    pending = [
        _row(params, outputs=[4, 9, PLACEHOLDER], pending_row=2),
        _row(params, outputs=[PLACEHOLDER], pending_row=0),
        _row(params),
    ]
    samples = torch.tensor([5, 11, 7])  # the previous step's tokens, rows 2 and 0 used
    a = SamplingMetadata.build(known, V, "cpu")
    b = SamplingMetadata.build(pending, V, "cpu", pending_tokens=samples)
    assert a.penalties is not None
    assert b.penalties is not None
    assert torch.equal(apply_penalties(logits, a.penalties), apply_penalties(logits, b.penalties))
    with pytest.raises(ValueError, match="not where their tokens are"):
        SamplingMetadata.build(pending, V, "cpu")
    early = [_row(params, outputs=[PLACEHOLDER, 3], pending_row=0)]
    with pytest.raises(ValueError, match="before a row's last"):
        SamplingMetadata.build(early, V, "cpu", pending_tokens=samples)


def test_build_rejects_an_empty_batch() -> None:
    with pytest.raises(ValueError, match="at least one row"):
        SamplingMetadata.build([], V, "cpu")


@pytest.mark.gpu  # host syncs exist only on CUDA
def test_sampling_launches_without_waiting_for_the_device() -> None:
    """With async scheduling the previous step still runs when the next one samples: building
    the metadata and launching the sampler must queue behind it, never wait for it (a copy
    from pageable memory would). The same rows on the CPU give the same greedy tokens."""
    rows = [
        _row(SamplingParams(temperature=0.0)),
        _row(SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=3)),
        _row(SamplingParams(temperature=1.0, min_p=0.1, logprobs=2)),
        _row(
            SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5),
            outputs=[4, 4],
        ),
        _row(SamplingParams(temperature=0.7, min_tokens=3, stop_token_ids=[9]), eos_token_id=2),
    ]
    logits = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(0))
    dev = logits.cuda()
    busy = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):  # a queue of work the sampling must not wait for
        busy = busy @ busy.T / 4096
    torch.cuda.set_sync_debug_mode("error")
    try:
        gen = torch.Generator(device="cuda").manual_seed(0)
        md = SamplingMetadata.build(rows, V, "cuda", gen)
        pending = Sampler().launch(dev, md)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    got = pending.result()
    expected = _sample(logits, rows)
    assert got.token_ids[0] == expected.token_ids[0]
    assert got.token_ids[3] == expected.token_ids[3]
    assert got.logprobs is not None
    entry = got.logprobs[2]
    assert entry is not None
    assert entry[0][0] == got.token_ids[2]  # the sampled token first


# ------------------------------------------------------------------ vLLM's token restrictions
def test_logit_bias_adds_and_bans_win_over_it() -> None:
    logits = torch.zeros(2, V)
    logits[:, 3] = 1.0
    bias = SamplingParams(temperature=0.0, logit_bias={7: 5.0, 3: -2.0})
    ban = SamplingParams(temperature=0.0, logit_bias={0: 50.0}, min_tokens=1)
    out = _sample(logits, [_row(bias), _row(ban, eos_token_id=0)])
    assert out.token_ids == [7, 3]  # the bias moves the argmax; EOS stays banned under +50


def test_allowed_token_ids_keep_only_those_tokens() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, V, generator=gen)
    allowed = [4, 9, 30]
    rows = [
        _row(SamplingParams(temperature=0.0, allowed_token_ids=allowed)),
        _row(SamplingParams(temperature=1.0, seed=1, allowed_token_ids=allowed)),
        _row(SamplingParams(temperature=0.0)),
    ]
    out = _sample(logits, rows)
    assert out.token_ids[0] == allowed[int(logits[0, allowed].argmax())]
    assert out.token_ids[1] in allowed
    assert out.token_ids[2] == int(logits[2].argmax())


def _bad(words: list[list[int]]) -> SamplingParams:
    return SamplingParams(temperature=0.0, _bad_words_token_ids=words)


def test_bad_words_ban_their_last_token_after_their_prefix() -> None:
    logits = torch.zeros(4, V)
    logits[:, 5] = 3.0
    logits[:, 6] = 2.0
    p = _bad([[5], [8, 9, 6]])
    rows = [
        _row(p, outputs=[1]),  # one-token word: 5 always banned
        _row(p, outputs=[8, 9]),  # the prefix 8 9 is there: 6 banned too
        _row(p, outputs=[9, 8]),  # not the prefix
        _row(_bad([[8, 9, 6]]), outputs=[8, 9]),
    ]
    out = _sample(logits, rows)
    assert out.token_ids[0] == 6
    assert out.token_ids[1] not in (5, 6)
    assert out.token_ids[2] == 6
    assert out.token_ids[3] == 5


def test_bad_words_read_a_placeholder_from_the_pending_samples() -> None:
    """With async scheduling the prefix's last token may still be on the device: the ban
    holds exactly when the previous step sampled it."""
    logits = torch.zeros(2, V)
    logits[:, 6] = 2.0
    p = _bad([[8, 9, 6]])
    rows = [
        _row(p, outputs=[8, PLACEHOLDER], pending_row=0),
        _row(p, outputs=[8, PLACEHOLDER], pending_row=1),
    ]
    samples = torch.tensor([9, 4])  # row 0's pending token completes the prefix, row 1's not
    md = SamplingMetadata.build(rows, V, "cpu", pending_tokens=samples)
    assert md.pending_bans is not None
    out = Sampler()(logits, md)
    assert out.token_ids[0] != 6
    assert out.token_ids[1] == 6


def test_grammar_bitmask_masks_only_the_constrained_rows() -> None:
    from engine.sampling.sampler import apply_token_bitmask_, apply_token_bitmask_reference

    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(3, V, generator=gen)
    allowed = {0: [2, 33, 63], 2: [40]}
    bitmask = torch.zeros(2, V // 32, dtype=torch.int32)
    for j, row in enumerate(allowed):
        for t in allowed[row]:
            word = int(bitmask[j, t // 32]) | (1 << (t % 32))
            bitmask[j, t // 32] = word - (1 << 32) if word >= 1 << 31 else word
    rows = [_row(SamplingParams(temperature=0.0)) for _ in range(3)]
    md = SamplingMetadata.build(rows, V, "cpu", grammar=([0, 2], bitmask))
    out = Sampler()(logits, md)
    assert out.token_ids[0] == allowed[0][int(logits[0, allowed[0]].argmax())]
    assert out.token_ids[1] == int(logits[1].argmax())
    assert out.token_ids[2] == 40
    # xgrammar's kernel and the torch reference mask alike.
    a, b = logits[[0, 2]].clone(), logits[[0, 2]].clone()
    apply_token_bitmask_(a, bitmask)
    apply_token_bitmask_reference(b, bitmask)
    assert torch.equal(a, b)
    assert torch.isfinite(a).sum() == 4


@pytest.mark.gpu  # host syncs exist only on CUDA
def test_vllm_restrictions_and_the_grammar_launch_without_waiting_for_the_device() -> None:
    """logit_bias, allowed_token_ids, bad words (one waiting on a pending token) and a
    grammar bitmask (pinned, xgrammar's kernel) queue behind the step in flight; the greedy
    rows equal the CPU's."""
    bitmask = torch.zeros(1, V // 32, dtype=torch.int32)
    bitmask[0, 0] = 0b1110  # tokens 1, 2, 3
    rows = [
        _row(SamplingParams(temperature=0.0, logit_bias={7: 9.0})),
        _row(SamplingParams(temperature=0.0, allowed_token_ids=[5, 6, 40])),
        _row(_bad([[8, 9, 6], [11]]), outputs=[8, PLACEHOLDER], pending_row=0),
        _row(SamplingParams(temperature=0.0, guided_regex="x")),
    ]
    logits = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(1))
    pending_cpu = torch.tensor([9])
    expected = Sampler()(
        logits,
        SamplingMetadata.build(
            rows, V, "cpu", pending_tokens=pending_cpu, grammar=([3], bitmask.clone())
        ),
    )
    dev = logits.cuda()
    pending = pending_cpu.cuda()
    busy = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):
        busy = busy @ busy.T / 4096
    torch.cuda.set_sync_debug_mode("error")
    try:
        md = SamplingMetadata.build(
            rows, V, "cuda", pending_tokens=pending, grammar=([3], bitmask.pin_memory())
        )
        launched = Sampler().launch(dev, md)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert launched.result().token_ids == expected.token_ids
    assert expected.token_ids[3] in (1, 2, 3)
