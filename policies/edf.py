"""Earliest-deadline-first batching, and the priority-ordered step EDF, SRPF and Niyama share.

Each step schedules the running decodes first (one token each, in admission order), then
gives the token budget left to prefill chunks in priority order over running prefills and
waiting requests alike, so a newly arrived urgent prompt overtakes a half-done lax one at
the next chunk. When a running request cannot get KV blocks, the running request with the
largest key (the least urgent, decode or prefill) is preempted for recompute and its tokens
this step, if any, are taken back, until the blocks fit; if the least urgent is the request
itself, it is preempted and the step schedules nothing more (`Victims`: vLLM's priority
scheduler). A waiting request never preempts: one that does not fit stops admissions
(head-of-line, as vLLM) while running prefills still get their chunks, and no waiting
request is admitted after a preemption in the step. So a step schedules or preempts
something whenever the replica holds a request. EDF's priority is the absolute first-token
deadline `arrival + first-token deadline` of the request's QoS tier (see `sim.qos`).

A waiting request's key does not change while it waits, so each policy keeps the waiting
queue as a heap across steps (`WaitingHeap`) instead of sorting it every step. Decodes come
first in any priority order, so when they all fit (the budget, and KV blocks for them and for
every running prefill's chunk, so nobody can be preempted) the replica's fast path schedules
the decode group in O(1) (`StepContext.decode_running_fast`) and only the running prefills
and the queue are looked at one by one; a step with nothing waiting and at most one running
prefill (`PrefillTracker`) is the same whatever the priority (`fast_step`). Both requests kept
across steps (queue, tracker) are dropped when a request leaves other than by a plan (`forget`).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from operator import itemgetter
from typing import Callable

from policies.common import fits_unchunked
from sim.kvcache import KVCache
from sim.qos import QoS
from sim.request import Request
from sim.scheduling import StepContext, StepPlan

_INF = float("inf")

PriorityKey = Callable[[Request], tuple]
"""Smaller keys are served first; keys end in (arrival_s, request_id) so ties break deterministically."""


class Deadlines:
    """Absolute first-token deadlines, `arrival + the tier's first-token deadline` (inf
    without one; see `sim.qos`), computed once per request. The request table's `deadline_s`
    is written when a policy first admits the request (`record`), not when it first looks at
    it: how often a policy sees a waiting request depends on the execution mode (fast-forward
    skips steps whose plan is known), what it admits does not."""

    __slots__ = ("qos", "_by_id")

    def __init__(self, qos: QoS) -> None:
        self.qos = qos
        self._by_id: dict[int, float] = {}
        """Deadlines of requests not admitted yet (and of those without one), by id."""

    def __call__(self, req: Request) -> float:
        d = req.deadline_s
        if d != _INF:  # admitted: recorded
            return d
        d = self._by_id.get(id(req))
        if d is None:
            d = req.arrival_s + self.qos.first_token_deadline_s(req.qos_class, req.num_output_tokens)
            self._by_id[id(req)] = d
        return d

    def record(self, admitted: list[Request]) -> None:
        """Write the deadlines of requests admitted this step into `req.deadline_s`."""
        for req in admitted:
            req.deadline_s = self(req)


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

    def forget(self, req: Request) -> None:
        """`req` left the waiting queue other than by this policy's plan: drop it."""
        self._pending = [r for r in self._pending if r is not req]
        if self._members.pop(id(req), None) is not None:
            self._heap = [e for e in self._heap if e[2] is not req]
            heapq.heapify(self._heap)

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

    def forget(self, req: Request) -> None:
        """`req` left the replica other than by this policy's plan: no longer running here."""
        self._busy.pop(id(req), None)


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


