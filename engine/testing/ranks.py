"""Test helper: run a function on every rank of a gloo group, one thread per rank, in this
process (no process start: layer tests stay fast)."""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from typing import TypeVar

import torch

from engine.distributed.group import TPGroup

T = TypeVar("T")


def run_ranks(world_size: int, fn: Callable[[TPGroup], T], timeout: float = 60.0) -> list[T]:
    """``fn(group)`` on ranks 0..world_size-1 at once; their results by rank. The first
    exception raised on any rank is raised here."""
    results: list[T | None] = [None] * world_size
    errors: list[BaseException] = []
    with tempfile.TemporaryDirectory(prefix="lorastream-ranks-") as tmp:
        store = os.path.join(tmp, "store")

        def run(rank: int) -> None:
            try:
                group = TPGroup.create(store, rank, world_size, torch.device("cpu"), timeout)
                results[rank] = fn(group)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=run, args=(r,)) for r in range(world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
        if errors:
            raise errors[0]
        if any(t.is_alive() for t in threads):
            raise TimeoutError(f"ranks still running after {timeout} s")
    return results  # type: ignore[return-value]
