"""Adapters by name: ``--lora-modules`` plus a Redis hash that operators change live.

The hash ``{prefix}:adapters`` maps name → path and is read with one HMGET per intake batch,
so ``lorastream adapters add|rm`` takes effect for the next request without a restart and
without a Redis round trip per request. A registry entry overrides a ``--lora-modules`` entry
of the same name. Registry paths come from whoever can write to Redis, so they must resolve
inside ``--lora-root`` (no ``..``, no symlink escape); without ``--lora-root`` the registry
is refused and only the operator's ``--lora-modules`` are served. The engine then opens each
file of an adapter only where it resolves inside the adapter directory's real path
(``engine.lora.peft``), so a file symlinked out of the root is refused too, even one swapped
in after this check.

The engine identifies an adapter by a positive int; equal ids must mean the same weights.
Ids are assigned per (name, resolved path) on first sight, so a name whose path changes gets
a new id and the engine never serves stale weights under the old one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import PurePath
from typing import Any

import redis
import redis.asyncio as aioredis

from engine.errors import AdapterError, AdapterNotFound, AdapterPathNotAllowed
from engine.lora.request import LoRARequest

MAX_NAME_LEN = 256


def registry_key(prefix: str) -> str:
    return f"{prefix}:adapters"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LEN or not name.isprintable():
        raise AdapterError(
            f"adapter name {name!r} is invalid: 1..{MAX_NAME_LEN} printable characters"
        )
    return name


def safe_adapter_path(root: str | os.PathLike[str] | None, path: str) -> str:
    """The real path of ``path`` (relative paths are taken from ``root``), which must lie
    inside ``root``. Raises AdapterPathNotAllowed naming why."""
    if root is None:
        raise AdapterPathNotAllowed(
            f"adapter path {path!r} comes from the Redis registry, which needs --lora-root"
        )
    if not path or "\x00" in path:
        raise AdapterPathNotAllowed(f"adapter path {path!r} is invalid")
    if ".." in PurePath(path).parts:
        raise AdapterPathNotAllowed(f"adapter path {path!r} must not contain '..'")
    real_root = os.path.realpath(root)
    # realpath follows every symlink, so a link inside the root pointing out of it is caught.
    real = os.path.realpath(os.path.join(real_root, path))
    if os.path.commonpath([real, real_root]) != real_root:
        raise AdapterPathNotAllowed(f"adapter path {path!r} resolves outside --lora-root")
    return real


class AdapterRegistry:
    def __init__(
        self,
        static: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        *,
        key: str = "lorastream:adapters",
        lora_root: str | os.PathLike[str] | None = None,
    ) -> None:
        items = list(static.items()) if isinstance(static, Mapping) else list(static)
        self.key = key
        self.lora_root = lora_root
        self.static: dict[str, str] = dict(items)
        self._ids: dict[tuple[str, str], int] = {}
        # The engine preloads --lora-modules as ids 1..N in order; give them the same ids.
        for name, path in items:
            self._id_for(name, path)

    def _id_for(self, name: str, path: str) -> int:
        key = (name, path)
        if key not in self._ids:
            self._ids[key] = len(self._ids) + 1
        return self._ids[key]

    def lora_request(self, name: str, path: str) -> LoRARequest:
        return LoRARequest(name, self._id_for(name, path), path)

    async def resolve_many(
        self, client: aioredis.Redis, names: Iterable[str]
    ) -> dict[str, LoRARequest | AdapterError]:
        """Name → LoRARequest, or the AdapterError to send. One HMGET; Redis errors propagate
        (the caller retries the batch)."""
        wanted = sorted(set(names))
        if not wanted:
            return {}
        paths = await client.hmget(self.key, wanted)
        return {name: self._resolve(name, raw) for name, raw in zip(wanted, paths, strict=True)}

    def _resolve(self, name: str, raw: bytes | str | None) -> LoRARequest | AdapterError:
        try:
            check_name(name)
            if raw is not None:
                path = raw.decode() if isinstance(raw, bytes) else raw
                return self.lora_request(name, safe_adapter_path(self.lora_root, path))
            if name in self.static:
                return self.lora_request(name, self.static[name])
            return AdapterNotFound(
                f"adapter {name!r} is not registered (lorastream adapters add {name} PATH)"
            )
        except AdapterError as e:
            return e
        except UnicodeDecodeError:
            return AdapterPathNotAllowed(f"adapter {name!r} has a path that is not UTF-8")


# ----------------------------------------------------------------------------- operator side
def add(client: redis.Redis, key: str, name: str, path: str, lora_root: str | None = None) -> None:
    """Register ``name``; with ``lora_root`` the path is checked as the workers will check it."""
    check_name(name)
    if lora_root is not None:
        safe_adapter_path(lora_root, path)
    client.hset(key, name, path)


def remove(client: redis.Redis, key: str, name: str) -> bool:
    return bool(client.hdel(key, name))


def list_all(client: redis.Redis, key: str) -> dict[str, str]:
    raw: Any = client.hgetall(key)
    return {_text(k): _text(v) for k, v in sorted(raw.items())}


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value
