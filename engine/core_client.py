"""How the front (``LLMEngine``) reaches its ``EngineCore``: in the same process
(``InprocClient``: a step is a call) or in a spawned one (``MPClient``: messages over pipes,
the core stepping on its own while it has work).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import queue
import threading
import weakref
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Protocol

from engine.config import EngineArgs, EngineConfig
from engine.core.scheduler import check_prompt_fits
from engine.core_messages import (
    PROTOCOL_VERSION,
    AbortRequests,
    AddRequest,
    CoreFailed,
    CoreReady,
    EngineCoreOutputs,
    EngineLoad,
    Shutdown,
    UtilityCall,
    UtilityResult,
    decode,
    encode,
)
from engine.engine_core import LORA_DISABLED, EngineCore
from engine.errors import EngineDead, InvalidRequest, LoRAStreamError
from engine.lora.peft import read_adapter_config
from engine.lora.request import LoRARequest
from engine.sequence import Request

logger = logging.getLogger("lorastream.engine")

# How long shutdown waits for the core to stop by itself before terminating it.
_STOP_TIMEOUT_S = 5.0
# In-process, how long a step that ran nothing waits for an adapter load before the next
# step: a load's end wakes it at once; the bound is for work that comes otherwise
# (AsyncLLMEngine adds requests between steps, so a new one waits for this at most).
_ADAPTER_WAIT_S = 0.02


class EngineCoreClient(Protocol):
    def add_request(self, request: Request) -> None:
        """Queue ``request``; raises what can be found wrong without running it."""

    def abort_requests(self, request_ids: Iterable[str]) -> None: ...

    def get_outputs(self, block: bool) -> list[EngineCoreOutputs]:
        """The core's step results since the last call, oldest first (in-process: one step).
        ``block``: wait for at least one (or a ``wake``). Raises ``EngineDead``."""

    def wake(self) -> None:
        """Make a blocked ``get_outputs`` return: the front has outputs of its own."""

    def check_adapter(self, lora_request: LoRARequest) -> None: ...

    def add_lora(self, lora_request: LoRARequest) -> bool: ...

    def remove_lora(self, lora_id: int) -> bool: ...

    def pin_lora(self, lora_id: int) -> bool: ...

    def list_loras(self) -> set[int]: ...

    def get_load(self) -> EngineLoad: ...

    def get_timings(self) -> dict[str, float]: ...

    def get_kernel_config(self) -> dict[str, Any]:
        """The core's kernel settings (``EngineCore.get_kernel_config``)."""
        ...

    def shutdown(self) -> None: ...


