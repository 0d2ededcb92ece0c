"""Incremental detokenizer: clean deltas over split UTF-8, stop strings that never leak."""

from __future__ import annotations

import random
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from engine.outputs import ResumedOutput
from engine.sampling.detokenizer import IncrementalDetokenizer
from engine.sampling_params import RequestOutputKind, SamplingParams

_CORPUS = [
    "héllo wörld 日本語 🙂 STOP",
    "hello world, the quick brown fox; ünïcödé ñ 中文字符 ✓",
    "the end is near. stop here. Stay a while",
]
_FFFD = "\ufffd"


def _byte_level_bpe(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", bos_token="<s>", clean_up_tokenization_spaces=False
    )


class _SlowTokenizer:
    """Only ``decode``: takes the pure-Python path (no Rust DecodeStream)."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.inner = tokenizer

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text = self.inner.decode(ids, skip_special_tokens=skip_special_tokens)
        assert isinstance(text, str)
        return text


# 258: bytes only, every multi-byte character is split; 300, 340: merges that cut characters
# (340 has a token holding the end of 日, all of 本 and the start of 語).
_TOKENIZERS = {vs: _byte_level_bpe(vs) for vs in (258, 300, 340)}


@pytest.fixture(params=[(vs, slow) for vs in _TOKENIZERS for slow in (False, True)], ids=str)
def tokenizer(request: pytest.FixtureRequest) -> Any:
    vocab_size, slow = request.param
    tok = _TOKENIZERS[vocab_size]
    return _SlowTokenizer(tok) if slow else tok


@pytest.fixture
def fast() -> PreTrainedTokenizerFast:
    return _TOKENIZERS[258]


def _stream(
    tokenizer: Any, ids: list[int], prompt: list[int] | None = None, **params: Any
) -> tuple[IncrementalDetokenizer, list[str]]:
    """Feed ``ids`` one at a time, checking the deltas add up to output_text at every step;
    the last update says the request finished."""
    det = IncrementalDetokenizer(tokenizer, prompt or [], SamplingParams(**params))
    deltas: list[str] = []
    for i, token_id in enumerate(ids):
        deltas.append(det.update([token_id], finished=i == len(ids) - 1))
        assert "".join(deltas) == det.output_text
    return det, deltas


def _hf(tokenizer: Any) -> PreTrainedTokenizerFast:
    return tokenizer.inner if isinstance(tokenizer, _SlowTokenizer) else tokenizer


def _encode(tokenizer: Any, text: str) -> list[int]:
    return _hf(tokenizer).encode(text, add_special_tokens=False)


def test_split_multibyte_characters_never_show_replacement_char(tokenizer: Any) -> None:
    text = "héllo wörld 日本語 🙂 ✓ ñ"
    ids = _encode(tokenizer, text)
    fast_tok = _hf(tokenizer)
    assert any(_FFFD in fast_tok.decode([i]) for i in ids), "no character is split"
    det, deltas = _stream(tokenizer, ids, prompt=_encode(tokenizer, "the end"))
    assert not any(_FFFD in d for d in deltas)
    assert "".join(deltas) == det.output_text == text


def test_deltas_concatenate_to_the_full_decode_for_any_token_sequence(tokenizer: Any) -> None:
    """Random ids, invalid UTF-8 and special tokens included, after any prompt."""
    fast_tok = _hf(tokenizer)
    rng = random.Random(0)
    for _ in range(40):
        ids = [rng.randrange(len(fast_tok)) for _ in range(rng.randrange(1, 20))]
        prompt = [rng.randrange(len(fast_tok)) for _ in range(rng.randrange(0, 8))]
        for skip in (True, False):
            det, _ = _stream(tokenizer, ids, prompt, skip_special_tokens=skip)
            assert det.output_text == fast_tok.decode(ids, skip_special_tokens=skip)


def test_several_tokens_per_update(fast: PreTrainedTokenizerFast) -> None:
    ids = _encode(fast, "日本語 🙂 héllo")
    det = IncrementalDetokenizer(fast, [], SamplingParams())
    deltas = [det.update(ids[i : i + 3]) for i in range(0, len(ids), 3)]
    assert not any(_FFFD in d for d in deltas)
    assert "".join(deltas) == det.output_text == "日本語 🙂 héllo"


def test_finishing_inside_a_character_releases_it_as_decode_does(
    fast: PreTrainedTokenizerFast,
) -> None:
    ids = _encode(fast, "ok 🙂")[:-2]  # max_tokens cut the emoji in half
    det, deltas = _stream(fast, ids)
    assert _FFFD not in "".join(deltas[:-1])
    assert det.output_text == fast.decode(ids) == "ok " + _FFFD


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(fast: PreTrainedTokenizerFast, skip: bool) -> None:
    ids = [fast.bos_token_id, *_encode(fast, "héllo"), fast.eos_token_id, *_encode(fast, " 日本")]
    det, _ = _stream(fast, ids, prompt=_encode(fast, "the"), skip_special_tokens=skip)
    assert det.output_text == fast.decode(ids, skip_special_tokens=skip)
    assert ("<eos>" in det.output_text) is not skip


def test_stop_string_never_leaks_into_deltas(tokenizer: Any) -> None:
    ids = _encode(tokenizer, "hello world STOP héllo")
    det, deltas = _stream(tokenizer, ids, stop=["STOP"])
    assert det.output_text == "hello world "
    assert not any(c in d for d in deltas for c in "STOP")
    assert det.stop_reason == "STOP"
    assert det.finished_by_stop_string
    assert det.finished


def test_stop_string_spanning_tokens(tokenizer: Any) -> None:
    fast_tok = _hf(tokenizer)
    ids = _encode(tokenizer, "héllo wörld 日本語 🙂")
    stop = "ld 日本"
    assert not any(stop in fast_tok.decode([i]) for i in ids)
    det, deltas = _stream(tokenizer, ids, stop=[stop])
    assert det.output_text == "héllo wör"
    assert "".join(deltas) == "héllo wör"
    assert det.stop_reason == stop


def test_stop_string_at_the_very_start(fast: PreTrainedTokenizerFast) -> None:
    det, deltas = _stream(fast, _encode(fast, "STOP and more"), stop=["STOP"])
    assert deltas == [""] * len(deltas)
    assert det.output_text == ""
    assert det.stop_reason == "STOP"


def test_earliest_of_several_stop_strings_wins(fast: PreTrainedTokenizerFast) -> None:
    det = IncrementalDetokenizer(fast, [], SamplingParams(stop=["near", "end is"]))
    assert det.update(_encode(fast, "the end is near. stop")) == "the "
    assert det.stop_reason == "end is"


def test_include_stop_str_in_output(tokenizer: Any) -> None:
    ids = _encode(tokenizer, "the end is near. stop here.")
    det, deltas = _stream(tokenizer, ids, stop=["stop"], include_stop_str_in_output=True)
    assert "".join(deltas) == det.output_text == "the end is near. stop"
    assert det.stop_reason == "stop"


def test_a_tail_that_may_start_a_stop_string_is_held_then_released(
    fast: PreTrainedTokenizerFast,
) -> None:
    det = IncrementalDetokenizer(fast, [], SamplingParams(stop=["STOP"]))
    assert det.update(_encode(fast, "hello ST")) == "hello "
    assert det.update(_encode(fast, "ay")) == "STay"
    assert det.update(_encode(fast, " S")) == " "
    assert det.update([], finished=True) == "S"
    assert det.output_text == "hello STay S"
    assert det.stop_reason is None


def test_stop_terminated_leaves_the_stop_tokens_text_out(fast: PreTrainedTokenizerFast) -> None:
    ids = _encode(fast, "hello.")
    det = IncrementalDetokenizer(fast, [], SamplingParams(stop_token_ids=[ids[-1]]))
    text = det.update(ids[:-1]) + det.update(ids[-1:], stop_terminated=True)
    assert text == det.output_text == fast.decode(ids[:-1])
    assert det.output_token_ids == ids


def test_updates_after_a_stop_string_add_no_text(fast: PreTrainedTokenizerFast) -> None:
    det = IncrementalDetokenizer(fast, [], SamplingParams(stop=["end"]))
    assert det.update(_encode(fast, "the end is")) == "the "
    assert det.update(_encode(fast, " near")) == ""
    assert det.output_text == "the "


def _final_only(
    tokenizer: Any, ids: list[int], prompt: list[int], **params: Any
) -> tuple[IncrementalDetokenizer, list[str]]:
    det = IncrementalDetokenizer(
        tokenizer, prompt, SamplingParams(output_kind=RequestOutputKind.FINAL_ONLY, **params)
    )
    deltas = [det.update([t], finished=i == len(ids) - 1) for i, t in enumerate(ids)]
    return det, deltas


def test_final_only_decodes_at_the_end_what_the_stream_gives(
    tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without stop strings a FINAL_ONLY request's text is decoded once, at the end, and is
    the text streaming gives: random ids, invalid UTF-8 and special tokens, any prompt."""
    fast_tok = _hf(tokenizer)
    rng = random.Random(1)
    steps: list[int] = []
    real_step = IncrementalDetokenizer._step

    def counted(self: IncrementalDetokenizer, token_id: int) -> str | None:
        steps.append(token_id)
        return real_step(self, token_id)

    for _ in range(40):
        ids = [rng.randrange(len(fast_tok)) for _ in range(rng.randrange(1, 20))]
        prompt = [rng.randrange(len(fast_tok)) for _ in range(rng.randrange(0, 8))]
        for skip in (True, False):
            streamed, _ = _stream(tokenizer, ids, prompt, skip_special_tokens=skip)
            monkeypatch.setattr(IncrementalDetokenizer, "_step", counted)
            det, deltas = _final_only(tokenizer, ids, prompt, skip_special_tokens=skip)
            monkeypatch.undo()
            assert deltas == [""] * (len(ids) - 1) + [det.output_text]
            assert det.output_text == streamed.output_text
            assert det.output_text == fast_tok.decode(ids, skip_special_tokens=skip)
            assert det.output_token_ids == ids
    assert steps == []  # not one token went through the stream


