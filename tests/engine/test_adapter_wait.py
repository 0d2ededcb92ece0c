"""A step that can run nothing because every waiting request waits for its adapter's load
blocks until a load ends, instead of returning at once into a loop of empty steps."""

from __future__ import annotations

import threading
import time

import engine.core_client as core_client
import engine.lora.manager as manager_mod
from engine import LoRARequest, SamplingParams

from .test_matches_peft import adapter_dirs, make_engine


def test_step_waits_for_the_adapter_load_instead_of_spinning(tiny_model_dir, monkeypatch):
    reading, gate = threading.Event(), threading.Event()
    real_load = manager_mod.load_adapter

    def held_load(path, *args, **kwargs):
        reading.set()
        assert gate.wait(60)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(manager_mod, "load_adapter", held_load)
    # Far longer than the load is held: only the load's end can end the wait in time.
    monkeypatch.setattr(core_client, "_ADAPTER_WAIT_S", 60.0)
    engine = make_engine(tiny_model_dir, max_loras=1)
    path = adapter_dirs(tiny_model_dir)[0]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("r", "Once upon a time", params, lora_request=LoRARequest("a", 1, str(path)))
    assert reading.wait(30)
    threading.Timer(0.3, gate.set).start()
    t0 = time.monotonic()
    steps = 0
    while not engine.step():
        steps += 1
    # Empty steps: one that waited for the load, then at most one whose token comes with the
    # next (async scheduling). Without the wait: thousands while the load is held.
    assert steps <= 2
    assert time.monotonic() - t0 < 30  # woken by the load, not by the 60 s bound
    while engine.has_unfinished_requests():
        engine.step()