class InprocClient:
    """The core in this process: ``get_outputs`` runs one step on the caller's thread."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core

    def add_request(self, request: Request) -> None:
        self.core.add_request(request)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self.core.abort_requests(request_ids)

    def get_outputs(self, block: bool) -> list[EngineCoreOutputs]:
        out = self.core.step()
        if block and not (out.stats.num_scheduled_tokens or out.request_ids or out.failed):
            # Nothing ran though requests are unfinished: they wait for adapter loads.
            self.core.wait_for_adapters(_ADAPTER_WAIT_S)
        return [out]

    def wake(self) -> None:
        pass

    def check_adapter(self, lora_request: LoRARequest) -> None:
        self.core.check_adapter(lora_request)

    def add_lora(self, lora_request: LoRARequest) -> bool:
        return self.core.add_lora(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        return self.core.remove_lora(lora_id)

    def pin_lora(self, lora_id: int) -> bool:
        return self.core.pin_lora(lora_id)

    def list_loras(self) -> set[int]:
        return self.core.list_loras()

    def get_load(self) -> EngineLoad:
        return self.core.get_load()

    def get_timings(self) -> dict[str, float]:
        return self.core.get_timings()

    def get_kernel_config(self) -> dict[str, Any]:
        return self.core.get_kernel_config()

    def shutdown(self) -> None:
        # The adapter loader is a daemon thread; tensor-parallel ranks are processes.
        self.core.runner.shutdown()


# Items of MPClient's output queue besides EngineCoreOutputs.
_WAKE = object()
_DEAD = object()


@dataclass
class _Shared:
    """What the reader thread and the client share. The thread holds this, not the client,
    so that dropping the client finalizes it (and stops the core)."""

    outputs: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    futures: dict[int, Future[Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Held around every join/is_alive of the process: two threads polling one child race on
    # waitpid, and the loser may see it alive (or its exit code unknown) for ever after.
    reap_lock: threading.Lock = field(default_factory=threading.Lock)
    dead: EngineDead | None = None
    closing: bool = False
    load: EngineLoad = field(default_factory=lambda: EngineLoad(0, 0, 0.0))
    lora_ids: frozenset[int] = frozenset()


class MPClient:
    """The core in a spawned process. Messages go out on one pipe from the calling thread;
    a reader thread decodes what comes back (step outputs into a queue, utility results
    into their futures) and turns the process's end into ``EngineDead`` for everyone."""

    def __init__(self, engine_args: EngineArgs, config: EngineConfig, log_stats: bool) -> None:
        from engine.core_proc import encode_engine_args, run_engine_core

        self.config = config
        ctx = multiprocessing.get_context("spawn")  # fork would copy CUDA state and threads
        core_input, self._input = ctx.Pipe(duplex=False)
        self._output, core_output = ctx.Pipe(duplex=False)
        level = logging.getLogger("lorastream").getEffectiveLevel()
        self.process: BaseProcess = ctx.Process(
            target=run_engine_core,
            args=(encode_engine_args(engine_args), log_stats, level, core_input, core_output),
            name="lorastream-engine-core",
            daemon=True,
        )
        self.process.start()
        # Only the child may hold its ends: then its death is EOF here, and ours EOF there.
        core_input.close()
        core_output.close()
        self._shared = _Shared()
        self._send_lock = threading.Lock()
        self._call_ids = itertools.count()
        self._ids = itertools.count()
        # The caller's request id ↔ the core's: a caller may reuse an id as soon as its
        # request finished here, while the core may still send outputs for the old one.
        self._id_lock = threading.Lock()
        self._to_core: dict[str, str] = {}
        self._from_core: dict[str, str] = {}
        self._finalizer = weakref.finalize(
            self, _stop_core, self.process, self._input, self._send_lock, self._shared
        )
        self.ready = self._wait_ready()
        self.module_shapes = (
            {k: tuple(v) for k, v in self.ready.module_shapes.items()}
            if self.ready.module_shapes is not None
            else None
        )
        self._reader = threading.Thread(
            target=_read_outputs,
            args=(self._output, self.process, self._shared),
            name="lorastream-core-reader",
            daemon=True,
        )
        self._reader.start()

    def _wait_ready(self) -> CoreReady:
        try:
            ready = wait([self._output, self.process.sentinel])
            if self._output not in ready:
                raise EOFError
            message = decode(self._output.recv_bytes())
        except (EOFError, OSError):
            self.process.join(timeout=_STOP_TIMEOUT_S)
            self.shutdown()
            raise EngineDead(
                f"the engine core process exited during start-up (exit code {self.process.exitcode})"
            ) from None
        if isinstance(message, CoreFailed):
            self.shutdown()
            raise message.error
        if not isinstance(message, CoreReady) or message.protocol_version != PROTOCOL_VERSION:
            self.shutdown()
            raise EngineDead(f"the engine core answered {message!r} instead of ready")
        return message

    # ---------------------------------------------------------------- requests
    def add_request(self, request: Request) -> None:
        # The scheduler's check, here so that it still raises at add_request.
        check_prompt_fits(
            request.num_prompt_tokens, self.config.cache.block_size, self.ready.num_blocks
        )
        with self._id_lock:
            core_id = str(next(self._ids))
            self._to_core[request.request_id] = core_id
            self._from_core[core_id] = request.request_id
        self._send(AddRequest.of(request, core_id))

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        with self._id_lock:
            core_ids = [c for i in request_ids if (c := self._to_core.pop(i, None)) is not None]
            for c in core_ids:
                del self._from_core[c]
        if core_ids:
            # A dead core holds nothing to abort: the front has finished the requests already.
            with contextlib.suppress(EngineDead):
                self._send(AbortRequests(core_ids))

    def get_outputs(self, block: bool) -> list[EngineCoreOutputs]:
        shared = self._shared
        items: list[Any] = []
        if block:
            items.append(shared.outputs.get())  # the reader always ends with _DEAD
        while True:
            try:
                items.append(shared.outputs.get_nowait())
            except queue.Empty:
                break
        if any(item is _DEAD for item in items):
            shared.outputs.put(_DEAD)  # every later call fails too
            assert shared.dead is not None
            raise shared.dead
        batches = [item for item in items if isinstance(item, EngineCoreOutputs)]
        with self._id_lock:
            for batch in batches:
                # Outputs of requests finished here meanwhile get an id nobody knows ("").
                from_core = self._from_core
                batch.request_ids = [from_core.get(c, "") for c in batch.request_ids]
                for i, reason in enumerate(batch.finish_reasons):
                    if reason is not None and batch.request_ids[i]:
                        self._forget(batch.request_ids[i])
                for f in batch.failed:
                    f.request_id = from_core.get(f.request_id, "")
                    if f.request_id:
                        self._forget(f.request_id)
        return batches

    def _forget(self, request_id: str) -> None:
        del self._from_core[self._to_core.pop(request_id)]

    def wake(self) -> None:
        self._shared.outputs.put(_WAKE)

    # ---------------------------------------------------------------- adapters
    def check_adapter(self, lora_request: LoRARequest) -> None:
        """The adapter-config check of ``LoRAManager.check_adapter``, in the front: JSON only,
        skipped for adapters the core holds (ids name adapters)."""
        if self.config.lora is None:
            raise InvalidRequest(LORA_DISABLED)
        if lora_request.lora_int_id in self._shared.lora_ids:
            return
        read_adapter_config(lora_request.lora_path, self.config.lora, self.module_shapes)

    def add_lora(self, lora_request: LoRARequest) -> bool:
        return bool(self._call("add_lora", lora_request))

    def remove_lora(self, lora_id: int) -> bool:
        return bool(self._call("remove_lora", lora_id))

    def pin_lora(self, lora_id: int) -> bool:
        return bool(self._call("pin_lora", lora_id))

    def list_loras(self) -> set[int]:
        return set(self._call("list_loras"))

    def get_load(self) -> EngineLoad:
        return self._shared.load

    def get_timings(self) -> dict[str, float]:
        return dict(self._call("timings"))

    def get_kernel_config(self) -> dict[str, Any]:
        return dict(self._call("kernel_config"))

    # ---------------------------------------------------------------- plumbing
    def _call(self, method: str, *args: Any) -> Any:
        shared = self._shared
        future: Future[Any] = Future()
        with shared.lock:
            if shared.dead is not None:
                raise shared.dead
            call_id = next(self._call_ids)
            shared.futures[call_id] = future
        self._send(UtilityCall(call_id, method, list(args)))
        return future.result()

    def _send(self, message: Any) -> None:
        data = encode(message)
        shared = self._shared
        with self._send_lock:
            if shared.dead is not None:
                raise shared.dead
            try:
                self._input.send_bytes(data)
            except (OSError, ValueError) as e:  # the core is gone (or we shut it down)
                raise shared.dead or EngineDead(f"the engine core process is gone ({e})") from e

    @property
    def is_alive(self) -> bool:
        return self._shared.dead is None

    def shutdown(self) -> None:
        """Stop the core process (idempotent); pending and later calls raise ``EngineDead``."""
        self._finalizer()


