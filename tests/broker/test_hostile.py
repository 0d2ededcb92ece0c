"""Hostile producers (issue 18's cases as regressions): each entry ends alone, exactly once,
and the worker keeps serving everyone else."""

from __future__ import annotations

import json
import logging
import time
import tracemalloc
from typing import Any

import anyio
import msgpack
import pytest
import redis.asyncio as aioredis

from broker import producer
from broker.embedded import RedisServer
from broker.protocol import ErrorEvent, decode_entry
from tests.broker.conftest import PREFIX, fake_engine, running_service
from tests.broker.fake_engine import FakeTokenizer, expected_tokens

pytestmark = pytest.mark.anyio

STREAM, DLQ = f"{PREFIX}:requests", f"{PREFIX}:requests:dlq"
FORGED = "x\n2026-01-01 00:00:00 CRITICAL lorastream: \x1b[31mhacked\x1b[0m"


def js(text: str) -> dict[bytes, bytes]:
    """A JSON entry written as redis-cli would (raw text, escapes as typed)."""
    return {b"json": text.encode()}


def mp(obj: Any) -> dict[bytes, bytes]:
    return {b"data": msgpack.packb(obj, use_bin_type=True)}


def good(rid: str) -> dict[str, Any]:
    return {"v": 1, "id": rid, "prompt": rid, "params": {"max_tokens": 4}}


# Entries with a usable reply address: (fields, the error code their client gets).
TOLD: dict[str, tuple[dict[bytes, bytes], str]] = {
    # An unknown key whose name forges a log line: named, escaped.
    "forged-key": (mp({**good("forged-key"), FORGED: 1}), "invalid_request"),
    # Integers past 64 bits (JSON has no limit), where only the engine core's pipe failed.
    "huge-int": (js('{"v":1,"id":"huge-int","prompt":"a","params":{"max_tokens":123456789012345678901234567890}}'), "invalid_sampling_params"),
    "huge-seed": (js('{"v":1,"id":"huge-seed","prompt":"a","params":{"seed":18446744073709551616}}'), "invalid_sampling_params"),
    "huge-priority": (js('{"v":1,"id":"huge-priority","prompt":"a","priority":1e400}'), "invalid_request"),
    "null-bool": (mp({**good("null-bool"), "params": {"skip_special_tokens": None}}), "invalid_sampling_params"),
    "yes-bool": (mp({**good("yes-bool"), "params": {"ignore_eos": "yes"}}), "invalid_sampling_params"),
    "stop-map": (mp({**good("stop-map"), "params": {"stop": {"a": 1}}}), "invalid_sampling_params"),
    "float-v": (js('{"v":1.0,"id":"float-v","prompt":"a"}'), "unsupported_version"),
    "bool-v": (js('{"v":true,"id":"bool-v","prompt":"a"}'), "unsupported_version"),
    "inf-temp": (mp({**good("inf-temp"), "params": {"temperature": float("inf")}}), "invalid_sampling_params"),
    "nan-top-p": (mp({**good("nan-top-p"), "params": {"top_p": float("nan")}}), "invalid_sampling_params"),
    "token-id-2e40": (mp({"v": 1, "id": "token-id-2e40", "prompt_token_ids": [2**40]}), "invalid_request"),
    "expired": (mp({**good("expired"), "deadline": 1}), "expired"),
    "expired-ttl": (mp({**good("expired-ttl"), "ttl_ms": 1}), "expired"),
    # Not UTF-8 where a channel name goes: the error goes to the default channel instead.
    "bad-utf8-reply-to": ({b"data": msgpack.packb({"v": 1, "id": "bad-utf8-reply-to", "reply_to": "abc", "prompt": "a"}).replace(b"abc", b"a\xffc")}, "bad_payload"),
}  # fmt: skip

# No usable reply address: dead-lettered (the lone surrogates of issue 18 case 1).
DEAD: dict[str, dict[bytes, bytes]] = {
    "surrogate-adapter": js('{"v":1,"id":"p1","prompt":"ab","adapter":"x\\udc00y"}'),
    "surrogate-reply-to": js('{"v":1,"id":"p2","prompt":"ab","reply_to":"c\\udc00"}'),
    "surrogate-key": js('{"v":1,"id":"p3","prompt":"ab","\\udc00":1}'),
    "surrogate-prompt": js('{"v":1,"id":"p4","prompt":"a\\ud800"}'),
    "surrogate-message": js('{"v":1,"id":"p5","messages":[{"role":"user","content":"\\udfff"}]}'),
    # Nested past the decoder's depth: not even the id can be read.
    "deep": {b"data": msgpack.packb({"v": 1, "id": "deep", "x": 1})[:-1] + b"\x91" * 2000},
    "cesu-8-id": {b"data": msgpack.packb({"v": 1, "id": "xyz", "prompt": "a"}).replace(b"xyz", b"\xed\xb0\x80")},
}  # fmt: skip


