"""The engine-core process (``enable_multiprocessing=True``): an ``EngineCore`` running its
step loop back to back while it has work, fed and drained through two one-way pipes.

Three threads, so that pipe I/O and (de)serialization never wait on a step and a step never
waits on the pipe: an input thread reads and decodes messages into a queue, the main thread
applies them between steps and steps, an output thread encodes and writes the outputs.
Nothing in here tokenizes or detokenizes: the front does that in the caller's process.

The process never outlives its parent: when the parent's end of the input pipe closes
(shutdown, exit, crash, SIGKILL) the input thread sees EOF and the loop stops; if the loop
is stuck, the process exits anyway after a grace period.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, NoReturn

import torch

from engine.config import EngineArgs
from engine.core_messages import (
    PROTOCOL_VERSION,
    AbortRequests,
    AddRequest,
    CoreFailed,
    CoreReady,
    EngineCoreOutputs,
    Shutdown,
    UtilityCall,
    UtilityResult,
    as_error,
    decode,
    encode,
)
from engine.engine_core import EngineCore

logger = logging.getLogger("lorastream.engine_core")

# Seconds the step loop gets to stop after the parent went away before the process exits.
_EXIT_GRACE_S = 10.0
# While requests wait and nothing could be scheduled (an adapter loading from disk), wait
# this long for a message between steps instead of spinning.
_IDLE_POLL_S = 0.002


def encode_engine_args(args: EngineArgs) -> bytes:
    """EngineArgs as msgpack (plain values only): what the spawned core builds its config from."""
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if f.name == "lora_modules":
            value = [f"{m.name}={m.path}" for m in value]
        elif f.name == "lora_dtype" and not isinstance(value, str):
            value = str(value).removeprefix("torch.")
        elif isinstance(value, os.PathLike):
            value = os.fspath(value)
        fields[f.name] = value
    return encode(fields)


def decode_engine_args(data: bytes) -> EngineArgs:
    return EngineArgs(**decode(data))


def run_engine_core(
    engine_args: bytes,
    log_stats: bool,
    log_level: int,
    input_conn: Connection,
    output_conn: Connection,
) -> None:
    """The child's entry point (``multiprocessing`` spawn target)."""
    # Ctrl-C reaches the whole process group: the parent decides when the core stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=log_level, format="%(asctime)s %(levelname)s [engine-core] %(name)s: %(message)s"
    )
    try:
        config = decode_engine_args(engine_args).create_engine_config()
        _share_cores(config.device)
        core = EngineCore(config, log_stats=log_stats)
    except BaseException as e:
        logger.exception("engine core failed to start")
        output_conn.send_bytes(encode(CoreFailed(as_error(e))))
        _exit(1)
    shapes = core.module_shapes()
    ready = CoreReady(
        protocol_version=PROTOCOL_VERSION,
        num_blocks=core.runner.num_blocks,
        module_shapes={k: list(v) for k, v in shapes.items()} if shapes is not None else None,
    )
    output_conn.send_bytes(encode(ready))
    _exit(EngineCoreProc(core, input_conn, output_conn).run())


def _share_cores(device: torch.device) -> None:
    """On CPU, leave one core to the front process. Its threads (detokenizing, the event
    loop) run all the time; a core whose intra-op threads want every core then waits at
    each parallel region's barrier for a thread the OS has parked, and a step took seconds
    (2 cores: 30 times slower). ``OMP_NUM_THREADS``, when set, decides instead."""
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))


