"""Which requests run this step, and how many tokens each.

Pure Python (no torch). One engine step is ``schedule()`` → the runner executes the
``SchedulerOutput`` → ``update_from_output()``. The scheduler schedules *tokens*, not
phases: every request's ``num_computed_tokens`` catches up with its ``num_tokens``, so a
prefill is a request far behind, a decode is a request one token behind, and chunked
prefill is only the step's token budget.

Order. Requests are ordered by ``(priority, arrival_time)`` — lower priority value first,
then earlier arrival, then the order of ``add_request``. The running requests are served
first in that order (one token for a decode, the next chunk for a prefill), then waiting
requests are admitted in that order under four limits: the token budget
(``max_num_batched_tokens``), ``max_num_seqs`` running requests, ``max_loras`` distinct
adapters among running requests (base-model requests never count) and the free KV-cache
blocks. A waiting request whose adapter is not yet in host memory (``lora_ready``) is
skipped and does not hold up the others; one that does not fit the budget, the sequence
limit or the free blocks stops admission for the step (first come, first served).

No decode stalls (Sarathi-Serve's stall-free batching). A step that runs decodes (a running
request that has computed its prompt and is one token behind) takes at most
``max_num_mixed_prefill_tokens`` prompt tokens — prefill chunks of running requests first,
then admissions — so every running request's next token waits for a bounded step instead of
for up to ``max_num_batched_tokens`` tokens of prompts. Decodes are never capped, and a step
with no decodes takes prompts up to ``max_num_batched_tokens``. No request starves: the cap
goes to running prefills oldest first, then to waiting requests in order, so every step
gives the oldest unfinished prompt at least one token (the budget covers the running
decodes: ``EngineArgs`` requires ``max_num_batched_tokens >= max_num_seqs``), and a waiting
request is admitted once the prompts ahead of it are in. The cap needs chunked prefill
(without it a prompt runs whole and the cap does not apply).

Prefix caching (the block manager's ``enable_caching``). A request being admitted starts
with the longest run of cached blocks that holds its first tokens under its adapter
(``BlockManager.find_cached_blocks``), so ``num_computed_tokens`` starts at their length, a
multiple of ``block_size`` and below ``num_tokens`` (the last token is always computed, to
sample from), and only the rest counts against the budget. ``num_cached_tokens`` keeps what
its first admission found. A preempted request looks again when it comes back.

Preemption. When a running request cannot get the blocks for its next tokens, the newest
running request (the last in the order above) is preempted — its blocks are freed, its
``num_computed_tokens`` goes back to 0 and it returns to the waiting queue, where its order
key puts it ahead of every request that arrived after it — and the allocation is retried;
if the request itself is the newest, it is the one preempted. No new request is admitted in
a step that preempted. A preempted request keeps its output tokens: they are recomputed as
part of its prefix, not sampled again, so its output is the same as without preemption.

Bounded adapter wait (no starvation). An adapter cannot be swapped in the middle of a
sequence, so a waiting request whose adapter cannot get one of the ``max_loras`` slots is
bypassed by later requests whose adapters are already active, and a steady stream of them
would keep its adapter out forever. The policy, in full:

1. Each step, the oldest waiting request that is ready but blocked only by the adapter
   limit (the admission pass reached it with budget and sequence slots left, its adapter
   is not active and ``max_loras`` adapters are) gets ``num_bypassed_steps += 1``. The
   counter goes back to 0 when the request is admitted.
2. While a waiting request has ``num_bypassed_steps > max_lora_wait_steps`` ("starving"),
   no request behind it in the queue that needs an adapter is admitted, whatever its
   adapter. Base-model requests behind it may still join: they never hold an adapter slot.
3. So no adapter request joins the running set behind the starving request, the running
   requests of each active adapter drain, and the first adapter slot to free up cannot be
   taken by anyone behind it. Once its adapter can have a slot, the starving request is
   first in line: if it does not fit (budget, sequences, blocks), admission stops there as
   for any head of the queue, so nothing behind it gets in first.

Bound: the oldest blocked request is bypassed in at most ``max_lora_wait_steps`` steps.
From the step its counter exceeds that, its adapter gets a slot within L steps, L being the
longest remaining generation among the adapter requests running then — when every running
request advances one token per step (the token budget covers the running decodes and
nothing is preempted). Requests ahead of it in the queue (higher priority, or older and
not yet ready) still go first.

Async scheduling (``async_scheduling``). The engine may schedule step N+1 while step N still
runs on the device. ``advance(out)``, called once a step is launched, moves each request's
``num_computed_tokens`` on and gives every request that samples a ``PLACEHOLDER`` output
token, so the next ``schedule()`` sees it one token further (the runner feeds the token
from the device). ``update_from_output`` then writes the real token in the placeholder's
place and checks the stops. A request whose placeholder will end it by length (max_tokens,
max_model_len) is not scheduled again. One stopped by EOS or a stop token may already be in
the next launched step: that token is dropped, and the request ends where it stopped.
Without async scheduling ``update_from_output`` advances the step itself, and no
placeholder is ever seen.

Stops. ``update_from_output`` sets each sampled token and checks, in this order: EOS
(unless ``ignore_eos``) and ``stop_token_ids`` → ``FINISHED_STOPPED`` (neither before
``min_tokens`` output tokens; a stop token id becomes ``stop_reason``), then ``max_tokens``
or ``max_model_len`` → ``FINISHED_LENGTH``. A stop token wins over length on the same
token, as stop strings do in the engine. A sequence also stops with length when the whole
KV cache could not hold its next token, since it could never run again. Stop strings are
the engine's: it detokenizes and calls ``finish_requests``.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.core.block_manager import BlockManager
from engine.errors import InvalidRequest, PromptTooLong
from engine.sequence import PLACEHOLDER, Request, RequestStatus

if TYPE_CHECKING:  # engine.config imports torch; the scheduler only reads its fields
    from engine.config import SchedulerConfig


@dataclass
class ScheduledRequest:
    """One request's share of a step: tokens ``[start_position, start_position + num_new_tokens)``."""

    request: Request
    start_position: int
    """``num_computed_tokens`` before the step."""
    num_new_tokens: int
    sample: bool
    """True when this chunk reaches ``num_tokens``: the runner samples one token for it."""

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    active_lora_ids: frozenset[int]
    """Distinct non-zero adapter ids of the running requests (at most ``max_loras``)."""
    preempted: list[Request]
    """Requests preempted this step (now waiting, to be recomputed)."""
    finished_request_ids: frozenset[str]
    """Requests finished since the previous ``schedule()``: the runner may drop their state."""
    advanced: bool = False
    """``Scheduler.advance`` has run for this step."""
    num_prefix_queried_tokens: int = 0
    """Tokens of the requests admitted this step, with prefix caching on."""
    num_prefix_hit_tokens: int = 0
    """Of those, the tokens found in the prefix cache (not computed)."""

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


