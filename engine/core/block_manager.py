"""KV-cache blocks: which fixed-size blocks of the paged cache each request owns.

Pure Python (no torch). A block is an int id in ``0..num_blocks-1`` holding the keys and
values of ``block_size`` consecutive token positions; a request's ``block_table`` lists its
blocks in position order, so token ``p`` lives in slot
``block_table[p // block_size] * block_size + p % block_size``. No prefix caching: every
block has exactly one owner.

Allocation is a pair of verbs, ``can_allocate`` / ``allocate_slots``; running short of
blocks is an answer (``False``), never an exception — the scheduler decides whom to preempt.
"""

from __future__ import annotations

from collections import deque

from engine.sequence import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
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
        self._free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free_blocks)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return self.num_used_blocks / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` token positions."""
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, request: Request, num_new_tokens: int) -> int:
        """Blocks ``request`` lacks for its first ``num_computed_tokens + num_new_tokens`` tokens."""
        needed = self.num_blocks_for(request.num_computed_tokens + num_new_tokens)
        return max(needed - len(request.block_table), 0)

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        return self.num_new_blocks(request, num_new_tokens) <= len(self._free_blocks)

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Grow ``request.block_table`` so its next ``num_new_tokens`` tokens have slots.

        Returns False and allocates nothing when too few blocks are free.
        """
        num_new = self.num_new_blocks(request, num_new_tokens)
        if num_new > len(self._free_blocks):
            return False
        request.block_table.extend(self._free_blocks.popleft() for _ in range(num_new))
        return True

    def free(self, request: Request) -> None:
        """Return all of ``request``'s blocks to the pool and clear its block table."""
        self._free_blocks.extend(request.block_table)
        request.block_table.clear()
