"""Paged KV cache accounting: fixed-size blocks, allocated per request, freed on finish or preemption.

Only counts matter to the simulator (no prefix sharing yet): a request holding
`num_computed_tokens + num_new_tokens` tokens needs `ceil(tokens / block_size)` blocks.
`allocate` returns False when blocks are short; the batch policy then preempts and retries,
as vLLM's scheduler does.
"""

from __future__ import annotations

from sim.request import Request


class KVCache:
    """Invariant: 0 <= num_used_blocks <= num_blocks, and num_used_blocks equals the sum
    of `num_blocks` over the requests holding blocks."""

    __slots__ = ("num_blocks", "block_size", "num_used_blocks")

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"KVCache: num_blocks and block_size must be > 0, got {num_blocks}, {block_size}")
        self.num_blocks = int(num_blocks)
        self.block_size = int(block_size)
        self.num_used_blocks = 0

    @property
    def num_free_blocks(self) -> int:
        return self.num_blocks - self.num_used_blocks

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Reserve blocks so `request` can compute `num_new_tokens` more; False if short (nothing changes)."""
        need = -(-(request.num_computed_tokens + num_new_tokens) // self.block_size) - request.num_blocks
        if need <= 0:
            return True
        if need > self.num_blocks - self.num_used_blocks:
            return False
        self.num_used_blocks += need
        request.num_blocks += need
        return True

    def free(self, request: Request) -> None:
        """Return all of `request`'s blocks."""
        self.num_used_blocks -= request.num_blocks
        request.num_blocks = 0
