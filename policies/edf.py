"""Earliest-deadline-first batching, and the priority-ordered step EDF, SRPF and Niyama share.

Each step schedules the running decodes first (one token each, in admission order; when KV
blocks run short the least urgent running prefill goes first, then the most recently
admitted decode, preempted for recompute). The token budget left then goes to prefill
chunks in priority order over running prefills and waiting requests alike, so a newly
arrived urgent prompt overtakes a half-done lax one at the next chunk. No request is
admitted in a step that preempted (as vLLM). EDF's priority is the absolute first-token
deadline `arrival + first-token deadline` of the request's QoS tier (see `sim.qos`).

A waiting request's key does not change while it waits, so each policy keeps the waiting
queue as a heap across steps (`WaitingHeap`) instead of sorting it every step. A step with
nothing waiting and at most one running prefill (`PrefillTracker`) is the same whatever
the priority, so it takes the replica's O(1) decode-group path (`fast_step`).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from typing import Callable

from policies.common import continue_running
from sim.qos import QoS
from sim.request import Request
from sim.scheduling import StepContext, StepPlan

PriorityKey = Callable[[Request], tuple]
"""Smaller keys are served first; keys end in (arrival_s, request_id) so ties break deterministically."""


def assign_deadline(req: Request, qos: QoS) -> float:
    """The request's absolute first-token deadline, stored in `req.deadline_s` on first use."""
    d = req.deadline_s
    if d == math.inf:
        d = req.arrival_s + qos.first_token_deadline_s(req.qos_class, req.num_output_tokens)
        req.deadline_s = d
    return d


class WaitingHeap:
    """The replica's waiting queue in key order. Invariant after `sync`: holds exactly the
    requests of the waiting deque. Requests enter the deque at its right end (arrivals) or
    through this policy's own plans (preemptions, relegations), and leave it only when this
    policy admits them, so a sync only scans the new arrivals; any mismatch rebuilds."""

    def __init__(self, key: PriorityKey) -> None:
        self.key = key
        self._heap: list[tuple] = []
        self._members: dict[int, Request] = {}
        self._pending: list[Request] = []  # preempted this step: keyed once the replica resets them
        self._seq = itertools.count()

    def sync(self, waiting: deque) -> None:
        for req in self._pending:
            if id(req) not in self._members:
                self.push(req)
        self._pending.clear()
        for req in reversed(waiting):
            if id(req) in self._members:
                break
            self.push(req)
        if len(self._members) != len(waiting):
            self._members = {id(r): r for r in waiting}
            self._heap = [(self.key(r), next(self._seq), r) for r in waiting]
            heapq.heapify(self._heap)

    def push(self, req: Request) -> None:
        self._members[id(req)] = req
        heapq.heappush(self._heap, (self.key(req), next(self._seq), req))

    def peek_key(self) -> tuple | None:
        return self._heap[0][0] if self._heap else None

    def pop(self) -> Request:
        req = heapq.heappop(self._heap)[2]
        del self._members[id(req)]
        return req

    def note_preempted(self, victims: list[Request]) -> None:
        self._pending.extend(victims)

    def __len__(self) -> int:
        return len(self._heap)


class PrefillTracker:
    """Running requests that have not emitted a token at the step they were last scheduled
    in (prefills and recomputes), kept from the policy's own plans. Empty means every
    running request is decoding, so a step without waiting requests only decodes."""

    def __init__(self) -> None:
        self._busy: dict[int, Request] = {}

    def note(self, plan: StepPlan) -> None:
        """Record a plan before the replica applies it (counters are still pre-step)."""
        busy = self._busy
        for r, n in zip(plan.scheduled, plan.num_new_tokens):
            if r.num_prompt_tokens + r.num_output_done - r.num_computed_tokens > n:
                busy[id(r)] = r
            elif busy:
                busy.pop(id(r), None)
        for r in plan.preempted:
            busy.pop(id(r), None)

    def requests(self) -> list[Request]:
        return list(self._busy.values()) if self._busy else []


def fast_step(ctx: StepContext, tracker: PrefillTracker, token_budget: int, *, prefills_ok: bool) -> StepPlan | None:
    """The step's plan through the replica's O(1) decode-group path when no priority can
    change it: nothing waits and no prefill is running, or (`prefills_ok`, for fixed-budget
    policies) one prefill is running or every running request's whole demand fits the
    budget. None when the general path must decide (nothing changed)."""
    if ctx.waiting:
        return None
    busy = tracker.requests()
    if busy:
        if not prefills_ok:
            return None
        if len(busy) > 1:
            demand = ctx.num_running - len(busy)
            for r in busy:
                demand += r.num_prompt_tokens + r.num_output_done - r.num_computed_tokens
            if demand > token_budget:
                return None
    plan = StepPlan()
    if ctx.continue_running_fast(plan, token_budget) is None:
        return None
    tracker.note(plan)
    return plan


