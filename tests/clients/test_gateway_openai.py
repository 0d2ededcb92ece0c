"""The official openai client against gateway + real worker (tiny model) + redis-server:
completions and chat, streaming and not, for the base model and two adapters; its errors
for an unknown model and a bad parameter."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import openai
import pytest
import redis

from broker import heartbeat
from broker.embedded import RedisServer
from clients.gateway import GatewayConfig
from tests.clients.conftest import BASE_MODEL, ROOT, Stack, running_gateway, wait_for

MODELS = [BASE_MODEL, "lora0", "lora1"]  # lora0 preloaded, lora1 from the registry


@pytest.fixture(scope="module")
def oai(stack: Stack) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key="unused", max_retries=0)
    yield c
    c.close()


def test_models_lists_base_and_registry_adapters(oai: openai.OpenAI) -> None:
    ids = [m.id for m in oai.models.list()]
    assert ids == [BASE_MODEL, "lora0", "lora1", "lora2"]


@pytest.mark.parametrize("model", MODELS)
def test_completion_streaming_equals_non_streaming(oai: openai.OpenAI, model: str) -> None:
    kwargs = {"model": model, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0.0}
    done = oai.completions.create(**kwargs, extra_body={"ignore_eos": True})
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None
    assert done.usage.completion_tokens == 8
    assert done.usage.prompt_tokens > 0
    chunks = list(
        oai.completions.create(
            **kwargs,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == done.choices[0].text
    assert len([c for c in chunks if c.choices]) >= 2  # streamed, not one blob
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8


def test_adapters_change_the_output(oai: openai.OpenAI) -> None:
    texts = {}
    for m in MODELS:
        done = oai.completions.create(
            model=m, prompt="The cat sat", max_tokens=8, temperature=0.0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        texts[m] = done.choices[0].text
    assert len(set(texts.values())) == len(MODELS), texts


@pytest.mark.parametrize("model", MODELS)
def test_chat_streaming_and_not(oai: openai.OpenAI, model: str) -> None:
    messages: list = [{"role": "user", "content": "Tell me a story"}]
    done = oai.chat.completions.create(
        model=model, messages=messages, max_tokens=6, temperature=0.0
    )
    assert done.object == "chat.completion"
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].finish_reason in {"length", "stop"}
    stream = oai.chat.completions.create(
        model=model, messages=messages, max_tokens=6, temperature=0.0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == done.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason


def test_unknown_model_is_404(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        oai.completions.create(model="no-such-adapter", prompt="hi", max_tokens=2)
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(
            model="no-such-adapter", messages=[{"role": "user", "content": "hi"}], stream=True
        )


def test_bad_parameter_is_400_naming_it(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=BASE_MODEL, prompt="hi", max_tokens=2, temperature=-1)
    assert info.value.status_code == 400
    assert info.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(
            model="lora1", messages=[{"role": "user", "content": "hi"}], top_p=7, stream=True
        )
    assert info.value.param == "top_p"
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=BASE_MODEL, prompt="hi", extra_body={"max_token": 3})
    assert info.value.param == "max_token"


def test_health(stack: Stack) -> None:
    with urllib.request.urlopen(stack.gateway_url + "/health", timeout=5) as res:
        assert json.load(res) == {"status": "ok", "workers": 1}


def _aborts(stack: Stack) -> float:
    with urllib.request.urlopen(stack.metrics_url, timeout=5) as res:
        text = res.read().decode()
    for line in text.splitlines():
        if line.startswith('lorastream_requests_finished_total{finish_reason="abort"}'):
            return float(line.split()[-1])
    return 0.0


def test_client_disconnect_aborts_the_request(stack: Stack, oai: openai.OpenAI) -> None:
    before = _aborts(stack)
    stream = oai.completions.create(
        model="lora1", prompt="Once", max_tokens=2000, stream=True,
        extra_body={"ignore_eos": True, "max_tokens": 2000},
    )  # fmt: skip
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()  # drops the HTTP connection
    deadline = time.monotonic() + 20
    while _aborts(stack) <= before:
        assert time.monotonic() < deadline, "the worker never saw an abort"
        time.sleep(0.05)


def test_no_worker_is_503(redis_server: RedisServer) -> None:
    cfg = GatewayConfig(
        redis_url=redis_server.url, prefix="idle", served_model_name="m", first_event_timeout_s=0.5
    )
    with running_gateway(cfg) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            c.completions.create(model="m", prompt="hi", max_tokens=2)
        c.close()
    assert info.value.status_code == 503
    assert info.value.code == "no_worker"


def test_generate_command_streams_to_the_terminal(stack: Stack) -> None:
    proc = subprocess.run(
        [
            sys.executable, "-m", "engine.cli", "generate", "--redis-url", stack.redis_url,
            "--prefix", stack.prefix, "--adapter", "lora1", "--max-tokens", "6",
            "--params", '{"ignore_eos": true}', "Once upon a time",
        ],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "[length] " in proc.stderr
    assert "6 completion tokens" in proc.stderr
    bad = subprocess.run(
        [
            sys.executable, "-m", "engine.cli", "generate", "--redis-url", stack.redis_url,
            "--prefix", stack.prefix, "--adapter", "nope", "hi",
        ],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert bad.returncode == 1
    assert "AdapterUnavailable" in bad.stderr
    assert "adapter_not_found" in bad.stderr


def test_the_real_worker_reports_its_adapters_in_its_heartbeat(
    stack: Stack, oai: openai.OpenAI
) -> None:
    """The engine reports adapters by id; the heartbeat names them, registry ones included."""
    oai.completions.create(model="lora2", prompt="The cat", max_tokens=2)
    r = redis.Redis.from_url(stack.redis_url)

    def holds_lora2() -> bool:
        workers = heartbeat.live_workers_sync(r, stack.prefix)
        return bool(workers) and "lora2" in workers[0].adapters_host

    try:
        wait_for(holds_lora2, "lora2 in the heartbeat's host cache")
        [worker] = heartbeat.live_workers_sync(r, stack.prefix)
    finally:
        r.close()
    assert worker.consumer == "w1"
    assert worker.model == str(stack.model_dir)
    assert worker.adapters_served == ["lora0"]
    assert set(worker.adapters_resident) <= {"lora0", "lora1", "lora2"}
    assert worker.max_num_seqs == 16
