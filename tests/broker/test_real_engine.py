"""The service on the real engine and the tiny model: several adapters stream at once
through a real redis-server, token for token what the engine generates."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from broker import producer
from broker.embedded import RedisServer
from broker.protocol import Event, TokenEvent, encode_event
from broker.registry import AdapterRegistry
from tests.broker.conftest import PREFIX, running_service

pytestmark = pytest.mark.anyio

PARAMS = {"max_tokens": 10, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture
async def real_engine(tiny_model_dir: Path, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    from engine.async_engine import AsyncLLMEngine
    from engine.config import EngineArgs

    args = EngineArgs(
        tensor_parallel_size=getattr(request, "param", 1),
        model=str(tiny_model_dir),
        device="cpu",
        enable_lora=True,
        max_loras=2,  # fewer slots than adapters in flight: the scheduler must rotate them
        max_cpu_loras=4,
        max_lora_rank=32,
        max_num_seqs=8,
        disable_log_stats=True,
        lora_modules=[f"lora0={tiny_model_dir / 'adapters' / 'lora0'}"],
    )
    engine = AsyncLLMEngine.from_engine_args(args)
    try:
        yield engine
    finally:
        await engine.shutdown()


def registry_for(model_dir: Path) -> AdapterRegistry:
    adapters = model_dir / "adapters"
    # lora0 from --lora-modules (preloaded as id 1), the others from the Redis registry.
    return AdapterRegistry(
        [("lora0", str(adapters / "lora0"))], key=f"{PREFIX}:adapters", lora_root=adapters
    )


async def reference(
    engine: Any, registry: AdapterRegistry, model_dir: Path, prompt: Any, adapter: str | None
) -> tuple[list[int], str]:
    from engine.sampling_params import SamplingParams

    lora = None
    if adapter is not None:
        path = (
            str(model_dir / "adapters" / adapter)
            if adapter == "lora0"
            else str((model_dir / "adapters" / adapter).resolve())
        )
        lora = registry.lora_request(adapter, path)
    last = None
    async for out in engine.generate(
        prompt, SamplingParams(**PARAMS), f"ref-{adapter}-{id(prompt)}", lora_request=lora
    ):
        last = out
    assert last is not None
    return list(last.outputs[0].token_ids), last.outputs[0].text


# A worker over two tensor-parallel ranks (gloo here) serves the same way: tests/distributed
# shows its tokens equal one rank's and transformers + PEFT's.
@pytest.mark.parametrize("real_engine", [1, 2], ids=["tp1", "tp2"], indirect=True)
async def test_several_adapters_stream_at_once_through_redis(
    redis_server: RedisServer, client: aioredis.Redis, real_engine: Any, tiny_model_dir: Path
) -> None:
    await client.hset(
        f"{PREFIX}:adapters", mapping={"lora1": "lora1", "lora2": "lora2", "lora3": "lora3"}
    )
    registry = registry_for(tiny_model_dir)
    requests: dict[str, tuple[dict[str, Any], bool]] = {
        "base": ({"prompt": "Once upon a time", "adapter": None}, False),
        "a0": ({"prompt": "Once upon a time", "adapter": "lora0"}, True),
        "a1": ({"prompt": "Once upon a time", "adapter": "lora1"}, False),
        "a2": ({"prompt": "The cat sat", "adapter": "lora2"}, True),
        "a3": ({"prompt": "Once upon a time", "adapter": "lora3"}, False),
        "chat": (
            {"messages": [{"role": "user", "content": "Tell me a story"}], "adapter": "lora1"},
            True,
        ),
    }
    got: dict[str, list[Event]] = {}
    async with running_service(redis_server.url, engine=real_engine, registry=registry):

        async def follow(rid: str) -> None:
            got[rid] = [e async for e in producer.events(client, PREFIX, rid, timeout_s=120)]

        async with anyio.create_task_group() as tg:
            for rid, (fields, as_json) in requests.items():
                tg.start_soon(follow, rid)
                await producer.submit(
                    client, PREFIX, {"id": rid, **fields, "params": PARAMS}, as_json=as_json
                )
        tokenizer = real_engine.engine.tokenizer
        outputs = {}
        for rid, (fields, _) in requests.items():
            events = got[rid]
            assert [e.seq for e in events] == list(range(len(events))), rid
            assert events[-1].finish_reason == "length", (rid, events[-1])
            tokens, text = producer.assemble(events)
            # A conversation is its template's tokens, special tokens included once
            # (transformers tokenizes it so), as vLLM does.
            prompt = fields.get("prompt") or {
                "prompt_token_ids": tokenizer.apply_chat_template(
                    fields["messages"], tokenize=True, add_generation_prompt=True, return_dict=False
                )
            }
            assert (tokens, text) == await reference(
                real_engine, registry, tiny_model_dir, prompt, fields["adapter"]
            ), rid
            outputs[rid] = tokens
    # The adapters change the output (same prompt as "base").
    assert len({tuple(outputs[r]) for r in ("base", "a0", "a1", "a3")}) == 4


async def test_a_rerun_on_the_real_engine_continues_the_published_tokens(
    redis_server: RedisServer, client: aioredis.Redis, real_engine: Any, tiny_model_dir: Path
) -> None:
    registry = registry_for(tiny_model_dir)
    await client.hset(f"{PREFIX}:adapters", "lora2", "lora2")
    full, full_text = await reference(
        real_engine, registry, tiny_model_dir, "Once upon a time", "lora2"
    )
    # A worker "w1" read the request, published 4 tokens, and died.
    await client.xgroup_create(f"{PREFIX}:requests", f"{PREFIX}:workers", id="0", mkstream=True)
    await producer.submit(
        client,
        PREFIX,
        {"id": "rerun", "prompt": "Once upon a time", "adapter": "lora2", "params": PARAMS},
    )
    await client.xreadgroup(f"{PREFIX}:workers", "w1", {f"{PREFIX}:requests": ">"})
    for seq, chunk in enumerate((full[:1], full[1:4])):
        event = TokenEvent(id="rerun", seq=seq, token_ids=chunk, text="")
        await client.xadd(f"{PREFIX}:out:rerun", {"data": encode_event(event)})
    async with running_service(
        redis_server.url, engine=real_engine, registry=registry, consumer="w1"
    ):
        events = [e async for e in producer.events(client, PREFIX, "rerun", timeout_s=120)]
    assert [e.seq for e in events] == list(range(len(events)))
    # The client was sent the 4 tokens without their text (as when the text was held back):
    # the rerun starts with it, so tokens and text are one run's.
    assert producer.assemble(events) == (full, full_text)
    assert events[-1].usage is not None
    assert events[-1].usage["resumed_tokens"] == 4
