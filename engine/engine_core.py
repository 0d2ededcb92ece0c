"""``EngineCore``: the scheduler, the model runner and the adapter manager behind one step.

One step is ``schedule()`` → ``launch()`` → ``wait()`` → ``update_from_output()``; requests
come in as token ids and leave as token ids (``EngineCoreOutputs``). No tokenizer and no
text: the front (``LLMEngine`` with its ``OutputProcessor``) turns ids into
``RequestOutput``s, in the same process or, with ``enable_multiprocessing``, in another one
(``engine.core_proc``).

With ``async_scheduling`` each ``step()`` launches the next step before it waits for the one
in flight, so the host's scheduling, input packing and output handling overlap the device
(see ``engine.core.scheduler``); each call still returns one step's tokens.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.config import EngineConfig
from engine.core.block_manager import BlockManager
from engine.core.scheduler import Scheduler, SchedulerOutput, sampled_output_index
from engine.core_messages import (
    AdapterStats,
    CoreStats,
    EngineCoreOutputs,
    EngineLoad,
    FailedRequest,
)
from engine.distributed.runner import make_model_runner
from engine.errors import InvalidRequest, InvalidSamplingParams, LoRAStreamError
from engine.lora.manager import LoRAManager
from engine.lora.request import LoRARequest
from engine.sampling.sampler import TokenLogprobs
from engine.sequence import Request, RequestStatus
from engine.structured_output import StructuredOutputManager
from engine.worker.model_runner import StepHandle

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("lorastream.engine")

LORA_DISABLED = "LoRA is not enabled: start the engine with enable_lora=True"


@dataclass
class CoreTimings:
    """Host seconds of the core's step phases, summed over steps that scheduled work."""

    schedule_s: float = 0.0
    execute_s: float = 0.0
    """``ModelRunner.launch`` and the wait for the tokens: input preparation, launch,
    sampling and its host sync."""
    update_s: float = 0.0
    """``update_from_output`` and the outputs (token ids) of the step."""
    steps: int = 0


