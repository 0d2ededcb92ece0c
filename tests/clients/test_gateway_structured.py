"""The official openai client against gateway + real worker (tiny random model) +
redis-server: ``response_format`` with a JSON schema on an adapter (validated with
``jsonschema``), ``logprobs`` / ``top_logprobs=5`` in OpenAI's shape, ``n=3`` streamed and
not, vLLM's ``guided_*`` extras, and the errors of a schema that does not compile."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import jsonschema
import openai
import pytest

from tests.clients.conftest import BASE_MODEL, Stack

SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 10},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2},
    },
    "required": ["sentiment", "score", "tags"],
    "additionalProperties": False,
}
MESSAGES: list = [{"role": "user", "content": "Rate this review: great product"}]


@pytest.fixture(scope="module")
def oai(stack: Stack) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key="unused", max_retries=0)
    yield c
    c.close()


def response_format() -> dict:
    return {
        "type": "json_schema",
        "json_schema": {"name": "review", "schema": SCHEMA, "strict": True},
    }


@pytest.mark.parametrize("model", [BASE_MODEL, "lora1"])
def test_json_schema_response_format_gives_valid_json(oai: openai.OpenAI, model: str) -> None:
    done = oai.chat.completions.create(
        model=model,
        messages=MESSAGES,
        response_format=response_format(),  # type: ignore[arg-type]
        max_tokens=120,
        temperature=1.0,
        seed=7,
    )
    choice = done.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content is not None
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    chunks = list(
        oai.chat.completions.create(
            model=model,
            messages=MESSAGES,
            response_format=response_format(),  # type: ignore[arg-type]
            max_tokens=120,
            temperature=1.0,
            seed=7,
            stream=True,
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content  # seeded: the same sample


def test_chat_logprobs_with_top_logprobs_5(oai: openai.OpenAI) -> None:
    done = oai.chat.completions.create(
        model=BASE_MODEL,
        messages=MESSAGES,
        max_tokens=6,
        temperature=0.0,
        logprobs=True,
        top_logprobs=5,
        extra_body={"ignore_eos": True},
    )
    choice = done.choices[0]
    assert choice.logprobs is not None
    content = choice.logprobs.content
    assert content is not None
    assert len(content) == 6
    for entry in content:
        top = entry.top_logprobs
        assert len(top) == 5
        values = [t.logprob for t in top]
        assert values == sorted(values, reverse=True)
        # Greedy: the sampled token is the most likely one.
        assert entry.token == top[0].token
        assert entry.logprob == pytest.approx(top[0].logprob)
        assert entry.bytes == list(entry.token.encode())
        assert all(t.logprob <= 0 for t in top)
    streamed = oai.chat.completions.create(
        model=BASE_MODEL,
        messages=MESSAGES,
        max_tokens=6,
        temperature=0.0,
        logprobs=True,
        top_logprobs=5,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    tokens = [
        e.token
        for c in streamed
        if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.content
        for e in c.choices[0].logprobs.content
    ]
    assert tokens == [e.token for e in content]


def test_completion_logprobs_in_openais_shape(oai: openai.OpenAI) -> None:
    done = oai.completions.create(
        model="lora0",
        prompt="Once upon a time",
        max_tokens=5,
        temperature=0.0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lp = done.choices[0].logprobs
    assert lp is not None
    assert lp.tokens is not None
    assert lp.token_logprobs is not None
    assert lp.top_logprobs is not None
    assert lp.text_offset is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert lp.text_offset[0] == 0
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 2
        assert max(top.values()) == pytest.approx(value)  # greedy
        assert token in top


def test_n_3_gives_three_choices_streamed_and_not(oai: openai.OpenAI) -> None:
    kwargs = {
        "model": "lora0",
        "messages": MESSAGES,
        "max_tokens": 8,
        "temperature": 1.0,
        "seed": 11,
        "n": 3,
        "extra_body": {"ignore_eos": True},
    }
    done = oai.chat.completions.create(**kwargs)
    assert [c.index for c in done.choices] == [0, 1, 2]
    texts = [c.message.content for c in done.choices]
    assert len(set(texts)) == 3  # independent samples (seeds 11, 12, 13)
    assert all(c.finish_reason == "length" for c in done.choices)
    assert done.usage is not None
    assert done.usage.completion_tokens == 24
    chunks = list(oai.chat.completions.create(**kwargs, stream=True))
    streamed = ["", "", ""]
    finished = [None, None, None]
    for c in chunks:
        for choice in c.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                finished[choice.index] = choice.finish_reason
    assert streamed == texts
    assert finished == ["length"] * 3


def test_n_3_with_a_schema_and_logprobs(oai: openai.OpenAI) -> None:
    done = oai.chat.completions.create(
        model="lora2",
        messages=MESSAGES,
        response_format=response_format(),  # type: ignore[arg-type]
        max_tokens=120,
        temperature=1.0,
        seed=3,
        n=3,
        logprobs=True,
        top_logprobs=5,
    )
    assert len(done.choices) == 3
    for choice in done.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)
        assert choice.logprobs is not None
        assert choice.logprobs.content


def test_vllm_guided_extras(oai: openai.OpenAI) -> None:
    choice = oai.completions.create(
        model=BASE_MODEL,
        prompt="Answer:",
        max_tokens=10,
        extra_body={"guided_choice": ["yes", "no"]},
    ).choices[0]
    assert choice.text in {"yes", "no"}
    regex = oai.completions.create(
        model="lora1",
        prompt="Code:",
        max_tokens=20,
        extra_body={"guided_regex": r"[A-Z]{3}-\d{4}"},
    ).choices[0]
    assert re.fullmatch(r"[A-Z]{3}-\d{4}", regex.text)


def test_a_schema_that_does_not_compile_is_400_naming_it(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(
            model=BASE_MODEL,
            prompt="x",
            max_tokens=5,
            extra_body={"guided_regex": "(unclosed"},
        )
    assert info.value.code == "invalid_sampling_params"
    assert info.value.param == "guided_regex"
    assert "does not compile" in str(info.value)
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(
            model=BASE_MODEL,
            messages=MESSAGES,
            response_format={"type": "json_schema", "json_schema": {"name": "x"}},  # type: ignore[arg-type]
        )
    assert info.value.param == "response_format.json_schema.schema"
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=BASE_MODEL, messages=MESSAGES, top_logprobs=3)
    assert info.value.param == "top_logprobs"
