"""Wire protocol v1: typed messages, one schema, validation errors that name the field.

Requests arrive as stream entries whose field ``data`` holds a msgpack map or ``json`` a JSON
object of the same shape; events and control messages are msgpack maps (control messages may
also be JSON so that redis-cli can send them). Nothing on the wire is pickle. docs/protocol.md
is the reference for producers and clients; keep the two in step.

Everything a producer writes is untrusted. It is parsed once, here, by msgspec Structs that
declare the wire format: the raw size is checked before anything is decoded, decoding builds
only the declared fields (an unknown key or a huge nested value is refused or skipped without
building Python objects for it), strings are valid UTF-8, integers fit the ranges the engine
takes in-process and across its process boundary, booleans are booleans. msgspec rather than
pydantic: it decodes msgpack and JSON straight into the typed Structs in one C pass, so there
is no intermediate ``dict`` of arbitrary values to bound, and its errors carry the field's path.
Past ``decode_entry`` every value is typed and valid; nothing later re-checks a field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Final

import msgpack
import msgspec

from engine.errors import InvalidRequest, InvalidSamplingParams, LoRAStreamError
from engine.sampling_params import SamplingParams

VERSION: Final = 1
MAX_ID_LEN: Final = 256
MAX_CHANNEL_LEN: Final = 512
FINISH_REASONS: Final = ("stop", "length", "abort", "error")
INT64_MAX: Final = 2**63 - 1
MAX_TOKEN_ID: Final = 2**31 - 1


# ----------------------------------------------------------------------------- errors
class BadPayload(InvalidRequest):
    """The entry is not a msgpack map in ``data`` nor a JSON object in ``json``."""

    code = "bad_payload"


class PayloadTooLarge(InvalidRequest):
    code = "payload_too_large"


class UnsupportedVersion(InvalidRequest):
    code = "unsupported_version"


class InvalidField(InvalidRequest):
    """A missing, wrong-typed or unknown field; ``field`` names it."""

    code = "invalid_request"

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class InvalidParam(InvalidSamplingParams):
    """A ``params`` value of the wrong type or out of the range the engine takes."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class DuplicateRequest(InvalidRequest):
    """A request with this id is already running on this worker."""

    code = "duplicate_request"


class Expired(LoRAStreamError):
    """The request's ``deadline`` (or ``ttl_ms``) passed before it finished."""

    code = "expired"


class MaxDeliveriesExceeded(LoRAStreamError):
    code = "max_deliveries_exceeded"


def untrusted(value: object, limit: int = 200) -> str:
    """Text from the wire made safe for a log line or an error message: control characters,
    newlines and lone surrogates escaped (``repr``), at most ``limit`` characters."""
    text = repr(value) if not isinstance(value, str) else repr(value)[1:-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- codec
class Codec:
    """msgpack for everything we write. ``unpack`` is for trusted bytes (tests, our own
    events); untrusted requests go through ``decode_entry`` and control messages through
    ``AbortRequest.decode``."""

    @staticmethod
    def pack(obj: dict[str, Any]) -> bytes:
        return msgpack.packb(obj, use_bin_type=True)

    @staticmethod
    def unpack(raw: bytes, *, kind: str = "data") -> Any:
        """Decode a ``data`` (msgpack) or ``json`` payload; raises BadPayload naming which."""
        try:
            if kind == "json":
                return msgspec.json.decode(raw)
            return msgpack.unpackb(raw, raw=False, strict_map_key=False)
        except (
            ValueError,
            msgpack.UnpackException,
            msgspec.DecodeError,
            TypeError,
            RecursionError,
        ) as e:
            what = "a JSON object" if kind == "json" else "a msgpack map"
            raise BadPayload(f"field {kind!r} is not {what}: {e}") from None

    @staticmethod
    def unpack_any(raw: bytes) -> Any:
        """msgpack or JSON: a msgpack map never starts with '{' (0x7b is a positive fixint)."""
        return Codec.unpack(raw, kind="json" if raw[:1] == b"{" else "data")


# ----------------------------------------------------------------------------- schema
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=INT64_MAX)]
NonNegInt64 = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
TokenId = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKEN_ID)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LEN)]
Channel = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_CHANNEL_LEN)]
UNSET: Final = msgspec.UNSET


