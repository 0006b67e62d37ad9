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

A policy may also ask for the earliest due time of the members' next tokens, `a + s *
num_output_done` with `(a, s)` fixed per member while it decodes (`min_due`); `DueTimes`
answers in O(1) typical work per step, bit for bit as a loop over the members would.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, insort
from typing import Callable

from sim.request import Request

DueFn = Callable[[Request], "tuple[float, float] | None"]
"""A member's due-time terms `(a, s)`: its next token is due at `a + s * num_output_done`
(None: no due time). Must depend only on what does not change while the request decodes."""


class DueTimes:
    """The least `a + s * n` over members, where `n = d + clock` is a member's output tokens so
    far (`d` fixed while it is in the group), evaluated exactly as `a + s * n` in floating point.

    Members are kept per slope `s`, sorted by `K = a + s * d`. In exact arithmetic the order
    by `K + s * clock` is the order of the due times at every clock; floating-point rounding
    can only swap members whose `K` are within a few ulps of each other. So `least` evaluates
    exactly every member whose `K` is within a bound on that rounding of the smallest one
    (usually one member per slope) and returns the least of those values, which is the least
    over all members. Members with non-finite terms are evaluated every time (`odd`)."""

    __slots__ = ("fn", "by_slope", "of", "odd", "_seq")

    def __init__(self, fn: DueFn) -> None:
        self.fn = fn
        self.by_slope: dict[float, list] = {}  # s -> [sorted [(K, seq, req, a, d)], magnitude bound]
        self.of: dict[Request, tuple] = {}  # member -> (s, K, seq) of its entry, or None when in `odd`
        self.odd: dict[Request, tuple[float, float, int]] = {}
        self._seq = 0

    def add(self, req: Request, d: int) -> None:
        terms = self.fn(req)
        if terms is None:
            return
        a, s = terms
        if not (math.isfinite(a) and math.isfinite(s)):
            self.odd[req] = (a, s, d)
            self.of[req] = None
            return
        k = a + s * d
        self._seq += 1
        entry = self.by_slope.get(s)
        if entry is None:
            entry = self.by_slope[s] = [[], 0.0]
        insort(entry[0], (k, self._seq, req, a, d))
        m = abs(a) + abs(s * d) + abs(k)
        if m > entry[1]:
            entry[1] = m
        self.of[req] = (s, k, self._seq)

    def remove(self, req: Request) -> None:
        if req not in self.of:
            return
        where = self.of.pop(req)
        if where is None:
            del self.odd[req]
            return
        s, k, seq = where
        entry = self.by_slope[s]
        items = entry[0]
        del items[bisect_left(items, (k, seq))]
        if not items:
            del self.by_slope[s]

    def least(self, clock: int) -> float:
        best = math.inf
        for s, (items, bound) in self.by_slope.items():
            # |rounding of K| + |rounding of a due time| <= 2.01 u (|a| + |s d| + |s clock|) each;
            # two members compared: 8.04 u; 36 u leaves a wide margin (u = 2**-53)
            limit = items[0][0] + 4e-15 * (bound + abs(s) * clock)
            for k, _, _, a, d in items:
                if k > limit:
                    break
                v = a + s * (d + clock)
                if v < best:
                    best = v
        for a, s, d in self.odd.values():
            v = a + s * (d + clock)
            if v < best:
                best = v
        return best


class DecodeGroup:
    """`members` maps each member (in join order) to its [base, rem0]."""

    __slots__ = ("members", "by_rem0", "rem0_heap", "clock", "block_size", "base_sum", "residues", "_seq_max",
                 "due")

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.clock = 0
        self.due: DueTimes | None = None
        self._reset()

    def _reset(self) -> None:
        self.members: dict[Request, tuple[int, int]] = {}
        self.by_rem0: dict[int, list[Request]] = {}
        self.rem0_heap: list[int] = []
        self.base_sum = 0
        self.residues = [0] * self.block_size  # members per (base mod block_size)
        self._seq_max: int | None = -1
        if self.due is not None:
            self.due = DueTimes(self.due.fn)

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

    def min_due(self, fn: DueFn) -> float:
        """Least due time `a + s * num_output_done` over members, `(a, s) = fn(member)` (inf if
        none); `fn` is kept to track members as they join and leave (a new `fn` re-indexes)."""
        due = self.due
        if due is None or (due.fn is not fn and due.fn != fn):
            due = self.due = DueTimes(fn)
            for req, (_, rem0) in self.members.items():
                due.add(req, req.num_output_tokens - rem0)
        return due.least(self.clock)

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
        due = self.due
        if due is not None:
            for r in reqs:
                due.add(r, r.num_output_done - clock)

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
        due = self.due
        for req in out:
            base, rem0 = members.pop(req)
            self._sync_one(req, base, rem0)
            self.residues[base % bs] -= 1
            self.base_sum -= base
            if due is not None:
                due.remove(req)
        self._seq_max = None
        return out

    def dissolve(self) -> list[Request]:
        """Sync and remove every member; return them."""
        self.sync()
        out = list(self.members)
        self._reset()
        return out
