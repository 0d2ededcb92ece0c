"""Who owns an entry, checked inside Redis: the three Lua scripts every write goes through.

A worker owns an entry while the entry is pending under its consumer name in the group's
PEL. Another worker takes an entry over with XAUTOCLAIM once it has been idle for
``--claim-idle-ms`` (its owner looked dead: killed, stopped, cut off from Redis). From that
moment the old owner must never write for it again, or its client would see two runs mixed
(two final events, ``seq`` going back). So nothing is written on ownership believed from a
moment ago: each script checks the PEL and writes in one atomic step.

* ``begin``: start a delivery of entries already pending under us (our own after a restart,
  or ones just taken with XAUTOCLAIM JUSTID, which moves them without counting). The
  delivery count is checked and raised *before* the entry is decoded, so an entry that
  kills the process in a way no ``except`` catches still reaches the dead-letter stream.
* ``publish``: a step's events, acks and dead letters, written only for entries still ours.
  Result-stream entries carry ``seq`` and ``fin``, so a batch sent again after a lost reply
  writes nothing twice and nothing follows a final event.
* ``keepalive``: reset the idle time of our running entries, and name those we lost.

"Ours" is: pending under our consumer name; or not pending and gone from the stream, or no
group at all (Redis restarted without persistence: nobody else can hold the entry, so the
request runs on and its client gets the rest). An entry that exists but is pending under
another consumer, or was acked, is lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import redis.asyncio as aioredis

from broker.routing import Shard, sharded_channel

# Shared by the scripts: whether ARGV[2] (our consumer) owns entry `id` of KEYS[1].
_OWNS = """
local function owns(id)
  local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if type(p) == 'table' and p.err then return true end
  if p[1] then return p[1][2] == ARGV[2] end
  return #redis.call('XRANGE', KEYS[1], id, id) == 0