class WireMessage(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    role: str
    content: str
    name: str | msgspec.UnsetType = UNSET


class WireParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """``params``: SamplingParams' fields by vLLM's names. Types and ranges are checked here;
    defaults and the rules between fields are SamplingParams' own (an unset field takes
    SamplingParams' default). What is not on the wire, and why: ``WIRE_PARAMS_EXCLUDED``."""

    n: Int64 | msgspec.UnsetType = UNSET
    """Only 1 on the wire (see ``WIRE_N``)."""
    best_of: Int64 | msgspec.UnsetType | None = UNSET
    temperature: float | msgspec.UnsetType = UNSET
    top_p: float | msgspec.UnsetType = UNSET
    top_k: Int64 | msgspec.UnsetType = UNSET
    min_p: float | msgspec.UnsetType = UNSET
    seed: Int64 | msgspec.UnsetType | None = UNSET
    max_tokens: Int64 | msgspec.UnsetType | None = UNSET
    min_tokens: Int64 | msgspec.UnsetType = UNSET
    stop: str | list[str] | msgspec.UnsetType | None = UNSET
    stop_token_ids: list[TokenId] | msgspec.UnsetType | None = UNSET
    ignore_eos: bool | msgspec.UnsetType = UNSET
    include_stop_str_in_output: bool | msgspec.UnsetType = UNSET
    logprobs: Int64 | msgspec.UnsetType | None = UNSET
    repetition_penalty: float | msgspec.UnsetType = UNSET
    presence_penalty: float | msgspec.UnsetType = UNSET
    frequency_penalty: float | msgspec.UnsetType = UNSET
    skip_special_tokens: bool | msgspec.UnsetType = UNSET
    spaces_between_special_tokens: bool | msgspec.UnsetType = UNSET
    detokenize: bool | msgspec.UnsetType = UNSET
    truncate_prompt_tokens: Int64 | msgspec.UnsetType | None = UNSET
    logit_bias: dict[TokenId, float] | msgspec.UnsetType | None = UNSET
    """In JSON the keys are strings of digits, as in OpenAI's API."""
    allowed_token_ids: list[TokenId] | msgspec.UnsetType | None = UNSET
    bad_words: list[str] | msgspec.UnsetType | None = UNSET
    guided_json: dict[str, Any] | str | msgspec.UnsetType | None = UNSET
    """A JSON schema: an object, or its JSON text."""
    guided_regex: str | msgspec.UnsetType | None = UNSET
    guided_choice: list[str] | msgspec.UnsetType | None = UNSET
    guided_grammar: str | msgspec.UnsetType | None = UNSET
    guided_json_object: bool | msgspec.UnsetType = UNSET

    def given(self) -> dict[str, Any]:
        """The fields the producer set."""
        return {
            name: getattr(self, name)
            for name in self.__struct_fields__
            if getattr(self, name) is not UNSET
        }


WIRE_PARAMS_EXCLUDED: Final = {
    "output_kind": "the worker streams deltas; every event holds what is new",
    "prompt_logprobs": "no event carries prompt scores (run the engine offline for them)",
    "_bad_words_token_ids": "derived from bad_words by the worker's tokenizer",
    "guided_decoding": "vLLM's Python object: the guided_* fields carry the same on the wire",
}
"""SamplingParams fields that are not on the wire, and why (a test checks every other one
is a ``WireParams`` field)."""

WIRE_N: Final = (
    "must be 1 on the wire: send n requests for n samples (with seeds seed + i), as the "
    "SDK's and the gateway's n do; each is a request of its own (events, resume, abort)"
)


class WireRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The request map, as docs/protocol.md declares it."""

    v: int
    id: Name
    prompt: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    prompt_token_ids: Annotated[list[TokenId], msgspec.Meta(min_length=1)] | None = None
    messages: Annotated[list[WireMessage], msgspec.Meta(min_length=1)] | None = None
    adapter: Name | None = None
    params: WireParams | None = None
    reply_to: Channel | None = None
    priority: Int64 = 0
    deadline: NonNegInt64 | None = None
    """Epoch milliseconds after which the request is not worth running (``expired``)."""
    ttl_ms: Annotated[int, msgspec.Meta(ge=1, le=INT64_MAX)] | None = None
    """Like ``deadline``, counted from the entry's XADD time (the Redis server's clock)."""


class _Envelope(msgspec.Struct):
    """What is read of a payload before it is validated: the version, and where to send an
    error. Every other key is skipped without being built."""

    v: msgspec.Raw = msgspec.Raw()
    id: msgspec.Raw = msgspec.Raw()
    reply_to: msgspec.Raw = msgspec.Raw()


_DECODERS: Final[dict[str, tuple[Any, Any, Callable[..., Any]]]] = {
    "data": (msgspec.msgpack.Decoder(WireRequest), msgspec.msgpack.Decoder(_Envelope),
             msgspec.msgpack.decode),
    "json": (msgspec.json.Decoder(WireRequest), msgspec.json.Decoder(_Envelope),
             msgspec.json.decode),
}  # fmt: skip


# ----------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class GenerateRequest:
    """A validated request. Exactly one of prompt, prompt_token_ids, messages is set."""

    id: str
    reply_to: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None
    adapter: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    deadline_ms: int | None = None
    """Absolute epoch ms (``deadline``, or the entry's time + ``ttl_ms``, the earlier)."""

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.params)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"v": VERSION, "id": self.id, "reply_to": self.reply_to}
        for key in ("prompt", "prompt_token_ids", "messages", "adapter"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.params:
            out["params"] = self.params
        if self.priority:
            out["priority"] = self.priority
        if self.deadline_ms is not None:
            out["deadline"] = self.deadline_ms
        return out

    @classmethod
    def decode(
        cls, raw: bytes, *, kind: str = "data", prefix: str, entry_ms: int | None = None
    ) -> GenerateRequest:
        """Parse and validate a payload. Raises BadPayload / UnsupportedVersion / InvalidField /
        InvalidSamplingParams naming the field; ``reply_address`` finds where to send it."""
        full, envelope, _ = _DECODERS[kind]
        try:
            head = envelope.decode(raw)
        except msgspec.ValidationError as e:  # (a DecodeError too: caught first)
            raise InvalidField("<payload>", f"must be a map ({untrusted(str(e))})") from None
        except (msgspec.DecodeError, RecursionError) as e:
            what = "a JSON object" if kind == "json" else "a msgpack map"
            raise BadPayload(f"field {kind!r} is not {what}: {untrusted(str(e))}") from None
        _check_version(head.v, kind)
        try:
            wire = full.decode(raw)
        except msgspec.ValidationError as e:
            raise _field_error(str(e)) from None
        except (msgspec.DecodeError, RecursionError) as e:
            raise BadPayload(f"field {kind!r} is malformed: {untrusted(str(e))}") from None
        return cls._from_struct(wire, prefix=prefix, entry_ms=entry_ms)

    @classmethod
    def from_wire(cls, obj: Any, *, prefix: str, entry_ms: int | None = None) -> GenerateRequest:
        """Validate an already decoded map (tests, in-process producers): the same schema."""
        try:
            raw = msgpack.packb(obj, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as e:
            raise BadPayload(f"the payload cannot be encoded: {untrusted(str(e))}") from None
        return cls.decode(raw, prefix=prefix, entry_ms=entry_ms)

    @classmethod
    def _from_struct(
        cls, wire: WireRequest, *, prefix: str, entry_ms: int | None
    ) -> GenerateRequest:
        request_id = _check_id(wire.id)
        prompts = [
            k for k in ("prompt", "prompt_token_ids", "messages") if getattr(wire, k) is not None
        ]
        if len(prompts) != 1:
            raise InvalidField(
                "prompt",
                "exactly one of prompt, prompt_token_ids, messages is required"
                + (f" (got {', '.join(prompts)})" if prompts else ""),
            )
        params = wire.params.given() if wire.params is not None else {}
        if params.get("n", 1) != 1:
            raise InvalidParam("params.n", WIRE_N)
        try:
            SamplingParams(**params)
        except InvalidSamplingParams as e:
            raise InvalidSamplingParams(e.message) from None
        deadline = wire.deadline
        if wire.ttl_ms is not None and entry_ms is not None:
            by_ttl = min(entry_ms + wire.ttl_ms, INT64_MAX)
            deadline = by_ttl if deadline is None else min(deadline, by_ttl)
        messages = None
        if wire.messages is not None:
            messages = [
                {
                    k: getattr(m, k)
                    for k in ("role", "content", "name")
                    if getattr(m, k) is not UNSET
                }
                for m in wire.messages
            ]
        return cls(
            id=request_id,
            reply_to=wire.reply_to
            if wire.reply_to is not None
            else default_reply_to(prefix, request_id),
            prompt=wire.prompt,
            prompt_token_ids=wire.prompt_token_ids,
            messages=messages,
            adapter=wire.adapter,
            params=params,
            priority=wire.priority,
            deadline_ms=deadline,
        )


def _check_version(raw_v: msgspec.Raw, kind: str) -> None:
    if not raw_v:
        raise InvalidField("v", f"missing (this worker speaks v={VERSION})")
    _, _, loose = _DECODERS[kind]
    try:
        v = loose(raw_v, type=int)
    except (msgspec.ValidationError, msgspec.DecodeError):
        v = None
    if v != VERSION:
        raise UnsupportedVersion(
            f"v={untrusted(bytes(raw_v).decode(errors='replace'), 40)} is not supported: "
            f"this worker speaks v={VERSION}"
        )


# "Expected `int`, got `str` - at `$.params.max_tokens`"
_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<key>.*)`$", re.DOTALL)
_MISSING = re.compile(r"^Object missing required field `(?P<key>[^`]*)`$")


def _field_error(message: str) -> InvalidRequest:
    """msgspec's validation message as our error, naming the field by its wire path."""
    m = _AT.match(message)
    assert m is not None  # the pattern matches any string
    what, path = m.group("what"), (m.group("path") or "").lstrip(".")
    unknown = _UNKNOWN.match(what)
    missing = _MISSING.match(what)
    if unknown:
        key = untrusted(unknown.group("key"), 80)
        name = f"{path}.{key}" if path else key
        detail = "unknown sampling parameter" if path == "params" else "unknown field"
        return InvalidField(name, detail)
    if missing:
        name = f"{path}.{missing.group('key')}" if path else missing.group("key")
        return InvalidField(name, "missing")
    what = what[:1].lower() + what[1:]
    if path.startswith("params."):
        return InvalidParam(path, what)
    return InvalidField(path or "<payload>", what)


def reply_address(raw: bytes, *, kind: str = "data", prefix: str) -> tuple[str, str] | None:
    """(id, reply channel) of a payload that may be invalid, or None when it has no usable id.

    Only ``id`` and ``reply_to`` are decoded. A bad ``reply_to`` falls back to the default
    channel: that is where a client that did not set one listens, and an invalid one cannot
    be published to anyway. Never raises."""
    _, envelope, loose = _DECODERS.get(kind, _DECODERS["data"])
    try:
        head = envelope.decode(raw)
        request_id = _check_id(loose(head.id, type=Name)) if head.id else None
    except Exception:
        return None
    if request_id is None:
        return None
    try:
        reply_to = loose(head.reply_to, type=Channel) if head.reply_to else None
    except Exception:
        reply_to = None
    return request_id, reply_to or default_reply_to(prefix, request_id)


def default_reply_to(prefix: str, request_id: str) -> str:
    return f"{prefix}:tokens:{request_id}"


def _check_id(value: str) -> str:
    # The id is part of key and channel names: no whitespace, control characters or glob
    # metacharacters, so pattern subscriptions and redis-cli stay unambiguous.
    if any(c.isspace() or not c.isprintable() or c in "*?[]" for c in value):
        raise InvalidField("id", "must not contain whitespace, control characters or * ? [ ]")
    return value


@dataclass(frozen=True)
class DecodedEntry:
    """One stream entry after ``decode_entry``: a request, or the error to answer with."""

    request: GenerateRequest | None
    error: LoRAStreamError | None
    address: tuple[str, str] | None
    """(id, reply channel) when the payload has a usable id, even if it is otherwise bad."""
    kind: str | None = None
    """The payload's field, ``data`` or ``json``, when there is exactly one."""


def decode_entry(
    fields: Any, *, prefix: str, max_payload_bytes: int, entry_ms: int | None = None
) -> DecodedEntry:
    """Decode and validate one stream entry's fields. Never raises: whatever the entry holds,
    the caller gets a request or the error that ends it."""
    try:
        return _decode_entry(fields, prefix, max_payload_bytes, entry_ms)
    except Exception as e:  # a bug here must end this entry alone, never the worker
        return DecodedEntry(
            None, BadPayload(f"the entry could not be decoded: {type(e).__name__}"), None
        )


def _decode_entry(
    fields: Any, prefix: str, max_payload_bytes: int, entry_ms: int | None
) -> DecodedEntry:
    if not isinstance(fields, dict):
        return DecodedEntry(None, BadPayload("the entry has no fields"), None)
    kinds = [k for k in ("data", "json") if k.encode() in fields]
    if len(kinds) != 1:
        what = "both data and json" if kinds else "no field data (msgpack) or json"
        return DecodedEntry(None, BadPayload(f"the entry has {what}"), None)
    kind = kinds[0]
    raw = fields[kind.encode()]
    if not isinstance(raw, bytes):
        return DecodedEntry(None, BadPayload(f"field {kind!r} is not bytes"), None, kind)
    address = reply_address(raw, kind=kind, prefix=prefix)
    if len(raw) > max_payload_bytes:
        err = PayloadTooLarge(f"payload is {len(raw)} bytes; max is {max_payload_bytes}")
        return DecodedEntry(None, err, address, kind)
    try:
        request = GenerateRequest.decode(raw, kind=kind, prefix=prefix, entry_ms=entry_ms)
    except LoRAStreamError as e:
        return DecodedEntry(None, e, address, kind)
    return DecodedEntry(request, None, (request.id, request.reply_to), kind)


# ----------------------------------------------------------------------------- control
class _WireAbort(msgspec.Struct):
    v: msgspec.Raw = msgspec.Raw()
    op: str | None = None
    id: Name | None = None


@dataclass(frozen=True)
class AbortRequest:
    """PUBLISH {prefix}:control {v: 1, op: "abort", id}."""

    id: str
    op: ClassVar[str] = "abort"

    def to_wire(self) -> dict[str, Any]:
        return {"v": VERSION, "op": self.op, "id": self.id}

    @classmethod
    def decode(cls, raw: bytes) -> AbortRequest:
        """msgpack or JSON (a msgpack map never starts with '{'); raises a LoRAStreamError."""
        kind = "json" if raw[:1] == b"{" else "data"
        decoder = msgspec.json.decode if kind == "json" else msgspec.msgpack.decode
        try:
            msg = decoder(raw, type=_WireAbort)
        except msgspec.ValidationError as e:  # (a DecodeError too: caught first)
            raise _field_error(str(e)) from None
        except (msgspec.DecodeError, RecursionError) as e:
            raise BadPayload(f"control message is not a map: {untrusted(str(e))}") from None
        _check_version(msg.v, kind)
        if msg.op != cls.op:
            raise InvalidField("op", f"unknown op {untrusted(msg.op, 40)} (known: abort)")
        if msg.id is None:
            raise InvalidField("id", "missing")
        return cls(id=_check_id(msg.id))

    @classmethod
    def from_wire(cls, obj: Any) -> AbortRequest:
        return cls.decode(msgpack.packb(obj, use_bin_type=True))


# ----------------------------------------------------------------------------- events
@dataclass(frozen=True)
class TokenEvent:
    """One engine step of one request: the tokens and text new since the previous event.

    ``seq`` counts events per request from 0 without gaps, so a client sees a lost event.
    ``restart`` is true on the first event of a request run again from the start when the
    worker could not know what was published before (no result stream): drop what you had.
    """

    id: str
    seq: int
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    usage: dict[str, float] | None = None
    logprobs: list[list[list[float]]] | None = None
    """Per new token: [[token_id, logprob], ...], the sampled token first, then the top-n."""
    logprob_tokens: list[list[str]] | None = None
    """The text of each token in ``logprobs``, in the same order (OpenAI's ``token``)."""
    restart: bool = False

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "v": VERSION,
            "id": self.id,
            "seq": self.seq,
            "token_ids": self.token_ids,
            "text": self.text,
            "finished": self.finished,
            "finish_reason": self.finish_reason,
        }
        if self.usage is not None:
            out["usage"] = self.usage
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        if self.logprob_tokens is not None:
            out["logprob_tokens"] = self.logprob_tokens
        if self.restart:
            out["restart"] = True
        return out


@dataclass(frozen=True)
class ErrorEvent:
    """The final event of a request that failed: finish_reason "error" and a stable code."""

    id: str
    seq: int
    code: str
    message: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    usage: dict[str, float] | None = None
    field: str | None = None
    """The request field at fault (``prompt``, ``params.temperature``, ...), when one is."""
    finished: ClassVar[bool] = True
    finish_reason: ClassVar[str] = "error"

    @classmethod
    def from_exception(cls, request_id: str, seq: int, err: BaseException) -> ErrorEvent:
        code = err.code if isinstance(err, LoRAStreamError) else "internal_error"
        message = (
            err.message if isinstance(err, LoRAStreamError) else f"{type(err).__name__}: {err}"
        )
        return cls(id=request_id, seq=seq, code=code, message=message, field=error_field(err))

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "v": VERSION,
            "id": self.id,
            "seq": self.seq,
            "token_ids": self.token_ids,
            "text": self.text,
            "finished": True,
            "finish_reason": "error",
            "error": {"code": self.code, "message": self.message},
        }
        if self.field is not None:
            out["error"]["field"] = self.field
        if self.usage is not None:
            out["usage"] = self.usage
        return out


Event = TokenEvent | ErrorEvent


def encode_event(event: Event) -> bytes:
    return Codec.pack(event.to_wire())


class _WireError(msgspec.Struct):
    code: str = "internal_error"
    message: str = ""
    field: str | None = None


class _WireEvent(msgspec.Struct):
    """An event as a client reads it; keys added by later versions are skipped."""

    v: int
    id: str
    seq: Annotated[int, msgspec.Meta(ge=0)]
    token_ids: list[int] = []
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    usage: dict[str, float] | None = None
    logprobs: list[list[list[float]]] | None = None
    logprob_tokens: list[list[str]] | None = None
    restart: bool = False
    error: _WireError | None = None


_EVENT_DECODER: Final = msgspec.msgpack.Decoder(_WireEvent)


def decode_event(raw: bytes) -> Event:
    """For clients and tests: the inverse of ``encode_event``. Anyone who can PUBLISH may
    write to a reply channel, so a malformed event raises BadPayload / UnsupportedVersion
    (the reader skips it) and never anything else."""
    try:
        obj = _EVENT_DECODER.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as e:
        raise BadPayload(f"not a v{VERSION} event: {untrusted(str(e))}") from None
    if obj.v != VERSION:
        raise UnsupportedVersion(f"not a v{VERSION} event: v={obj.v}")
    if obj.error is not None:
        return ErrorEvent(
            id=obj.id,
            seq=obj.seq,
            code=obj.error.code,
            message=obj.error.message,
            token_ids=obj.token_ids,
            text=obj.text,
            usage=obj.usage,
            field=obj.error.field,
        )
    return TokenEvent(
        id=obj.id,
        seq=obj.seq,
        token_ids=obj.token_ids,
        text=obj.text,
        finished=obj.finished,
        finish_reason=obj.finish_reason,
        usage=obj.usage,
        logprobs=obj.logprobs,
        logprob_tokens=obj.logprob_tokens,
        restart=obj.restart,
    )


def error_field(err: BaseException) -> str | None:
    """The wire field an error is about: InvalidField names it; the engine's sampling
    parameter errors name theirs as ``SamplingParams.<name>=...``."""
    if isinstance(err, InvalidField | InvalidParam):
        return err.field
    if isinstance(err, InvalidSamplingParams):
        m = re.match(r"SamplingParams\.(\w+)=", err.message)
        return f"params.{m.group(1)}" if m else "params"
    return None


def logprobs_to_wire(logprobs: Sequence[Mapping[int, Any]]) -> list[list[list[float]]]:
    """{token_id: Logprob} per token → [[token_id, logprob], ...] per token (JSON-safe keys),
    the sampled token first."""
    return [
        [[tid, _finite(lp.logprob if hasattr(lp, "logprob") else lp)] for tid, lp in d.items()]
        for d in logprobs
    ]


def logprob_tokens_to_wire(logprobs: Sequence[Mapping[int, Any]]) -> list[list[str]]:
    """The decoded text of each token of ``logprobs_to_wire``'s lists, in the same order."""
    return [[getattr(lp, "decoded_token", None) or "" for lp in d.values()] for d in logprobs]


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -1e30