def _exit(code: int) -> NoReturn:
    """Leave without interpreter teardown. Everything the front needs has been written;
    tearing torch down in this process can abort in a C++ static destructor (seen on CPU
    about once in fifteen exits: SIGABRT, "terminate called without an active exception"),
    which would turn a clean shutdown into a crash report."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class EngineCoreProc:
    def __init__(self, core: EngineCore, input_conn: Connection, output_conn: Connection) -> None:
        self.core = core
        self.input_conn = input_conn
        self.output_conn = output_conn
        self.inputs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.outputs: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def run(self) -> int:
        """The step loop until Shutdown or EOF; returns the process's exit code."""
        threading.Thread(target=self._read_inputs, name="core-input", daemon=True).start()
        writer = threading.Thread(target=self._write_outputs, name="core-output", daemon=True)
        writer.start()
        code = 0
        try:
            self._loop()
        except BaseException as e:
            logger.exception("engine core step loop died")
            self.outputs.put(CoreFailed(as_error(e)))
            code = 1
        finally:
            self.outputs.put(None)
            writer.join(timeout=_EXIT_GRACE_S)
            self.core.close()
        return code

    def _loop(self) -> None:
        core = self.core
        idle_wait = False
        while True:
            if core.has_unfinished_requests():
                timeout: float | None = _IDLE_POLL_S if idle_wait else 0.0
            else:
                timeout = None  # nothing to do until a message comes
            applied = self._apply_inputs(timeout)
            if applied is None:
                return
            # A step runs when there is work, and also after messages that left none (the
            # last requests aborted): its stats tell the front the core is idle, else
            # free_capacity would go on seeing the load of the last busy step.
            if not (core.has_unfinished_requests() or applied):
                continue
            out = core.step()
            manager = core.lora_manager
            if manager is not None:
                out.stats.lora_ids = manager.list_loras()
            idle_wait = out.stats.num_scheduled_tokens == 0
            if out.request_ids or out.failed or not idle_wait or applied:
                self.outputs.put(out)

    def _apply_inputs(self, timeout: float | None) -> int | None:
        """Apply every queued message, waiting up to ``timeout`` (None: forever) for the
        first one. Returns how many were applied; None once a Shutdown came."""
        try:
            message = (
                self.inputs.get(timeout=timeout) if timeout != 0.0 else self.inputs.get_nowait()
            )
        except queue.Empty:
            return 0
        applied = 0
        while True:
            if isinstance(message, Shutdown):
                return None
            self._apply(message)
            applied += 1
            try:
                message = self.inputs.get_nowait()
            except queue.Empty:
                return applied

    def _apply(self, message: Any) -> None:
        core = self.core
        if isinstance(message, AddRequest):
            request = message.to_request()
            try:
                core.add_request(request)
            except Exception as e:  # the front checked what it could; the rest fails one request
                core.fail_request(message.request_id, as_error(e))
        elif isinstance(message, AbortRequests):
            core.abort_requests(message.request_ids)
        elif isinstance(message, UtilityCall):
            self.outputs.put(self._call(message))
        else:
            logger.error("engine core: unexpected message %r", type(message).__name__)

    def _call(self, call: UtilityCall) -> UtilityResult:
        methods: dict[str, Callable[..., Any]] = {
            "add_lora": self.core.add_lora,
            "remove_lora": self.core.remove_lora,
            "pin_lora": self.core.pin_lora,
            "list_loras": self.core.list_loras,
            "timings": self.core.get_timings,
            "kernel_config": self.core.get_kernel_config,
        }
        try:
            method = methods[call.method]
            return UtilityResult(call.call_id, method(*call.args))
        except Exception as e:
            return UtilityResult(call.call_id, None, as_error(e))

    def _read_inputs(self) -> None:
        try:
            while True:
                self.inputs.put(decode(self.input_conn.recv_bytes()))
        except (EOFError, OSError):
            pass  # the parent closed its end or is gone
        except Exception:
            logger.exception("engine core: bad message from the front")
        self.inputs.put(Shutdown())
        # Should the step loop not stop in time, the process still must not outlive the parent.
        timer = threading.Timer(_EXIT_GRACE_S, os._exit, args=(1,))
        timer.daemon = True
        timer.start()

    def _write_outputs(self) -> None:
        while True:
            message = self.outputs.get()
            if message is None:
                return
            if isinstance(message, EngineCoreOutputs | UtilityResult | CoreFailed):
                try:
                    self.output_conn.send_bytes(encode(message))
                except (BrokenPipeError, OSError):
                    return  # the front is gone; the input thread sees EOF and stops the loop