end
"""

# KEYS[1] stream. ARGV: group, consumer, max_deliveries, allow_last (0/1), ids...
# Returns per id {id, status, count[, fields]}: 'gone' (not ours), 'dead' (over the limit:
# not counted again), 'wait' (its last delivery, while another last one runs here), 'run'
# (counted: its delivery number and its fields).
_BEGIN = """
local max = tonumber(ARGV[3])
local allow_last = ARGV[4] == '1'
local out = {}
for i = 5, #ARGV do
  local id = ARGV[i]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if not p[1] or p[1][2] ~= ARGV[2] then
    out[#out + 1] = {id, 'gone', 0}
  else
    local n = tonumber(p[1][4]) + 1
    local e = redis.call('XRANGE', KEYS[1], id, id)
    local fields = {}
    if e[1] then fields = e[1][2] end
    if n > max then
      out[#out + 1] = {id, 'dead', n - 1, fields}
    elseif n == max and n > 1 and not allow_last then
      out[#out + 1] = {id, 'wait', n - 1}
    else
      if n == max and n > 1 then allow_last = false end
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'RETRYCOUNT', n, 'JUSTID')
      out[#out + 1] = {id, 'run', n, fields}
    end
  end
end
return out
"""

# KEYS[1] stream, KEYS[2] dead-letter stream, KEYS[3..] result streams.
# ARGV: group, consumer, result ttl s, result maxlen, dlq maxlen, then the ops as one msgpack
# array (one argument: packing thousands of arguments per step would cost the worker more
# than the script costs Redis). An op: [entry id, channel ('' none), result key index (0
# none), seq, data, fin, ack, fenced (0/1 each), [dead-letter field, value, ...], sharded
# (1: SPUBLISH, on Redis Cluster for a channel in this shard's slot; 0: PUBLISH)].
# Returns the entry ids that are not ours (nothing was written for them).
_PUBLISH = (
    _OWNS
    + """
local ops = cmsgpack.unpack(ARGV[6])
local owned, last, lost = {}, {}, {}
for _, op in ipairs(ops) do
  local id, channel, k, seq = op[1], op[2], op[3], op[4]
  local data, fin, ack, fenced, dlq, sharded = op[5], op[6], op[7], op[8], op[9], op[10]
  if owned[id] == nil then owned[id] = owns(id) end
  if fenced == 1 and owned[id] ~= true then
    if owned[id] == false then lost[#lost + 1] = id; owned[id] = 'reported' end
  else
    local write = data ~= ''
    if write and k > 0 then
      local key = KEYS[k]
      if last[key] == nil then
        last[key] = {-1, 0}
        local e = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
        if e[1] then
          local f = e[1][2]
          local s, d = nil, 0
          for j = 1, #f, 2 do
            if f[j] == 'seq' then s = tonumber(f[j + 1])
            elseif f[j] == 'fin' then d = tonumber(f[j + 1]) end
          end
          if s == nil then
            -- written by something that did not record seq: read it from the event
            for j = 1, #f, 2 do
              if f[j] == 'data' then
                local ok, ev = pcall(cmsgpack.unpack, f[j + 1])
                if ok and type(ev) == 'table' then
                  s = tonumber(ev['seq'])
                  if ev['finished'] == true then d = 1 end
                end
              end
            end
          end
          last[key] = {s or -1, d or 0}
        end
      end
      if last[key][2] == 1 or seq <= last[key][1] then
        write = false
      else
        redis.call('XADD', key, 'MAXLEN', '~', ARGV[4], '*', 'data', data, 'seq', seq, 'fin', fin)
        redis.call('EXPIRE', key, ARGV[3])
        last[key] = {seq, fin}
      end
    end
    if write and channel ~= '' then
      redis.call(sharded == 1 and 'SPUBLISH' or 'PUBLISH', channel, data)
    end
    if #dlq > 0 then
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', unpack(dlq))
    end
    if ack == 1 then redis.call('XACK', KEYS[1], ARGV[1], id) end
  end
end
return lost
"""
)

# KEYS[1] stream. ARGV: group, consumer, ids... Resets the idle time of the ids still ours
# (XCLAIM JUSTID counts no delivery) and returns the ones we lost.
_KEEPALIVE = (
    _OWNS
    + """
local lost = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  if owns(id) then
    redis.pcall('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
  else
    lost[#lost + 1] = id
  end
end
return lost
"""
)


# KEYS[1] stream. ARGV: group, consumer, min idle ms, cursor, count. XAUTOCLAIM JUSTID moves
# idle entries to us without counting a delivery (``begin`` counts it); run as a script
# because redis-py's JUSTID reply parser drops the cursor.
_CLAIM_IDLE = """
return redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5],
                  'JUSTID')
"""


@dataclass(frozen=True)
class Begun:
    """One entry after ``begin``."""

    entry_id: str
    status: str
    """``run``, ``dead``, ``wait`` or ``gone`` (see the module docstring)."""
    deliveries: int
    """For ``run``, this delivery's number; for ``dead`` and ``wait``, the count so far."""
    fields: dict[bytes, bytes]


@dataclass
class WriteOp:
    """One entry's writes in a publish batch (all optional but the entry id)."""

    entry_id: str
    channel: str = ""
    result_key: str | None = None
    seq: int = 0
    data: bytes = b""
    fin: bool = False
    ack: bool = False
    fenced: bool = True
    """False only for a dead-lettered entry's error event, written after its own ack."""
    dlq: Sequence[str | bytes] = ()
    """Field/value pairs of a dead-letter entry, flat."""
    sharded: bool = False
    """SPUBLISH instead of PUBLISH (Redis Cluster, a channel in the shard's slot)."""


class Ownership:
    """The scripts, bound to one shard stream (``broker.routing.Shard``: the single stream
    ``{prefix}:requests`` or one of the shards), the group and this worker's consumer name.

    Every entry a worker holds is known with the ``Ownership`` of its stream: entry ids are
    unique within a stream only, and every write for an entry goes through its stream's
    scripts, so fencing and exactly-once finals hold per shard."""

    def __init__(
        self,
        client: aioredis.Redis,
        shard: Shard,
        *,
        group: str,
        consumer: str,
        cluster: bool = False,
    ) -> None:
        self.shard = shard
        self.stream, self.dlq = shard.stream, shard.dlq
        self.group, self.consumer = group, consumer
        self.cluster = cluster
        """On Redis Cluster, events for channels in this stream's slot are SPUBLISHed."""
        self._begin = client.register_script(_BEGIN)
        self._publish = client.register_script(_PUBLISH)
        self._keepalive = client.register_script(_KEEPALIVE)
        self._claim_idle = client.register_script(_CLAIM_IDLE)

    async def claim_idle(self, cursor: str, count: int, min_idle_ms: int) -> tuple[str, list[str]]:
        """Take over up to ``count`` entries idle for ``min_idle_ms`` (any consumer's, ours
        included); returns the next cursor ("0-0" at the end) and their ids."""
        reply: Any = await self._claim_idle(
            keys=[self.stream], args=[self.group, self.consumer, min_idle_ms, cursor, count]
        )
        return _text(reply[0]), [_text(x) for x in reply[1]]

    async def begin(
        self, entry_ids: Sequence[str], *, max_deliveries: int, allow_last: bool
    ) -> list[Begun]:
        if not entry_ids:
            return []
        reply: Any = await self._begin(
            keys=[self.stream],
            args=[self.group, self.consumer, max_deliveries, int(allow_last), *entry_ids],
        )
        out = []
        for item in reply:
            raw_fields = item[3] if len(item) > 3 else []
            fields = {raw_fields[j]: raw_fields[j + 1] for j in range(0, len(raw_fields) - 1, 2)}
            out.append(Begun(_text(item[0]), _text(item[1]), int(item[2]), fields))
        return out

    async def publish(
        self, ops: Sequence[WriteOp], *, result_ttl_s: int, result_maxlen: int, dlq_maxlen: int
    ) -> set[str]:
        """Write ``ops`` in one atomic step; returns the entry ids found not ours."""
        keys: list[str] = [self.stream, self.dlq]
        index: dict[str, int] = {}
        packed: list[list[Any]] = []
        for op in ops:
            k = 0
            if op.result_key is not None:
                if op.result_key not in index:
                    keys.append(op.result_key)
                    index[op.result_key] = len(keys)
                k = index[op.result_key]
            packed.append([
                op.entry_id, op.channel, k, op.seq, op.data,
                int(op.fin), int(op.ack), int(op.fenced), list(op.dlq), int(op.sharded),
            ])  # fmt: skip
        args = [self.group, self.consumer, max(result_ttl_s, 1), result_maxlen, dlq_maxlen,
                # No bin type: Redis's cmsgpack reads only the old raw strings (bytes to Lua).
                msgpack.packb(packed, use_bin_type=False)]  # fmt: skip
        lost: Any = await self._publish(keys=keys, args=args)
        return {_text(x) for x in lost or []}

    def sharded_channel(self, channel: str) -> bool:
        """SPUBLISH for ``channel`` (``broker.routing.sharded_channel``)."""
        return sharded_channel(self.cluster, self.shard.prefix, channel)

    async def keepalive(self, entry_ids: Sequence[str]) -> set[str]:
        """Keep ``entry_ids`` from going idle; returns those that are no longer ours."""
        if not entry_ids:
            return set()
        lost: Any = await self._keepalive(
            keys=[self.stream], args=[self.group, self.consumer, *entry_ids]
        )
        return {_text(x) for x in lost or []}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


__all__: Final = ["Begun", "Ownership", "WriteOp"]