class EngineCore:
    def __init__(self, config: EngineConfig, log_stats: bool = False) -> None:
        self.config = config
        self.log_stats = log_stats
        self.runner = make_model_runner(config)
        self.block_manager = BlockManager(
            self.runner.num_blocks,
            config.cache.block_size,
            enable_caching=config.cache.enable_prefix_caching,
        )
        lora_ready = self.runner.lora_manager.is_ready if self.runner.lora_manager else None
        self.scheduler = Scheduler(
            config.scheduler,
            self.block_manager,
            **({"lora_ready": lora_ready} if lora_ready else {}),
        )
        self.timings = CoreTimings()
        self._pinned_loras: set[int] = set()
        eos = getattr(config.hf_config, "eos_token_id", None)
        self.structured = StructuredOutputManager(
            config.tokenizer,
            self.runner.vocab_size,
            [eos] if isinstance(eos, int) else list(eos or []),
        )
        self.runner.grammar_fill = self._fill_bitmask
        # Requests that failed outside a step (a bad AddRequest in the core process):
        # reported at the start of the next step.
        self._failed: list[FailedRequest] = []
        # Launched steps whose tokens have not been collected, oldest first (at most two).
        self._in_flight: deque[tuple[SchedulerOutput, StepHandle]] = deque()
        self.async_scheduling = config.scheduler.async_scheduling
        """Read at every step, so it may change between steps (benchmarks compare both)."""
        self._loads_seen = 0  # the adapter manager's loads_ended when the last step began

    # ---------------------------------------------------------------- adapters
    @property
    def lora_manager(self) -> LoRAManager | None:
        return self.runner.lora_manager

    def require_lora(self) -> LoRAManager:
        if self.runner.lora_manager is None:
            raise InvalidRequest(LORA_DISABLED)
        return self.runner.lora_manager

    def check_adapter(self, lora_request: LoRARequest) -> None:
        self.require_lora().check_adapter(lora_request)

    def add_lora(self, lora_request: LoRARequest) -> bool:
        return self.require_lora().add_lora(lora_request)

    def pin_lora(self, lora_id: int) -> bool:
        """Keep an added adapter in host memory until it is removed (vLLM's ``pin_lora``):
        it is never read from disk again; device slots stay least recently used. False
        when it was pinned already."""
        manager = self.require_lora()
        if lora_id not in manager.list_loras():
            raise InvalidRequest(f"adapter id {lora_id} is not loaded: add_lora it first")
        if lora_id in self._pinned_loras:
            return False
        assert self.config.lora is not None
        limit = self.config.lora.max_cpu_loras
        if len(self._pinned_loras) + 1 >= limit:
            # Other adapters could then never be loaded: the host cache would be all pins.
            raise InvalidRequest(
                f"cannot pin adapter id {lora_id}: {len(self._pinned_loras)} of "
                f"max_cpu_loras={limit} host slots are pinned and one must stay free; "
                "raise max_cpu_loras"
            )
        manager.pin([lora_id])
        self._pinned_loras.add(lora_id)
        return True

    def remove_lora(self, lora_id: int) -> bool:
        if lora_id in self._pinned_loras:
            self._pinned_loras.discard(lora_id)
            self.require_lora().unpin([lora_id])
        removed = self.require_lora().remove_lora(lora_id)
        # Its id may come back naming other weights: its cached KV must not be found then.
        self.block_manager.evict_adapter(lora_id)
        return removed

    def list_loras(self) -> set[int]:
        return set(self.require_lora().list_loras()) if self.runner.lora_manager else set()

    def module_shapes(self) -> dict[str, tuple[str, int, int, int]] | None:
        manager = self.runner.lora_manager
        return dict(manager.module_shapes) if manager is not None else None

    def reset_prefix_cache(self) -> None:
        """Forget the prefix cache's blocks (benchmarks: runs of the same prompts each start
        cold)."""
        self.block_manager.reset_prefix_cache()

    # ---------------------------------------------------------------- requests
    def add_request(self, request: Request) -> None:
        """Queue ``request``; raises ``PromptTooLong`` / ``InvalidRequest`` when it could never run."""
        if request.sampling_params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]  # the first prompt token has no prediction
        self.scheduler.add_request(request)
        if request.sampling_params.has_constraint:
            # Compiled off the step loop; the scheduler admits it once its matcher exists.
            self.structured.add_request(request)
        manager = self.runner.lora_manager
        if request.lora_request is not None and manager is not None:
            # Pinned while the request lives, so its adapter is not evicted from host memory
            # between being loaded and being scheduled.
            manager.pin([request.lora_int_id])
            manager.request_load(request.lora_request)

    def fail_request(self, request_id: str, error: LoRAStreamError) -> None:
        """Report a request the core could not take as finished with ``error``."""
        self._failed.append(FailedRequest(request_id, error))

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        """Finish requests now, freeing their blocks. No output: the front reports aborts
        (and stop strings, which end requests the same way) itself. Unknown ids are ignored."""
        for request in self.scheduler.abort_requests(list(request_ids)):
            self._unpin(request)

    def has_unfinished_requests(self) -> bool:
        return (
            self.scheduler.has_unfinished_requests() or bool(self._failed) or bool(self._in_flight)
        )

    def get_load(self) -> EngineLoad:
        return EngineLoad(
            self.scheduler.num_waiting, self.scheduler.num_running, self.block_manager.usage
        )

    # ---------------------------------------------------------------- step
    def step(self) -> EngineCoreOutputs:
        t0 = time.perf_counter()
        if self.runner.lora_manager is not None:
            self._loads_seen = self.runner.lora_manager.loads_ended
        failed, self._failed = self._failed, []
        self._fail_adapter_errors(failed)
        self._fail_constraints(failed)
        queue = self._in_flight
        sched = None
        launch_s = 0.0  # of the host time before t1, what the runner's launches took
        if not queue:
            sched, launch_s = self._launch()
        if queue and self.async_scheduling and self._can_run_ahead():
            sched, dt = self._launch()
            launch_s += dt
        t1 = t2 = time.perf_counter()
        num_prompt = num_gen = 0
        ids: list[str] = []
        tokens: list[int] = []
        finish_reasons: list[str | None] = []
        stop_reasons: list[int | None] = []
        first_times: list[float | None] = []
        num_cached: list[int] = []
        logprobs: list[TokenLogprobs | None] | None = None
        prompt_logprobs: list[list[TokenLogprobs | None] | None] = []
        if queue:
            sched, handle = queue.popleft()
            result = handle.wait()
            t2 = time.perf_counter()
            if result.prompt_logprobs:
                _merge_prompt_logprobs(sched, result.prompt_logprobs)
            touched = self.scheduler.update_from_output(sched, result.sampled_token_ids)
            touched = self._advance_grammars(sched, touched, failed)
            if queue and queue[0][1].deferred is not None:
                # The next step's constrained rows have their last tokens now: their masks
                # are computed while the device runs that step's forward pass.
                self.runner.sample_deferred(queue[0][1])
            sampled = {}
            for s in sched.scheduled:
                if not s.sample:
                    num_prompt += s.num_new_tokens
                else:
                    num_gen += 1
                    num_prompt += s.num_new_tokens - 1
                    sampled[s.request_id] = s
            for req in touched:
                # update_from_output sets exactly one sampled token of each request it returns.
                index = sampled_output_index(sampled[req.request_id])
                ids.append(req.request_id)
                tokens.append(req.output_token_ids[index])
                finish_reasons.append(req.status.finish_reason)
                # Stop token ids only: the core never sees stop strings.
                stop = req.stop_reason
                stop_reasons.append(stop if isinstance(stop, int) else None)
                first_times.append(req.first_token_time if index == 0 else None)
                num_cached.append(req.num_cached_tokens or 0)
                prompt_logprobs.append(req.prompt_logprobs if index == 0 else None)
                if index == 0:
                    req.prompt_logprobs = None  # sent: a recomputation scores nothing again
                if req.is_finished:
                    self._unpin(req)
            if result.logprobs:
                logprobs = [result.logprobs.get(i) for i in ids]
        t3 = time.perf_counter()
        assert sched is not None
        schedule_s, execute_s, update_s = t1 - t0 - launch_s, t2 - t1 + launch_s, t3 - t2
        tm = self.timings
        if sched.scheduled:
            tm.schedule_s += schedule_s
            tm.execute_s += execute_s
            tm.update_s += update_s
            tm.steps += 1
        stats = self._stats(sched, num_prompt, num_gen, t3 - t0, schedule_s, execute_s, update_s)
        return EngineCoreOutputs(
            ids,
            tokens,
            finish_reasons,
            stop_reasons,
            first_times,
            logprobs,
            failed,
            stats,
            num_cached_tokens=num_cached,
            prompt_logprobs=prompt_logprobs
            if any(p is not None for p in prompt_logprobs)
            else None,
        )

    def wait_for_adapters(self, timeout: float) -> None:
        """After a step that ran nothing while requests wait: block until an adapter load
        that began before it ends (a request may then run), at most ``timeout`` seconds,
        instead of stepping again at once (a busy loop of empty steps)."""
        manager = self.runner.lora_manager
        if manager is not None and not self._in_flight:
            manager.wait_for_load(self._loads_seen, timeout)

    def _launch(self) -> tuple[SchedulerOutput, float]:
        """Schedule a step and launch it (when it has work) behind the steps in flight;
        returns it and the seconds the launch took."""
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return sched, 0.0
        t0 = time.perf_counter()
        previous = self._in_flight[-1][1] if self._in_flight else None
        try:
            handle = self.runner.launch(sched, previous)
        except BaseException:
            # The step's blocks are in the prefix cache already but will hold no KV.
            self.block_manager.reset_prefix_cache()
            raise
        self.scheduler.advance(sched)
        self._in_flight.append((sched, handle))
        return sched, time.perf_counter() - t0

    def _can_run_ahead(self) -> bool:
        """Whether the next step may be launched before the one in flight is collected:
        one step runs ahead at most."""
        return len(self._in_flight) == 1

    def _fail_adapter_errors(self, failed: list[FailedRequest]) -> None:
        manager = self.runner.lora_manager
        if manager is None:
            return
        for lora_id, err in manager.poll_errors():
            ids = [
                r.request_id for r in self.scheduler.requests.values() if r.lora_int_id == lora_id
            ]
            for req in self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ERROR):
                self._unpin(req)
                failed.append(FailedRequest(req.request_id, err))
                logger.warning("request %r failed: %r", req.request_id, str(err))

    def _fill_bitmask(self, requests: list[Request], pin: bool) -> torch.Tensor:
        return self.structured.fill_bitmask(requests, pin)

    def _fail_constraints(self, failed: list[FailedRequest]) -> None:
        """End the requests whose constraint did not compile."""
        for request in self.structured.poll():
            error = request.grammar.error
            for req in self.scheduler.finish_requests(
                [request.request_id], RequestStatus.FINISHED_ERROR
            ):
                self._unpin(req)
                failed.append(FailedRequest(req.request_id, error))
                logger.info("request %r failed: %r", req.request_id, str(error))

    def _advance_grammars(
        self, sched: SchedulerOutput, touched: list[Request], failed: list[FailedRequest]
    ) -> list[Request]:
        """Feed each constrained request's new token to its matcher. A complete grammar
        ends the request ("stop"); a token the grammar refuses (nothing allowed was left to
        sample: ``min_tokens``, ``allowed_token_ids``, ``bad_words`` or ``logit_bias``
        removed every token the constraint allows) ends it with an error."""
        if not any(r.grammar is not None for r in touched):
            return touched
        by_id = {s.request_id: s for s in sched.scheduled}
        kept: list[Request] = []
        for req in touched:
            state = req.grammar
            if state is None or not state.ready:
                kept.append(req)
                continue
            token = req.output_token_ids[sampled_output_index(by_id[req.request_id])]
            if not self.structured.accept(req, token):
                for r in self.scheduler.finish_requests(
                    [req.request_id], RequestStatus.FINISHED_ERROR
                ):
                    self._unpin(r)
                    failed.append(
                        FailedRequest(
                            r.request_id,
                            InvalidSamplingParams(
                                f"SamplingParams.{_constraint_field(r)}=... cannot be met: the "
                                "other parameters (min_tokens, allowed_token_ids, bad_words, "
                                "logit_bias) removed every token it allows"
                            ),
                        )
                    )
                continue
            if state.terminated and not req.is_finished:
                # Complete, and a stop token accepted (with ignore_eos, EOS too): done.
                for r in self.scheduler.finish_requests(
                    [req.request_id], RequestStatus.FINISHED_STOPPED
                ):
                    self._unpin(r)
            kept.append(req)
        return kept

    def _unpin(self, request: Request) -> None:
        manager = self.runner.lora_manager
        if manager is not None and request.lora_int_id:
            manager.unpin([request.lora_int_id])

    def _stats(
        self,
        sched: SchedulerOutput,
        num_prompt: int,
        num_gen: int,
        step_s: float,
        schedule_s: float,
        execute_s: float,
        update_s: float,
    ) -> CoreStats:
        stats = CoreStats(
            num_waiting=self.scheduler.num_waiting,
            num_running=self.scheduler.num_running,
            kv_cache_usage=self.block_manager.usage,
            num_scheduled_tokens=sched.num_scheduled_tokens,
            num_prompt_tokens=num_prompt,
            num_generation_tokens=num_gen,
            num_preemptions=len(sched.preempted),
            step_time_s=step_s,
            schedule_s=schedule_s,
            execute_s=execute_s,
            update_s=update_s,
            num_prefix_queried_tokens=sched.num_prefix_queried_tokens,
            num_prefix_hit_tokens=sched.num_prefix_hit_tokens,
        )
        manager = self.runner.lora_manager
        if manager is not None and self.log_stats:
            ms = manager.get_stats()
            stats.adapters = AdapterStats(
                on_device=list(ms.on_device),
                in_host=list(ms.in_host),
                disk_loads=ms.disk_loads,
                load_time_s=ms.load_time_s,
                host_evictions=ms.host_evictions,
                device_loads=ms.device_loads,
                device_evictions=ms.device_evictions,
            )
        return stats

    def get_kernel_config(self) -> dict[str, object]:
        """The kernel settings the model runs with (``KernelConfig``, launch settings
        resolved for this device)."""
        return self.runner.kernel_settings()

    def get_timings(self) -> dict[str, float]:
        """Per-step host milliseconds of the core (steps that scheduled work)."""
        tm = self.timings
        n = max(tm.steps, 1)
        out = {
            "core_steps": float(tm.steps),
            "core_schedule_ms": 1e3 * tm.schedule_s / n,
            "core_execute_ms": 1e3 * tm.execute_s / n,
            "core_update_ms": 1e3 * tm.update_s / n,
        }
        out.update({f"core_{k}": v for k, v in self.runner.timings.per_step_ms().items()})
        return out

    def close(self) -> None:
        self.structured.close()
        if self.runner.lora_manager is not None:
            self.runner.lora_manager.close()
        self.runner.shutdown()


def _merge_prompt_logprobs(
    sched: SchedulerOutput, results: dict[str, tuple[int, list[TokenLogprobs]]]
) -> None:
    """Append each request's newly scored prompt positions in order; positions it already
    has (scored again after a preemption) are skipped."""
    for s in sched.scheduled:
        found = results.get(s.request_id)
        have = s.request.prompt_logprobs
        if found is None or have is None:  # finished, or sent already
            continue
        first, entries = found
        for j, entry in enumerate(entries, start=first):
            if j == len(have):
                have.append(entry)


def _constraint_field(request: Request) -> str:
    constraint = request.sampling_params.constraint
    kind = constraint[0] if constraint else "json"
    return "guided_" + kind if kind != "json_object" else "guided_json_object"
