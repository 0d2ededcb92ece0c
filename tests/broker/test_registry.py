"""Adapter registry: names to stable ids, paths confined to --lora-root."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis
import torch

from broker.embedded import RedisServer
from broker.registry import AdapterPathNotAllowed, AdapterRegistry, safe_adapter_path
from engine.config import LoRAConfig
from engine.errors import AdapterNotFound
from engine.lora.peft import read_adapter_config


def test_paths_must_stay_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    (root / "inner-link").symlink_to(root / "a")
    assert safe_adapter_path(root, "a") == str((root / "a").resolve())
    assert safe_adapter_path(root, str(root / "a")) == str((root / "a").resolve())
    assert safe_adapter_path(root, "inner-link") == str((root / "a").resolve())
    for bad in ("../outside", "a/../../outside", "link", str(outside), "/etc", "a\x00b", ""):
        with pytest.raises(AdapterPathNotAllowed):
            safe_adapter_path(root, bad)
    with pytest.raises(AdapterPathNotAllowed, match="--lora-root"):
        safe_adapter_path(None, "a")


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_file_linked_out_of_the_root_is_refused_where_the_engine_opens_it(
    tmp_path: Path, name: str
) -> None:
    adapter = tmp_path / "root" / "a"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"target_modules": ["q_proj"]}')
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    outside = tmp_path / name
    (adapter / name).rename(outside)
    (adapter / name).symlink_to(outside)
    path = safe_adapter_path(tmp_path / "root", "a")  # the directory itself is inside
    with pytest.raises(AdapterPathNotAllowed, match=f"{name} resolves to .*outside"):
        read_adapter_config(path, LoRAConfig(2, 16, 2, torch.float32))


def test_ids_are_stable_per_name_and_path_and_match_the_engine_preload() -> None:
    registry = AdapterRegistry([("sql", "/m/sql"), ("chat", "/m/chat")])
    # The engine preloads --lora-modules as 1..N in order.
    assert registry.lora_request("sql", "/m/sql").lora_int_id == 1
    assert registry.lora_request("chat", "/m/chat").lora_int_id == 2
    assert registry.lora_request("new", "/m/new").lora_int_id == 3
    assert registry.lora_request("new", "/m/new").lora_int_id == 3
    # A new path under an old name is a new adapter to the engine.
    assert registry.lora_request("sql", "/m/sql-v2").lora_int_id == 4


@pytest.mark.anyio
async def test_registry_overrides_static_modules_and_unknown_names_are_errors(
    redis_server: RedisServer, client: aioredis.Redis, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    (root / "v2").mkdir(parents=True)
    registry = AdapterRegistry(
        [("sql", "/static/sql"), ("chat", "/static/chat")], key="k", lora_root=root
    )
    await client.hset("k", mapping={"sql": "v2", "evil": "../x"})
    got = await registry.resolve_many(client, ["sql", "chat", "evil", "nope"])
    assert got["sql"].lora_path == str((root / "v2").resolve())  # type: ignore[union-attr]
    assert got["chat"].lora_path == "/static/chat"  # type: ignore[union-attr]
    assert isinstance(got["evil"], AdapterPathNotAllowed)
    assert isinstance(got["nope"], AdapterNotFound)
