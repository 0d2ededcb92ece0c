"""Moves adapter weights between disk, host memory and the device slots of ``LoRALinear``.

Two LRU caches:

- host: up to ``max_cpu_loras`` adapters' ``LoRAWeights``, filled from disk by one loader
  thread. ``request_load`` queues a load and returns at once; ``is_ready`` says when the
  scheduler may admit the adapter's requests; failed loads surface through ``poll_errors``.
- device: ``max_loras`` slots in every ``LoRALinear``'s stacked buffers. ``activate`` (called
  by the runner once per step) maps each adapter of the step to a slot, copying host -> device
  for adapters not resident.

Pinning: ``pin``/``unpin`` count the requests that need an adapter (meant to be called at
admission and when the request finishes). A pinned adapter is never evicted from host
memory, nor, while ``activate`` copies a step's adapters in, is one of that step's. When
every host entry is pinned, a further load waits in the queue, without reading anything,
until ``unpin`` (or the end of an activation) frees an entry, so host memory holds at most
``max_cpu_loras`` adapters (one more only if a synchronous ``add_lora`` races a background
load). Without pins an adapter may be evicted before its requests run; ``is_ready`` then
queues a reload for any adapter it has seen requested, so nothing waits forever, at the
cost of a second disk read.

Threads: the loader thread only reads files and builds host tensors. Device buffers are only
touched by ``activate`` and ``remove_lora``, which must run on the step loop's thread. One
lock (with a condition for the loader) guards every shared dict.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from engine.config import LoRAConfig
from engine.errors import AdapterCorrupt, AdapterError
from engine.lora.layers import LoRALinear
from engine.lora.peft import (
    AdapterConfig,
    LoRAWeights,
    load_adapter,
    lora_targets_from_layers,
    read_adapter_config,
)
from engine.lora.request import LoRARequest

logger = logging.getLogger("lorastream.lora")


@dataclass
class LoRAManagerStats:
    """A snapshot for the engine's stat loggers."""

    disk_loads: int
    """Adapters read from disk (successful loads)."""
    load_time_s: float
    """Total seconds spent reading adapters from disk."""
    failed_loads: int
    host_evictions: int
    device_loads: int
    """Host -> device copies into a slot (first placements and swaps)."""
    device_evictions: int
    """Adapters pushed out of a device slot to make room for another."""
    in_host: list[int] = field(default_factory=list)
    """Adapter ids in host memory, least recently used first."""
    on_device: list[int] = field(default_factory=list)
    """Adapter ids in device slots, by slot."""
    loading: list[int] = field(default_factory=list)
    """Adapter ids queued or being read."""
    host_bytes: int = 0


