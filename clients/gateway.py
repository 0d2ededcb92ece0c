"""``lorastream gateway``: an OpenAI-compatible HTTP server in front of the Redis workers.

``/v1/completions`` and ``/v1/chat/completions`` (streaming SSE and not) become wire requests
through the SDK; ``model`` is the base model's served name or an adapter name. ``/v1/models``
lists the base model and the adapters: those live workers serve (their heartbeat records),
the registry hash, and any ``--adapter`` names; ``/health`` is 200 while at least one worker
is live; ``/`` is the chat page. Every error, Redis being down included, uses OpenAI's shape
``{"error": {message, type, param, code}}``. A client that disconnects aborts its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import re
import socket
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from broker.protocol import TokenEvent
from broker.redis_conn import REDIS_ERRORS
from clients.sdk import (
    AsyncClient,
    ClientError,
    RequestExpired,
    RequestFailed,
    RequestTimeout,
    TokenStream,
    event_logprobs,
)
from engine.cli import UsageError
from engine.errors import InvalidSamplingParams
from engine.sampling_params import SamplingParams

STATIC = Path(__file__).parent / "static"
T = TypeVar("T")
logger = logging.getLogger("lorastream.gateway")

# OpenAI request fields → SamplingParams names (vLLM's extras pass through unchanged).
_SAMPLING_FIELDS = frozenset(
    {
        "max_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "top_k",
        "min_p",
        "repetition_penalty",
        "ignore_eos",
        "min_tokens",
        "stop_token_ids",
        "skip_special_tokens",
        "include_stop_str_in_output",
        "spaces_between_special_tokens",
        "logit_bias",
        "allowed_token_ids",
        "bad_words",
        "truncate_prompt_tokens",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
    }
)
# Accepted and ignored: they change nothing about what a worker generates.
_IGNORED_FIELDS = frozenset(
    {"user", "stream_options", "service_tier", "store", "guided_decoding_backend"}
)
MAX_N = 16
"""Most samples per request: each is a wire request of its own."""
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class GatewayConfig:
    redis_url: str
    prefix: str = "lorastream"
    served_model_name: str = "base"
    """The name clients use for the base model (no adapter)."""
    adapters: tuple[str, ...] = ()
    """Adapter names to list besides those of live workers and the registry."""
    timeout_s: float = 120.0
    """Longest a request may take, end to end (504 when exceeded); also its wire deadline."""
    first_event_timeout_s: float = 30.0
    """Longest wait for a worker to start answering (503 when exceeded)."""
    default_max_tokens: int = 512
    """``max_tokens`` of a chat request that sets neither it nor max_completion_tokens: a
    model that never emits its end token must not run to the context length."""
    ca_file: str | None = None


class ApiError(Exception):
    """An error response in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status)


def api_error(err: ClientError) -> ApiError:
    """The HTTP error of an SDK exception (the wire code becomes ``code``)."""
    if isinstance(err, RequestTimeout):
        if err.started:
            return ApiError(504, err.message, type_="timeout", code="timeout")
        return ApiError(
            503,
            f"no worker answered in time: {err.message}",
            type_="service_unavailable",
            code="no_worker",
        )
    if isinstance(err, RequestExpired):
        return ApiError(504, err.message, type_="timeout", code="expired")
    if isinstance(err, RequestFailed):
        code = err.code
        param = _param_of(err.message)
        if code == "adapter_not_found":
            return ApiError(404, err.message, param="model", code="model_not_found")
        if code in {"prompt_too_long", "invalid_sampling_params", "invalid_request"} or code in {
            "bad_payload",
            "payload_too_large",
            "unsupported_version",
        }:
            return ApiError(400, err.message, param=param, code=code)
        return ApiError(500, err.message, type_="server_error", code=code)
    return ApiError(500, err.message, type_="server_error", code=err.code)


def redis_down(err: BaseException) -> ApiError:
    return ApiError(
        503,
        f"Redis is unreachable ({type(err).__name__}): try again later",
        type_="service_unavailable",
        code="redis_unavailable",
    )


def _param_of(message: str) -> str | None:
    """Wire messages start with the field they name ("params.temperature: ...")."""
    m = re.match(r"([A-Za-z_][\w.\[\]]*): ", message) or re.match(
        r"SamplingParams\.(\w+)=", message
    )
    return m.group(1).removeprefix("params.") if m else None


