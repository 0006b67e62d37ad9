"""The decode group: running requests in steady decode, kept with O(1) aggregates.

Most of a replica's batch, most of the time, is requests that each compute one token per
step. The group keeps their counters relative to a shared step clock (a member's context is
`base + clock`, its output left `rem0 - clock`), plus aggregates (context sum, members per
context residue mod the block size, members bucketed by `rem0`), so advancing every member
by a step, pricing it, reserving its KV blocks and finding who finishes are O(1) Python work.
Members' `Request` objects are stale while in the group; `sync` writes the counters back
(before a policy reads them, a request leaves, or the run ends).
Invariant: every member emitted a token at every replica step since it joined, so its
token run simply extends to the latest step.
"""

from __future__ import annotations

import heapq

from sim.request import Request


class DecodeGroup:
    """`members` maps each member (in join order) to its [base, rem0]."""

    __slots__ = ("members", "by_rem0", "rem0_heap", "clock", "block_size", "base_sum", "residues", "_seq_max")

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.clock = 0
        self._reset()

    def _reset(self) -> None:
        self.members: dict[Request, tuple[int, int]] = {}
        self.by_rem0: dict[int, list[Request]] = {}
        self.rem0_heap: list[int] = []
        self.base_sum = 0
        self.residues = [0] * self.block_size  # members per (base mod block_size)
        self._seq_max: int | None = -1

    def __len__(self) -> int:
        return len(self.members)

    # ------------------------------------------------------------ aggregates
    def ctx_sum(self) -> int:
        """Sum of members' num_computed_tokens."""
        return self.base_sum + len(self.members) * self.clock

    @property
    def rem0_min(self) -> int:
        return self.rem0_heap[0] if self.rem0_heap else 1 << 62

    def min_remaining(self) -> int:
        """Least output tokens any member still has to emit."""
        return self.rem0_min - self.clock

    def num_new_blocks(self, ahead: int = 0) -> int:
        """Members that need a new KV block to compute their token `ahead` steps from now."""
        return self.residues[(-(self.clock + ahead)) % self.block_size]

    @property
    def seq_max(self) -> int:
        """Latest admission sequence number among members (-1 if none)."""
        if self._seq_max is None:
            self._seq_max = max((r.admit_seq for r in self.members), default=-1)
        return self._seq_max

    # --------------------------------------------------------------- changes
    def add(self, reqs: list[Request]) -> None:
        """Join requests whose objects are up to date and that just emitted a token."""
        clock, bs = self.clock, self.block_size
        members, by_rem0, residues = self.members, self.by_rem0, self.residues
        for r in reqs:
            base = r.num_computed_tokens - clock
            rem0 = r.num_output_tokens - r.num_output_done + clock
            members[r] = (base, rem0)
            bucket = by_rem0.get(rem0)
            if bucket is None:
                by_rem0[rem0] = [r]
                heapq.heappush(self.rem0_heap, rem0)
            else:
                bucket.append(r)
            residues[base % bs] += 1
            self.base_sum += base
            if self._seq_max is not None and r.admit_seq > self._seq_max:
                self._seq_max = r.admit_seq

    def advance(self, m: int) -> None:
        """Every member computes `m` more tokens and emits `m` more output tokens."""
        self.clock += m

    def _sync_one(self, req: Request, base: int, rem0: int) -> None:
        ctx = base + self.clock
        steps = ctx - req.num_computed_tokens
        if steps:
            req.num_computed_tokens = ctx
            req.num_output_done = req.num_output_tokens - (rem0 - self.clock)
            req.last_token_step += steps
            req.token_steps[-1] = req.last_token_step
        req.num_blocks = -(-ctx // self.block_size)

    def sync(self) -> None:
        """Write every member's counters back to its Request object."""
        for req, (base, rem0) in self.members.items():
            self._sync_one(req, base, rem0)

    def take_finished(self) -> list[Request]:
        """Remove members with no output left; return their (synced) objects."""
        heap = self.rem0_heap
        out: list[Request] = []
        while heap and heap[0] <= self.clock:
            rem0 = heapq.heappop(heap)
            out.extend(self.by_rem0.pop(rem0))
        if not out:
            return out
        bs = self.block_size
        members = self.members
        for req in out:
            base, rem0 = members.pop(req)
            self._sync_one(req, base, rem0)
            self.residues[base % bs] -= 1
            self.base_sum -= base
        self._seq_max = None
        return out

    def dissolve(self) -> list[Request]:
        """Sync and remove every member; return them."""
        self.sync()
        out = list(self.members)
        self._reset()
        return out
