"""``TPModelRunner``: the model runner of one tensor-parallel rank.

Rank 0 is the engine core's runner: its scheduler and adapter manager decide each step
once, and ``launch`` runs as on one device, with two additions (``_before_forward`` and
``_sample``): before the forward pass it sends the other ranks the step's plan
(``StepPlan``: the adapter calls and slots, the packed inputs, the graph, the logits rows),
and after sampling it broadcasts the sampled tokens the next step's placeholders read.
Ranks 1..N-1 run ``follow``: each plan is replayed through the same methods (``place`` the
adapters, ``_eager_inputs`` or ``_load_graph_inputs``, the model, ``compute_logits`` on the
same rows), so every rank issues the same collectives in the same order.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable
from typing import IO

import numpy as np
import torch

from engine.config import EngineConfig, LoRAConfig
from engine.core.scheduler import ScheduledRequest, SchedulerOutput
from engine.distributed.group import TPGroup
from engine.distributed.messages import (
    LoRACall,
    StepPlan,
    StepTokens,
    Stop,
    read_message,
)
from engine.distributed.ranks import RankProcesses
from engine.errors import TensorParallelRankDied
from engine.lora.manager import LoRAManager
from engine.lora.sharded import LoRAOp, ShardedLoRAManager
from engine.model.llama import LlamaForCausalLM
from engine.model.parallel import load_sharded_model
from engine.sampling.sampler import SampledTokens
from engine.sequence import Request
from engine.worker.model_runner import (
    _PROMPT_LOGPROBS_ROWS,
    ModelRunner,
    PackedInputs,
    StepHandle,
    _Graph,
    prompt_logprob_rows,
)

logger = logging.getLogger("lorastream.distributed")

# A step's tokens are read by the next step's placeholders only; a few are kept for a step
# launched behind a deferred one.
_KEPT_TOKENS = 4


def make_model_runner(config: EngineConfig) -> ModelRunner:
    """One device's ``ModelRunner``, or rank 0's ``TPModelRunner`` with ranks 1..N-1 started."""
    if config.parallel.tensor_parallel_size == 1:
        return ModelRunner(config)
    threads = torch.get_num_threads()
    if config.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # The ranks share the host's cores (each of the others takes its share too): a rank
        # whose intra-op threads want every core waits for threads the OS parked for them.
        # Restored at shutdown: this is the caller's process.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.parallel.tensor_parallel_size))
    ranks = RankProcesses(config, on_shutdown=lambda: torch.set_num_threads(threads))
    try:
        group = ranks.join_group(config.device)
        return TPModelRunner(config, group, ranks)
    except BaseException as e:
        dead = ranks.wait_for_death(5.0) if not isinstance(e, TensorParallelRankDied) else None
        ranks.shutdown()
        if dead is not None:
            raise dead from e
        raise


class TPModelRunner(ModelRunner):
    def __init__(
        self, config: EngineConfig, group: TPGroup, ranks: RankProcesses | None = None
    ) -> None:
        self.group = group
        self.ranks = ranks
        self._seq = 0  # the step being launched (rank 0)
        self._sampling_seq = 0  # the step whose tokens ``_sample`` samples (rank 0)
        self._step_of: weakref.WeakKeyDictionary[StepHandle, int] = weakref.WeakKeyDictionary()
        self._tokens: dict[int, torch.Tensor] = {}  # step -> sampled tokens (ranks > 0)
        super().__init__(config)
        if ranks is not None:
            self._finalizer = weakref.finalize(self, ranks.shutdown)

    # ---------------------------------------------------------------- construction
    def _load_model(self) -> LlamaForCausalLM:
        return load_sharded_model(self.config, self.group)

    def _make_lora_manager(self, lora_config: LoRAConfig) -> LoRAManager:
        return ShardedLoRAManager(lora_config, self.model.lora_layers(), self.device)

    def _determine_num_blocks(self) -> int:
        # Every rank must hold the same blocks: the smallest any rank can afford.
        num = torch.tensor([super()._determine_num_blocks()], dtype=torch.int64)
        return int(self.group.all_reduce_min(num.to(self.device)).item())

    def _warm_up_lora(self) -> None:
        """Nothing ahead of time: the sharded layers' kernels compile at their first step."""

    # ---------------------------------------------------------------- rank 0
    def launch(self, sched: SchedulerOutput, previous: StepHandle | None = None) -> StepHandle:
        self._check_alive()
        try:
            handle = super().launch(sched, previous)
        except Exception as e:
            raise self._rank_death(e) from e
        self._step_of[handle] = self._seq
        return handle

    def sample_deferred(self, handle: StepHandle) -> None:
        self._check_alive()
        self._sampling_seq = self._step_of.get(handle, -1)
        try:
            super().sample_deferred(handle)
        except Exception as e:
            raise self._rank_death(e) from e

    def _before_forward(
        self,
        scheduled: list[ScheduledRequest],
        packed: PackedInputs,
        graph: _Graph | None,
        previous: StepHandle | None,
    ) -> None:
        assert self.ranks is not None, "only rank 0 launches steps"
        self._seq += 1
        self._sampling_seq = self._seq
        manager = self.lora_manager
        calls: list[LoRAOp] = []
        slot_ids: list[int] = []
        if isinstance(manager, ShardedLoRAManager):
            calls = manager.take_ops()
            slot_ids = manager.slot_ids()
        lora = packed.token_slots_lora
        self.ranks.send(
            StepPlan(
                seq=self._seq,
                prev_seq=self._step_of.get(previous, -1) if previous is not None else -1,
                lora_calls=[LoRACall(c.kind, c.lora_id, c.name, c.path) for c in calls],
                slot_ids=slot_ids,
                stage=self._stage_np[: packed.total].tobytes(),
                token_slots_lora=None if lora is None else lora.astype(np.int64).tobytes(),
                num_tokens=packed.num_tokens,
                num_seqs=packed.num_seqs,
                num_real_seqs=packed.num_real_seqs,
                num_real_tokens=packed.num_real_tokens,
                width=packed.width,
                num_logits=packed.num_logits,
                max_seq_len=packed.max_seq_len,
                fills_offset=packed.fills_offset,
                num_fills=packed.num_fills,
                graph_size=0 if graph is None else graph.hidden.shape[0],
                graph_mixed=graph is not None and graph.mixed,
                prompt_rows=prompt_logprob_rows(scheduled, packed)[1],
            )
        )

    def _sample(
        self,
        logits: torch.Tensor,
        reqs: list[Request],
        previous: StepHandle | None,
        masks: tuple[list[int], torch.Tensor] | None = None,
        num_outputs: list[int] | None = None,
    ) -> SampledTokens:
        tokens = super()._sample(logits, reqs, previous, masks, num_outputs)
        assert self.ranks is not None
        ids = tokens.token_ids
        self.ranks.send(StepTokens(self._sampling_seq, int(ids.shape[0])))
        self.group.broadcast(ids if ids.dtype == torch.int64 else ids.to(torch.int64))
        return tokens

    def synthetic_decode(
        self, batch_size: int, context_len: int, lora_slots: list[int] | None = None
    ) -> tuple[Callable[[], None], Callable[[], torch.Tensor]]:
        # The other ranks would never replay their part of it: the collectives would hang.
        raise NotImplementedError(
            "synthetic_decode runs at tensor_parallel_size 1 only; benchmarks/bench_tp.py "
            "measures tensor-parallel steps through the engine"
        )

    def _check_alive(self) -> None:
        if self.ranks is not None:
            self.ranks.check()

    def _rank_death(self, error: Exception) -> Exception:
        """``error`` itself, or the death of a rank that caused it."""
        if isinstance(error, TensorParallelRankDied) or self.ranks is None:
            return error
        if isinstance(error, RuntimeError):
            dead = self.ranks.wait_for_death(5.0)
            if dead is not None:
                return dead
        return error

    def shutdown(self) -> None:
        if self.ranks is not None:
            self.ranks.shutdown()

    # ---------------------------------------------------------------- ranks 1..N-1
    def follow(self, channel: IO[bytes]) -> None:
        """Run rank 0's steps as they come, until ``Stop`` (or EOF: rank 0 is gone)."""
        while True:
            message = read_message(channel)
            if isinstance(message, Stop):
                return
            if isinstance(message, StepTokens):
                ids = torch.empty(message.num, dtype=torch.int64, device=self.device)
                self._tokens[message.seq] = self.group.broadcast(ids)
                for old in [s for s in self._tokens if s <= message.seq - _KEPT_TOKENS]:
                    del self._tokens[old]
            elif isinstance(message, StepPlan):
                self._run_plan(message)
            else:
                raise RuntimeError(f"unexpected message {type(message).__name__} from rank 0")

    @torch.inference_mode()
    def _run_plan(self, plan: StepPlan) -> None:
        manager = self.lora_manager
        if isinstance(manager, ShardedLoRAManager):
            manager.apply_ops([LoRAOp(c.kind, c.lora_id, c.name, c.path) for c in plan.lora_calls])
            manager.place(plan.slot_ids)
        packed = self._unpack(plan)
        fills = self._tokens[plan.prev_seq] if plan.num_fills else None
        if plan.graph_size:
            graphs = self.mixed_graphs if plan.graph_mixed else self.graphs
            graph = graphs[plan.graph_size]
            logits_rows = self._load_graph_inputs(packed, graph, fills)
            graph.graph.replay()
            hidden = graph.hidden
        else:
            batch, logits_rows = self._eager_inputs(packed, fills)
            hidden = self.model(batch)
        # The same compute_logits calls as rank 0's, on the same rows: each gathers.
        rows = torch.tensor(plan.prompt_rows, dtype=torch.int64, device=self.device)
        for a in range(0, len(rows), _PROMPT_LOGPROBS_ROWS):
            self.model.compute_logits(hidden.index_select(0, rows[a : a + _PROMPT_LOGPROBS_ROWS]))
        if plan.num_logits:
            self.model.compute_logits(hidden.index_select(0, logits_rows))

    def _unpack(self, plan: StepPlan) -> PackedInputs:
        stage = np.frombuffer(plan.stage, dtype=np.int64)
        total = stage.shape[0]
        self._stage_np_ready()[:total] = stage
        lora = plan.token_slots_lora
        packed = PackedInputs(
            num_tokens=plan.num_tokens,
            num_seqs=plan.num_seqs,
            num_real_seqs=plan.num_real_seqs,
            num_real_tokens=plan.num_real_tokens,
            width=plan.width,
            num_logits=plan.num_logits,
            total=total,
            max_seq_len=plan.max_seq_len,
            fills_offset=plan.fills_offset,
            num_fills=plan.num_fills,
            query_start_loc=np.empty(0, dtype=np.int64),
            seq_lens=np.empty(0, dtype=np.int64),
            token_slots_lora=None if lora is None else np.frombuffer(lora, dtype=np.int64),
        )
        b, o = packed.num_seqs, packed.int32_offset
        packed.query_start_loc = stage[o : o + b + 1].copy()
        lens = o + packed.seq_lens_offset
        packed.seq_lens = stage[lens : lens + b].copy()
        return packed