async def test_hostile_entries_end_alone_and_the_batch_around_them_is_served(
    redis_server: RedisServer, client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lorastream")
    goods = [f"good-{i}" for i in range(len(TOLD) + len(DEAD))]
    hostile = [fields for fields, _ in TOLD.values()] + list(DEAD.values())
    engine = fake_engine()
    async with running_service(redis_server.url, engine=engine) as running:
        # One pipeline: bad and good entries are read in the same XREADGROUP batches.
        pipe = client.pipeline(transaction=False)
        for bad, rid in zip(hostile, goods, strict=True):
            pipe.xadd(STREAM, bad)
            pipe.xadd(STREAM, mp(good(rid)))
        await pipe.execute()
        for rid in goods:
            events = [e async for e in producer.events(client, PREFIX, rid, timeout_s=20)]
            assert producer.assemble(events)[0] == expected_tokens(FakeTokenizer().encode(rid), 4)
        for rid, (_, code) in TOLD.items():
            events = [e async for e in producer.events(client, PREFIX, rid, timeout_s=20)]
            assert len(events) == 1, rid
            assert isinstance(events[0], ErrorEvent), rid
            assert events[0].code == code, (rid, events[0])
        with anyio.fail_after(10):
            while await client.xlen(DLQ) < len(DEAD):
                await anyio.sleep(0.02)
        assert running.rc is None  # still serving
    dead = await client.xrange(DLQ)
    assert len(dead) == len(DEAD)
    assert {f[b"reason"] for _, f in dead} == {b"bad_payload"}
    assert (await client.xpending(STREAM, f"{PREFIX}:workers"))["pending"] == 0
    # Nothing hostile ran, and no log line carries the forged newline or escape codes.
    ran = {rid for rid, _, _ in engine.generate_calls}
    assert ran == set(goods)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "\x1b" not in text
    assert "CRITICAL lorastream: " not in text.replace("\\n2026-01-01 00:00:00 CRITICAL", "")
    forged = [e async for e in producer.events(client, PREFIX, "forged-key", timeout_s=5)]
    assert isinstance(forged[0], ErrorEvent)
    assert forged[0].field is not None
    assert "\n" not in forged[0].field
    assert "\x1b" not in forged[0].message


def test_decoding_is_bounded_by_the_raw_size_not_by_what_it_holds() -> None:
    """Case 3: a payload of millions of empty arrays once grew the worker by hundreds of MiB.
    Now the size is checked before decoding, and within the size nothing undeclared is built."""
    wide = b"\xdd" + (5 << 20).to_bytes(4, "big") + b"\x90" * (5 << 20)
    shapes = {
        "array": wide,  # not a map at all
        "unknown key": b"\x83\xa1v\x01\xa2id\xa1a\xa1x" + wide,  # {v, id, x: [[], [], ...]}
        "known key": b"\x83\xa1v\x01\xa2id\xa1a\xb0prompt_token_ids" + wide,
    }
    for name, raw in shapes.items():
        for limit in (1 << 20, 64 << 20):  # over the limit, and within it
            tracemalloc.start()
            decoded = decode_entry({b"data": raw}, prefix="p", max_payload_bytes=limit)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert decoded.request is None, name
            assert decoded.error is not None, name
            assert peak < 256 << 10, (name, limit, peak)  # < 256 KiB for 5 MiB of arrays
        assert decode_entry({b"data": raw}, prefix="p", max_payload_bytes=1 << 20).error.code == (
            "payload_too_large"
        )


async def test_a_request_past_its_deadline_ends_expired_and_frees_its_sequence(
    redis_server: RedisServer, client: aioredis.Redis
) -> None:
    engine = fake_engine(step_delay_s=0.01)
    async with running_service(redis_server.url, engine=engine) as running:
        deadline = int(time.time() * 1000) + 300
        await producer.submit(
            client, PREFIX,
            {"id": "late", "prompt": "a", "params": {"max_tokens": 100_000}, "deadline": deadline},
        )  # fmt: skip
        events = [e async for e in producer.events(client, PREFIX, "late", timeout_s=20)]
        assert running.service.inflight == 0
    last = events[-1]
    assert isinstance(last, ErrorEvent)
    assert last.code == "expired"
    assert last.usage is not None
    assert 0 < last.usage["completion_tokens"] < 100_000
    assert "late" in engine.aborted
    assert time.time() * 1000 >= deadline


async def test_expired_entries_are_never_run(
    redis_server: RedisServer, client: aioredis.Redis
) -> None:
    engine = fake_engine()
    past = int(time.time() * 1000) - 1
    async with running_service(redis_server.url, engine=engine):
        await producer.submit(client, PREFIX, {**good("gone"), "deadline": past})
        await producer.submit(client, PREFIX, {**good("kept"), "ttl_ms": 600_000})
        (event,) = [e async for e in producer.events(client, PREFIX, "gone", timeout_s=20)]
        kept = [e async for e in producer.events(client, PREFIX, "kept", timeout_s=20)]
    assert isinstance(event, ErrorEvent)
    assert (event.code, event.finish_reason) == ("expired", "error")
    assert kept[-1].finish_reason == "length"
    assert [rid for rid, _, _ in engine.generate_calls] == ["kept"]


async def test_an_engine_that_fails_one_request_fails_only_that_one(
    redis_server: RedisServer, client: aioredis.Redis
) -> None:
    engine = fake_engine()
    real_submit = engine.submit

    async def submit(prompt: Any, params: Any, request_id: str, **kw: Any) -> None:
        if request_id == "boom":
            raise RuntimeError("boom")
        await real_submit(prompt, params, request_id, **kw)

    engine.submit = submit  # type: ignore[method-assign]
    async with running_service(redis_server.url, engine=engine) as running:
        await producer.submit(client, PREFIX, good("boom"))
        await producer.submit(client, PREFIX, good("fine"))
        (event,) = [e async for e in producer.events(client, PREFIX, "boom", timeout_s=20)]
        fine = [e async for e in producer.events(client, PREFIX, "fine", timeout_s=20)]
        assert running.rc is None
    assert isinstance(event, ErrorEvent)
    assert event.code == "internal_error"
    assert fine[-1].finish_reason == "length"


def test_json_entries_match_msgpack_entries() -> None:
    wire = good("same")
    a = decode_entry(mp(wire), prefix="p", max_payload_bytes=1 << 20)
    b = decode_entry(js(json.dumps(wire)), prefix="p", max_payload_bytes=1 << 20)
    assert a.request == b.request
    assert a.request is not None
