"""Rank 0's side of the other rank processes: start them, feed them, watch them, stop them.

Ranks 1..N-1 run ``python -m engine.distributed.worker`` as child processes of the engine
core (plain subprocesses: nothing is pickled, and a user's script is never re-imported).
Each one's stdin is its message channel (``engine.distributed.messages``); its stdout and
stderr are the core's, so its logs and tracebacks show where the core's do.

Liveness, both ways, so that a dead rank ends the engine with an error instead of a hang:

- a monitor thread waits on every child; when one exits while the engine runs, it records
  which and how, aborts the device group (NCCL would otherwise wait for the dead peer
  forever) and kills the other children (their gloo sockets close, so a collective rank 0
  is blocked in fails at once). ``dead`` then holds the ``TensorParallelRankDied`` error
  every later call raises;
- a child exits when its stdin reaches EOF (rank 0 exited or died) or its parent process
  changes (``engine.distributed.worker``).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.distributed.group import TPGroup
from engine.distributed.messages import (
    Message,
    Stop,
    WorkerStart,
    encode_config,
    write_message,
)
from engine.errors import TensorParallelRankDied

logger = logging.getLogger("lorastream.distributed")

STARTUP_TIMEOUT_S = 300.0
"""Longest the other ranks may take to start and join the group (importing torch on a
loaded machine, not loading the model: that happens after)."""

_POLL_S = 0.05


def started_path(store_path: str) -> str:
    """The file where the other ranks say they started (``RankProcesses.join_group``)."""
    return store_path + ".started"


class RankProcesses:
    """Ranks 1..N-1 of an engine whose rank 0 is this process."""

    def __init__(self, config: EngineConfig, on_shutdown: Callable[[], None] | None = None) -> None:
        self.world_size = config.parallel.tensor_parallel_size
        self._on_shutdown = on_shutdown
        self._tmp = tempfile.mkdtemp(prefix="lorastream-tp-")
        self.store_path = os.path.join(self._tmp, "store")
        self.dead: TensorParallelRankDied | None = None
        self.group: TPGroup | None = None
        self._stopping = False
        self._lock = threading.Lock()
        root = str(Path(__file__).resolve().parents[2])  # the directory holding ``engine``
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.procs: list[subprocess.Popen[bytes]] = []
        payload = encode_config(config)
        try:
            for rank in range(1, self.world_size):
                proc = subprocess.Popen(
                    [sys.executable, "-m", "engine.distributed.worker"],
                    stdin=subprocess.PIPE,
                    env=env,
                )
                self.procs.append(proc)
                start = WorkerStart(rank, self.world_size, self.store_path, payload)
                self._write(rank, start)
        except BaseException:
            self.shutdown()
            raise
        for rank, proc in enumerate(self.procs, start=1):
            threading.Thread(
                target=self._watch, args=(rank, proc), name=f"lorastream-tp-rank{rank}", daemon=True
            ).start()

    def join_group(self, device: torch.device) -> TPGroup:
        """Join the device group as rank 0 once every other rank has started; raises
        ``TensorParallelRankDied`` if one exits first."""
        import torch.distributed as dist

        # Its own file: a FileStore removes its file once as many instances as the group has
        # ranks are gone, so the group's rendezvous file must serve one instance per rank.
        store = dist.FileStore(started_path(self.store_path), self.world_size)
        keys = [f"started/{r}" for r in range(1, self.world_size)]
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not store.check(keys):
            self.check()
            if time.monotonic() > deadline:
                raise TensorParallelRankDied(
                    f"the other tensor-parallel ranks did not start within {STARTUP_TIMEOUT_S:.0f} s"
                )
            time.sleep(_POLL_S)
        del store
        self.group = TPGroup.create(self.store_path, 0, self.world_size, device)
        return self.group

    def send(self, message: Message) -> None:
        """``message`` to every other rank, in rank order."""
        for rank in range(1, self.world_size):
            self._write(rank, message)

    def _write(self, rank: int, message: Message) -> None:
        stdin = self.procs[rank - 1].stdin
        assert stdin is not None
        try:
            write_message(stdin, message)
        except (BrokenPipeError, OSError, ValueError) as e:
            self.wait_for_death(5.0)
            self.check()
            raise TensorParallelRankDied(
                f"tensor-parallel rank {rank} stopped reading its messages ({e})"
            ) from e

    def check(self) -> None:
        """Raise the error of a rank that died, if one did."""
        if self.dead is not None:
            raise self.dead

    def wait_for_death(self, timeout: float) -> TensorParallelRankDied | None:
        """After a failed collective: wait up to ``timeout`` s for the monitor to see the
        rank that caused it exit (its socket closes a moment before its exit is reaped)."""
        deadline = time.monotonic() + timeout
        while self.dead is None and time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                deadline = min(deadline, time.monotonic() + 1.0)
            time.sleep(_POLL_S)
        return self.dead

    def _watch(self, rank: int, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()
        with self._lock:
            if self._stopping or self.dead is not None:
                return
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited ({code})"
            self.dead = TensorParallelRankDied(
                f"tensor-parallel rank {rank} (pid {proc.pid}) {how}: the engine cannot "
                "continue without it; restart the engine"
            )
        logger.error("%s", self.dead.message)
        if self.group is not None:
            self.group.abort()
        for other in self.procs:
            if other is not proc and other.poll() is None:
                other.kill()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the other ranks (idempotent): a ``Stop`` message, then kill what is left."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        for rank, proc in enumerate(self.procs, start=1):
            if proc.poll() is None and proc.stdin is not None:
                try:
                    write_message(proc.stdin, Stop())
                    proc.stdin.close()
                except (OSError, ValueError):
                    logger.debug("rank %d: its channel is closed already", rank)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self._tmp, ignore_errors=True)
        if self._on_shutdown is not None:
            self._on_shutdown()
