"""Intake: stream entries in, jobs out, and every entry that cannot run ended on its own.

Three sources, as much as the engine can take now (``COUNT`` = free capacity), read from
every stream this worker serves: the one requests stream, or with ``--routing affine`` the
shard streams it owns first and others' shards it steals from (``broker.routing``):

* new entries, ``XREADGROUP >`` (their first delivery);
* our own pending entries after a restart (``XPENDING`` under our consumer name), and
* entries of dead consumers idle past ``--claim-idle-ms`` (``XAUTOCLAIM … JUSTID``).

The last two are redeliveries. Their delivery count is checked and raised by the ``begin``
script before anything of them is decoded, so an entry that kills the process in a way no
``except`` can catch goes to the dead-letter stream after ``--max-deliveries`` instead of
crashing workers forever. Such an entry takes down whatever ran beside it, which is counted
too; so an entry on its *last* delivery runs while no other last delivery runs here (the
others wait, pending), and the one that crashes again is the one that goes to the
dead-letter stream, alone.

Each entry is handled in isolation: decoding (``broker.protocol.decode_entry``), its
deadline, its adapter, its history. Whatever one entry raises ends that entry alone, with an
error event where it has a usable reply address, else a dead letter, and it is acked.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import redis
import redis.asyncio as aioredis

from broker.jobs import EntryKey, Job, Jobs, entry_key, next_seq, plan_resume
from broker.metrics import BrokerMetrics
from broker.ownership import Begun, Ownership
from broker.protocol import (
    DecodedEntry,
    DuplicateRequest,
    Event,
    Expired,
    MaxDeliveriesExceeded,
    decode_entry,
    decode_event,
    error_field,
    reply_address,
    untrusted,
)
from broker.publisher import Out, Publisher, dlq_fields
from broker.redis_conn import REDIS_ERRORS, Backoff
from broker.registry import AdapterRegistry
from broker.routing import Router, Shard
from engine.errors import LoRAStreamError
from engine.lora.request import LoRARequest

logger = logging.getLogger("lorastream.broker")


@dataclass(frozen=True)
class IntakeSettings:
    group: str
    consumer: str
    block_ms: int
    claim_idle_ms: int
    max_deliveries: int
    max_payload_bytes: int
    result_streams: bool
    steal_after_ms: int = 500
    """With affine routing: entries of another worker's shard that waited this long may be
    taken by a worker with free capacity."""
    poll_ms: int = 20
    """On Redis Cluster, where one XREADGROUP cannot block on streams of several slots: the
    longest pause between polls of an idle worker's shards."""


STEAL_PROBES = 8
"""Shards an idle worker looks at per steal probe, twice over (see ``_steal_candidates``)."""


@dataclass
class _Entry:
    entry_id: str
    fields: Any
    deliveries: int
    decoded: DecodedEntry | None = None


# KEYS[1] stream. ARGV[1] group. How long the oldest entry not yet delivered to the group has
# waited, in ms by the server's clock (-1: none waits), and how many wait (the group's lag).
_BACKLOG = """
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if not ok then return {-1, 0} end
for _, g in ipairs(groups) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  if info['name'] == ARGV[1] then
    local e = redis.call('XRANGE', KEYS[1], '(' .. info['last-delivered-id'], '+', 'COUNT', 1)
    if not e[1] then return {-1, 0} end
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    local ms = tonumber(string.match(e[1][1], '^(%d+)'))
    return {now - ms, tonumber(info['lag']) or 1}
  end
end
return {-1, 0}
"""


