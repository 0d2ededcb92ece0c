"""Clients of the Redis service: the Python SDK, the OpenAI-compatible gateway, the load tester."""

from __future__ import annotations

from clients.sdk import (
    AdapterUnavailable,
    AsyncClient,
    Client,
    ClientError,
    Completion,
    EventsLost,
    InvalidRequestError,
    RequestExpired,
    RequestFailed,
    RequestTimeout,
    ServerError,
    TokenStream,
)

__all__ = [
    "AdapterUnavailable",
    "AsyncClient",
    "Client",
    "ClientError",
    "Completion",
    "EventsLost",
    "InvalidRequestError",
    "RequestExpired",
    "RequestFailed",
    "RequestTimeout",
    "ServerError",
    "TokenStream",
]
