"""Bad input never crashes or stalls the worker: each gets its error event (or a dead letter)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import msgpack
import pytest
import redis.asyncio as aioredis

from broker import producer
from broker.embedded import RedisServer
from broker.protocol import ErrorEvent
from broker.registry import AdapterRegistry
from tests.broker.conftest import PREFIX, fake_engine, running_service

pytestmark = pytest.mark.anyio

STREAM = f"{PREFIX}:requests"


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def good(rid: str) -> dict[str, Any]:
    return {"v": 1, "id": rid, "prompt": "ok", "params": {"max_tokens": 3}}


# (entry fields, the error code its client gets)
WITH_REPLY: dict[str, tuple[dict[str, Any], str]] = {
    "missing-prompt": ({"data": pack({"v": 1, "id": "missing-prompt"})}, "invalid_request"),
    "two-prompts": ({"data": pack({"v": 1, "id": "two-prompts", "prompt": "a", "prompt_token_ids": [1]})}, "invalid_request"),
    "wrong-type": ({"data": pack({"v": 1, "id": "wrong-type", "prompt": 5})}, "invalid_request"),
    "bad-ids": ({"data": pack({"v": 1, "id": "bad-ids", "prompt_token_ids": [1, "x"]})}, "invalid_request"),
    "bad-messages": ({"data": pack({"v": 1, "id": "bad-messages", "messages": [{"role": "user"}]})}, "invalid_request"),
    "unknown-field": ({"data": pack({"v": 1, "id": "unknown-field", "prompt": "a", "tempreature": 1})}, "invalid_request"),
    "unknown-param": ({"json": json.dumps({"v": 1, "id": "unknown-param", "prompt": "a", "params": {"max_token": 3}})}, "invalid_request"),
    "bad-param-type": ({"data": pack({"v": 1, "id": "bad-param-type", "prompt": "a", "params": {"max_tokens": "3"}})}, "invalid_sampling_params"),
    "bad-param-value": ({"data": pack({"v": 1, "id": "bad-param-value", "prompt": "a", "params": {"temperature": -1}})}, "invalid_sampling_params"),
    "bad-version": ({"data": pack({"v": 2, "id": "bad-version", "prompt": "a"})}, "unsupported_version"),
    "no-version": ({"data": pack({"id": "no-version", "prompt": "a"})}, "invalid_request"),
    "too-long": ({"data": pack({"v": 1, "id": "too-long", "prompt": "x" * 300})}, "prompt_too_long"),
    "vocab": ({"data": pack({"v": 1, "id": "vocab", "prompt_token_ids": [10**6]})}, "invalid_request"),
    "unknown-adapter": ({"data": pack({"v": 1, "id": "unknown-adapter", "prompt": "a", "adapter": "nope"})}, "adapter_not_found"),
    "escaping-adapter": ({"data": pack({"v": 1, "id": "escaping-adapter", "prompt": "a", "adapter": "escape"})}, "adapter_path_not_allowed"),
    "missing-dir-adapter": ({"data": pack({"v": 1, "id": "missing-dir-adapter", "prompt": "a", "adapter": "ghost"})}, "adapter_not_found"),
    "corrupt-adapter": ({"data": pack({"v": 1, "id": "corrupt-adapter", "prompt": "a", "adapter": "broken"})}, "adapter_corrupt"),
    "huge": ({"data": pack({"v": 1, "id": "huge", "prompt": "y" * 5000})}, "payload_too_large"),
    "bad-reply-to": ({"data": pack({"v": 1, "id": "bad-reply-to", "prompt": 1, "reply_to": 7})}, "invalid_request"),
}  # fmt: skip

# No usable reply address: dead-lettered with the reason.
NO_REPLY: list[tuple[dict[str, Any], str]] = [
    ({"data": b"\xc1not msgpack"}, "bad_payload"),
    ({"json": b"{not json"}, "bad_payload"),
    ({"data": pack([1, 2, 3])}, "invalid_request"),
    ({"data": pack({"v": 1, "prompt": "no id"})}, "invalid_request"),
    ({"data": pack({"v": 1, "id": "has space", "prompt": "a"})}, "invalid_request"),
    ({"other": b"x"}, "bad_payload"),
    ({"json": '{"x": ' + "[" * 3000}, "bad_payload"),  # deep, under --max-payload-bytes
    ({"data": b"\x81\xa1x" + b"\x91" * 3000}, "bad_payload"),
    ({"data": pack(good("both")), "json": json.dumps(good("both"))}, "bad_payload"),
]


async def test_every_bad_input_gets_its_error_and_good_requests_go_on(
    redis_server: RedisServer, client: aioredis.Redis, adapter_root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (adapter_root / "escape").symlink_to(outside)
    registry = AdapterRegistry(key=f"{PREFIX}:adapters", lora_root=adapter_root)
    await client.hset(
        f"{PREFIX}:adapters", mapping={"escape": "escape", "ghost": "ghost", "broken": "broken"}
    )
    async with running_service(
        redis_server.url,
        registry=registry,
        engine=fake_engine(max_model_len=256),
        max_payload_bytes=4096,
    ) as running:
        goods = []
        entries = [fields for fields, _ in WITH_REPLY.values()] + [fields for fields, _ in NO_REPLY]
        for i, fields in enumerate(entries):
            await client.xadd(STREAM, fields)
            rid = f"good-{i}"
            goods.append(rid)
            await client.xadd(STREAM, {"data": pack(good(rid))})
        for rid in goods:
            events = [e async for e in producer.events(client, PREFIX, rid, timeout_s=10)]
            assert events[-1].finish_reason == "length", rid
        for rid, (_, code) in WITH_REPLY.items():
            events = [e async for e in producer.events(client, PREFIX, rid, timeout_s=10)]
            assert len(events) == 1, rid
            assert isinstance(events[0], ErrorEvent), rid
            assert (events[0].code, events[0].finish_reason, events[0].seq) == (code, "error", 0), (
                rid
            )
            assert events[0].message
        with anyio.fail_after(5):
            while await client.xlen(f"{PREFIX}:requests:dlq") < len(NO_REPLY):
                await anyio.sleep(0.02)
        dead = await client.xrange(f"{PREFIX}:requests:dlq")
        assert [f[b"reason"].decode() for _, f in dead] == [code for _, code in NO_REPLY]
        assert all(f[b"entry_id"] and f[b"message"] for _, f in dead)
        assert dead[0][1][b"data"] == b"\xc1not msgpack"  # the original payload is kept
        assert running.service.inflight == 0
    assert (await client.xpending(STREAM, f"{PREFIX}:workers"))["pending"] == 0


async def test_error_messages_name_the_field(
    redis_server: RedisServer, client: aioredis.Redis
) -> None:
    async with running_service(redis_server.url):
        await client.xadd(STREAM, WITH_REPLY["unknown-param"][0])
        await client.xadd(STREAM, WITH_REPLY["bad-param-value"][0])
        await client.xadd(STREAM, WITH_REPLY["wrong-type"][0])
        messages, fields = {}, {}
        for rid in ("unknown-param", "bad-param-value", "wrong-type"):
            (event,) = [e async for e in producer.events(client, PREFIX, rid, timeout_s=10)]
            assert isinstance(event, ErrorEvent)
            messages[rid], fields[rid] = event.message, event.field
    assert "max_token" in messages["unknown-param"]
    assert "temperature" in messages["bad-param-value"]
    assert messages["wrong-type"].startswith("prompt:")
    assert fields == {
        "unknown-param": "params.max_token",
        "bad-param-value": "params.temperature",
        "wrong-type": "prompt",
    }


async def test_a_custom_reply_channel_gets_the_error(
    redis_server: RedisServer, client: aioredis.Redis
) -> None:
    async with running_service(redis_server.url):
        bad = {
            "v": 1,
            "id": "custom",
            "prompt": "a",
            "params": {"top_p": 5},
            "reply_to": "my:inbox",
        }
        async with anyio.create_task_group() as tg:
            got = []

            async def listen() -> None:
                got.extend(
                    [
                        e
                        async for e in producer.events(
                            client, PREFIX, "custom", reply_to="my:inbox"
                        )
                    ]
                )

            tg.start_soon(listen)
            await anyio.sleep(0.05)
            await client.xadd(STREAM, {"data": pack(bad)})
    assert isinstance(got[0], ErrorEvent)
    assert got[0].code == "invalid_sampling_params"


async def test_duplicate_running_id_is_dead_lettered_without_touching_the_running_stream(
    redis_server: RedisServer, client: aioredis.Redis
) -> None:
    async with running_service(redis_server.url, engine=fake_engine(step_delay_s=0.01)):
        await producer.submit(
            client, PREFIX, {"id": "dup", "prompt": "a", "params": {"max_tokens": 20}}
        )
        await anyio.sleep(0.1)
        await producer.submit(
            client, PREFIX, {"id": "dup", "prompt": "b", "params": {"max_tokens": 20}}
        )
        events = [e async for e in producer.events(client, PREFIX, "dup", timeout_s=10)]
        with anyio.fail_after(5):
            while not await client.xlen(f"{PREFIX}:requests:dlq"):
                await anyio.sleep(0.02)
    assert events[-1].finish_reason == "length"
    assert not any(isinstance(e, ErrorEvent) for e in events)
    ((_, fields),) = await client.xrange(f"{PREFIX}:requests:dlq")
    assert fields[b"reason"] == b"duplicate_request"
