"""KV-cache blocks: which fixed-size blocks of the paged cache each request holds, and
which hold a reusable prefix.

Pure Python (no torch). A block is an int id in ``0..num_blocks-1`` holding the keys and
values of ``block_size`` consecutive token positions; a request's ``block_table`` lists its
blocks in position order, so token ``p`` lives in slot
``block_table[p // block_size] * block_size + p % block_size``.

Allocation is a pair of verbs, ``can_allocate`` / ``allocate_slots``; running short of
blocks is an answer (``False``), never an exception — the scheduler decides whom to preempt.

Prefix caching (``enable_caching``). Once a step is scheduled to compute a request's tokens
up to the end of a block, the block is entered in the cache under its hash
(``engine.core.kv_cache_utils``: parent hash, adapter id, token ids), provided its tokens
are known (a block that a ``PLACEHOLDER`` completes is entered at the request's next
allocation). ``find_cached_blocks`` gives a request being admitted the longest run of cached
blocks that starts its tokens; they join its block table shared, and its computation starts
after them. Blocks are reference-counted: a block goes back to the free pool when its last
holder frees it, and one with a hash stays findable there. Allocation takes never-hashed
free blocks first, then evicts cached free blocks least recently freed first; a request
frees its blocks last block first, so the start of a prefix, which more requests share, is
evicted last. Entering a block as the scheduler schedules it is safe because every step
runs on one device stream in launch order and each attention layer stores the step's keys
and values before it reads the cache: a request that finds a block in the same step or the
next one reads keys and values already written.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

from engine.core.kv_cache_utils import BlockHash, block_hashes
from engine.sequence import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(
                f"BlockManager.num_blocks={num_blocks!r} is invalid: must be an integer >= 1"
            )
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(
                f"BlockManager.block_size={block_size!r} is invalid: must be an integer >= 1"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._ref_counts = [0] * num_blocks
        self._free_blocks: deque[int] = deque(range(num_blocks))
        """Free blocks without a hash."""
        self._evictable: OrderedDict[int, None] = OrderedDict()
        """Free blocks with a hash, least recently freed first."""
        self._cached: dict[BlockHash, int] = {}
        """Hash → the block that holds it (in use or free)."""
        self._block_hash: dict[int, tuple[BlockHash, int]] = {}
        """Block → (its hash, its adapter id), for the blocks in ``_cached``."""
        self.num_evictions = 0
        """Cached blocks given a new content so far."""

    # ------------------------------------------------------------------ sizes
    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds, cached ones included (they are evicted on demand)."""
        return len(self._free_blocks) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable by hash, in use or free."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return self.num_used_blocks / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` token positions."""
        return -(-num_tokens // self.block_size)

    def ref_count(self, block: int) -> int:
        """Requests holding ``block``."""
        return self._ref_counts[block]

    # ------------------------------------------------------------------ prefix cache
    def find_cached_blocks(self, request: Request) -> list[int]:
        """The longest run of cached blocks that starts ``request``'s tokens, for a request
        that holds no blocks. It never covers the last token: that one is computed to sample
        from. Empty without prefix caching."""
        if not self.enable_caching or request.block_table:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        found: list[int] = []
        for h in block_hashes(request, self.block_size, max_blocks)[:max_blocks]:
            block = self._cached.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def evict_adapter(self, lora_id: int) -> None:
        """Forget the cached blocks of adapter ``lora_id``: once an adapter is removed its id
        may come back naming other weights. Requests holding such blocks keep them."""
        for block, (h, block_lora) in list(self._block_hash.items()):
            if block_lora != lora_id:
                continue
            del self._cached[h]
            del self._block_hash[block]
            if block in self._evictable:
                del self._evictable[block]
                self._free_blocks.append(block)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (a benchmark's timed runs each start cold). Requests
        holding blocks keep them."""
        self._cached.clear()
        self._block_hash.clear()
        self._free_blocks.extend(self._evictable)
        self._evictable.clear()

    # ------------------------------------------------------------------ allocation
    def num_new_blocks(
        self, request: Request, num_new_tokens: int, num_cached_blocks: int = 0
    ) -> int:
        """Blocks ``request`` lacks for its first ``num_computed_tokens + num_new_tokens``
        tokens, after ``num_cached_blocks`` cached blocks (of ``block_size`` tokens each)."""
        held = len(request.block_table) + num_cached_blocks
        end = request.num_computed_tokens + num_cached_blocks * self.block_size + num_new_tokens
        return max(self.num_blocks_for(end) - held, 0)

    def can_allocate(
        self, request: Request, num_new_tokens: int, cached_blocks: Sequence[int] = ()
    ) -> bool:
        # Cached blocks that no one holds sit among the free ones: taking them leaves fewer.
        revived = sum(1 for b in cached_blocks if self._ref_counts[b] == 0)
        needed = self.num_new_blocks(request, num_new_tokens, len(cached_blocks))
        return needed <= self.num_free_blocks - revived

    def allocate_slots(
        self, request: Request, num_new_tokens: int, cached_blocks: Sequence[int] = ()
    ) -> bool:
        """Grow ``request.block_table`` so its next ``num_new_tokens`` tokens have slots.

        ``cached_blocks`` (from ``find_cached_blocks``, for a request that holds no blocks)
        come first, shared; the new tokens follow them. Returns False and allocates nothing
        when too few blocks are free.
        """
        # Called for every running request every step: one pass, no helper calls.
        table = request.block_table
        size = self.block_size
        num_cached = len(cached_blocks)
        end = request.num_computed_tokens + num_cached * size + num_new_tokens
        num_new = -(-end // size) - len(table) - num_cached
        if num_cached:
            if table:
                raise ValueError("cached blocks start a block table: the request holds blocks")
            # Cached blocks no one holds sit among the free ones: taking them leaves fewer.
            revived = sum(1 for b in cached_blocks if self._ref_counts[b] == 0)
            if num_new > len(self._free_blocks) + len(self._evictable) - revived:
                return False
            for block in cached_blocks:
                if self._ref_counts[block] == 0:
                    del self._evictable[block]
                self._ref_counts[block] += 1
            table.extend(cached_blocks)
        elif num_new > len(self._free_blocks) + len(self._evictable):
            return False
        if num_new > 0:
            table.extend(self._take_free_block() for _ in range(num_new))
        if self.enable_caching and end // size > request.num_hashed_blocks:
            self._cache_full_blocks(request, end)
        return True

    def free(self, request: Request) -> None:
        """Release all of ``request``'s blocks and clear its block table; cached ones stay
        findable until evicted."""
        for block in reversed(request.block_table):  # the end of a prefix is evicted first
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                if block in self._block_hash:
                    self._evictable[block] = None
                else:
                    self._free_blocks.append(block)
        request.block_table.clear()
        request.num_hashed_blocks = 0

    # ------------------------------------------------------------------ helpers
    def _take_free_block(self) -> int:
        if self._free_blocks:
            block = self._free_blocks.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            h, _ = self._block_hash.pop(block)
            del self._cached[h]
            self.num_evictions += 1
        self._ref_counts[block] = 1
        return block

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Enter ``request``'s full blocks of its first ``num_tokens`` tokens (being computed
        or computed) in the cache, those whose tokens are known."""
        num_full = num_tokens // self.block_size
        start = request.num_hashed_blocks
        if num_full <= start:
            return
        hashes = block_hashes(request, self.block_size, num_full)
        end = min(num_full, len(hashes))
        lora_id = request.lora_int_id
        for i in range(start, end):
            block, h = request.block_table[i], hashes[i]
            # A block found in the cache has its hash already; one whose content another
            # block holds stays unnamed (either serves a later request equally).
            if block not in self._block_hash and h not in self._cached:
                self._cached[h] = block
                self._block_hash[block] = (h, lora_id)
        request.num_hashed_blocks = max(start, end)
