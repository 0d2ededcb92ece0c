"""The adapter manager: host LRU with pins, background loads and their errors, device slots
that reproduce PEFT after any sequence of swaps, and the counters the engine reports."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel

import engine.lora.manager as manager_mod
from engine.errors import AdapterCorrupt, AdapterError, AdapterRankTooLarge
from engine.lora import LoRAMetadata
from engine.lora.layers import LoRALinear
from engine.lora.manager import LoRAManager
from engine.lora.request import LoRARequest
from tests.lora.test_peft_loading import lora_config, make_adapter, make_base, make_layers

# Four adapters that touch different modules, so a reused slot shows any leftover.
ADAPTERS: dict[int, dict[str, Any]] = {
    1: {"r": 8, "lora_alpha": 16},
    2: {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]},
    3: {
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": True,
        "target_modules": ["k_proj", "o_proj", "up_proj"],
    },
    4: {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["v_proj", "down_proj"],
        "layers_to_transform": [1],
    },
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, PeftModel]]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        i: (root / f"a{i}", make_adapter(root / f"a{i}", seed=i, **kw))
        for i, kw in ADAPTERS.items()
    }


def req(adapters: dict[int, tuple[Path, PeftModel]], i: int) -> LoRARequest:
    return LoRARequest(f"a{i}", i, str(adapters[i][0]))


@pytest.fixture
def make_manager() -> Iterator[Callable[..., tuple[LoRAManager, dict[str, LoRALinear]]]]:
    managers: list[LoRAManager] = []

    def make(**kw: Any) -> tuple[LoRAManager, dict[str, LoRALinear]]:
        layers = make_layers(make_base())
        m = LoRAManager(lora_config(**kw), layers, "cpu")
        managers.append(m)
        return m, layers

    yield make
    for m in managers:
        m.close()


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@torch.no_grad()
def assert_slot_matches_peft(layers: dict[str, LoRALinear], slot: int, model: PeftModel) -> None:
    """Every layer's output for tokens of ``slot`` equals PEFT's modules (base + delta)."""
    gen = torch.Generator().manual_seed(3)
    meta = LoRAMetadata(token_slots=torch.full((4,), slot), groups=[(slot, torch.arange(4))])
    hf = model.get_base_model()
    for key, layer in layers.items():
        x = torch.randn(4, layer.in_features, generator=gen)
        parent = key.rpartition(".")[0]
        expected = torch.cat(
            [hf.get_submodule(f"{parent}.{n}")(x) for n in layer.slice_names], dim=1
        )
        torch.testing.assert_close(
            layer(x, meta), expected, atol=1e-5, rtol=0, msg=lambda m, key=key: f"{key}: {m}"
        )


def slot_is_zero(layers: dict[str, LoRALinear], slot: int) -> bool:
    return all(
        not t[slot].any() for layer in layers.values() for t in [*layer.lora_a, *layer.lora_b]
    )


# ---------------------------------------------------------------------------- device slots
def test_buffers_are_created_for_every_layer(make_manager):
    _, layers = make_manager(max_loras=3, max_lora_rank=8)
    qkv = layers["model.layers.0.self_attn.qkv_proj"]
    assert [a.shape for a in qkv.lora_a] == [(3, 8, 32)] * 3
    assert [b.shape for b in qkv.lora_b] == [(3, 32, 8), (3, 16, 8), (3, 16, 8)]


def test_swapped_slots_reproduce_peft_and_keep_no_leftovers(make_manager, adapters):
    m, layers = make_manager(max_loras=2, max_cpu_loras=4)
    for i in ADAPTERS:
        m.add_lora(req(adapters, i))

    slots = m.activate({1, 2})
    assert sorted(slots.values()) == [0, 1]
    for i, s in slots.items():
        assert_slot_matches_peft(layers, s, adapters[i][1])

    # 1 is not needed by this step and least recently used: 3 takes its slot.
    slots = m.activate({2, 3})
    assert slots[3] == 0
    assert slots[2] == 1
    # Adapter 1 wrote every module of slot 0; adapter 3 touches three, the rest is zero again.
    qkv = layers["model.layers.0.self_attn.qkv_proj"]
    assert not qkv.lora_a[0][0].any()
    assert not qkv.lora_b[2][0].any()
    assert not layers["model.layers.1.mlp.down_proj"].lora_b[0][0].any()
    for i, s in slots.items():
        assert_slot_matches_peft(layers, s, adapters[i][1])

    slots = m.activate({4, 1})
    assert sorted(slots.values()) == [0, 1]
    for i, s in slots.items():
        assert_slot_matches_peft(layers, s, adapters[i][1])

    stats = m.get_stats()
    assert stats.device_loads == 5
    assert stats.device_evictions == 3
    assert sorted(stats.on_device) == [1, 4]
    assert stats.disk_loads == 4


def test_resident_adapter_keeps_its_slot(make_manager, adapters):
    m, _ = make_manager(max_loras=2)
    assert m.add_lora(req(adapters, 1))
    assert not m.add_lora(req(adapters, 1))  # in host memory already: nothing read
    assert m.get_stats().disk_loads == 1
    first = m.activate({1})
    assert m.activate({1}) == first
    assert m.activate([0, 1]) == first  # id 0 is the base model: no slot
    assert m.get_stats().device_loads == 1


def test_a_repeated_step_places_again_only_what_left_its_slot(make_manager, adapters):
    # activate() answers a step with the previous step's adapters from its last mapping;
    # that answer must not outlive an adapter removed (and added back) in between.
    m, layers = make_manager(max_loras=2)
    m.add_lora(req(adapters, 1))
    m.add_lora(req(adapters, 2))
    first = m.activate({1, 2})
    assert m.activate({2, 1}) == first
    assert m.get_stats().device_loads == 2
    assert m.remove_lora(1)
    assert slot_is_zero(layers, first[1])
    m.add_lora(req(adapters, 1))
    again = m.activate({1, 2})
    assert m.get_stats().device_loads == 3
    assert again[2] == first[2]
    for i, s in again.items():
        assert_slot_matches_peft(layers, s, adapters[i][1])


def test_more_adapters_than_slots_is_an_error(make_manager, adapters):
    m, _ = make_manager(max_loras=2, max_cpu_loras=3)
    for i in (1, 2, 3):
        m.add_lora(req(adapters, i))
    with pytest.raises(RuntimeError, match="max_loras=2"):
        m.activate({1, 2, 3})


def test_remove_lora_zeroes_its_slot_and_forgets_it(make_manager, adapters):
    m, layers = make_manager(max_loras=2)
    m.add_lora(req(adapters, 1))
    slot = m.activate({1})[1]
    assert not slot_is_zero(layers, slot)
    assert m.remove_lora(1)
    assert slot_is_zero(layers, slot)
    assert m.list_loras() == []
    assert not m.is_ready(1)  # forgotten: not fetched again on demand
    assert not m.get_stats().loading
    assert not m.remove_lora(1)


# ---------------------------------------------------------------------------- host level
def test_host_cache_evicts_least_recently_used(make_manager, adapters):
    m, _ = make_manager(max_loras=1, max_cpu_loras=2)
    m.add_lora(req(adapters, 1))
    m.add_lora(req(adapters, 2))
    assert m.is_ready(1)  # a use: 2 is now least recently used
    m.add_lora(req(adapters, 3))
    stats = m.get_stats()
    assert stats.in_host == [1, 3]
    assert stats.host_evictions == 1
    assert m.list_loras() == [1, 3]

    # An evicted adapter someone asked for is fetched again when the scheduler asks.
    assert not m.is_ready(2)
    wait_until(lambda: m.is_ready(2))
    stats = m.get_stats()
    assert stats.in_host == [3, 2]
    assert stats.host_evictions == 2
    assert stats.disk_loads == 4


def test_background_load_is_ready_later(make_manager, adapters, monkeypatch):
    gate = threading.Event()
    real = manager_mod.load_adapter

    def slow_load(*args: Any) -> Any:
        assert gate.wait(10)
        return real(*args)

    monkeypatch.setattr(manager_mod, "load_adapter", slow_load)
    m, layers = make_manager()
    m.request_load(req(adapters, 1))  # returns while the load waits
    assert not m.is_ready(1)
    assert m.get_stats().loading == [1]
    m.request_load(req(adapters, 1))  # no second load for the same adapter
    gate.set()
    wait_until(lambda: m.is_ready(1))
    stats = m.get_stats()
    assert stats.disk_loads == 1
    assert stats.loading == []
    assert stats.load_time_s > 0
    assert stats.host_bytes > 0
    assert_slot_matches_peft(layers, m.activate({1})[1], adapters[1][1])


def test_remove_lora_drops_a_load_in_flight(make_manager, adapters, monkeypatch):
    started, gate = threading.Event(), threading.Event()
    real = manager_mod.load_adapter

    def slow_load(*args: Any) -> Any:
        started.set()
        assert gate.wait(10)
        return real(*args)

    monkeypatch.setattr(manager_mod, "load_adapter", slow_load)
    m, _ = make_manager()
    m.request_load(req(adapters, 1))
    assert started.wait(10)
    assert m.remove_lora(1)
    m.request_load(req(adapters, 1))  # asked again while the stale read is still running
    gate.set()
    wait_until(lambda: m.is_ready(1))
    assert m.get_stats().disk_loads == 2  # the stale result was dropped, the new one kept
    assert m.list_loras() == [1]


def test_load_errors_are_reported_while_others_load(make_manager, adapters, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(adapters[2][0], bad)
    (bad / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    m, _ = make_manager(max_cpu_loras=3)
    m.request_load(req(adapters, 1))
    m.request_load(LoRARequest("bad", 2, str(bad)))
    m.request_load(req(adapters, 3))
    errors: list[tuple[int, AdapterError]] = []
    wait_until(
        lambda: m.is_ready(1) and m.is_ready(3) and bool(errors.extend(m.poll_errors()) or errors)
    )
    assert [(i, type(e)) for i, e in errors] == [(2, AdapterCorrupt)]
    assert str(bad) in str(errors[0][1])
    assert m.poll_errors() == []  # reported once
    assert not m.is_ready(2)  # and not retried on its own
    time.sleep(0.05)
    assert m.poll_errors() == []
    assert m.get_stats().failed_loads == 1

    # Fixed on disk: a new request for the same id loads it.
    shutil.copy(adapters[2][0] / "adapter_model.safetensors", bad / "adapter_model.safetensors")
    m.request_load(LoRARequest("bad", 2, str(bad)))
    wait_until(lambda: m.is_ready(2))
    assert m.poll_errors() == []


@pytest.mark.parametrize(
    "exc",
    [MemoryError(), RuntimeError("a reader's own error"), RecursionError()],
    ids=["memory", "runtime", "recursion"],
)
def test_a_load_failing_in_any_way_fails_that_adapter_alone(
    make_manager, adapters, monkeypatch, exc
):
    real = manager_mod.load_adapter
    failing = str(adapters[2][0])

    def load(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path) == failing:
            raise exc
        return real(path, *args, **kwargs)

    monkeypatch.setattr(manager_mod, "load_adapter", load)
    m, _ = make_manager(max_cpu_loras=3)
    m.request_load(req(adapters, 2))
    m.request_load(req(adapters, 1))
    errors: list[tuple[int, AdapterError]] = []
    wait_until(lambda: m.is_ready(1) and bool(errors.extend(m.poll_errors()) or errors))
    [(lora_id, error)] = errors
    assert lora_id == 2
    assert error.code == "adapter_error"
    assert failing in str(error)
    assert type(exc).__name__ in str(error)
    assert m.get_stats().failed_loads == 1
    # The loader lives on: the next adapter still loads.
    m.request_load(req(adapters, 3))
    wait_until(lambda: m.is_ready(3))


def test_pinned_adapters_are_not_evicted(make_manager, adapters):
    m, _ = make_manager(max_loras=1, max_cpu_loras=2)
    m.add_lora(req(adapters, 1))
    m.add_lora(req(adapters, 2))
    m.pin([1])  # least recently used, but a waiting request needs it
    m.request_load(req(adapters, 3))
    wait_until(lambda: m.is_ready(3))
    assert m.get_stats().in_host == [1, 3]

    # Every entry pinned: the next load waits, reading nothing, until one is unpinned.
    m.pin([3])
    m.request_load(req(adapters, 4))
    time.sleep(0.2)
    stats = m.get_stats()
    assert not m.is_ready(4)
    assert stats.loading == [4]
    assert stats.in_host == [1, 3]
    assert stats.disk_loads == 3
    m.unpin([3])
    wait_until(lambda: m.is_ready(4))
    assert m.get_stats().in_host == [1, 4]

    # Pins count users: one unpin of two pins keeps it.
    m.pin([1])
    m.unpin([1])
    m.request_load(req(adapters, 2))
    wait_until(lambda: m.is_ready(2))
    assert m.get_stats().in_host == [1, 2]


def test_a_steps_adapters_leave_host_memory_once_copied_in(make_manager, adapters):
    """Only pins hold host entries after activate: a step's adapters live on in their
    slots, and keeping their entries could starve a load that waiting requests need."""
    m, layers = make_manager(max_loras=2, max_cpu_loras=2)
    m.add_lora(req(adapters, 1))
    m.add_lora(req(adapters, 2))
    slots = m.activate({1, 2})
    m.pin([2])
    m.request_load(req(adapters, 3))
    wait_until(lambda: m.is_ready(3))
    assert m.get_stats().in_host == [2, 3]  # 1: least recently used and not pinned
    assert m.activate({1, 2}) == slots  # still in its slot: nothing read again
    assert_slot_matches_peft(layers, slots[1], adapters[1][1])
    assert m.get_stats().disk_loads == 3


def test_device_copy_serves_an_adapter_evicted_from_host(make_manager, adapters):
    m, layers = make_manager(max_loras=2, max_cpu_loras=2)
    m.add_lora(req(adapters, 1))
    slot = m.activate({1})[1]
    m.activate(set())
    m.add_lora(req(adapters, 2))
    m.add_lora(req(adapters, 3))  # evicts 1 from host memory; its slot still holds it
    assert m.get_stats().in_host == [2, 3]
    assert m.is_ready(1)
    assert m.activate({1}) == {1: slot}
    assert_slot_matches_peft(layers, slot, adapters[1][1])
    assert m.get_stats().disk_loads == 3


def test_add_lora_refuses_when_every_entry_is_pinned(make_manager, adapters):
    m, _ = make_manager(max_loras=1, max_cpu_loras=2)
    m.add_lora(req(adapters, 1))
    m.add_lora(req(adapters, 2))
    m.pin([1, 2])
    with pytest.raises(AdapterError, match="pinned"):
        m.add_lora(req(adapters, 3))


def test_check_adapter_reads_only_the_config(make_manager, adapters, tmp_path):
    m, _ = make_manager(max_lora_rank=8)
    assert m.check_adapter(req(adapters, 2)) is not None
    with pytest.raises(AdapterRankTooLarge, match="max_lora_rank=8"):
        m.check_adapter(LoRARequest("big", 9, str(make_adapter_dir(tmp_path))))
    assert m.get_stats().disk_loads == 0


def make_adapter_dir(tmp_path: Path) -> Path:
    make_adapter(tmp_path / "big", r=16, target_modules=["q_proj"])
    return tmp_path / "big"


@pytest.mark.gpu  # the CUDA caching allocator
def test_storing_a_under_w_leaves_no_old_weights_cached() -> None:
    """The manager moves each layer's W into the larger ``[W; A]`` buffer: the old weights
    go back to the driver, so the KV cache (sized from the device's free memory) does not
    lose a second copy of the model to the allocator's cache."""
    dev = torch.device("cuda")
    layers = {
        f"layers.{i}.o_proj": LoRALinear(4096, [4096], ["o_proj"], dtype=torch.bfloat16, device=dev)
        for i in range(8)
    }
    weights = {}
    for key, layer in layers.items():
        layer.weight.normal_()
        weights[key] = layer.weight.cpu()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved(dev)
    config = lora_config(max_loras=4, max_lora_rank=16, lora_dtype=torch.bfloat16)
    m = LoRAManager(config, layers, dev)
    try:
        grown = torch.cuda.memory_reserved(dev) - before
        old_weights = sum(w.numel() * w.element_size() for w in weights.values())  # 256 MiB
        # A and B of 4 slots (0.5 MiB each per layer) and the allocator's 2 MiB rounding.
        assert grown < old_weights // 2, f"{grown / 2**20:.0f} MiB more reserved"
        for key, layer in layers.items():
            assert layer.can_stack_a
            assert torch.equal(layer.weight.cpu(), weights[key])
    finally:
        m.close()