def test_final_only_leaves_out_the_eos_text_and_keeps_stop_strings(
    fast: PreTrainedTokenizerFast,
) -> None:
    ids = [*_encode(fast, "héllo 日本"), fast.eos_token_id]
    det = IncrementalDetokenizer(
        fast,
        [],
        SamplingParams(output_kind=RequestOutputKind.FINAL_ONLY, skip_special_tokens=False),
    )
    for token_id in ids[:-1]:
        assert det.update([token_id]) == ""
    assert det.update(ids[-1:], stop_terminated=True) == "héllo 日本"
    assert det.output_token_ids == ids
    # With a stop string the text is watched token by token, as for any other kind.
    det, deltas = _final_only(fast, _encode(fast, "hello world STOP héllo"), [], stop=["STOP"])
    assert "".join(deltas) == det.output_text == "hello world "
    assert det.stop_reason == "STOP"


def test_final_only_text_read_before_the_end_is_the_streamed_text(tokenizer: Any) -> None:
    """An abort reads the text of a request still running: what streaming has shown by then
    (an unfinished character held back), and the request can still go on."""
    text = "héllo wörld 日本語 🙂"
    ids = _encode(tokenizer, text)
    prompt = _encode(tokenizer, "the end")
    for cut in range(1, len(ids)):
        streamed = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
        streamed.update(ids[:cut])
        det = IncrementalDetokenizer(
            tokenizer, prompt, SamplingParams(output_kind=RequestOutputKind.FINAL_ONLY)
        )
        for token_id in ids[:cut]:
            det.update([token_id])
        assert det.output_text == streamed.output_text
        for i, token_id in enumerate(ids[cut:], start=cut):
            det.update([token_id], finished=i == len(ids) - 1)
        assert det.output_text == text