def _read_outputs(conn: Connection, process: BaseProcess, shared: _Shared) -> None:
    """The front's reader thread: until the core's end of the pipe closes."""
    failure: LoRAStreamError | None = None
    try:
        while True:
            try:
                message = decode(conn.recv_bytes())
            except (EOFError, OSError):
                break
            if isinstance(message, EngineCoreOutputs):
                s = message.stats
                shared.load = EngineLoad(s.num_waiting, s.num_running, s.kv_cache_usage)
                shared.lora_ids = frozenset(s.lora_ids)
                shared.outputs.put(message)
            elif isinstance(message, UtilityResult):
                with shared.lock:
                    future = shared.futures.pop(message.call_id, None)
                if future is not None:
                    if message.error is not None:
                        future.set_exception(message.error)
                    else:
                        future.set_result(message.result)
            elif isinstance(message, CoreFailed):
                failure = message.error  # the process exits next
    except Exception as e:
        logger.exception("engine core reader failed")
        failure = failure or LoRAStreamError(f"{type(e).__name__}: {e}")
    finally:
        conn.close()
        with shared.reap_lock:
            process.join(timeout=_STOP_TIMEOUT_S)
        if shared.closing:
            dead = EngineDead("the engine was shut down")
        else:
            why = f": {failure.message}" if failure is not None else ""
            dead = EngineDead(f"the engine core process died (exit code {process.exitcode}){why}")
            logger.error("%s", dead.message)
        with shared.lock:
            shared.dead = shared.dead or dead
            futures, shared.futures = shared.futures, {}
        for future in futures.values():
            future.set_exception(shared.dead)
        shared.outputs.put(_DEAD)


def _stop_core(
    process: BaseProcess, conn: Connection, send_lock: threading.Lock, shared: _Shared
) -> None:
    """Ask the core to stop, close its input (EOF stops it too), then make sure it is gone."""
    shared.closing = True
    with send_lock:
        with contextlib.suppress(OSError, ValueError):
            conn.send_bytes(encode(Shutdown()))
        conn.close()
    with shared.reap_lock:
        process.join(timeout=_STOP_TIMEOUT_S)
        if process.is_alive():
            logger.warning(
                "engine core did not stop within %.0f s; terminating it", _STOP_TIMEOUT_S
            )
            process.terminate()
            process.join(timeout=_STOP_TIMEOUT_S)
        if process.is_alive():
            process.kill()
            process.join()