class Intake:
    """Reads the shard streams of ``router`` (one stream with the default routing)."""

    def __init__(
        self,
        client: aioredis.Redis,
        settings: IntakeSettings,
        *,
        shards: Mapping[str, Ownership],
        router: Router,
        cluster: bool,
        jobs: Jobs,
        publisher: Publisher,
        registry: AdapterRegistry,
        metrics: BrokerMetrics,
        capacity: Callable[[], int],
        start_job: Callable[[Job], None],
        aborted: Callable[[str], bool],
    ) -> None:
        self.redis = client
        self.s = settings
        self.shards = shards
        """Shard prefix → the scripts of that stream, for every stream of the layout."""
        self.router = router
        self.cluster = cluster
        self.jobs = jobs
        self.publisher = publisher
        self.registry = registry
        self.metrics = metrics
        self._capacity = capacity
        self._start_job = start_job
        self._aborted = aborted
        self._waiting: dict[EntryKey, Ownership] = {}
        """Our pending entries on their last delivery, waiting for the one running to end."""
        self.ready = anyio.Event()
        self.stolen = 0
        """Entries read from shards this worker does not own (affine routing)."""
        self._idle_polls = 0
        self._steal_cursor = 0

    def _lanes(self, shards: Sequence[Shard]) -> list[Ownership]:
        return [self.shards[s.prefix] for s in shards]

    async def run(self, draining: anyio.Event, changed: Callable[[float], Any]) -> None:
        """Read until ``draining`` is set. ``changed(timeout)`` waits for capacity to free."""
        backoff = Backoff()
        # Our own pending entries first (every stream: ownership of shards may have moved
        # while we were away), then new ones.
        own_scan: list[Ownership] = list(self.shards.values())
        own_cursor = "-"
        claim_every = self.s.claim_idle_ms / 2000
        steal_every = max(0.01, self.s.steal_after_ms / 2000)
        next_claim = next_steal = 0.0
        group_ok = False
        idle = False
        while not draining.is_set():
            try:
                if not group_ok:
                    await self._ensure_groups()
                    group_ok = True
                    self.ready.set()
                cap = self._capacity()
                if cap == 0:
                    # KV pressure changes without a notification: poll it too.
                    await changed(0.05)
                    continue
                now = time.monotonic()
                if self._waiting and not self.jobs.last_chance_running:
                    await self._begin_waiting(cap)
                elif own_scan:
                    ids, after = await self._own_pending(own_scan[0], own_cursor, cap)
                    await self._begin(own_scan[0], ids)
                    if after is None:
                        own_scan.pop(0)
                        own_cursor = "-"
                    else:
                        own_cursor = after
                elif now >= next_claim:
                    next_claim = now + claim_every
                    for lane in self.shards.values():
                        await self._autoclaim(lane)
                elif idle and self.router.affine and now >= next_steal:
                    next_steal = now + steal_every
                    idle = not await self._steal(cap)
                else:
                    until = (
                        next_claim
                        if not (idle and self.router.affine)
                        else min(next_claim, next_steal)
                    )
                    block = max(1, min(self.s.block_ms, int((until - now) * 1000)))
                    idle = not await self._read_new(cap, block)
                backoff.reset()
            except redis.ResponseError as e:
                if "NOGROUP" in str(e):
                    logger.warning("consumer group is gone (Redis restarted empty?): recreating it")
                    group_ok = False
                    continue
                await self._redis_error(e, backoff, draining)
            except REDIS_ERRORS as e:
                await self._redis_error(e, backoff, draining)

    async def _redis_error(
        self, err: BaseException, backoff: Backoff, draining: anyio.Event
    ) -> None:
        self.metrics.redis_errors.labels("intake").inc()
        delay = backoff.next_delay()
        # Loud on the first failure and every ~30 s of an outage, not on every retry.
        log = logger.warning if backoff.failures % 15 == 1 else logger.debug
        log("redis intake failed (%s: %s); retrying in %.2fs", type(err).__name__, err, delay)
        with anyio.move_on_after(delay):
            await draining.wait()

    async def _ensure_groups(self) -> None:
        """Create the group on every stream at 0, so entries a producer added before any
        worker are served (and after a Redis restart without persistence, whatever arrived
        since); one pipeline for all of them."""
        lanes = list(self.shards.values())
        pipe = self.redis.pipeline(transaction=False)
        for lane in lanes:
            pipe.xgroup_create(lane.stream, self.s.group, id="0", mkstream=True)
        for lane, result in zip(lanes, await pipe.execute(raise_on_error=False), strict=True):
            if isinstance(result, Exception):
                if "BUSYGROUP" not in str(result):
                    raise result
            else:
                logger.info("created consumer group %s on %s", self.s.group, lane.stream)
        # Listed by XINFO CONSUMERS from the start, not from the first entry it reads.
        pipe = self.redis.pipeline(transaction=False)
        for lane in lanes:
            pipe.xgroup_createconsumer(lane.stream, self.s.group, self.s.consumer)
        await pipe.execute()

    # ------------------------------------------------------------------ sources
    async def _read_new(self, cap: int, block_ms: int) -> bool:
        """New entries of the streams we own; whether any came."""
        lanes = self._lanes(self.router.owned)
        if not lanes:
            with anyio.move_on_after(block_ms / 1000):
                await anyio.sleep_forever()
            return False
        # COUNT is per stream: split the capacity, so one read takes at most
        # max(cap, number of streams) entries (any excess waits in the engine's queue).
        count = max(1, cap // len(lanes))
        if len(lanes) == 1 or not self.cluster:
            reply: Any = await self.redis.xreadgroup(
                self.s.group, self.s.consumer, {lane.stream: ">" for lane in lanes},
                count=count if len(lanes) > 1 else cap, block=block_ms,
            )  # fmt: skip
            got = [(self._lane_of(_s(stream)), items) for stream, items in reply or []]
        else:
            # One XREADGROUP may name streams of one slot only, and every shard is a slot
            # of its own: poll them in one pipeline, pausing longer while nothing comes.
            pipe = self.redis.pipeline(transaction=False)
            for lane in lanes:
                pipe.xreadgroup(self.s.group, self.s.consumer, {lane.stream: ">"}, count=count)
            replies = await pipe.execute()
            got = [(lane, r[0][1]) for lane, r in zip(lanes, replies, strict=True) if r]
            if not got:
                self._idle_polls += 1
                pause = min(self.s.poll_ms, block_ms, 2 ** min(self._idle_polls, 10)) / 1000
                await anyio.sleep(pause)
                return False
            self._idle_polls = 0
        for lane, items in got:
            # RESP2: [(id, fields), ...]
            await self._admit(lane, [_Entry(_s(eid), fields, 1) for eid, fields in items])
        return bool(got)

    def _lane_of(self, stream: str) -> Ownership:
        for lane in self.shards.values():
            if lane.stream == stream:
                return lane
        raise KeyError(stream)

    async def _steal(self, cap: int) -> bool:
        """Affine routing, nothing of our own to do: take entries from the other shard whose
        oldest waiting entry is past ``steal_after_ms`` (its owner is busy or gone), those we
        are next in line for first, so a hot adapter spreads over few workers. Whether any
        entry was taken."""
        others = self._lanes(self._steal_candidates())
        if not others:
            return False
        pipe = self.redis.pipeline(transaction=False)
        for lane in others:
            pipe.eval(_BACKLOG, 1, lane.stream, self.s.group)
        ages = await pipe.execute()
        ready = [
            (lane, int(age))
            for lane, (age, _) in zip(others, ages, strict=True)
            if int(age) >= self.s.steal_after_ms
        ]
        if not ready:
            return False
        lane = ready[0][0]  # others() is in our order of preference
        reply: Any = await self.redis.xreadgroup(
            self.s.group, self.s.consumer, {lane.stream: ">"}, count=cap
        )
        if not reply:
            return False
        items = reply[0][1]
        self.stolen += len(items)
        self.metrics.stolen.inc(len(items))
        logger.debug("took %d entr(ies) from %s", len(items), lane.stream)
        await self._admit(lane, [_Entry(_s(eid), fields, 1) for eid, fields in items])
        return True

    def _steal_candidates(self) -> list[Shard]:
        """At most ``2 * STEAL_PROBES`` shards per probe, so an idle fleet costs Redis
        O(workers), not O(workers x shards): the shards we are next in line for first (a hot
        adapter spreads over the same few workers, whose caches stay warm), then a window
        that rotates over the rest, so every backlog is seen by every idle worker in time."""
        ranked = self.router.others()
        head, rest = ranked[:STEAL_PROBES], ranked[STEAL_PROBES:]
        if len(rest) <= STEAL_PROBES:
            return head + rest
        start = self._steal_cursor % len(rest)
        self._steal_cursor += STEAL_PROBES
        window = (rest + rest)[start : start + STEAL_PROBES]
        return head + window

    async def _own_pending(
        self, lane: Ownership, cursor: str, count: int
    ) -> tuple[list[str], str | None]:
        """Ids of our pending entries of ``lane`` from ``cursor`` on that we are not running
        (without counting a delivery: that is ``begin``'s job), and the next cursor (None at
        the end)."""
        rows: Any = await self.redis.xpending_range(
            lane.stream, self.s.group, min=cursor, max="+", count=count,
            consumername=self.s.consumer,
        )  # fmt: skip
        ids = [_s(r["message_id"]) for r in rows]
        after = "(" + ids[-1] if len(ids) == count else None
        return [i for i in ids if entry_key(lane, i) not in self.jobs.by_entry], after

    async def _autoclaim(self, lane: Ownership) -> None:
        cursor = "0-0"
        while True:
            cap = self._capacity()
            if cap == 0:
                return
            cursor, claimed = await lane.claim_idle(cursor, cap, self.s.claim_idle_ms)
            ids = [x for x in claimed if entry_key(lane, x) not in self.jobs.by_entry]
            if ids:
                self.metrics.claimed.inc(len(ids))
                logger.info("took over %d idle entr(ies) of %s", len(ids), lane.stream)
                await self._begin(lane, ids)
            if cursor == "0-0":
                return

    async def _begin_waiting(self, cap: int) -> None:
        by_lane: dict[str, list[str]] = {}
        for (prefix, entry_id), _ in list(self._waiting.items())[:cap]:
            by_lane.setdefault(prefix, []).append(entry_id)
        for prefix, ids in by_lane.items():
            await self._begin(self.shards[prefix], ids)

    async def _begin(self, lane: Ownership, entry_ids: Sequence[str]) -> None:
        """Start a redelivery of entries pending under us: count it first, decode after."""
        begun = await lane.begin(
            entry_ids,
            max_deliveries=self.s.max_deliveries,
            allow_last=not self.jobs.last_chance_running,
        )
        runs: list[_Entry] = []
        for b in begun:
            self._waiting.pop(entry_key(lane, b.entry_id), None)
            if b.status == "run":
                runs.append(_Entry(b.entry_id, b.fields, b.deliveries))
            elif b.status == "wait":
                self._waiting[entry_key(lane, b.entry_id)] = lane
            elif b.status == "dead":
                await self._dead_letter_over_limit(lane, b)
        await self._admit(lane, runs)

    async def _dead_letter_over_limit(self, lane: Ownership, b: Begun) -> None:
        """Dead-letter and ack first, decode after: if decoding is what kills workers, the
        entry is out of the stream before it can do it again. Then tell its client."""
        err = MaxDeliveriesExceeded(
            f"entry {b.entry_id} was delivered {b.deliveries} times (max {self.s.max_deliveries})"
        )
        logger.warning("entry %s dead-lettered: %s", b.entry_id, err.message)
        dlq = dlq_fields(
            b.entry_id, b.fields, err.code, err.message, self.s.consumer, self.s.max_payload_bytes
        )
        await self.publisher.write([Out(None, None, b.entry_id, lane, ack=True, dlq=dlq)])
        address = _address(b.fields, lane.shard.prefix)
        if address is None:
            return
        history = await self._histories(lane, [address[0]])
        out = Out(address[0], address[1], b.entry_id, lane, finished=True, finish_reason="error",
                  error=(err.code, err.message, None), seq=next_seq(history.get(address[0], [])),
                  fenced=False)  # fmt: skip
        self.publisher.put(out)

    # ------------------------------------------------------------------ admission
    async def _admit(self, lane: Ownership, entries: list[_Entry]) -> None:
        """Decode, check and start a batch. Redis round trips per batch, not per entry: one
        pipeline of XRANGE for redelivered entries' histories, one HMGET for adapters."""
        entries = [e for e in entries if entry_key(lane, e.entry_id) not in self.jobs.by_entry]
        if not entries:
            return
        for e in entries:
            e.decoded = decode_entry(
                e.fields, prefix=lane.shard.prefix, max_payload_bytes=self.s.max_payload_bytes,
                entry_ms=_entry_ms(e.entry_id),
            )  # fmt: skip
        redelivered = [
            e.decoded.address[0]
            for e in entries
            if e.deliveries > 1 and e.decoded is not None and e.decoded.address is not None
        ]
        history = await self._histories(lane, redelivered)
        adapters = {
            e.decoded.request.adapter
            for e in entries
            if e.decoded is not None and e.decoded.request is not None and e.decoded.request.adapter
        }
        loras: dict[str, LoRARequest | LoRAStreamError] = {}
        if adapters:
            try:
                loras.update(await self.registry.resolve_many(self.redis, adapters))
            except REDIS_ERRORS:
                raise  # the batch stays pending under us; reclaimed after --claim-idle-ms
            except Exception as e:
                logger.exception("adapter lookup failed")
                loras = {
                    a: LoRAStreamError(f"adapter lookup failed: {type(e).__name__}")
                    for a in adapters
                }
        for entry in entries:
            try:
                await self._admit_one(lane, entry, history, loras)
            except REDIS_ERRORS:
                raise
            except Exception as exc:  # a bug must end this entry alone, never the worker
                logger.exception("entry %s could not be admitted", entry.entry_id)
                err = LoRAStreamError(f"internal error: {type(exc).__name__}")
                await self._reject(lane, entry, err, 0, dead_letter=True)

    async def _admit_one(
        self,
        lane: Ownership,
        e: _Entry,
        history: dict[str, list[Event]],
        loras: dict[str, LoRARequest | LoRAStreamError],
    ) -> None:
        d = e.decoded
        assert d is not None
        rid = d.address[0] if d.address else None
        past = history.get(rid, []) if rid is not None else []
        seq = next_seq(past)
        if d.request is None:
            err = d.error or LoRAStreamError("undecodable entry")
            # No reply address: nobody to tell, so the entry is kept in the dead-letter stream.
            await self._reject(lane, e, err, seq, dead_letter=d.address is None)
            return
        req = d.request
        if req.id in self.jobs.by_request:
            # Its reply channel belongs to the running request: do not write there.
            dup = DuplicateRequest(f"request id {req.id!r} is already running on this worker")
            await self._reject(lane, e, dup, 0, dead_letter=True, tell=False)
            return
        if past and past[-1].finished:
            # Published in full by a worker that died before its XACK.
            self.publisher.put(Out(None, None, e.entry_id, lane, ack=True))
            return
        if req.deadline_ms is not None and req.deadline_ms <= time.time() * 1000:
            err = Expired(
                f"the request's deadline ({req.deadline_ms} ms since the epoch) passed before it ran"
            )
            await self._reject(lane, e, err, seq, dead_letter=False)
            return
        lora = loras.get(req.adapter) if req.adapter else None
        if isinstance(lora, LoRAStreamError):
            await self._reject(lane, e, lora, seq, dead_letter=False)
            return
        job = Job(
            entry_id=e.entry_id,
            shard=lane,
            req=req,
            params=req.sampling_params(),
            deliveries=e.deliveries,
            entry_ms=_entry_ms(e.entry_id),
            intake_time=time.time(),
            lora=lora,
            last_chance=e.deliveries > 1 and e.deliveries >= self.s.max_deliveries,
        )
        if e.deliveries > 1:
            plan_resume(job, past, result_streams=self.s.result_streams)
        if self._aborted(req.id):
            job.abort_requested = True
        self.jobs.add(job)
        self._start_job(job)

    async def _reject(
        self,
        lane: Ownership,
        e: _Entry,
        err: LoRAStreamError,
        seq: int,
        *,
        dead_letter: bool,
        tell: bool = True,
    ) -> None:
        d = e.decoded
        address = d.address if d is not None and tell else None
        logger.warning(
            "entry %s rejected (%s): %s", e.entry_id, err.code, untrusted(err.message, 500)
        )
        out = Out(address[0] if address else None, address[1] if address else None, e.entry_id,
                  lane, seq=seq, ack=True)  # fmt: skip
        if address is not None:
            out.finished, out.finish_reason = True, "error"
            out.error = (err.code, err.message, error_field(err))
        if dead_letter:
            out.dlq = dlq_fields(
                e.entry_id, e.fields, err.code, err.message, self.s.consumer,
                self.s.max_payload_bytes,
            )  # fmt: skip
        self.publisher.put(out)

    async def _histories(
        self, lane: Ownership, request_ids: Sequence[str]
    ) -> dict[str, list[Event]]:
        """The events already in each request's result stream (one pipeline)."""
        if not self.s.result_streams or not request_ids:
            return {}
        ids = list(dict.fromkeys(request_ids))
        pipe = self.redis.pipeline(transaction=False)
        for rid in ids:
            pipe.xrange(lane.shard.out_key(rid))
        history: dict[str, list[Event]] = {}
        for rid, entries in zip(ids, await pipe.execute(), strict=True):
            events: list[Event] = []
            for _, f in entries:
                with contextlib.suppress(LoRAStreamError, KeyError, TypeError):
                    events.append(decode_event(f[b"data"]))
            history[rid] = events
        return history


def _address(fields: Any, prefix: str) -> tuple[str, str] | None:
    if not isinstance(fields, dict):
        return None
    for kind in ("data", "json"):
        raw = fields.get(kind.encode())
        if isinstance(raw, bytes):
            return reply_address(raw, kind=kind, prefix=prefix)
    return None


def _entry_ms(entry_id: str) -> int:
    with contextlib.suppress(ValueError):
        return int(entry_id.split("-", 1)[0])
    return 0


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


__all__ = ["Intake", "IntakeSettings"]