def decode_first(ctx: StepContext, plan: StepPlan, token_budget: int, key: PriorityKey) -> tuple[list[tuple], int]:
    """Schedule running decodes (one token each, at most `token_budget` of them), preempting
    when KV blocks run short; return the running prefills still held as (key, request),
    most urgent first, and how many requests were running at the start of the step."""
    decodes, prefills = [], []
    running = ctx.running
    for r in running:
        if r.num_prompt_tokens + r.num_output_done - r.num_computed_tokens == 1:
            decodes.append(r)
        else:
            prefills.append((key(r), r))
    if len(prefills) > 1:
        prefills.sort(key=lambda kr: kr[0])
    if decodes and token_budget > 0:
        # Victims come from the end of this list: the least urgent prefill first.
        continue_running(ctx, plan, min(len(decodes), token_budget), running=decodes + [r for _, r in prefills])
        if plan.preempted:
            gone = {id(r) for r in plan.preempted}
            prefills = [kr for kr in prefills if id(kr[1]) not in gone]
    return prefills, len(running)


def schedule_prefills(ctx: StepContext, plan: StepPlan, token_budget: int, running_prefills: list[tuple],
                      num_running: int, queue: WaitingHeap,
                      should_relegate: Callable[[Request], bool] | None = None) -> int:
    """Give prefill chunks to running prefills and waiting requests in key order while the
    budget, free sequence slots and KV blocks allow; stop at the first that does not fit in
    KV (head-of-line, as vLLM). No waiting request is admitted in a step that preempted.

    With `should_relegate`, a waiting request never scheduled before and not yet relegated
    for which it returns True is relegated: flagged, reported in `plan.relegated` and
    re-queued under its new key (which sorts behind every non-relegated request); it may
    still be served this step. Returns the budget left."""
    free_seqs = ctx.limits.max_num_seqs - (num_running - len(plan.preempted))
    allow_waiting = not plan.preempted and free_seqs > 0
    chunked = ctx.limits.enable_chunked_prefill
    kv = ctx.kv
    i = 0
    while token_budget > 0:
        rk = running_prefills[i][0] if i < len(running_prefills) else None
        wk = queue.peek_key() if allow_waiting else None
        if rk is None and wk is None:
            break
        running = wk is None or (rk is not None and rk <= wk)
        if running:
            req = running_prefills[i][1]
            i += 1
        else:
            req = queue.pop()
            if (should_relegate is not None and not req.relegated and req.num_computed_tokens == 0
                    and req.first_scheduled_s != req.first_scheduled_s  # NaN: never scheduled
                    and should_relegate(req)):
                req.relegated = True
                plan.relegated.append(req)
                queue.push(req)
                continue
        num_new = req.num_prompt_tokens + req.num_output_done - req.num_computed_tokens
        if num_new > token_budget:
            if not chunked:
                if not running:
                    queue.push(req)
                break
            num_new = token_budget
        if not kv.allocate(req, num_new):
            if not running:
                queue.push(req)
            break
        plan.scheduled.append(req)
        plan.num_new_tokens.append(num_new)
        token_budget -= num_new
        if not running:
            plan.admitted.append(req)
            free_seqs -= 1
            if free_seqs == 0:
                allow_waiting = False
    return token_budget


class PriorityBatching:
    """Decode first, then prefill chunks in `key` order under a fixed per-step token budget.
    EDF and SRPF are this with their keys; Niyama adds dynamic budgets and relegation."""

    fast_forward_safe = True  # an all-decode batch with nothing admissible: decode everything, as FCFS

    def __init__(self, token_budget: int | None = None) -> None:
        if token_budget is not None and token_budget < 1:
            raise ValueError(f"{type(self).__name__}: token_budget must be >= 1 or None, got {token_budget}")
        self.token_budget = token_budget
        """Tokens per step; None means the replica's `max_num_batched_tokens`."""
        self.queue = WaitingHeap(self.key)
        self.prefills = PrefillTracker()

    def key(self, req: Request) -> tuple:
        raise NotImplementedError

    def schedule(self, ctx: StepContext) -> StepPlan:
        budget = min(self.token_budget or ctx.limits.max_num_batched_tokens, ctx.limits.max_num_batched_tokens)
        fast = fast_step(ctx, self.prefills, budget, prefills_ok=True)
        if fast is not None:
            return fast
        if not self.prefills.requests():
            # No running prefill: the decode pass is the same in any order, so let the replica
            # do it in O(1); the waiting queue then gets the budget left in key order.
            plan = StepPlan()
            left = ctx.continue_running_fast(plan, budget)
            if left is not None:
                if left > 0:
                    self.queue.sync(ctx.waiting)
                    schedule_prefills(ctx, plan, left, [], ctx.num_running, self.queue)
                self.prefills.note(plan)
                return plan
        plan = StepPlan()
        self.queue.sync(ctx.waiting)
        prefills, num_running = decode_first(ctx, plan, budget, self.key)
        budget -= len(plan.scheduled)
        if budget > 0:
            schedule_prefills(ctx, plan, budget, prefills, num_running, self.queue)
        self.queue.note_preempted(plan.preempted)
        self.prefills.note(plan)
        return plan


class EDF(PriorityBatching):
    """Earliest first-token deadline first (deadlines from the QoS tiers; requests without
    one go last, in arrival order)."""

    def __init__(self, slo: object = None, token_budget: int | None = None) -> None:
        self.qos = QoS.from_config(slo)
        """Tiers the deadlines come from (an slo config: `classes: {name: {ttft_s, tbt_s, e2e_s}}`)."""
        super().__init__(token_budget)

    def key(self, req: Request) -> tuple:
        return (assign_deadline(req, self.qos), req.arrival_s, req.request_id)
