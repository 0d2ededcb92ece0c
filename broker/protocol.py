"""Wire protocol v1: typed messages, one codec, validation errors that name the field.

Requests arrive as stream entries whose field ``data`` holds a msgpack map or ``json`` a JSON
object of the same shape; events and control messages are msgpack maps (control messages may
also be JSON so that redis-cli can send them). Nothing on the wire is pickle. docs/protocol.md
is the reference for producers and clients; keep the two in step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

import msgpack

from engine.errors import InvalidRequest, InvalidSamplingParams, LoRAStreamError
from engine.sampling_params import SamplingParams

VERSION: Final = 1
MAX_ID_LEN: Final = 256
MAX_CHANNEL_LEN: Final = 512
FINISH_REASONS: Final = ("stop", "length", "abort", "error")

# Wire keys of ``params``: every SamplingParams field (vLLM's names).
PARAM_KEYS: Final = frozenset(f.name for f in dataclasses.fields(SamplingParams))
_REQUEST_KEYS: Final = frozenset(
    {
        "v",
        "id",
        "prompt",
        "prompt_token_ids",
        "messages",
        "adapter",
        "params",
        "reply_to",
        "priority",
        "deadline",
    }
)
_MESSAGE_KEYS: Final = frozenset({"role", "content", "name"})


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


class DuplicateRequest(InvalidRequest):
    """A request with this id is already running on this worker."""

    code = "duplicate_request"


class MaxDeliveriesExceeded(LoRAStreamError):
    code = "max_deliveries_exceeded"


# ----------------------------------------------------------------------------- codec
class Codec:
    """The one codec: msgpack for everything we write; JSON accepted where producers write."""

    @staticmethod
    def pack(obj: dict[str, Any]) -> bytes:
        return msgpack.packb(obj, use_bin_type=True)

    @staticmethod
    def unpack(raw: bytes, *, kind: str = "data") -> Any:
        """Decode a ``data`` (msgpack) or ``json`` payload; raises BadPayload naming which."""
        try:
            if kind == "json":
                return json.loads(raw)
            return msgpack.unpackb(raw, raw=False, strict_map_key=False)
        except (ValueError, msgpack.UnpackException, TypeError, RecursionError) as e:
            what = "a JSON object" if kind == "json" else "a msgpack map"
            raise BadPayload(f"field {kind!r} is not {what}: {e}") from None

    @staticmethod
    def unpack_any(raw: bytes) -> Any:
        """msgpack or JSON: a msgpack map never starts with '{' (0x7b is a positive fixint)."""
        return Codec.unpack(raw, kind="json" if raw[:1] == b"{" else "data")


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
        return out

    @classmethod
    def from_wire(cls, obj: Any, *, prefix: str) -> GenerateRequest:
        """Validate a decoded payload. Raises InvalidField / UnsupportedVersion /
        InvalidSamplingParams naming the field; the caller finds the reply address
        with ``reply_address`` so even a bad request gets its error event."""
        if not isinstance(obj, dict):
            raise InvalidField("<payload>", f"must be a map, got {type(obj).__name__}")
        unknown = sorted(str(k) for k in obj if k not in _REQUEST_KEYS)
        if unknown:
            raise InvalidField(unknown[0], f"unknown field(s) {', '.join(map(repr, unknown))}")
        if "v" not in obj:
            raise InvalidField("v", f"missing (this worker speaks v={VERSION})")
        if obj["v"] != VERSION or isinstance(obj["v"], bool):
            raise UnsupportedVersion(
                f"v={obj['v']!r} is not supported: this worker speaks v={VERSION}"
            )
        request_id = _check_id(obj.get("id"))
        prompts = [k for k in ("prompt", "prompt_token_ids", "messages") if obj.get(k) is not None]
        if len(prompts) != 1:
            raise InvalidField(
                "prompt",
                "exactly one of prompt, prompt_token_ids, messages is required"
                + (f" (got {', '.join(prompts)})" if prompts else ""),
            )
        prompt = obj.get("prompt")
        if prompt is not None and (not isinstance(prompt, str) or not prompt):
            raise InvalidField("prompt", "must be a non-empty string")
        token_ids = obj.get("prompt_token_ids")
        if token_ids is not None:
            if not isinstance(token_ids, list) or not token_ids:
                raise InvalidField("prompt_token_ids", "must be a non-empty list of integers")
            if not all(_is_int(t) and t >= 0 for t in token_ids):
                raise InvalidField("prompt_token_ids", "must hold integers >= 0")
        messages = obj.get("messages")
        if messages is not None:
            messages = _check_messages(messages)
        adapter = obj.get("adapter")
        if adapter is not None and (
            not isinstance(adapter, str) or not 0 < len(adapter) <= MAX_ID_LEN
        ):
            raise InvalidField("adapter", f"must be null or a string of 1..{MAX_ID_LEN} characters")
        params = obj.get("params", {})
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise InvalidField("params", "must be a map")
        bad_keys = sorted(str(k) for k in params if k not in PARAM_KEYS)
        if bad_keys:
            raise InvalidField(
                "params." + bad_keys[0],
                f"unknown sampling parameter(s) {', '.join(map(repr, bad_keys))}",
            )
        priority = obj.get("priority", 0)
        if not _is_int(priority):
            raise InvalidField("priority", "must be an integer")
        req = cls(
            id=request_id,
            reply_to=_check_reply_to(obj.get("reply_to"), request_id, prefix),
            prompt=prompt,
            prompt_token_ids=token_ids,
            messages=messages,
            adapter=adapter,
            params=dict(params),
            priority=priority,
        )
        _check_params(req.params)
        return req


def reply_address(obj: Any, *, prefix: str) -> tuple[str, str] | None:
    """(id, reply channel) of a payload that may be invalid, or None when it has no usable id.

    A bad ``reply_to`` falls back to the default channel: that is where a client that did not
    set one listens, and an invalid one cannot be published to anyway."""
    if not isinstance(obj, dict):
        return None
    try:
        request_id = _check_id(obj.get("id"))
    except InvalidField:
        return None
    try:
        return request_id, _check_reply_to(obj.get("reply_to"), request_id, prefix)
    except InvalidField:
        return request_id, default_reply_to(prefix, request_id)


def default_reply_to(prefix: str, request_id: str) -> str:
    return f"{prefix}:tokens:{request_id}"


def _check_id(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_LEN:
        raise InvalidField("id", f"must be a string of 1..{MAX_ID_LEN} characters")
    # The id is part of key and channel names: no whitespace, control characters or glob
    # metacharacters, so pattern subscriptions and redis-cli stay unambiguous.
    if any(c.isspace() or not c.isprintable() or c in "*?[]" for c in value):
        raise InvalidField("id", "must not contain whitespace, control characters or * ? [ ]")
    return value


def _check_reply_to(value: Any, request_id: str, prefix: str) -> str:
    if value is None:
        return default_reply_to(prefix, request_id)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_CHANNEL_LEN:
        raise InvalidField("reply_to", f"must be a string of 1..{MAX_CHANNEL_LEN} characters")
    return value


def _check_params(params: dict[str, Any]) -> None:
    """SamplingParams validates values and names the field; a value of a type it does not
    expect at all (``stop: 5``) raises a bare TypeError, found here one key at a time."""
    try:
        SamplingParams(**params)
    except InvalidSamplingParams:
        raise
    except (TypeError, ValueError) as e:
        for key, value in params.items():
            try:
                SamplingParams(**{key: value})
            except (TypeError, ValueError):
                raise InvalidSamplingParams(
                    f"SamplingParams.{key}={value!r:.100} is invalid: {e}"
                ) from None
        raise InvalidSamplingParams(f"params are invalid together: {e}") from None


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise InvalidField("messages", "must be a non-empty list of {role, content} maps")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidField(where, "must be a map with role and content")
        unknown = sorted(str(k) for k in m if k not in _MESSAGE_KEYS)
        if unknown:
            raise InvalidField(f"{where}.{unknown[0]}", "unknown field")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise InvalidField(f"{where}.{key}", "must be a string")
    return [dict(m) for m in messages]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ----------------------------------------------------------------------------- control
@dataclass(frozen=True)
class AbortRequest:
    """PUBLISH {prefix}:control {v: 1, op: "abort", id}."""

    id: str
    op: ClassVar[str] = "abort"

    def to_wire(self) -> dict[str, Any]:
        return {"v": VERSION, "op": self.op, "id": self.id}

    @classmethod
    def from_wire(cls, obj: Any) -> AbortRequest:
        if not isinstance(obj, dict):
            raise InvalidField("<payload>", "must be a map")
        if obj.get("v") != VERSION:
            raise UnsupportedVersion(
                f"v={obj.get('v')!r} is not supported: this worker speaks v={VERSION}"
            )
        if obj.get("op") != cls.op:
            raise InvalidField("op", f"unknown op {obj.get('op')!r} (known: abort)")
        return cls(id=_check_id(obj.get("id")))


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
    """Per new token: [[token_id, logprob], ...] over the sampled token and the top-n."""
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


def decode_event(raw: bytes) -> Event:
    """For clients and tests: the inverse of ``encode_event``."""
    obj = Codec.unpack(raw)
    if not isinstance(obj, dict) or obj.get("v") != VERSION:
        raise UnsupportedVersion(f"not a v{VERSION} event: {obj!r:.200}")
    if obj.get("error") is not None:
        err = obj["error"]
        return ErrorEvent(
            id=obj["id"],
            seq=obj["seq"],
            code=err.get("code", "internal_error"),
            message=err.get("message", ""),
            token_ids=list(obj.get("token_ids") or []),
            text=obj.get("text") or "",
            usage=obj.get("usage"),
            field=err.get("field"),
        )
    return TokenEvent(
        id=obj["id"],
        seq=obj["seq"],
        token_ids=list(obj["token_ids"]),
        text=obj["text"],
        finished=bool(obj["finished"]),
        finish_reason=obj.get("finish_reason"),
        usage=obj.get("usage"),
        logprobs=obj.get("logprobs"),
        restart=bool(obj.get("restart", False)),
    )


def error_field(err: BaseException) -> str | None:
    """The wire field an error is about: InvalidField names it; the engine's sampling
    parameter errors name theirs as ``SamplingParams.<name>=...``."""
    if isinstance(err, InvalidField):
        return err.field
    if isinstance(err, InvalidSamplingParams):
        m = re.match(r"SamplingParams\.(\w+)=", err.message)
        return f"params.{m.group(1)}" if m else "params"
    return None


def logprobs_to_wire(logprobs: list[dict[int, float]]) -> list[list[list[float]]]:
    """{token_id: logprob} per token → [[token_id, logprob], ...] per token (JSON-safe keys)."""
    return [[[tid, lp if math.isfinite(lp) else -1e30] for tid, lp in d.items()] for d in logprobs]