@dataclass(frozen=True)
class SchedulerStats:
    num_waiting: int
    num_running: int
    kv_cache_usage: float
    """Fraction of KV-cache blocks in use."""
    active_lora_ids: frozenset[int]
    num_preemptions: int
    """Total since the scheduler started."""


def sampled_output_index(s: ScheduledRequest) -> int:
    """Index in ``output_token_ids`` of the token step ``s`` samples."""
    return s.start_position + s.num_new_tokens - s.request.num_prompt_tokens


def check_prompt_fits(num_prompt: int, block_size: int, num_blocks: int) -> None:
    """Raise ``PromptTooLong`` when the prompt alone needs more KV-cache blocks than exist
    (it could never run). The engine's front calls it too, where the core is elsewhere."""
    needed = -(-num_prompt // block_size)
    if needed > num_blocks:
        raise PromptTooLong(
            f"prompt has {num_prompt} tokens, which need {needed} KV-cache blocks of "
            f"{block_size}; the cache has {num_blocks} ({num_blocks * block_size} tokens)"
        )


def _always_ready(lora_id: int) -> bool:
    return True


def _is_decode(request: Request) -> bool:
    """A request that has computed its prompt and is one token behind: one new token."""
    n = request.num_computed_tokens
    return n >= request.num_prompt_tokens and request.num_tokens - n == 1


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        lora_ready: Callable[[int], bool] = _always_ready,
    ) -> None:
        if (
            not config.enable_chunked_prefill
            and config.max_num_batched_tokens < config.max_model_len
        ):
            # Without chunking a resumed request recomputes up to max_model_len - 1 tokens in one step.
            raise ValueError(
                f"SchedulerConfig.max_num_batched_tokens={config.max_num_batched_tokens} is invalid: "
                f"must be >= max_model_len ({config.max_model_len}) when chunked prefill is off"
            )
        self.config = config
        self.block_manager = block_manager
        self.lora_ready = lora_ready
        # A sequence stops at max_model_len tokens, or when the cache could not hold its last
        # sampled token (that token is never computed, hence the + 1).
        self.max_num_tokens = min(
            config.max_model_len, block_manager.num_blocks * block_manager.block_size + 1
        )
        self.requests: dict[str, Request] = {}
        """Unfinished requests by id."""
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        """Both kept sorted by ``_order_key``; the last running request is the newest."""
        self._running_loras: Counter[int] = Counter()
        """Running requests per adapter id (not 0), kept with ``running``: the step's active
        adapters without a pass over every running request."""
        self.num_preemptions = 0
        self._order_keys: dict[str, tuple[int, float, int]] = {}
        self._counter = itertools.count()
        self._finished_ids: set[str] = set()
        self._final: set[str] = set()
        """Running requests whose pending placeholder will finish them by length: nothing
        more is scheduled for them."""

    # ------------------------------------------------------------------ requests
    def add_request(self, request: Request) -> None:
        """Queue ``request``. Raises ``PromptTooLong`` when it could never run."""
        if request.request_id in self.requests:
            raise InvalidRequest(f"request_id {request.request_id!r} is already scheduled")
        num_prompt = request.num_prompt_tokens
        if num_prompt == 0:
            raise InvalidRequest(f"request {request.request_id!r} has an empty prompt")
        if num_prompt >= self.config.max_model_len:
            raise PromptTooLong(
                f"prompt has {num_prompt} tokens; max_model_len is {self.config.max_model_len}, "
                "which leaves no room for any output token"
            )
        check_prompt_fits(num_prompt, self.block_manager.block_size, self.block_manager.num_blocks)
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self._order_keys[request.request_id] = (
            request.priority,
            request.arrival_time,
            next(self._counter),
        )
        bisect.insort(self.waiting, request, key=self._order_key)

    def abort_requests(self, request_ids: str | Iterable[str]) -> list[Request]:
        """Finish the given unfinished requests as aborted, freeing their blocks now.
        Unknown or already finished ids are ignored."""
        return self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def finish_requests(
        self, request_ids: str | Iterable[str], status: RequestStatus
    ) -> list[Request]:
        """Finish the given unfinished requests with ``status`` (stop strings, adapter errors)."""
        if not status.is_finished:
            raise ValueError(f"finish_requests: status {status} is not a finished status")
        ids = [request_ids] if isinstance(request_ids, str) else request_ids
        finished: list[Request] = []
        for request_id in ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self._remove_running(request)
            else:
                self.waiting.remove(request)
            self._finish(request, status)
            finished.append(request)
        return finished

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def get_stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_waiting=len(self.waiting),
            num_running=len(self.running),
            kv_cache_usage=self.block_manager.usage,
            active_lora_ids=self._active_lora_ids(),
            num_preemptions=self.num_preemptions,
        )

    # ------------------------------------------------------------------ step
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        # Prompt tokens (prefill and recompute) this step may still take: capped while
        # decodes run, so their step stays short (see the module docstring).
        prefill_budget = self._prefill_budget(budget)
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []

        # Running requests first, oldest first; the newest give way when blocks run short.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.request_id in self._final:
                i += 1
                continue
            computed = request.num_computed_tokens
            remaining = request.num_tokens - computed
            num_new = min(remaining, budget)
            decode = remaining == 1 and computed >= request.num_prompt_tokens  # _is_decode
            if not decode:
                num_new = min(num_new, prefill_budget)
                if num_new == 0:  # the cap is spent: decodes behind it still run
                    i += 1
                    continue
            while not self.block_manager.allocate_slots(request, num_new):
                victim = self.running[-1]
                self._remove_running(victim)
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                scheduled.append(self._scheduled(request, num_new))
                budget -= num_new
                if not decode:
                    prefill_budget -= num_new
                i += 1

        out = SchedulerOutput(
            scheduled=scheduled,
            active_lora_ids=frozenset(),
            preempted=preempted,
            finished_request_ids=frozenset(),
        )
        if not preempted:  # memory is tight: admit no one this step
            self._admit_waiting(min(budget, prefill_budget), out)

        finished_ids, self._finished_ids = frozenset(self._finished_ids), set()
        out.active_lora_ids = self._active_lora_ids()
        out.finished_request_ids = finished_ids
        return out

    def _prefill_budget(self, budget: int) -> int:
        """The prompt tokens this step may take: ``max_num_mixed_prefill_tokens`` when a
        running request decodes (with chunked prefill), else the whole ``budget``."""
        cap = self.config.max_num_mixed_prefill_tokens
        if cap is None or cap >= budget or not self.config.enable_chunked_prefill:
            return budget
        final = self._final
        if any(_is_decode(r) and r.request_id not in final for r in self.running):
            return cap
        return budget

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> None:
        """Admit waiting requests in order within ``budget`` tokens (see the module docstring)."""
        max_loras = self.config.max_loras
        bm = self.block_manager
        active = set(self._active_lora_ids())
        admitted: list[Request] = []
        # Set once the pass reaches a starving request: adapter requests behind it are held.
        hold_adapters = False
        counted_bypass = False
        for request in self.waiting:
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if request.grammar is not None and not request.grammar.ready:
                continue  # its constraint is still compiling: the others go on
            lora_id = request.lora_int_id
            if lora_id:
                if hold_adapters:
                    continue
                if not self.lora_ready(lora_id):
                    # A starving request keeps its claim while its adapter (re)loads.
                    hold_adapters = self._is_starving(request)
                    continue
                if max_loras and lora_id not in active and len(active) >= max_loras:
                    if not counted_bypass:  # only the oldest blocked request counts
                        counted_bypass = True
                        request.num_bypassed_steps += 1
                    hold_adapters = self._is_starving(request)
                    continue
            # A request that scores its prompt computes all of it, as in vLLM.
            cached = [] if request.prompt_logprobs is not None else bm.find_cached_blocks(request)
            num_cached = len(cached) * bm.block_size
            num_new = request.num_tokens - num_cached
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            if not bm.allocate_slots(request, num_new, cached):
                break
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens is None:
                request.num_cached_tokens = num_cached
            if bm.enable_caching:
                out.num_prefix_queried_tokens += request.num_tokens
                out.num_prefix_hit_tokens += num_cached
            request.status = RequestStatus.RUNNING
            request.num_bypassed_steps = 0
            bisect.insort(self.running, request, key=self._order_key)
            admitted.append(request)
            if lora_id:
                self._running_loras[lora_id] += 1
                active.add(lora_id)
            out.scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
        if admitted:
            done = set(admitted)
            self.waiting = [r for r in self.waiting if r not in done]

    def advance(self, scheduler_output: SchedulerOutput) -> None:
        """The step is launched: its tokens count as computed, and each request it samples
        gets a ``PLACEHOLDER`` output token until ``update_from_output`` brings the real one."""
        if scheduler_output.advanced:
            return
        scheduler_output.advanced = True
        for s in scheduler_output.scheduled:
            request = s.request
            if request.is_finished:  # aborted while the step ran (advanced at its update)
                continue
            request.num_computed_tokens += s.num_new_tokens
            if s.sample:
                request.output_token_ids.append(PLACEHOLDER)
                if self._length_reached(request, request.num_output_tokens):
                    self._final.add(request.request_id)

    def update_from_output(
        self, scheduler_output: SchedulerOutput, sampled_token_ids: dict[str, int]
    ) -> list[Request]:
        """Set the step's sampled tokens (advancing it first if ``advance`` was not called);
        returns the requests that got a token or finished."""
        self.advance(scheduler_output)
        changed: list[Request] = []
        for s in scheduler_output.scheduled:
            request = s.request
            if not s.sample or request.is_finished:  # aborted or stopped while the step ran
                continue
            index = sampled_output_index(s)
            request.output_token_ids[index] = sampled_token_ids[request.request_id]
            if request.first_token_time is None:
                request.first_token_time = time.monotonic()
            status = self._check_stop(request, index)
            if status is not None:
                # Tokens of steps launched after this one are dropped.
                del request.output_token_ids[index + 1 :]
                if request.status == RequestStatus.RUNNING:
                    self._remove_running(request)
                else:  # preempted after its step was launched
                    self.waiting.remove(request)
                self._finish(request, status)
            changed.append(request)
        return changed

    # ------------------------------------------------------------------ helpers
    def _check_stop(self, request: Request, index: int) -> RequestStatus | None:
        """Whether output token ``index`` (just sampled) ends the request."""
        params = request.sampling_params
        token = request.output_token_ids[index]
        if index + 1 >= params.min_tokens:
            if token == request.eos_token_id and not params.ignore_eos:
                request.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if self._length_reached(request, index + 1):
            return RequestStatus.FINISHED_LENGTH
        return None

    def _length_reached(self, request: Request, num_output: int) -> bool:
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None and num_output >= max_tokens:
            return True
        return request.num_prompt_tokens + num_output >= self.max_num_tokens

    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        return ScheduledRequest(
            request=request,
            start_position=start,
            num_new_tokens=num_new,
            sample=start + num_new == request.num_tokens,
        )

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, request, key=self._order_key)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self._final.discard(request.request_id)
        self.block_manager.free(request)
        del self.requests[request.request_id]
        del self._order_keys[request.request_id]
        self._finished_ids.add(request.request_id)

    def _is_starving(self, request: Request) -> bool:
        return request.num_bypassed_steps > self.config.max_lora_wait_steps

    def _order_key(self, request: Request) -> tuple[int, float, int]:
        return self._order_keys[request.request_id]

    def _active_lora_ids(self) -> frozenset[int]:
        return frozenset(self._running_loras)

    def _remove_running(self, request: Request) -> None:
        if request is self.running[-1]:  # preemption takes the newest: no search
            self.running.pop()
        else:
            self.running.remove(request)
        if lora_id := request.lora_int_id:
            left = self._running_loras[lora_id] - 1
            if left:
                self._running_loras[lora_id] = left
            else:
                del self._running_loras[lora_id]