# ----------------------------------------------------------------------------- requests
@dataclass
class _Call:
    """A parsed OpenAI request, ready for the SDK."""

    model: str
    adapter: str | None
    stream: bool
    include_usage: bool
    sampling: dict[str, Any]
    n: int = 1
    logprobs: int | None = None
    """Top logprobs per token to return (chat: ``top_logprobs``); None: no logprobs."""
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None
    request_id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def _parse_common(
    body: Any, *, chat: bool, extra: frozenset[str], default_max_tokens: int | None = None
) -> tuple[dict[str, Any], bool, int, int | None]:
    """(sampling params, include_usage, n, top logprobs or None) of an OpenAI request."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    known = _SAMPLING_FIELDS | _IGNORED_FIELDS | extra | {"model", "stream", "n", "response_format"}
    if chat:
        known |= {"max_completion_tokens", "logprobs", "top_logprobs"}
    unknown = sorted(k for k in body if k not in known)
    if unknown:
        raise ApiError(
            400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0]
        )
    n = body.get("n", 1) if body.get("n") is not None else 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
        raise ApiError(400, f"n must be an integer in [1, {MAX_N}]", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be a boolean", param="stream")
    sampling = {k: body[k] for k in _SAMPLING_FIELDS if body.get(k) is not None}
    if chat and body.get("max_completion_tokens") is not None:
        sampling["max_tokens"] = body["max_completion_tokens"]
    if chat and "max_tokens" not in sampling:
        sampling["max_tokens"] = default_max_tokens
    if isinstance(sampling.get("stop"), str):
        sampling["stop"] = [sampling["stop"]]
    sampling.update(_response_format(body.get("response_format"), sampling))
    top = _logprobs(body, chat=chat)
    if top is not None:
        sampling["logprobs"] = top
    try:
        SamplingParams(**sampling)
    except InvalidSamplingParams as e:
        raise ApiError(400, e.message, param=_param_of(e.message), code=e.code) from None
    except TypeError as e:
        raise ApiError(400, str(e), code="invalid_sampling_params") from None
    opts = body.get("stream_options") or {}
    include_usage = bool(stream and isinstance(opts, dict) and opts.get("include_usage"))
    return sampling, include_usage, n, top


def _response_format(value: Any, sampling: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's ``response_format`` as a structured-output constraint."""
    if value is None:
        return {}
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return {}
    if any(k.startswith("guided_") for k in sampling):
        raise ApiError(
            400, "response_format and guided_* cannot be used together", param="response_format"
        )
    if kind == "json_object":
        return {"guided_json_object": True}
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ApiError(
                400,
                "response_format.json_schema.schema must be a JSON schema object",
                param="response_format.json_schema.schema",
            )
        strict = spec.get("strict") if isinstance(spec, dict) else None
        if strict not in (None, True, False):
            raise ApiError(
                400, "response_format.json_schema.strict must be a boolean",
                param="response_format.json_schema.strict",
            )  # fmt: skip
        # The schema is always enforced, whatever strict says: tokens outside it are masked.
        return {"guided_json": schema}
    raise ApiError(
        400,
        "response_format.type must be one of text, json_object, json_schema",
        param="response_format.type",
    )


def _logprobs(body: dict[str, Any], *, chat: bool) -> int | None:
    """How many top logprobs per token the request asks for (None: no logprobs)."""
    if chat:
        want, top = body.get("logprobs"), body.get("top_logprobs")
        if want not in (None, True, False):
            raise ApiError(400, "logprobs must be a boolean", param="logprobs")
        if top is not None and (
            not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP_LOGPROBS
        ):
            raise ApiError(
                400, f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]",
                param="top_logprobs",
            )  # fmt: skip
        if top is not None and not want:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (top or 0) if want else None
    want = body.get("logprobs")
    if want is None:
        return None
    if not isinstance(want, int) or isinstance(want, bool) or not 0 <= want <= MAX_TOP_LOGPROBS:
        raise ApiError(
            400, f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]", param="logprobs"
        )
    return want


def _check_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required", param="model")
    return model


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content parts: only text is supported
        parts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ApiError(400, "only text content parts are supported", param=where)
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    if value is None:
        return ""
    raise ApiError(400, "content must be a string or a list of text parts", param=where)


