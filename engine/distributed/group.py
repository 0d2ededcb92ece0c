"""The tensor-parallel process group: the collectives the sharded model runs.

One ``TPGroup`` per rank process, made from a process group constructed directly (NCCL on
CUDA, gloo on CPU) rather than through ``torch.distributed.init_process_group``: rank 0 is
the engine core's own process, which may be a user's program with a default group of its
own, and two engines in one process must not share global state.

Every collective blocks the host on gloo and is enqueued on the current stream on NCCL
(capturable in CUDA graphs). A peer that dies makes gloo fail the pending collective at
once ("Connection closed by peer"); NCCL would wait, so ``abort`` (called by the rank
monitor, ``engine.distributed.executor``) breaks the communicator.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger("lorastream.distributed")

COLLECTIVE_TIMEOUT_S = 300.0
"""Longest a collective may wait for a live but stuck peer (a dead one fails at once on
gloo, and is aborted by the rank monitor on NCCL). Generous: a rank's first step may load
adapters from disk or compile kernels while the others wait for it."""


class TPGroup:
    """``rank`` of ``world_size`` ranks; collectives over ``pg`` (a gloo or NCCL backend). A group of one rank
    (``TPGroup.single()``) runs no collective at all."""

    def __init__(self, rank: int, world_size: int, pg: Any) -> None:
        self.rank = rank
        self.world_size = world_size
        self.pg = pg

    @classmethod
    def single(cls) -> TPGroup:
        return cls(0, 1, None)

    @classmethod
    def create(
        cls,
        store_path: str,
        rank: int,
        world_size: int,
        device: torch.device,
        timeout_s: float = COLLECTIVE_TIMEOUT_S,
    ) -> TPGroup:
        """Join the group whose rendezvous is the file ``store_path`` (every rank passes the
        same path); returns when all ``world_size`` ranks have joined."""
        store = dist.FileStore(store_path, world_size)
        timeout = datetime.timedelta(seconds=timeout_s)
        pg: Any
        if device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
        else:
            pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        group = cls(rank, world_size, pg)
        # A first collective: every rank has joined and the transport works.
        group.all_reduce(torch.zeros(1, device=device))
        return group

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over ranks, in place; returns it."""
        if self.pg is not None:
            self.pg.allreduce([x]).wait()
        return x

    def all_reduce_min(self, x: torch.Tensor) -> torch.Tensor:
        if self.pg is not None:
            opts = dist.AllreduceOptions()
            opts.reduceOp = dist.ReduceOp(dist.ReduceOp.MIN)
            self.pg.allreduce([x], opts).wait()
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, ...] -> [world, T, ...], rank i's x at index i."""
        if self.pg is None:
            return x.unsqueeze(0)
        x = x.contiguous()
        out = x.new_empty(self.world_size * x.shape[0], *x.shape[1:])
        self.pg._allgather_base(out, x).wait()
        return out.view(self.world_size, *x.shape)

    def gather_to_leader(self, x: torch.Tensor) -> torch.Tensor | None:
        """x: [N, ...] -> on rank 0 [world, N, ...] (rank i's x at index i); None elsewhere."""
        if self.pg is None:
            return x.unsqueeze(0)
        x = x.contiguous()
        opts = dist.GatherOptions()
        opts.rootRank = 0
        if self.rank != 0:
            self.pg.gather([], [x], opts).wait()
            return None
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        self.pg.gather([parts], [x], opts).wait()
        return torch.stack(parts)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` into every rank's ``x`` (same shape and dtype everywhere)."""
        if self.pg is not None:
            opts = dist.BroadcastOptions()
            opts.rootRank = 0
            self.pg.broadcast([x], opts).wait()
        return x

    def abort(self) -> None:
        """Break the communicator so that pending and later collectives fail instead of
        waiting for a dead peer (NCCL; gloo fails by itself)."""
        pg = self.pg
        if pg is None:
            return
        abort = getattr(pg, "abort", None)
        if abort is None:
            return
        try:
            abort()
        except Exception:  # already broken, or a backend without abort: nothing to break
            logger.debug("aborting the tensor-parallel group failed", exc_info=True)