class LoRAManager:
    def __init__(
        self,
        lora_config: LoRAConfig,
        lora_layers: Mapping[str, LoRALinear],
        device: torch.device | str,
    ) -> None:
        self.config = lora_config
        self.device = torch.device(device)
        self.layers = dict(lora_layers)
        self.module_shapes = lora_targets_from_layers(self.layers)
        for layer in self.layers.values():
            layer.create_lora_buffers(
                lora_config.max_loras, lora_config.max_lora_rank, lora_config.lora_dtype
            )
            if self.device.type == "cuda":
                # Storing A under W moved the layer's weight into a larger buffer: give the
                # old one back to the driver now. Left in the allocator's cache, the old
                # weights of all layers would add up to a second copy of the model, counted
                # as used when the runner sizes the KV cache.
                torch.cuda.empty_cache()

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # Host level; all of it under _lock.
        self._host: OrderedDict[int, LoRAWeights] = OrderedDict()  # LRU first
        self._known: dict[int, LoRARequest] = {}  # every adapter asked for, to reload on demand
        self._queue: deque[tuple[int, int]] = deque()  # (id, generation), FIFO
        self._loading: set[int] = set()  # queued or being read
        self._failed: set[int] = set()  # not reloaded on demand until request_load asks again
        self._errors: list[tuple[int, AdapterError]] = []
        self._pins: Counter[int] = Counter()
        self._step_ids: frozenset[int] = frozenset()  # the step activate is copying in
        self._gen: Counter[int] = Counter()  # bumped by remove_lora: drops loads queued before
        self._closed = False
        # Device level: written only by the step loop's thread (under _lock, as others read it).
        self._slot_ids: list[int | None] = [None] * lora_config.max_loras
        self._device_lru: OrderedDict[int, int] = OrderedDict()  # id -> slot, LRU first
        # The last step's adapters and slots: a decode step usually repeats them.
        self._last_activation: tuple[frozenset[int], dict[int, int]] | None = None

        self.num_disk_loads = 0
        self.load_time_s = 0.0
        self.num_failed_loads = 0
        self.loads_ended = 0
        """Background loads that ended (read or failed); ``wait_for_load`` waits for it to move."""
        self.num_host_evictions = 0
        self.num_device_loads = 0
        self.num_device_evictions = 0

        # A daemon thread, not an executor: a load waiting for a host entry must not keep
        # the interpreter from exiting.
        self._thread = threading.Thread(
            target=self._loader_loop, name="lorastream-lora-loader", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------------ host level
    def check_adapter(self, lora_request: LoRARequest) -> AdapterConfig | None:
        """Validate the adapter's config (its JSON; the weights file is only opened) so a bad
        adapter fails at add_request.

        Adapters already in memory are not re-read: ids name adapters, as in vLLM.
        """
        with self._lock:
            if (
                lora_request.lora_int_id in self._host
                or lora_request.lora_int_id in self._device_lru
            ):
                return None
        return read_adapter_config(lora_request.lora_path, self.config, self.module_shapes)

    def request_load(self, lora_request: LoRARequest) -> None:
        """Queue a background load unless the adapter is in host memory or loading; returns at once.

        A load that failed before is tried again (the files may have been fixed).
        """
        lora_id = lora_request.lora_int_id
        with self._cond:
            self._known[lora_id] = lora_request
            self._failed.discard(lora_id)
            if lora_id in self._host:
                self._host.move_to_end(lora_id)
                return
            self._enqueue_locked(lora_id)

    def is_ready(self, lora_int_id: int) -> bool:
        """Whether ``activate`` can place the adapter now (it is in host memory or a slot)."""
        if lora_int_id == 0:
            return True
        with self._cond:
            if lora_int_id in self._device_lru:
                return True
            if lora_int_id in self._host:
                self._host.move_to_end(lora_int_id)
                return True
            if lora_int_id in self._known and lora_int_id not in self._failed:
                # Evicted from host memory before its requests ran: fetch it again.
                self._enqueue_locked(lora_int_id)
            return False

    def poll_errors(self) -> list[tuple[int, AdapterError]]:
        """Loads that failed since the last call; each is reported once."""
        with self._lock:
            errors, self._errors = self._errors, []
        return errors

    def pin(self, lora_ids: Iterable[int]) -> None:
        """Count one more user of each adapter: pinned adapters stay in host memory."""
        with self._cond:
            for i in lora_ids:
                if i:
                    self._pins[i] += 1

    def unpin(self, lora_ids: Iterable[int]) -> None:
        with self._cond:
            for i in lora_ids:
                if self._pins[i] > 1:
                    self._pins[i] -= 1
                else:
                    self._pins.pop(i, None)
            self._cond.notify_all()  # a load may be waiting for an entry to free

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load now, on the caller's thread (preloading ``lora_modules``); raises ``AdapterError``.

        False when the adapter is in host memory already (nothing is read, as in vLLM).
        """
        lora_id = lora_request.lora_int_id
        with self._lock:
            self._known[lora_id] = lora_request
            self._failed.discard(lora_id)
            if lora_id in self._host:
                self._host.move_to_end(lora_id)
                return False
            self._check_room_locked(lora_request)  # fail before reading anything
            gen = self._gen[lora_id]
        weights = self._read(lora_request)
        with self._cond:
            if self._gen[lora_id] != gen:  # removed meanwhile
                return False
            if lora_id not in self._host and len(self._host) >= self.config.max_cpu_loras:
                self._check_room_locked(lora_request)
                self._evict_one_locked()
            self._host[lora_id] = weights
            self._host.move_to_end(lora_id)
            self._cond.notify_all()
        return True

    def _check_room_locked(self, lora_request: LoRARequest) -> None:
        if len(self._host) >= self.config.max_cpu_loras and self._evictable_locked() is None:
            raise AdapterError(
                f"adapter {lora_request.lora_path}: host memory holds max_cpu_loras="
                f"{self.config.max_cpu_loras} adapters, all pinned by requests or being copied to the device"
            )

    def remove_lora(self, lora_int_id: int) -> bool:
        """Forget an adapter at both levels (its slot is zeroed). Step loop's thread only.

        Requests still using it fail at their next step, so remove only unused adapters.
        """
        with self._cond:
            existed = (
                lora_int_id in self._known
                or lora_int_id in self._host
                or lora_int_id in self._device_lru
            )
            self._known.pop(lora_int_id, None)
            self._host.pop(lora_int_id, None)
            self._failed.discard(lora_int_id)
            self._loading.discard(lora_int_id)
            self._gen[lora_int_id] += 1
            slot = self._device_lru.pop(lora_int_id, None)
            if slot is not None:
                self._slot_ids[slot] = None
            self._cond.notify_all()
        if slot is not None:
            self._clear_slot(slot)
        return existed

    def list_loras(self) -> list[int]:
        """Ids of the adapters in memory (host or device)."""
        with self._lock:
            return sorted(set(self._host) | set(self._device_lru))

    def wait_for_load(self, since: int, timeout: float) -> None:
        """Block until a background load ends after ``since`` (an earlier ``loads_ended``),
        at most ``timeout`` seconds; at once when none is queued or being read. For a step
        loop whose waiting requests all wait for their adapters."""
        with self._cond:
            self._cond.wait_for(lambda: self.loads_ended != since or not self._loading, timeout)

    def close(self) -> None:
        """Stop the loader thread (a read in progress finishes first)."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ device level
    def activate(self, lora_ids: Iterable[int]) -> dict[int, int]:
        """Map every adapter of this step to a device slot; step loop's thread only.

        Adapters not in a slot are copied in, evicting the least recently used adapters that
        this step does not need. The scheduler admits at most ``max_loras`` distinct adapters
        per step, so more is a bug.
        """
        step = frozenset(i for i in lora_ids if i)
        last = self._last_activation
        if (
            last is not None
            and last[0] == step
            and all(self._slot_ids[slot] == i for i, slot in last[1].items())
        ):
            # The same adapters, all still in their slots: nothing to copy, and the device
            # LRU has them last already.
            return last[1]
        ids = sorted(step)
        if len(ids) > self.config.max_loras:
            raise RuntimeError(
                f"a step uses {len(ids)} adapters ({ids}) but there are max_loras={self.config.max_loras} slots"
            )
        slots: dict[int, int] = {}
        with self._cond:
            self._step_ids = frozenset(ids)
            for i in ids:
                if i in self._host:
                    self._host.move_to_end(i)  # in use: the host copy is worth keeping
                if i in self._device_lru:
                    self._device_lru.move_to_end(i)
                    slots[i] = self._device_lru[i]
        try:
            for i in ids:
                if i not in slots:
                    slots[i] = self._place(i, ids)
        finally:
            # The step's host entries are protected only while they are copied in. Kept
            # longer, they could hold every entry after the step, and a load waiting for one
            # would wait for a step that never comes: one whose requests need that load.
            with self._cond:
                self._step_ids = frozenset()
                self._cond.notify_all()
        self._last_activation = (step, slots)
        return slots

    def _place(self, lora_id: int, step_ids: list[int]) -> int:
        weights = self._host_weights(lora_id)
        with self._lock:
            slot = self._free_slot_locked(step_ids)
        self._write_slot(slot, lora_id, weights)
        return slot

    def _write_slot(self, slot: int, lora_id: int, weights: LoRAWeights) -> None:
        """Copies adapter ``lora_id``'s weights into device slot ``slot`` (no longer anyone's)."""
        # Zero the whole slot first: modules this adapter does not touch must add nothing,
        # whatever the previous occupant wrote there.
        self._clear_slot(slot)
        for (layer_key, slice_idx), (a, b) in weights.tensors.items():
            self.layers[layer_key].set_lora(slot, slice_idx, a, b)
        with self._lock:
            self._slot_ids[slot] = lora_id
            self._device_lru[lora_id] = slot
            self.num_device_loads += 1

    def _free_slot_locked(self, step_ids: list[int]) -> int:
        for slot, occupant in enumerate(self._slot_ids):
            if occupant is None:
                return slot
        # At most max_loras ids per step, so a slot not needed by this step always exists.
        victim = next(i for i in self._device_lru if i not in step_ids)
        slot = self._device_lru.pop(victim)
        self._slot_ids[slot] = None
        self.num_device_evictions += 1
        return slot

    def _clear_slot(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear_lora(slot)

    def _host_weights(self, lora_id: int) -> LoRAWeights:
        with self._lock:
            weights = self._host.get(lora_id)
            request = self._known.get(lora_id)
        if weights is not None:
            return weights
        if request is None:
            raise KeyError(f"adapter id {lora_id} was never requested (or was removed)")
        # The scheduler saw it ready, then the loader evicted it for another adapter before
        # this step: rare (only without pins), so read it here rather than fail the step.
        logger.warning(
            "adapter %d left host memory before its step; reading it synchronously", lora_id
        )
        self.add_lora(request)
        with self._lock:
            weights = self._host.get(lora_id)
        if weights is None:
            raise AdapterCorrupt(f"adapter {request.lora_path}: vanished while loading")
        return weights

    # ------------------------------------------------------------------ stats
    def get_stats(self) -> LoRAManagerStats:
        with self._lock:
            return LoRAManagerStats(
                disk_loads=self.num_disk_loads,
                load_time_s=self.load_time_s,
                failed_loads=self.num_failed_loads,
                host_evictions=self.num_host_evictions,
                device_loads=self.num_device_loads,
                device_evictions=self.num_device_evictions,
                in_host=list(self._host),
                on_device=[i for i in self._slot_ids if i is not None],
                loading=sorted(self._loading),
                host_bytes=sum(w.nbytes for w in self._host.values()),
            )

    # ------------------------------------------------------------------ loader thread
    def _enqueue_locked(self, lora_id: int) -> None:
        if lora_id in self._loading or self._closed:
            return
        self._loading.add(lora_id)
        self._queue.append((lora_id, self._gen[lora_id]))
        self._cond.notify_all()

    def _evictable_locked(self) -> int | None:
        """The least recently used host entry neither pinned nor being copied in."""
        return next(
            (i for i in self._host if i not in self._pins and i not in self._step_ids), None
        )

    def _evict_one_locked(self) -> bool:
        victim = self._evictable_locked()
        if victim is None:
            return False
        del self._host[victim]
        self.num_host_evictions += 1
        return True

    def _loader_loop(self) -> None:
        while True:
            with self._cond:
                job = self._next_job_locked()
                if job is None:
                    return
                request, gen = job
            lora_id = request.lora_int_id
            weights: LoRAWeights | None = None
            error: AdapterError | None = None
            try:
                weights = self._read(request)
            except AdapterError as e:
                error = e
            except Exception as e:  # one bad adapter must not kill the loader thread
                # (MemoryError, a reader's own error type, ...): it fails that adapter only.
                logger.exception("adapter %r: unexpected error while loading", request.lora_path)
                detail = f"{type(e).__name__}: {str(e)[:200]!r}"
                error = AdapterError(f"adapter {request.lora_path}: cannot load ({detail})")
            with self._cond:
                if self._gen[lora_id] != gen:  # removed while reading
                    continue
                self._loading.discard(lora_id)
                if weights is not None:
                    # The entry was made free before reading; only an add_lora racing us
                    # can have taken it, so evict once more if possible.
                    if len(self._host) >= self.config.max_cpu_loras:
                        self._evict_one_locked()
                    self._host[lora_id] = weights
                else:
                    assert error is not None
                    self._failed.add(lora_id)
                    self._errors.append((lora_id, error))
                self.loads_ended += 1
                self._cond.notify_all()

    def _next_job_locked(self) -> tuple[LoRARequest, int] | None:
        """The next load to run, once host memory has an entry for it; None when closed."""
        while True:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            lora_id, gen = self._queue[0]
            request = self._known.get(lora_id)
            if self._gen[lora_id] != gen or request is None or lora_id in self._host:
                # Removed after it was queued, or loaded meanwhile by add_lora.
                self._queue.popleft()
                if self._gen[lora_id] == gen:
                    self._loading.discard(lora_id)
                continue
            if len(self._host) < self.config.max_cpu_loras or self._evict_one_locked():
                self._queue.popleft()
                return request, gen
            # Every entry is pinned or being copied in: wait, reading nothing, until
            # unpin / activate / remove_lora frees one (they notify).
            self._cond.wait()

    def _read(self, request: LoRARequest) -> LoRAWeights:
        t0 = time.monotonic()
        try:
            weights = load_adapter(request.lora_path, self.config, self.module_shapes)
        except Exception:
            with self._lock:
                self.num_failed_loads += 1
            raise
        dt = time.monotonic() - t0
        with self._lock:
            self.num_disk_loads += 1
            self.load_time_s += dt
        logger.info(
            "loaded adapter %s (id %d, rank %d, %.1f MiB) in %.1f ms",
            request.lora_name,
            request.lora_int_id,
            weights.rank,
            weights.nbytes / 2**20,
            dt * 1e3,
        )
        return weights


__all__ = ["LoRAManager", "LoRAManagerStats"]
