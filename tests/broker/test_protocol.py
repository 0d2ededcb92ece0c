"""Wire protocol v1: one codec, typed messages, validation errors that name the field."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest

from broker.protocol import (
    AbortRequest,
    BadPayload,
    Codec,
    ErrorEvent,
    GenerateRequest,
    InvalidField,
    TokenEvent,
    UnsupportedVersion,
    decode_event,
    encode_event,
    error_field,
    reply_address,
)
from engine.errors import AdapterNotFound, InvalidSamplingParams


def request(**fields: Any) -> dict[str, Any]:
    return {"v": 1, "id": "r1", "prompt": "hi", **fields}


def test_request_round_trips_through_msgpack_and_json() -> None:
    wire = request(adapter="sql", params={"max_tokens": 5, "stop": ["\n"]}, priority=2)
    for raw, kind in ((Codec.pack(wire), "data"), (json.dumps(wire).encode(), "json")):
        req = GenerateRequest.from_wire(Codec.unpack(raw, kind=kind), prefix="p")
        assert req.reply_to == "p:tokens:r1"
        assert req.sampling_params().max_tokens == 5
        assert GenerateRequest.from_wire(req.to_wire(), prefix="p") == req


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        ({"id": None}, "id"),
        ({"id": "a b"}, "id"),
        ({"id": "x" * 300}, "id"),
        ({"prompt": None}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt_token_ids": [1]}, "prompt"),
        ({"prompt": None, "prompt_token_ids": [1, True]}, "prompt_token_ids[1]"),
        ({"prompt": None, "prompt_token_ids": []}, "prompt_token_ids"),
        ({"prompt": None, "messages": [{"role": "user", "content": 1}]}, "messages[0].content"),
        ({"prompt": None, "messages": [{"role": "user", "content": "a", "x": 1}]}, "messages[0].x"),
        ({"adapter": 3}, "adapter"),
        ({"params": []}, "params"),
        ({"params": {"max_token": 1}}, "params.max_token"),
        ({"priority": 1.5}, "priority"),
        ({"priority": True}, "priority"),
        ({"reply_to": 5}, "reply_to"),
        ({"extra": 1}, "extra"),
    ],
)
def test_invalid_fields_are_named(fields: dict[str, Any], field_name: str) -> None:
    with pytest.raises(InvalidField) as info:
        GenerateRequest.from_wire(request(**fields), prefix="p")
    assert info.value.field == field_name
    assert info.value.code == "invalid_request"
    assert field_name in info.value.message


def test_version_is_required_and_checked() -> None:
    with pytest.raises(InvalidField, match="v: missing"):
        GenerateRequest.from_wire({"id": "a", "prompt": "b"}, prefix="p")
    for v in (2, "1", True):
        with pytest.raises(UnsupportedVersion):
            GenerateRequest.from_wire(request(v=v), prefix="p")


def test_sampling_params_are_validated_by_the_engine_and_named() -> None:
    with pytest.raises(InvalidSamplingParams, match="top_p"):
        GenerateRequest.from_wire(request(params={"top_p": 2}), prefix="p")
    # A value of a type SamplingParams does not even expect is named by the schema.
    with pytest.raises(InvalidSamplingParams, match=r"^params\.stop: expected `str") as info:
        GenerateRequest.from_wire(request(params={"max_tokens": 3, "stop": 5}), prefix="p")
    assert error_field(info.value) == "params.stop"


def test_undecodable_payloads_are_bad_payload() -> None:
    with pytest.raises(BadPayload, match="msgpack"):
        Codec.unpack(b"\xc1")
    with pytest.raises(BadPayload, match="JSON"):
        Codec.unpack(b"{", kind="json")


def test_reply_address_is_found_even_in_a_bad_request() -> None:
    def address(obj: Any) -> tuple[str, str] | None:
        return reply_address(Codec.pack(obj), prefix="p")

    assert address({"id": "a", "prompt": 5}) == ("a", "p:tokens:a")
    assert address({"id": "a", "reply_to": "mine"}) == ("a", "mine")
    assert address({"id": "a", "reply_to": 7}) == ("a", "p:tokens:a")
    assert address({"prompt": "x"}) is None
    assert address([1]) is None  # type: ignore[arg-type]
    assert reply_address(b'{"id": "a", "x": [[[]]]}', kind="json", prefix="p") == (
        "a",
        "p:tokens:a",
    )


def test_events_round_trip_and_are_plain_msgpack_maps() -> None:
    token = TokenEvent(
        id="a", seq=3, token_ids=[1, 2], text="hi", logprobs=[[[1, -0.5]], [[2, -0.1]]]
    )
    final = TokenEvent(
        id="a",
        seq=4,
        token_ids=[],
        text="",
        finished=True,
        finish_reason="length",
        usage={"prompt_tokens": 2},
    )
    error = ErrorEvent.from_exception("a", 0, AdapterNotFound("no adapter 'x'"))
    for event in (token, final, error):
        raw = encode_event(event)
        assert decode_event(raw) == event
        wire = msgpack.unpackb(raw)
        assert wire["v"] == 1
        assert set(wire) >= {"id", "seq", "token_ids", "text", "finished", "finish_reason"}
    assert msgpack.unpackb(encode_event(error))["error"] == {
        "code": "adapter_not_found",
        "message": "no adapter 'x'",
    }
    assert "restart" not in msgpack.unpackb(encode_event(token))


def test_abort_accepts_msgpack_and_json() -> None:
    wire = AbortRequest("r1").to_wire()
    assert AbortRequest.from_wire(Codec.unpack_any(Codec.pack(wire))) == AbortRequest("r1")
    assert AbortRequest.from_wire(Codec.unpack_any(json.dumps(wire).encode())) == AbortRequest("r1")
    with pytest.raises(InvalidField, match="op"):
        AbortRequest.from_wire({"v": 1, "op": "pause", "id": "r1"})


# ------------------------------------------------------------------ params ↔ SamplingParams
def test_every_sampling_param_is_on_the_wire_or_excluded_with_a_reason() -> None:
    """WireParams and SamplingParams list the same fields: a new sampling parameter gets a
    wire type and range, or an entry in WIRE_PARAMS_EXCLUDED saying why it is not sent."""
    import dataclasses

    from broker.protocol import WIRE_PARAMS_EXCLUDED, WireParams
    from engine.sampling_params import SamplingParams

    engine_fields = {f.name for f in dataclasses.fields(SamplingParams)}
    wire_fields = set(WireParams.__struct_fields__)
    assert wire_fields | set(WIRE_PARAMS_EXCLUDED) == engine_fields
    assert not wire_fields & set(WIRE_PARAMS_EXCLUDED)
    assert all(reason.strip() for reason in WIRE_PARAMS_EXCLUDED.values())


def test_every_wire_param_takes_the_engines_default() -> None:
    """Each wire field's type admits SamplingParams' own default (where it is not None), and
    that value reaches SamplingParams unchanged: the two declare the same types."""
    import dataclasses

    from broker.protocol import WireParams
    from engine.sampling_params import SamplingParams

    defaults = SamplingParams()
    for name in WireParams.__struct_fields__:
        value = getattr(defaults, name)
        if value is None:
            continue
        if isinstance(value, list) and not value:
            value = []
        req = GenerateRequest.from_wire(request(params={name: value}), prefix="p")
        assert getattr(req.sampling_params(), name) == value, name
    assert dataclasses.fields(SamplingParams)  # (the loop above ran over real fields)


@pytest.mark.parametrize(
    ("params", "field_name"),
    [
        ({"logit_bias": {5: float("inf")}}, "params.logit_bias"),
        ({"allowed_token_ids": []}, "params.allowed_token_ids"),
        ({"allowed_token_ids": [-1]}, "params.allowed_token_ids"),
        ({"bad_words": [""]}, "params.bad_words"),
        ({"truncate_prompt_tokens": 0}, "params.truncate_prompt_tokens"),
        ({"best_of": 2}, "params.best_of"),
        ({"n": 2}, "params.n"),
        ({"detokenize": False, "stop": ["x"]}, "params.stop"),
    ],
)
def test_new_params_are_checked_and_named(params: dict[str, Any], field_name: str) -> None:
    with pytest.raises(InvalidSamplingParams) as e:
        GenerateRequest.from_wire(request(params=params), prefix="p")
    assert (error_field(e.value) or "").startswith(field_name)  # [0]: a list item


def test_n_above_one_is_refused_with_how_to_get_n_samples() -> None:
    with pytest.raises(InvalidSamplingParams, match="send n requests"):
        GenerateRequest.from_wire(request(params={"n": 3}), prefix="p")


def test_logit_bias_keys_are_token_ids_in_json_and_msgpack() -> None:
    wire = request(params={"logit_bias": {"7": 2.5, "3": -200}})
    from_json = GenerateRequest.decode(json.dumps(wire).encode(), kind="json", prefix="p")
    assert from_json.sampling_params().logit_bias == {7: 2.5, 3: -100.0}  # clamped, as vLLM
    packed = request(params={"logit_bias": {7: 2.5}})
    assert GenerateRequest.from_wire(packed, prefix="p").sampling_params().logit_bias == {7: 2.5}