class Victims:
    """The running requests still holding KV blocks this step. When a running request cannot
    get blocks, the one with the largest key is preempted (recompute), as in vLLM's priority
    scheduler (`max(running, key=(priority, arrival_time))`), and its tokens this step, if it
    was already scheduled, go back to the budget. Requests admitted this step are never
    victims: prefills are served in key order, so whoever asks for blocks has a larger key
    than every request admitted before it, and is itself a candidate. Keys are computed at
    the first shortage of the step (most steps have none)."""

    __slots__ = ("running", "key", "by_key", "gone")

    def __init__(self, running: list[Request], key: PriorityKey) -> None:
        self.running = running
        self.key = key
        self.by_key: list[tuple[tuple, Request]] | None = None
        """(key, request) of the running requests not preempted yet, most urgent first."""
        self.gone: set[int] = set()
        """ids of the requests preempted this step."""

    def make_room(self, kv: KVCache, plan: StepPlan, req: Request, num_new_tokens: int) -> int:
        """Reserve blocks for running request `req` to compute `num_new_tokens` more, preempting
        the least urgent running requests until they fit. Returns the tokens given back by
        victims already scheduled this step, or -1 if `req` itself was the least urgent (it is
        then preempted and nothing was reserved)."""
        if self.by_key is None:
            key = self.key
            self.by_key = sorted(((key(r), r) for r in self.running), key=itemgetter(0))
        returned = 0
        while not kv.allocate(req, num_new_tokens):
            victim = self.by_key.pop()[1]
            kv.free(victim)
            plan.preempted.append(victim)
            self.gone.add(id(victim))
            if victim is req:
                return -1
            returned += _unschedule(plan, victim)
        return returned


_NO_VICTIMS = Victims([], None)
"""For a step in which no running request can run short of blocks (allocating never fails)."""


def _unschedule(plan: StepPlan, req: Request) -> int:
    """Take `req` out of the plan's scheduled requests; its tokens (0 if it was not there)."""
    for i, r in enumerate(plan.scheduled):
        if r is req:
            del plan.scheduled[i]
            return plan.num_new_tokens.pop(i)
    return 0


def decode_first(ctx: StepContext, plan: StepPlan, token_budget: int,
                 key: PriorityKey) -> tuple[list[tuple], Victims | None]:
    """Schedule running decodes (one token each, in admission order, at most `token_budget`
    of them), preempting the least urgent running request when KV blocks run short (see
    `Victims`). Returns the running prefills still held as (key, request), most urgent
    first, and the victims for the prefill pass; (`[]`, None) if a decode was itself the
    least urgent: the step then schedules nothing more (vLLM stops at such a request)."""
    decodes, prefills = [], []
    running = ctx.running
    for r in running:
        if r.num_prompt_tokens + r.num_output_done - r.num_computed_tokens == 1:
            decodes.append(r)
        else:
            prefills.append((key(r), r))
    if len(prefills) > 1:
        prefills.sort(key=itemgetter(0))
    victims = Victims(running, key)
    gone = victims.gone
    kv = ctx.kv
    scheduled, num_new_tokens = plan.scheduled, plan.num_new_tokens
    left = token_budget
    for r in decodes:
        if left <= 0:
            break
        if gone and id(r) in gone:
            continue
        if not kv.allocate(r, 1):
            returned = victims.make_room(kv, plan, r, 1)
            if returned < 0:
                return [], None
            left += returned
        scheduled.append(r)
        num_new_tokens.append(1)
        left -= 1
    if gone:
        prefills = [kr for kr in prefills if id(kr[1]) not in gone]
    return prefills, victims


def decode_pass(ctx: StepContext, plan: StepPlan, token_budget: int,
                key: PriorityKey) -> tuple[list[tuple], Victims | None]:
    """`decode_first`, through the replica's fast path when its outcome is certain (every
    decode fits and nobody can be preempted: `StepContext.decode_running_fast`): the decode
    group is then one entry of the plan and only running prefills are keyed."""
    prefilling = ctx.decode_running_fast(plan, token_budget)
    if prefilling is None:
        return decode_first(ctx, plan, token_budget, key)
    if not prefilling:
        return [], _NO_VICTIMS
    keyed = [(key(r), r) for r in prefilling]
    keyed.sort(key=itemgetter(0))
    return keyed, _NO_VICTIMS