@pytest.mark.parametrize("stop", [[], ["ld 日本"], ["STOP"], ["🙂 S"]], ids=str)
def test_resumed_at_any_token_the_client_gets_the_uninterrupted_text(
    tokenizer: Any, stop: list[str]
) -> None:
    """A run that dies after k tokens and a run resumed from them (the client holding the
    first run's text) give the client what one run gives: the text ``tokenizer.decode``
    makes, cut before the first stop string, even one across the resume point."""
    text = "héllo wörld 日本語 🙂 STOP and more"
    ids = _encode(tokenizer, text)
    prompt = _encode(tokenizer, "the end")
    full = _hf(tokenizer).decode(ids)
    cut = min((full.find(s) for s in stop if s in full), default=len(full))
    stopped = cut < len(full)
    for k in range(1, len(ids)):
        first = IncrementalDetokenizer(tokenizer, prompt, SamplingParams(stop=stop))
        for token_id in ids[:k]:
            first.update([token_id])
        if first.finished:  # stopped before the split: nothing to resume
            assert first.output_text == full[:cut]
            continue
        sent = first.output_text
        resumed = ResumedOutput(num_tokens=k, text=sent)
        second = IncrementalDetokenizer(
            tokenizer, prompt + ids[:k], SamplingParams(stop=stop), resumed
        )
        deltas = []
        for i, token_id in enumerate(ids[k:], start=k):
            deltas.append(second.update([token_id], finished=i == len(ids) - 1))
            if second.finished:
                break
        assert "".join(deltas) == second.output_text, k
        assert sent + second.output_text == full[:cut], k
        assert second.finished_by_stop_string is stopped, k
        assert second.output_token_ids == ids[k : k + len(deltas)], k


def test_resumed_text_the_tokenizer_would_not_make_is_continued(
    fast: PreTrainedTokenizerFast,
) -> None:
    """The client holds text these ids do not decode to (another tokenizer, a bad record):
    the new text follows it, and a stop string across the point is still found."""
    ids = _encode(fast, "hello world")
    more = _encode(fast, "P and more")
    resumed = ResumedOutput(num_tokens=len(ids), text="xyz STO")
    det = IncrementalDetokenizer(fast, [*_encode(fast, "the"), *ids], SamplingParams(), resumed)
    assert det.update(more, finished=True) == "P and more"
    det = IncrementalDetokenizer(
        fast, [*_encode(fast, "the"), *ids], SamplingParams(stop=["STOP"]), resumed
    )
    assert det.update(more) == ""
    assert det.stop_reason == "STOP"
