"""Chat prompts: the rendered template is tokenized without adding special tokens again."""

from __future__ import annotations

import pytest

from engine import SamplingParams
from engine.errors import InvalidRequest

from .test_matches_peft import make_engine

BOS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_template_starting_with_bos_gives_exactly_one_bos(tiny_model_dir):
    engine = make_engine(tiny_model_dir, enable_lora=False)
    tok = engine.tokenizer
    bos = tok.bos_token_id
    # This tokenizer adds BOS to plain text, so tokenizing the rendered template the plain
    # way would give two.
    assert tok.encode("hello")[0] == bos
    tok.chat_template = BOS_TEMPLATE
    messages = [{"role": "user", "content": "Once upon a time"}]
    text, ids = engine.tokenize_chat(messages)
    assert text == f"{tok.bos_token}user: Once upon a time\nassistant:"
    assert ids[0] == bos
    assert ids.count(bos) == 1
    assert tok.decode(ids) == text
    engine.add_request("r", {"prompt": text, "prompt_token_ids": ids}, SamplingParams(max_tokens=2))
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.prompt_token_ids == ids


def test_messages_without_a_template_or_that_it_refuses_are_invalid(tiny_model_dir):
    engine = make_engine(tiny_model_dir, enable_lora=False)
    engine.tokenizer.chat_template = None
    with pytest.raises(InvalidRequest, match="no chat template"):
        engine.tokenize_chat([{"role": "user", "content": "hi"}])
    engine.tokenizer.chat_template = "{{ raise_exception('only user turns') }}"
    with pytest.raises(InvalidRequest, match="only user turns"):
        engine.tokenize_chat([{"role": "system", "content": "hi"}])
