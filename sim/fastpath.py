"""The fast path: exact shortcuts that make a run cost the events that change batches, not tokens.

Everything a replica does faster than one request at a time lives here; the replica's step
loop calls it, batch policies reach it only through `StepContext`:
- `Batch`, a replica's running requests. Those in steady decode (they emitted a token at the
  previous step) live in a `DecodeGroup` (`sim/decodes.py`) that advances, prices and
  reserves KV for all of them in O(1) Python work; the others (prefilling) stay objects.
  `continue_fcfs` (FCFS order) and `decode_all` (every decode first, for priority policies)
  put the whole group in a plan as one entry when the outcome is certain, and decline
  (nothing changed) when the per-request path must decide;
- `FastForward`: when the batch is stable (only grouped decodes, nothing admissible
  waiting), the replica does not ask the policy and advances many decode steps in one SimPy
  event, cut short by an arrival or a controller's release;
- `DecodePricing`: decode-only steps priced with the cost model's `decode_step_time_fn`.
`fast_forward=False` turns all of it off: the per-request reference the property tests
compare with (request and step tables identical, times bit for bit).

Two contracts make the shortcuts exact. Under `check_plans` both are checked as a run goes:
- `fast_forward_safe = True` on a batch policy: when every running request is in the decode
  group and nothing waiting can be admitted (the queue is empty or `max_num_seqs` are
  running), its plan decodes every running request once and does nothing else, and leaves the
  policy's own state as it was. The replica then skips the policy; `check_stable_plan` asks
  it anyway on the per-request path at every skipped step the loop takes alone and at each
  fast-forward chunk boundary, and raises `PlanError` on any other plan;
- a cost model's optional `decode_step_time_fn(n)`: a function `f` of the decode context sum
  with `f(c) == step_time_s(0, 0, n, c, n)` bit for bit (checked on every use).
"""

from __future__ import annotations

from bisect import bisect_left
from functools import partial
from heapq import heappush
from operator import attrgetter
from typing import Callable, Protocol

import simpy

from sim.costmodel import CostModel
from sim.decodes import DecodeGroup, DueFn
from sim.kvcache import KVCache
from sim.request import Request
from sim.scheduling import EngineLimits, PlanError, StepContext, StepPlan
from sim.steplog import StepLog

STEP_END_PRIORITY = 2
"""SimPy priority of step ends: after URGENT (0) and NORMAL (1) events at the same time."""


class StepEnd(simpy.events.Event):
    """A timeout that fires at the absolute time `at_s`, after every other kind of event due
    then (see `sim.replica` on ties). Absolute, so that a fast-forward chunk and the steps it
    stands for end at bit-identical times (`now + (t - now)` may differ from `t`)."""

    __slots__ = ()

    def __init__(self, env: simpy.Environment, at_s: float) -> None:
        # as simpy.events.Timeout.__init__, scheduled at an absolute time and a later priority
        self.env = env
        self.callbacks = []
        self._value = None
        self._ok = True
        heappush(env._queue, (at_s, STEP_END_PRIORITY, next(env._eid), self))  # simpy<5 internals


class DecodeStepTime(Protocol):
    """The optional cost-model method the fast path prices decode runs with."""

    def decode_step_time_fn(self, num_decodes: int) -> Callable[[int], float]:
        """`f` with `f(decode_context_sum) == step_time_s(0, 0, num_decodes, decode_context_sum,
        num_decodes)` bit for bit (fold what does not depend on the context once)."""
        ...


class DecodePricing:
    """Step time of `n` decodes as a function of their context sum, per `n` (the cost model's
    `decode_step_time_fn` when it has one, else `step_time_s`); `check` compares every value
    with `step_time_s` (the contract, under `check_plans`)."""

    __slots__ = ("cost_model", "check", "_fns")

    def __init__(self, cost_model: CostModel, check: bool = False) -> None:
        self.cost_model = cost_model
        self.check = check
        self._fns: dict[int, Callable[[int], float]] = {}

    def __call__(self, n: int) -> Callable[[int], float]:
        fn = self._fns.get(n)
        if fn is None:
            step_time_s = self.cost_model.step_time_s
            make = getattr(self.cost_model, "decode_step_time_fn", None)
            if make is None:
                fn = partial(_decode_step_time, step_time_s, n)
            else:
                fn = make(n)
                if self.check:
                    fn = partial(_checked_decode_step_time, fn, step_time_s, n, self.cost_model)
            self._fns[n] = fn
        return fn


