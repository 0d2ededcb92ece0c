"""A tensor-parallel rank process (ranks 1..N-1): ``python -m engine.distributed.worker``.

Started by ``engine.distributed.ranks``; reads ``WorkerStart`` and then rank 0's steps from
stdin. It never outlives rank 0: stdin's EOF, a failed collective (rank 0's socket closed)
or a change of parent process ends it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import NoReturn

import torch

from engine.distributed.group import TPGroup
from engine.distributed.messages import WorkerStart, decode_config, read_message
from engine.distributed.ranks import started_path

logger = logging.getLogger("lorastream.distributed")


def main() -> NoReturn:
    channel = sys.stdin.buffer
    start = read_message(channel)
    if not isinstance(start, WorkerStart):
        raise SystemExit(f"expected WorkerStart, got {type(start).__name__}")
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s [tp-rank{start.rank}] %(name)s: %(message)s",
    )
    _exit_with_parent()
    config = decode_config(start.config, start.rank)
    if config.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # The ranks share the host's cores.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // start.world_size))
    if config.device.type == "cuda":
        torch.cuda.set_device(config.device)
    import torch.distributed as dist

    dist.FileStore(started_path(start.store_path), start.world_size).set(
        f"started/{start.rank}", "1"
    )
    group = TPGroup.create(start.store_path, start.rank, start.world_size, config.device)

    from engine.distributed.runner import TPModelRunner

    code = 0
    try:
        runner = TPModelRunner(config, group)
        runner.follow(channel)
    except EOFError:
        logger.info("rank 0 is gone: stopping")
        code = 1
    except BaseException:
        logger.exception("tensor-parallel rank %d failed", start.rank)
        code = 1
    _exit(code)


def _exit_with_parent() -> None:
    """Exit when rank 0's process is gone, even while blocked in a collective."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        _exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _exit(code: int) -> NoReturn:
    # No interpreter teardown: torch's static destructors can abort (see engine.core_proc).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