def schedule_prefills(ctx: StepContext, plan: StepPlan, token_budget: int, running_prefills: list[tuple],
                      victims: Victims | None, queue: WaitingHeap,
                      should_relegate: Callable[[Request], bool] | None = None) -> int:
    """Give prefill chunks to running prefills (`running_prefills`, from `decode_first`) and
    waiting requests in key order while the budget, free sequence slots and KV blocks allow.
    A running prefill short of blocks preempts the least urgent running request (`victims`);
    if that is itself, the step schedules nothing more. A waiting request short of blocks, or
    too long for the budget with chunked prefill off (unless it may run alone,
    `fits_unchunked`), stops admissions (head-of-line, as vLLM); running prefills go on. No
    waiting request is admitted after a preemption in the step.

    With `should_relegate`, a waiting request never scheduled before and not yet relegated
    for which it returns True is relegated: flagged, reported in `plan.relegated` and
    re-queued under its new key (which sorts behind every non-relegated request); it may
    still be served this step. Returns the budget left."""
    limits = ctx.limits
    free_seqs = limits.max_num_seqs - ctx.num_running
    chunked = limits.enable_chunked_prefill
    kv = ctx.kv
    allow_waiting = True
    i = 0
    while token_budget > 0:
        rk = running_prefills[i][0] if i < len(running_prefills) else None
        if allow_waiting and (plan.preempted or len(plan.admitted) >= free_seqs):
            allow_waiting = False
        wk = queue.peek_key() if allow_waiting else None
        if rk is None and wk is None:
            break
        running = wk is None or (rk is not None and rk <= wk)
        if running:
            req = running_prefills[i][1]
            i += 1
            if victims.gone and id(req) in victims.gone:
                continue
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
            if chunked:
                num_new = token_budget
            elif not fits_unchunked(ctx, plan, num_new):
                if not running:
                    queue.push(req)
                    allow_waiting = False
                continue
        if running:
            if not kv.allocate(req, num_new):
                returned = victims.make_room(kv, plan, req, num_new)
                if returned < 0:
                    break
                token_budget += returned
        elif not kv.allocate(req, num_new):
            queue.push(req)
            allow_waiting = False
            continue
        plan.scheduled.append(req)
        plan.num_new_tokens.append(num_new)
        token_budget -= num_new
        if not running:
            plan.admitted.append(req)
    return max(token_budget, 0)


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
        plan = StepPlan()
        self.queue.sync(ctx.waiting)
        prefills, victims = decode_pass(ctx, plan, budget, self.key)
        budget -= len(plan)
        if victims is not None and budget > 0:
            schedule_prefills(ctx, plan, budget, prefills, victims, self.queue)
        self.queue.note_preempted(plan.preempted)
        self.prefills.note(plan)
        return plan

    def forget(self, req: Request) -> None:
        """`req` left the replica other than by this policy's plans (a controller's eviction or
        migration): it is no longer queued or running here."""
        self.queue.forget(req)
        self.prefills.forget(req)


class EDF(PriorityBatching):
    """Earliest first-token deadline first (deadlines from the QoS tiers; requests without
    one go last, in arrival order)."""

    def __init__(self, slo: object = None, token_budget: int | None = None) -> None:
        self.qos = QoS.from_config(slo)
        """Tiers the deadlines come from (an slo config: `classes: {name: {ttft_s, tbt_s, e2e_s}}`)."""
        self.deadline = Deadlines(self.qos)
        super().__init__(token_budget)

    def key(self, req: Request) -> tuple:
        return (self.deadline(req), req.arrival_s, req.request_id)

    def schedule(self, ctx: StepContext) -> StepPlan:
        plan = super().schedule(ctx)
        if plan.admitted:
            self.deadline.record(plan.admitted)
        return plan