def _decode_step_time(step_time_s, n: int, decode_context_sum: int) -> float:
    return step_time_s(0, 0, n, decode_context_sum, n)


def _checked_decode_step_time(fn, step_time_s, n: int, cost_model, decode_context_sum: int) -> float:
    d = fn(decode_context_sum)
    ref = step_time_s(0, 0, n, decode_context_sum, n)
    if d != ref:
        raise PlanError(f"cost model {getattr(cost_model, 'name', type(cost_model).__name__)}: "
                        f"decode_step_time_fn({n})({decode_context_sum}) = {d!r} != step_time_s(...) = {ref!r}")
    return d


_admit_seq = attrgetter("admit_seq")
_NOBODY: tuple = ()


class Batch:
    """A replica's running requests. Invariant: each is in `prefilling` (admission order) or
    in `group`, and holds KV blocks; after every step `prefilling` holds only requests that did
    not emit a token at it (with `enabled` False, every running request: the group stays empty)."""

    __slots__ = ("prefilling", "group", "kv", "limits", "enabled", "waiting_with_tokens")

    def __init__(self, kv: KVCache, limits: EngineLimits, enabled: bool) -> None:
        self.prefilling: list[Request] = []
        self.group = DecodeGroup(kv.block_size)
        self.kv = kv
        self.limits = limits
        self.enabled = enabled
        self.waiting_with_tokens = 0
        """Requests that joined the replica's queue with computed tokens and no KV blocks (a KV
        transfer's arrival; the replica counts them), since the queue last held none."""

    def __len__(self) -> int:
        return len(self.prefilling) + len(self.group.members)

    # ------------------------------------------------------------------ views
    def requests(self) -> list[Request]:
        """Every running request as an up-to-date object, in admission order; dissolves the
        group (the next step re-forms it). Returns `prefilling`, which then holds them all."""
        if len(self.group.members):
            merged = self.prefilling + self.group.dissolve()
            merged.sort(key=_admit_seq)
            self.prefilling[:] = merged
        return self.prefilling

    def snapshot(self) -> list[Request]:
        """Every running request in admission order, counters up to date, group kept."""
        members = list(self.group.members)
        if not members:
            return list(self.prefilling)
        self.group.sync()  # idempotent: counters as of the group's last applied step
        return sorted(self.prefilling + members, key=_admit_seq)

    def held(self) -> list[Request]:
        return self.prefilling + list(self.group.members)

    # ------------------------------------------------------- fast decisions
    def continue_fcfs(self, plan: StepPlan, budget: int) -> int | None:
        """FCFS continuation of running requests (see `StepContext.continue_running_fast`)."""
        g = self.group
        n = len(g.members)
        if not self.enabled or n == 0 or n > budget:
            return None
        prefilling = self.prefilling
        kv = self.kv
        bs = kv.block_size
        need_blocks = decode_blocks = g.num_new_blocks()
        left = budget - n
        if prefilling:
            demand = 0
            for req in prefilling:
                demand += req.num_prompt_tokens + req.num_output_done - req.num_computed_tokens
            if demand > left and prefilling[0].admit_seq < g.seq_max:
                return None  # a prefill ahead of some decodes would take their budget
            chunks = []
            for req in prefilling:
                if left <= 0:
                    break
                c = req.num_computed_tokens
                num_new = min(req.num_prompt_tokens + req.num_output_done - c, left)
                need_blocks += -(-(c + num_new) // bs) - req.num_blocks
                chunks.append(num_new)
                left -= num_new
        if need_blocks > kv.num_blocks - kv.num_used_blocks:
            return None
        if prefilling:
            for req, num_new in zip(prefilling, chunks):
                kv.allocate(req, num_new)
                plan.scheduled.append(req)
                plan.num_new_tokens.append(num_new)
        kv.num_used_blocks += decode_blocks
        plan.num_group_decodes = n
        return left

    def decode_all(self, plan: StepPlan, budget: int, waiting) -> list[Request] | None:
        """Every running decode gets one token (see `StepContext.decode_running_fast`); returns
        the running requests still prefilling (admission order), or None.

        Nobody can be preempted when the free blocks cover the decodes and a bound on what
        prefill chunks may take this step, whoever gets them in whatever order (running
        prefills or admissions): chunks of `x_i` tokens summing to at most `T` (the budget;
        unchunked, one prompt alone up to `max_num_batched_tokens`) need at most
        `sum ceil(x_i / bs) <= T // bs + k` new blocks for `k` chunks, plus the blocks of
        tokens a request computed without holding them (a KV transfer's arrival)."""
        if not self.enabled:
            return None
        g = self.group
        kv = self.kv
        bs = kv.block_size
        need = g.num_new_blocks()
        num_decodes = len(g.members)
        decodes = prefills = None
        num_chunks = debt = 0
        if self.prefilling:
            decodes, prefills = [], []
            for r in self.prefilling:
                c = r.num_computed_tokens
                if r.num_prompt_tokens + r.num_output_done - c == 1:
                    decodes.append(r)
                    need += -(-(c + 1) // bs) - r.num_blocks
                else:
                    prefills.append(r)
                    num_chunks += 1
                    d = -(-c // bs) - r.num_blocks
                    if d > 0:
                        debt += d
            num_decodes += len(decodes)
        if num_decodes > budget:
            return None
        free = kv.num_blocks - kv.num_used_blocks
        if num_chunks or waiting:
            limits = self.limits
            if waiting:
                num_chunks += min(len(waiting), max(limits.max_num_seqs - len(self), 0))
                if self.waiting_with_tokens:
                    found = 0
                    for r in waiting:
                        if r.num_computed_tokens:
                            debt += -(-r.num_computed_tokens // bs) - r.num_blocks
                            found += 1
                    self.waiting_with_tokens = found
            tokens = budget if limits.enable_chunked_prefill else max(budget, limits.max_num_batched_tokens)
            need += tokens // bs + num_chunks + debt
        if need > free:
            return None
        kv.num_used_blocks += g.num_new_blocks()
        plan.num_group_decodes = len(g.members)
        if decodes:
            for r in decodes:
                kv.allocate(r, 1)
                plan.scheduled.append(r)
                plan.num_new_tokens.append(1)
        return prefills or []

    # ------------------------------------------------------- applying a step
    def preempt(self, victims: list[Request]) -> None:
        ids = {id(v) for v in victims}
        self.prefilling[:] = [r for r in self.prefilling if id(r) not in ids]

    def apply(self, plan: StepPlan, step_index: int, end_s: float) -> tuple[int, list[Request]]:
        """Apply the plan's computed tokens and emit output tokens at the end of step
        `step_index`; take off the requests with no output left and let those that emitted a
        token join the group (a recompute's last prompt token emits none: it stays out until
        its next step). Returns the tokens computed and the finished requests (group members
        first, then the others in admission order), which the replica then retires."""
        done = False
        tokens = 0
        for req, n in zip(plan.scheduled, plan.num_new_tokens):
            tokens += n
            req.num_computed_tokens += n
            if req.num_computed_tokens == req.num_prompt_tokens + req.num_output_done:
                req.record_token(step_index, end_s)
                if req.num_output_done == req.num_output_tokens:
                    done = True
        g = self.group
        if plan.num_group_decodes:
            tokens += plan.num_group_decodes
            g.clock += 1  # DecodeGroup.advance(1)
        heap = g.rem0_heap
        finished = g.take_finished() if heap and heap[0] <= g.clock else []
        prefilling = self.prefilling
        if done:
            kept = []
            for req in prefilling:
                if req.num_output_done == req.num_output_tokens:
                    finished.append(req)
                else:
                    kept.append(req)
            prefilling[:] = kept
        if self.enabled and prefilling:
            joining = [r for r in prefilling if r.last_token_step == step_index]
            if joining:
                g.add(joining)
                if len(joining) == len(prefilling):
                    prefilling.clear()
                else:
                    ids = {id(r) for r in joining}
                    prefilling[:] = [r for r in prefilling if id(r) not in ids]
        return tokens, finished

    def advance_group(self, m: int) -> list[Request]:
        """The group alone computed `m` more steps: the members that finished, taken off."""
        g = self.group
        g.clock += m  # DecodeGroup.advance(m)
        heap = g.rem0_heap
        return g.take_finished() if heap and heap[0] <= g.clock else _NOBODY

    def stable(self, plan: StepPlan, min_steps: int) -> bool:
        """True if the plan decodes the whole group and nothing else and the next completion is
        at least `min_steps` away (a stretch pays off)."""
        return (not self.prefilling and not plan.scheduled and plan.num_group_decodes == len(self.group.members) > 0
                and self.group.min_remaining() >= min_steps)


class _Probe:
    """The policy-facing side of a `Batch` for `check_stable_plan`: the running requests as
    objects (the group kept), every fast path declined, so the policy decides per request."""

    __slots__ = ("running",)
    group = None  # plans on the per-request path count no grouped decodes

    def __init__(self, running: list[Request]) -> None:
        self.running = running

    def __len__(self) -> int:
        return len(self.running)

    def requests(self) -> list[Request]:
        return self.running

    def continue_fcfs(self, plan, budget):
        return None

    def decode_all(self, plan, budget, waiting):
        return None


def check_stable_plan(policy, ctx: StepContext, batch: Batch, name: str) -> None:
    """The `fast_forward_safe` contract, checked at a step the replica is about to take without
    the policy (before its KV blocks are reserved): ask the policy on the per-request path; the
    plan must decode every running request once and do nothing else. The blocks it reserved are
    given back (a compliant policy changes nothing else)."""
    running = batch.snapshot()
    kv = ctx.kv
    used = kv.num_used_blocks
    blocks = [r.num_blocks for r in running]
    probe = StepContext(ctx.replica_id, ctx.waiting, kv, ctx.limits, ctx.cost_model, _Probe(running))
    probe.now = ctx.now
    plan = policy.schedule(probe)
    kv.num_used_blocks = used
    for r, b in zip(running, blocks):
        r.num_blocks = b
    if (plan.admitted or plan.preempted or plan.relegated or plan.num_group_decodes
            or len(plan.scheduled) != len(running) or {id(r) for r in plan.scheduled} != {id(r) for r in running}
            or any(n != 1 for n in plan.num_new_tokens)):
        raise PlanError(
            f"{name}: policy {type(policy).__name__} claims fast_forward_safe, but at t={ctx.now:.6f}s with "
            f"{len(running)} decoding and {len(ctx.waiting)} waiting it planned {len(plan.scheduled)} scheduled "
            f"(tokens {sorted(set(plan.num_new_tokens))}), {len(plan.admitted)} admitted, {len(plan.preempted)} "
            f"preempted, {len(plan.relegated)} relegated instead of one decode each")


class FastForward:
    """A stable decode group advancing without the policy (see the module docstring). A stretch
    runs in chunks of growing length (16 steps first), each one SimPy event; `in_flight` is the
    chunk being simulated: (end times, durations, start, first context sum, members, queue
    length, whether its first step's blocks were reserved before the stretch)."""

    __slots__ = ("env", "batch", "steps", "pricing", "max_steps", "in_flight", "event", "cut_at")

    def __init__(self, env: simpy.Environment, batch: Batch, steps: StepLog, pricing: DecodePricing,
                 max_steps: int) -> None:
        self.env = env
        self.batch = batch
        self.steps = steps
        self.pricing = pricing
        self.max_steps = max_steps
        self.in_flight: tuple | None = None
        self.event: simpy.Event | None = None  # the chunk's end while no arrival has cut it short
        self.cut_at = 0  # steps of the chunk in flight to apply when it was cut short

    def run(self, num_waiting: int, advance: Callable[[int, float], None], check: Callable[[], None] | None):
        """A stretch of the group's decode steps (the first one's KV already reserved; the
        replica takes one plain step instead when a completion is too close for a stretch to
        pay off). `advance(m, end_s)` applies `m` steps ending at `end_s`; `check`
        (under check_plans) is called at each chunk boundary after the first."""
        env = self.env
        g = self.batch.group
        n = len(g.members)
        cost = self.pricing(n)
        kv = self.batch.kv
        k_max = min(g.min_remaining(), self.max_steps)
        if n * -(-(k_max - 1) // kv.block_size) > kv.num_blocks - kv.num_used_blocks:
            k_max = min(k_max, self._kv_step_limit())  # the free blocks may not last the stretch
        ctx_sum = g.ctx_sum()
        t = env.now
        done = 0
        chunk = 16
        while done < k_max:
            if done and check is not None:
                check()
            # Price steps done+1 .. done+chunk exactly as the step-by-step loop would.
            t0 = t
            durs, ends = [], []
            for k in range(done, min(done + chunk, k_max)):
                d = cost(ctx_sum + n * k)
                t = t + d
                durs.append(d)
                ends.append(t)
            self.in_flight = (ends, durs, t0, ctx_sum + n * done, n, num_waiting, done == 0)
            self.event = StepEnd(env, t)
            yield self.event
            self.event = None
            if self.cut_at:
                # cut short: the step in flight has finished; the policy sees what changed
                self.apply(self.cut_at, advance)
                self.cut_at = 0
                return
            self.apply(len(ends), advance)
            done += len(ends)
            chunk *= 2

    def _kv_step_limit(self) -> int:
        """How many decode steps of the group the free KV blocks cover (the first step's
        blocks are already reserved). Every `block_size` steps each member needs exactly one
        block, so whole cycles are skipped and at most one cycle is walked."""
        g = self.batch.group
        kv = self.batch.kv
        n = len(g.members)
        free = kv.num_blocks - kv.num_used_blocks
        bs = kv.block_size
        cycles = free // n
        need = cycles * n
        k = cycles * bs + 1  # steps 1 .. cycles*bs need cycles*n blocks
        residues, clock = g.residues, g.clock
        while True:
            need += residues[(-(clock + k)) % bs]
            if need > free:
                return k
            k += 1

    def cut(self, process: simpy.Process) -> None:
        """Something changed during a chunk (an arrival, a release): wake `process` at the end of
        the step in flight instead of the chunk's end. Equivalent to interrupting it and waiting
        out the step, with one event instead of three: the process's resume callback moves from
        the chunk's end (which then fires with no callback) to a new event (SimPy's
        `Process._resume` and `_target`, hence the `simpy<5` pin)."""
        env = self.env
        ends = self.in_flight[0]
        m = min(bisect_left(ends, env.now) + 1, len(ends))
        self.cut_at = m
        self.event.callbacks.remove(process._resume)
        self.event = None
        wake = StepEnd(env, ends[m - 1])
        wake.callbacks.append(process._resume)
        process._target = wake

    def tokens_in_flight(self, now: float) -> int:
        """Tokens of the chunk in flight computed by steps that ended before `now`."""
        ff = self.in_flight
        return 0 if ff is None else ff[4] * bisect_left(ff[0], now)

    def apply(self, m: int, advance: Callable[[int, float], None]) -> None:
        """Apply the first `m` steps of the chunk in flight."""
        ends, durs, t0, ctx0, n, num_waiting, first_reserved = self.in_flight
        self.in_flight = None
        g = self.batch.group
        kv = self.batch.kv
        # KV blocks in use after each step's reservation (the stretch's first step's were
        # reserved before it started)
        residues, clock, bs = g.residues, g.clock, kv.block_size
        used = kv.num_used_blocks
        kv_used = []
        for j in range(m):
            if j or not first_reserved:
                used += residues[(-(clock + j)) % bs]
            kv_used.append(used)
        self.steps.extend_decodes([t0] + ends[:m - 1], durs[:m], n, ctx0, kv_used, num_waiting)
        kv.num_used_blocks = used
        advance(m, ends[m - 1])

    def flush(self, horizon_s: float, advance: Callable[[int, float], None]) -> None:
        """At the end of a run: apply the steps of the chunk in flight that ended before the
        horizon (one ending exactly at it had not completed, as step by step)."""
        if self.in_flight is not None:
            m = bisect_left(self.in_flight[0], horizon_s)
            if m > 0:
                self.apply(m, advance)
            self.in_flight = None
