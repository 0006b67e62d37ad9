"""A replica: one inference engine (model instance) running continuous batching.

`engine_loop` is the replica's SimPy process. Each step the batch policy returns a plan;
preemptions and admissions take effect at once (as in vLLM), the cost model prices the
step's shape, the process waits that long, then the computed tokens are applied and output
tokens emitted.

Two mechanisms keep the cost of a run proportional to the events that change a batch, not
to its tokens (both exact; `fast_forward=False` turns them off for comparison):
- steady decodes live in a `DecodeGroup` (numpy arrays), so a step costs O(1) Python work
  for them;
- when the batch is stable (only decodes, nothing admissible waiting), the loop advances
  many decode steps at once in closed form until the next event that could change the
  batch: a completion, a KV shortage, or an arrival (which wakes it; the step in flight
  then finishes, exactly as it would step by step).

Ties: every step ends with a `StepEnd` event, which SimPy processes after any other event
due at the same instant. So an arrival at the exact end of a step is queued before the next
step is planned, and a horizon at the exact end of a step ends the run before that step
completes, whatever the order in which the events were created; both execution modes
schedule step ends at the same absolute times, so they agree on every tie.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from functools import partial
from heapq import heappush
from typing import Callable

import numpy as np
import simpy

from sim.costmodel import CostModel
from sim.decodes import DecodeGroup
from sim.kvcache import KVCache
from sim.request import FINISHED, Request
from sim.scheduling import BatchPolicy, EngineLimits, StepContext, StepPlan
from sim.steplog import StepLog


class PlanError(Exception):
    """A batch policy returned a plan that breaks the engine's invariants (a policy bug).
    Not a RuntimeError, so `simulate` does not mistake it for a stalled event queue."""


STEP_END_PRIORITY = 2
"""SimPy priority of step ends: after URGENT (0) and NORMAL (1) events at the same time."""


class StepEnd(simpy.events.Event):
    """A timeout that fires at the absolute time `at_s`, after every other kind of event due
    then (see the module docstring on ties). Absolute, so that a fast-forward chunk and the
    steps it stands for end at bit-identical times (`now + (t - now)` may differ from `t`)."""

    __slots__ = ()

    def __init__(self, env: simpy.Environment, at_s: float) -> None:
        # as simpy.events.Timeout.__init__, scheduled at an absolute time and a later priority
        self.env = env
        self.callbacks = []
        self._value = None
        self._ok = True
        heappush(env._queue, (at_s, STEP_END_PRIORITY, next(env._eid), self))


class Replica:
    """Invariants: every request it holds is waiting, running (`running`, admission order)
    or in the decode group; running and grouped requests hold KV blocks, waiting ones none;
    after each step every running request outside the group is still prefilling."""

    def __init__(
        self,
        env: simpy.Environment,
        replica_id: int,
        cost_model: CostModel,
        policy: BatchPolicy,
        limits: EngineLimits,
        num_kv_blocks: int,
        block_size: int = 16,
        *,
        name: str = "",
        model: str = "",
        fast_forward: bool = True,
        max_fast_forward_steps: int = 4096,
        min_fast_forward_steps: int = 2,
        check_plans: bool = False,
        on_finish: Callable[[Request], None] | None = None,
    ) -> None:
        self.env = env
        self.replica_id = replica_id
        self.name = name or f"replica{replica_id}"
        self.model = model
        self.cost_model = cost_model
        self.policy = policy
        self.limits = limits
        self.kv = KVCache(num_kv_blocks, block_size)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.group = DecodeGroup(block_size)
        self.use_group = fast_forward
        self.fast_forward = fast_forward and getattr(policy, "fast_forward_safe", False)
        self.min_fast_forward_steps = min_fast_forward_steps
        self.ctx = StepContext(self, self.waiting, self.kv, limits, cost_model)
        self.max_fast_forward_steps = max_fast_forward_steps
        self.check_plans = check_plans
        self.on_finish = on_finish
        self.num_outstanding_requests = 0
        self._outstanding_tokens = 0
        self.steps = StepLog()
        self._admit_seq = 0
        self._wake: simpy.Event | None = None  # set while idle; an arrival triggers it
        self._ff: tuple | None = None  # fast-forward in flight (see _fast_forward)
        # the chunk's timeout while the loop waits on it and no arrival has cut it short yet
        self._ff_event: simpy.Event | None = None
        self._ff_cut = 0  # steps of the chunk in flight to apply when an arrival cut it short
        # True while the last plan was validated as stable by the policy and since then only
        # decode steps and completions happened: the policy would decode every running
        # request again, so the loop may skip it (an arrival or any other step clears it).
        self._stable_ok = False
        self._decode_fns: dict[int, Callable[[int], float]] = {}  # see _decode_step_time
        # Cluster control (set by sim.controlplane.Cluster; a plain run never uses them).
        self.on_idle: Callable[[Replica], None] | None = None  # called whenever it runs empty
        self._leaving: list[tuple[Request, Callable[[Request], None]]] = []  # leave at the step end
        self._work_in = 0  # tokens of work ever handed to it (tokens_computed = this - outstanding)
        self.state, self.config_name, self.hardware, self.tp = "serving", "", "", 1
        self.started_s = self.serving_s = 0.0
        self.stopped_s = float("nan")
        self.pending: str | None = None
        self.rate_mark = (0.0, 0)
        self.process = env.process(self.engine_loop())

    # ----------------------------------------------------------------- arrivals
    def can_ever_fit(self, request: Request) -> str:
        """Why `request` can never run here ('' if it can): longer than `max_model_len`
        (vLLM refuses it too); more KV blocks at its largest than the replica has; or, with
        chunked prefill off, a step larger than `max_num_batched_tokens` at its largest (a
        recompute after preemption computes prompt + output so far in one step, at most
        `max_tokens_needed`). The last is our design: vLLM instead refuses the whole
        configuration when `max_num_batched_tokens < max_model_len` (see `EngineLimits`)."""
        limits = self.limits
        if request.num_prompt_tokens + request.num_output_tokens > limits.max_model_len:
            return "exceeds_max_model_len"
        if self.kv.blocks_for(request.max_tokens_needed) > self.kv.num_blocks:
            return "exceeds_kv_capacity"
        if not limits.enable_chunked_prefill and request.max_tokens_needed > limits.max_num_batched_tokens:
            return "exceeds_max_num_batched_tokens"
        return ""

    def submit(self, request: Request) -> None:
        """Queue an arriving request (already checked with `can_ever_fit`)."""
        request.replica = self.replica_id
        self.waiting.append(request)
        self.num_outstanding_requests += 1
        work = request.remaining_work_tokens
        self._outstanding_tokens += work
        self._work_in += work
        self._stable_ok = False
        if self._ff_event is not None:  # fast-forwarding: finish the step in flight, then reschedule
            self._cut_fast_forward()
            return
        wake = self._wake
        if wake is not None and not wake.triggered:
            wake.succeed()

    @property
    def num_outstanding_tokens(self) -> int:
        """Tokens still to compute for the requests this replica holds, as of now (a step
        ending exactly now has not completed yet: arrivals come first)."""
        ff = self._ff
        if ff is None:
            return self._outstanding_tokens
        return self._outstanding_tokens - ff[4] * bisect_left(ff[0], self.env.now)

    # ------------------------------------------------------- running requests
    @property
    def num_running(self) -> int:
        return len(self.running) + len(self.group.members)

    def running_list(self) -> list[Request]:
        """All running requests as up-to-date objects, in admission order (dissolves the group)."""
        if len(self.group.members):
            members = self.group.dissolve()
            merged = self.running + members
            merged.sort(key=_admit_seq)
            self.running[:] = merged
        return self.running

    def continue_running_fast(self, plan: StepPlan, budget: int) -> int | None:
        """FCFS continuation of running requests with O(1) Python work per grouped decode
        (see StepContext.continue_running_fast); None when the general path must decide."""
        g = self.group
        n = len(g.members)
        if not self.use_group or n == 0 or n > budget:
            return None
        prefilling = self.running
        bs = self.kv.block_size
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
        if need_blocks > self.kv.num_blocks - self.kv.num_used_blocks:
            return None
        if prefilling:
            for req, num_new in zip(prefilling, chunks):
                self.kv.allocate(req, num_new)
                plan.scheduled.append(req)
                plan.num_new_tokens.append(num_new)
        self.kv.num_used_blocks += decode_blocks
        plan.num_group_decodes = n
        return left

    # ---------------------------------------------------------------- the loop
    def engine_loop(self):
        env = self.env
        ctx = self.ctx
        # bound once: these objects live as long as the replica (their contents change)
        waiting, running, group, kv = self.waiting, self.running, self.group, self.kv
        schedule = self.policy.schedule
        step_time_s = self.cost_model.step_time_s
        log_step = self.steps.append
        max_num_seqs = self.limits.max_num_seqs
        while True:
            if self._leaving:
                self._release_leaving()
            if not waiting and not running and not len(group.members):
                if self.on_idle is not None:
                    self.on_idle(self)  # a drain or reconfiguration may complete now
                self._wake = env.event()
                yield self._wake
                self._wake = None
                if self.on_idle is not None:  # a reconfiguration while idle replaced these
                    ctx, group, kv = self.ctx, self.group, self.kv
                    schedule, step_time_s = self.policy.schedule, self.cost_model.step_time_s
                    max_num_seqs = self.limits.max_num_seqs
                continue
            if self._stable_ok and not running and len(group.members) and (
                    not waiting or len(group.members) >= max_num_seqs) and self._allocate_decode_step():
                # The policy would decode the whole group again (fast_forward_safe contract).
                if group.min_remaining() >= self.min_fast_forward_steps:
                    yield from self._fast_forward()
                    continue
                # A completion is too close for a stretch to pay off: one plain decode step.
                n = len(group.members)
                start = env.now
                decode_ctx = group.ctx_sum()
                dur = self._decode_step_time(n)(decode_ctx)
                kv_used = kv.num_used_blocks
                num_waiting = len(waiting)
                yield StepEnd(env, start + dur)
                log_step(start, dur, 0, 0, n, decode_ctx, n, kv_used, num_waiting)
                self._advance_group(1, env.now)
                continue
            self._stable_ok = False
            start = ctx.now = env.now
            plan = schedule(ctx)
            if self.check_plans:
                self._check(plan)
            self._commit(plan)
            if not plan.scheduled and not plan.num_group_decodes:
                if plan.preempted or plan.relegated:
                    continue
                raise PlanError(
                    f"{self.name}: policy {type(self.policy).__name__} scheduled nothing at "
                    f"t={env.now:.6f}s with {len(waiting)} waiting, {self.num_running} running, "
                    f"{kv.num_free_blocks}/{kv.num_blocks} KV blocks free"
                )
            if self.fast_forward and self._stable(plan):
                self._stable_ok = True
                yield from self._fast_forward()
                continue
            num_prefill, prefill_ctx, num_decodes, decode_ctx, batch = ctx.plan_shape(plan)
            dur = step_time_s(num_prefill, prefill_ctx, num_decodes, decode_ctx, batch)
            kv_used = kv.num_used_blocks
            num_waiting = len(waiting)
            yield StepEnd(env, start + dur)
            log_step(start, dur, num_prefill, prefill_ctx, num_decodes, decode_ctx, batch, kv_used, num_waiting)
            self._advance(plan, env.now)
            # Every running request now decodes in the group and nothing waits: by the
            # fast_forward_safe contract the policy would schedule exactly those decodes, so
            # the next iteration may skip asking it (KV is still checked there).
            self._stable_ok = self.fast_forward and not running and not waiting

    def _commit(self, plan: StepPlan) -> None:
        """Apply preemptions and admissions at the start of the step."""
        if not (plan.admitted or plan.preempted or plan.relegated):
            return
        now = self.env.now
        if plan.preempted:
            victims = plan.preempted
            ids = {id(v) for v in victims}
            self.running[:] = [r for r in self.running if id(r) not in ids]
            for v in reversed(victims):  # first-preempted ends up at the queue's front
                self._outstanding_tokens += v.num_computed_tokens
                self._work_in += v.num_computed_tokens
                v.num_computed_tokens = 0
                v.num_preemptions += 1
                self.waiting.appendleft(v)
        if plan.relegated:
            ids = {id(r) for r in plan.relegated}
            kept = [r for r in self.waiting if id(r) not in ids]
            self.waiting.clear()
            self.waiting.extend(kept)
            self.waiting.extend(plan.relegated)
        if plan.admitted:
            admitted = plan.admitted
            waiting = self.waiting
            if waiting and waiting[0] is admitted[0] and (len(admitted) == 1 or all(
                    waiting[i] is r for i, r in enumerate(admitted))):
                for _ in admitted:
                    waiting.popleft()
            else:
                ids = {id(r) for r in admitted}
                kept = [r for r in waiting if id(r) not in ids]
                waiting.clear()
                waiting.extend(kept)
            for r in admitted:
                if r.first_scheduled_s != r.first_scheduled_s:  # NaN: first time
                    r.first_scheduled_s = now
                r.admit_seq = self._admit_seq
                self._admit_seq += 1
            self.running.extend(admitted)

    def _advance(self, plan: StepPlan, end_s: float) -> None:
        """Apply the step's computed tokens; emit output tokens; retire finished requests."""
        step_index = self.steps.num_steps - 1
        done = False
        tokens = 0
        for req, n in zip(plan.scheduled, plan.num_new_tokens):
            tokens += n
            req.num_computed_tokens += n
            if req.num_computed_tokens == req.num_prompt_tokens + req.num_output_done:
                req.record_token(step_index, end_s)
                if req.num_output_done == req.num_output_tokens:
                    done = True
        if plan.num_group_decodes:
            tokens += plan.num_group_decodes
            self.group.advance(1)
        self._outstanding_tokens -= tokens
        self._retire(end_s, done)
        if self.use_group and self.running:
            # steady decodes: emitted a token this step (a recompute's last prompt token does not)
            joining = [r for r in self.running if r.last_token_step == step_index]
            if joining:
                self.group.add(joining)
                if len(joining) == len(self.running):
                    self.running.clear()
                else:
                    ids = {id(r) for r in joining}
                    self.running[:] = [r for r in self.running if id(r) not in ids]

    def _finish(self, req: Request, end_s: float) -> None:
        req.finish_s = end_s
        req.outcome = FINISHED
        self.kv.free(req)
        self.num_outstanding_requests -= 1
        if self.on_finish is not None:
            self.on_finish(req)

    def _retire(self, end_s: float, check_running: bool) -> None:
        """Finish requests (in the group and, if `check_running`, outside it) with no output left."""
        g = self.group
        if g.rem0_min <= g.clock:
            for req in g.take_finished():
                self._finish(req, end_s)
        if check_running:
            kept = []
            for req in self.running:
                if req.num_output_done == req.num_output_tokens:
                    self._finish(req, end_s)
                else:
                    kept.append(req)
            self.running[:] = kept

    # ------------------------------------------------------------ fast forward
    def _stable(self, plan: StepPlan) -> bool:
        """True if the plan decodes every running request and nothing else, and nothing
        waiting could be admitted before a completion."""
        if plan.admitted or plan.preempted or plan.relegated:
            return False
        if self.waiting and self.num_running < self.limits.max_num_seqs:
            return False
        # only grouped decodes run, all of them, and the next completion is far enough away
        # for a closed-form stretch to pay off
        return (not self.running and not plan.scheduled and plan.num_group_decodes == len(self.group.members) > 0
                and self.group.min_remaining() >= self.min_fast_forward_steps)

    def _allocate_decode_step(self) -> bool:
        """Reserve one more token of KV for every grouped decode, all or nothing."""
        need = self.group.num_new_blocks()
        if need > self.kv.num_blocks - self.kv.num_used_blocks:
            return False
        self.kv.num_used_blocks += need
        return True

    def _fast_forward(self):
        """Advance the stable decode group by many steps (the first step's KV is already
        reserved), in chunks of growing length, each one SimPy event; an arrival wakes it."""
        env = self.env
        g = self.group
        n = len(g.members)
        cost = self._decode_step_time(n)
        k_max = min(g.min_remaining(), self.max_fast_forward_steps)
        if n * -(-(k_max - 1) // self.kv.block_size) > self.kv.num_blocks - self.kv.num_used_blocks:
            k_max = min(k_max, self._kv_step_limit())  # the free blocks may not last the stretch
        ctx_sum = g.ctx_sum()
        num_waiting = len(self.waiting)
        t = env.now
        done = 0
        chunk = 16
        while done < k_max:
            # Price steps done+1 .. done+chunk exactly as the step-by-step loop would.
            t0 = t
            durs, ends = [], []
            for k in range(done, min(done + chunk, k_max)):
                d = cost(ctx_sum + n * k)
                t = t + d
                durs.append(d)
                ends.append(t)
            self._ff = (ends, durs, t0, ctx_sum + n * done, n, num_waiting, done == 0)
            self._ff_event = StepEnd(env, t)
            yield self._ff_event
            self._ff_event = None
            if self._ff_cut:
                # An arrival: the step in flight has finished; the policy sees the new request.
                self._apply_fast_forward(self._ff_cut)
                self._ff_cut = 0
                return
            self._apply_fast_forward(len(ends))
            done += len(ends)
            chunk *= 2

    def _decode_step_time(self, n: int) -> Callable[[int], float]:
        """Step time of `n` decodes as a function of their context sum (the cost model's
        `decode_step_time_fn` when it has one: same values, less work per step)."""
        fn = self._decode_fns.get(n)
        if fn is None:
            make = getattr(self.cost_model, "decode_step_time_fn", None)
            if make is not None:
                fn = make(n)
            else:
                step_time_s = self.cost_model.step_time_s
                fn = partial(_decode_step_time, step_time_s, n)
            self._decode_fns[n] = fn
        return fn

    def _kv_step_limit(self) -> int:
        """How many decode steps of the group the free KV blocks cover (the first step's
        blocks are already reserved). Every `block_size` steps each member needs exactly one
        block, so whole cycles are skipped and at most one cycle is walked."""
        g = self.group
        n = len(g.members)
        free = self.kv.num_blocks - self.kv.num_used_blocks
        bs = self.kv.block_size
        cycles = free // n
        need = cycles * n
        k = cycles * bs + 1  # steps 1 .. cycles*bs need cycles*n blocks
        residues, clock = g.residues, g.clock
        while True:
            need += residues[(-(clock + k)) % bs]
            if need > free:
                return k
            k += 1

    def _cut_fast_forward(self) -> None:
        """An arrival during a fast-forward chunk: wake the engine loop at the end of the step
        in flight instead of the chunk's end. Equivalent to interrupting the process and
        waiting out the step, with one event instead of three: the loop's resume callback
        moves from the chunk's timeout (which then fires with no callback) to a new one."""
        env = self.env
        ends = self._ff[0]
        m = min(bisect_left(ends, env.now) + 1, len(ends))
        self._ff_cut = m
        proc = self.process
        self._ff_event.callbacks.remove(proc._resume)
        self._ff_event = None
        wake = StepEnd(env, ends[m - 1])
        wake.callbacks.append(proc._resume)
        proc._target = wake

    def _apply_fast_forward(self, m: int) -> None:
        """Apply the first `m` steps of the fast-forward chunk in flight."""
        ends, durs, t0, ctx0, n, num_waiting, first_reserved = self._ff
        self._ff = None
        g = self.group
        # KV blocks in use after each step's reservation (the stretch's first step's were
        # reserved before it started)
        residues, clock, bs = g.residues, g.clock, self.kv.block_size
        used = self.kv.num_used_blocks
        kv_used = []
        for j in range(m):
            if j or not first_reserved:
                used += residues[(-(clock + j)) % bs]
            kv_used.append(used)
        self.steps.extend_decodes([t0] + ends[:m - 1], durs[:m], n, ctx0, kv_used, num_waiting)
        self.kv.num_used_blocks = used
        self._advance_group(m, ends[m - 1])

    def _advance_group(self, m: int, end_s: float) -> None:
        """The decode group alone computed `m` steps ending at `end_s`: advance it, retire who finished."""
        self._outstanding_tokens -= len(self.group.members) * m
        self.group.advance(m)
        self._retire(end_s, False)

    def flush(self, horizon_s: float) -> None:
        """At the end of a run: apply fast-forwarded steps that ended before the horizon (one
        ending exactly at it had not completed when the run stopped, as step by step), and
        bring every request object up to date."""
        if self._ff is not None:
            m = bisect_left(self._ff[0], horizon_s)
            if m > 0:
                self._apply_fast_forward(m)
            self._ff = None
        self.running_list()

    # --------------------------------------------------------- cluster control
    @property
    def tokens_computed(self) -> int:
        """Tokens this replica has computed so far (as of now, fast-forward in flight included)."""
        return self._work_in - self.num_outstanding_tokens

    def held_requests(self) -> list[Request]:
        """Every request it holds (waiting, then running), without disturbing a step in flight."""
        return list(self.waiting) + list(self.running) + list(self.group.members)

    def has_leaving(self) -> bool:
        return bool(self._leaving)

    def running_requests(self) -> list[Request]:
        """Running requests in admission order, without disturbing a step in flight. Counters of
        decode-group members are as of the group's last applied step (a fast-forward stretch
        applies its steps when it ends or is cut): a controller may see them a few steps stale."""
        members = list(self.group.members)
        if not members:
            return list(self.running)
        self.group.sync()  # idempotent: counters as of the group's last applied step
        return sorted(self.running + members, key=_admit_seq)

    def release(self, request: Request, then: Callable[[Request], None]) -> None:
        """Let `request` leave this replica: at once if it waits, else at the end of the step
        in flight (that step's tokens count). `then(request)` runs once it has left, unless it
        finished in that step. KV blocks are freed; its counters are kept (the caller decides
        between recompute and a KV transfer)."""
        for i, r in enumerate(self.waiting):
            if r is request:
                del self.waiting[i]
                self._drop(request)
                then(request)
                return
        if any(r is request for r, _ in self._leaving):
            return  # already leaving at the end of the step in flight
        self._leaving.append((request, then))
        self._stable_ok = False
        if self._ff_event is not None:  # a fast-forward stretch: stop at the end of the step in flight
            self._cut_fast_forward()
        else:
            self.kick()

    def _release_leaving(self) -> None:
        """At a step boundary: take the requests asked to leave off the batch."""
        leaving, self._leaving = self._leaving, []
        running = self.running_list()  # up-to-date objects (dissolves the decode group)
        for req, then in leaving:
            if req.outcome is not None:
                continue  # finished in the step in flight
            for i, r in enumerate(running):
                if r is req:
                    del running[i]
                    self.kv.free(req)
                    break
            else:
                for i, r in enumerate(self.waiting):  # preempted in the meantime
                    if r is req:
                        del self.waiting[i]
                        break
                else:
                    continue  # already gone
            self._drop(req)
            then(req)

    def _drop(self, req: Request) -> None:
        self.num_outstanding_requests -= 1
        work = req.remaining_work_tokens
        self._outstanding_tokens -= work
        self._work_in -= work
        forget = getattr(self.policy, "forget", None)
        if forget is not None:
            forget(req)
        req.leave_replica()

    def reorder(self, request_ids) -> None:
        """Put these waiting requests first, in this order (the rest keep theirs)."""
        ids = list(request_ids)
        pos = {rid: k for k, rid in enumerate(ids)}
        front = sorted((r for r in self.waiting if r.request_id in pos), key=lambda r: pos[r.request_id])
        if len(front) != len(ids):
            from sim.controlplane import ActionError

            raise ActionError(f"{self.name}: reorder names requests not waiting here: "
                              f"{sorted(set(ids) - {r.request_id for r in front})}")
        rest = [r for r in self.waiting if r.request_id not in pos]
        self.waiting.clear()
        self.waiting.extend(front + rest)
        self._stable_ok = False
        self.kick()

    def kick(self) -> None:
        """Wake the loop if it is idle (so it notices a state change)."""
        wake = self._wake
        if wake is not None and not wake.triggered:
            wake.succeed()

    def reconfigure(self, spec) -> None:
        """Load another configuration (a `ReplicaSpec`: model, cost model, policy, limits, KV)
        while empty; the engine loop picks it up when it next wakes."""
        if self.waiting or self.running or len(self.group.members) or self._ff is not None:
            raise RuntimeError(f"{self.name}: reconfigure needs an empty replica")
        self.cost_model = spec.cost_model
        self.policy = spec.policy_factory()
        self.limits = spec.limits
        self.kv = KVCache(spec.resolve_kv_blocks(), spec.block_size)
        self.group = DecodeGroup(spec.block_size)
        self.model = spec.model
        self.fast_forward = self.use_group and getattr(self.policy, "fast_forward_safe", False)
        self.ctx = StepContext(self, self.waiting, self.kv, self.limits, self.cost_model)
        self._decode_fns = {}

    # ------------------------------------------------------------------ checks
    def _check(self, plan: StepPlan) -> None:
        """Assert the plan's invariants (enabled in tests)."""
        lim = self.limits
        total = plan.num_tokens
        if len(plan) > lim.max_num_seqs:
            raise PlanError(f"{self.name}: {len(plan)} requests > max_num_seqs={lim.max_num_seqs}")
        if total > lim.max_num_batched_tokens:
            raise PlanError(f"{self.name}: {total} tokens > max_num_batched_tokens={lim.max_num_batched_tokens}")
        if len({id(r) for r in plan.scheduled}) != len(plan.scheduled):
            raise PlanError(f"{self.name}: a request was scheduled twice in one step")
        for req, n in zip(plan.scheduled, plan.num_new_tokens):
            if not 1 <= n <= req.num_tokens_to_compute:
                raise PlanError(f"{self.name}: {req} advanced by {n} tokens")
            if req in plan.preempted:
                raise PlanError(f"{self.name}: {req} both scheduled and preempted")
        if not 0 <= self.kv.num_used_blocks <= self.kv.num_blocks:
            raise PlanError(f"{self.name}: KV blocks used {self.kv.num_used_blocks} outside [0, {self.kv.num_blocks}]")


def _decode_step_time(step_time_s, n: int, decode_context_sum: int) -> float:
    return step_time_s(0, 0, n, decode_context_sum, n)


def _admit_seq(req: Request) -> int:
    return req.admit_seq