# ----------------------------------------------------------------------------- app
class Gateway:
    def __init__(self, cfg: GatewayConfig, client: AsyncClient | None = None) -> None:
        self.cfg = cfg
        self.client = client or AsyncClient(
            cfg.redis_url,
            cfg.prefix,
            timeout_s=cfg.timeout_s,
            first_event_timeout_s=cfg.first_event_timeout_s,
            ca_file=cfg.ca_file,
        )

    async def adapter_names(self) -> list[str]:
        """Adapters live workers serve, the registry holds, or ``--adapter`` names."""
        served = {a for w in await self.client.workers() for a in w.adapters_served}
        registry = await self.client.adapters()
        return sorted(served | set(registry) | set(self.cfg.adapters))

    async def resolve_model(self, model: str) -> str | None:
        """The adapter a model name means (None: the base model); 404 when unknown."""
        if model == self.cfg.served_model_name:
            return None
        if model in await self.adapter_names():
            return model
        raise ApiError(
            404,
            f"The model `{model}` does not exist",
            param="model",
            code="model_not_found",
        )

    # ------------------------------------------------------------------------- routes
    async def health(self, request: Request) -> Response:
        """200 while at least one worker is live (its heartbeat record exists) and not
        draining, else 503."""
        with anyio.fail_after(5):
            workers = [w for w in await self.client.workers() if not w.draining]
        if not workers:
            return ApiError(
                503,
                f"no live worker: none has a heartbeat record under {self.cfg.prefix}:worker:* "
                "that is not draining (start one with lorastream serve)",
                type_="service_unavailable",
                code="no_worker",
            ).response()
        return JSONResponse({"status": "ok", "workers": len(workers)})

    async def models(self, request: Request) -> Response:
        now = int(time.time())
        names = [self.cfg.served_model_name, *await self.adapter_names()]
        data = [
            {
                "id": name,
                "object": "model",
                "created": now,
                "owned_by": "lorastream",
                **({"parent": self.cfg.served_model_name} if i else {}),
            }
            for i, name in enumerate(names)
        ]
        return JSONResponse({"object": "list", "data": data})

    async def chat_page(self, request: Request) -> Response:
        return FileResponse(STATIC / "chat.html", media_type="text/html")

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    async def _serve(self, request: Request, *, chat: bool) -> Response:
        try:
            call = await self._parse(request, chat=chat)
            streams = self.client.generate_n(
                call.prompt,
                n=call.n,
                messages=call.messages,
                prompt_token_ids=call.prompt_token_ids,
                adapter=call.adapter,
                request_id=call.request_id,
                **call.sampling,
            )
            choices = _Choices(streams)
            if call.stream:
                # Wait for the first event before the 200: errors get their status code.
                first = await _until_disconnect(request, choices.__anext__)
                if first is None:
                    await choices.aclose()
                    return Response(status_code=499)
                return EventStream(_sse(call, choices, first, chat=chat))
            done = await _until_disconnect(request, choices.collect)
            if done is None:
                return Response(status_code=499)  # nobody is listening; the request is aborted
            return JSONResponse(_full_response(call, streams, chat=chat))
        except ApiError as e:
            return e.response()
        except ClientError as e:
            return api_error(e).response()

    async def _parse(self, request: Request, *, chat: bool) -> _Call:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if chat:
            sampling, include_usage, n, top = _parse_common(
                body,
                chat=True,
                extra=frozenset({"messages"}),
                default_max_tokens=self.cfg.default_max_tokens,
            )
            model = _check_model(body)
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ApiError(400, "messages must be a non-empty list", param="messages")
            msgs = []
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                    raise ApiError(400, "each message needs a role", param=f"messages[{i}]")
                msgs.append(
                    {"role": m["role"], "content": _content(m.get("content"), f"messages[{i}]")}
                )
            adapter = await self.resolve_model(model)
            return _Call(model, adapter, body.get("stream", False), include_usage, sampling,
                         n=n, logprobs=top, messages=msgs)  # fmt: skip
        sampling, include_usage, n, top = _parse_common(
            body, chat=False, extra=frozenset({"prompt", "echo", "logprobs", "suffix", "best_of"})
        )
        model = _check_model(body)
        for unsupported in ("echo", "suffix"):
            if body.get(unsupported):
                raise ApiError(400, f"{unsupported} is not supported", param=unsupported)
        if body.get("best_of") not in (None, 1, n):
            raise ApiError(
                400, "best_of is not supported (vLLM V1 does not support it either): use n",
                param="best_of",
            )  # fmt: skip
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        call = _Call(
            model, None, body.get("stream", False), include_usage, sampling, n=n, logprobs=top
        )
        if isinstance(prompt, str) and prompt:
            call.prompt = prompt
        elif (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            call.prompt_token_ids = prompt
        else:
            raise ApiError(
                400, "prompt must be a non-empty string or list of token ids", param="prompt"
            )
        call.adapter = await self.resolve_model(model)
        return call

    def app(self) -> Starlette:
        routes = [
            Route("/", _guarded(self.chat_page)),
            Route("/chat", _guarded(self.chat_page)),
            Route("/health", _guarded(self.health)),
            Route("/v1/models", _guarded(self.models)),
            Route("/v1/completions", _guarded(self.completions), methods=["POST"]),
            Route("/v1/chat/completions", _guarded(self.chat_completions), methods=["POST"]),
        ]

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            try:
                yield
            finally:
                await self.client.aclose()

        return Starlette(routes=routes, lifespan=lifespan)


def _guarded(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """Every failure of a route as an error in OpenAI's shape: 503 while Redis is down,
    500 for a bug (logged with its traceback)."""

    @functools.wraps(handler)
    async def guarded(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as e:
            return e.response()
        except REDIS_ERRORS as e:  # OSError, hence TimeoutError, included
            return redis_down(e).response()
        except Exception:
            logger.exception("%s %s failed", request.method, request.url.path)
            return ApiError(
                500, "internal error (see the gateway's log)", type_="server_error",
                code="internal_error",
            ).response()  # fmt: skip

    return guarded


def build_app(cfg: GatewayConfig, client: AsyncClient | None = None) -> Starlette:
    return Gateway(cfg, client).app()


# ----------------------------------------------------------------------------- responses
def _usage(streams: list[TokenStream]) -> dict[str, int]:
    prompt = int(streams[0].usage.get("prompt_tokens", 0))
    completion = sum(int(st.usage.get("completion_tokens", len(st.token_ids))) for st in streams)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _openai_logprobs(
    call: _Call, entries: list[list[tuple[int, float, str]]], *, chat: bool, offset: int = 0
) -> dict[str, Any] | None:
    """Per-token logprobs in OpenAI's shape (the wire lists the sampled token first, then
    the top-n by rank without it)."""
    if call.logprobs is None:
        return None
    k = call.logprobs

    def top(entry: list[tuple[int, float, str]]) -> list[tuple[int, float, str]]:
        return sorted(entry, key=lambda e: -e[1])[:k]

    if chat:
        content = []
        for entry in entries:
            _, lp, text = entry[0]
            content.append(
                {
                    "token": text,
                    "logprob": lp,
                    "bytes": list(text.encode()),
                    "top_logprobs": [
                        {"token": t, "logprob": v, "bytes": list(t.encode())}
                        for _, v, t in top(entry)
                    ],
                }
            )
        return {"content": content, "refusal": None}
    tokens, values, tops, offsets = [], [], [], []
    for entry in entries:
        _, lp, text = entry[0]
        tokens.append(text)
        values.append(lp)
        tops.append({t: v for _, v, t in top(entry)})
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def _full_response(call: _Call, streams: list[TokenStream], *, chat: bool) -> dict[str, Any]:
    choices = []
    for i, stream in enumerate(streams):
        logprobs = _openai_logprobs(call, stream.logprobs or [], chat=chat)
        if chat:
            choice: dict[str, Any] = {
                "index": i,
                "message": {"role": "assistant", "content": stream.text},
                "logprobs": logprobs,
                "finish_reason": stream.finish_reason,
            }
        else:
            choice = {
                "index": i,
                "text": stream.text,
                "logprobs": logprobs,
                "finish_reason": stream.finish_reason,
            }
        choices.append(choice)
    return {
        "id": call.request_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": call.created,
        "model": call.model,
        "choices": choices,
        "usage": _usage(streams),
    }


def _chunk(
    call: _Call,
    event: TokenEvent | None,
    *,
    chat: bool,
    first: bool,
    index: int = 0,
    offset: int = 0,
) -> dict[str, Any]:
    reason = event.finish_reason if event is not None and event.finished else None
    text = event.text if event is not None else ""
    logprobs = None
    if event is not None and event.logprobs is not None:
        logprobs = _openai_logprobs(call, event_logprobs(event), chat=chat, offset=offset)
    if chat:
        delta: dict[str, Any] = {"content": text}
        if first:
            delta["role"] = "assistant"
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": logprobs}
    else:
        choice = {"index": index, "text": text, "logprobs": logprobs}
    choice["finish_reason"] = reason
    return {
        "id": call.request_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": call.created,
        "model": call.model,
        "choices": [choice],
    }


class _Choices:
    """The events of a request's ``n`` streams as one sequence of (choice index, event),
    in arrival order; ends when every stream has finished.

    Each stream is followed by a task of its own (asyncio tasks, not a task group: the
    first event is awaited in one task and the rest in the response's), which ends its
    stream, aborting its request if unfinished, when cancelled by ``aclose``."""

    def __init__(self, streams: list[TokenStream]) -> None:
        self.streams = streams
        self._send, self._receive = anyio.create_memory_object_stream[
            tuple[int, TokenEvent] | BaseException
        ](math.inf)
        self._tasks: list[asyncio.Task[None]] = []
        self._open = len(streams)

    async def _pump(self, i: int) -> None:
        try:
            async with self.streams[i] as stream:
                async for event in stream:
                    self._send.send_nowait((i, event))
        except Exception as e:
            self._send.send_nowait(e)
        finally:
            self._open -= 1
            if not self._open:
                self._send.close()

    async def __anext__(self) -> tuple[int, TokenEvent]:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._pump(i)) for i in range(len(self.streams))]
        try:
            item = await self._receive.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None
        if isinstance(item, BaseException):
            raise item
        return item

    async def collect(self) -> bool:
        try:
            while True:
                await self.__anext__()
        except StopAsyncIteration:
            return True
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Stop following every stream (aborting the unfinished ones)."""
        for task in self._tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            for task in self._tasks:
                with contextlib.suppress(BaseException):
                    await task


def _data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _sse(
    call: _Call, choices: _Choices, first: tuple[int, TokenEvent], *, chat: bool
) -> AsyncGenerator[bytes, None]:
    try:
        item: tuple[int, TokenEvent] | None = first
        sent_text = [False] * call.n
        is_first = [True] * call.n
        offsets = [0] * call.n
        while item is not None:
            i, event = item
            if event.restart and sent_text[i]:
                # Text already on the wire cannot be taken back.
                yield _data(
                    ApiError(
                        500,
                        "the request was restarted by another worker",
                        type_="server_error",
                        code="stream_restarted",
                    ).body
                )
                break
            yield _data(
                _chunk(call, event, chat=chat, first=is_first[i], index=i, offset=offsets[i])
            )
            sent_text[i] = sent_text[i] or bool(event.text)
            is_first[i] = False
            offsets[i] += len(event.text)
            try:
                item = await choices.__anext__()
            except StopAsyncIteration:
                item = None
        if call.include_usage:
            tail = _chunk(call, None, chat=chat, first=False)
            tail["choices"] = []
            tail["usage"] = _usage(choices.streams)
            yield _data(tail)
    except ClientError as e:
        yield _data(api_error(e).body)
    except REDIS_ERRORS as e:
        yield _data(redis_down(e).body)
    finally:
        await choices.aclose()
    yield b"data: [DONE]\n\n"


async def _until_disconnect(request: Request, fn: Callable[[], Awaitable[T]]) -> T | None:
    """``fn()``, cancelled (None) if the client goes away first (its stream then aborts)."""
    result: list[T] = []
    error: list[Exception] = []
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            try:
                result.append(await fn())
            except Exception as e:  # re-raised bare, not in an ExceptionGroup
                error.append(e)
            tg.cancel_scope.cancel()

        tg.start_soon(run)
        await _wait_disconnect(request.receive)
        tg.cancel_scope.cancel()
    if error:
        raise error[0]
    return result[0] if result else None


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class EventStream(Response):
    """text/event-stream that stops (closing its generator, which aborts the request) as
    soon as the client disconnects, whatever the server's ASGI version."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncGenerator[bytes, None]) -> None:
        super().__init__(
            status_code=200,
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
            media_type=self.media_type,
        )
        # Response.__init__ declares the empty body's length; a stream has none.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.chunks = chunks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    await send(
                        {
                            "type": "http.response.start",
                            "status": self.status_code,
                            "headers": self.raw_headers,
                        }
                    )
                    async for chunk in self.chunks:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await _wait_disconnect(receive)
                tg.cancel_scope.cancel()
        except OSError:
            pass  # the client went away mid-write
        finally:
            with anyio.CancelScope(shield=True):
                await self.chunks.aclose()


def listen(host: str, port: int) -> socket.socket:
    """The gateway's listening socket; a busy or forbidden address is a UsageError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UsageError(
            f"cannot listen on {host}:{port} ({e.strerror}): choose another --port or --host"
        ) from e
    return sock


def serve(cfg: GatewayConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    sock = listen(host, port)
    logger.info("gateway on http://%s:%d (chat page at /)", host, port)
    with sock:
        uvicorn.Server(uvicorn.Config(build_app(cfg), log_level="info")).run(sockets=[sock])
