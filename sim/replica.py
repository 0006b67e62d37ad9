"""A replica: one inference engine (model instance) running continuous batching.

`engine_loop` is the replica's SimPy process. Each step the batch policy returns a plan;
preemptions and admissions take effect at once (as in vLLM), the cost model prices the
step's shape, the process waits that long, then the computed tokens are applied and output
tokens emitted.

The fast path (`sim.fastpath`: the decode group, fast-forward) keeps the cost of a run
proportional to the events that change a batch, not to its tokens; it is exact, and
`fast_forward=False` turns it off for comparison. The loop asks it; the policy sees only a
`StepContext`.

Ties: every step ends with a `StepEnd` event, which SimPy processes after any other event
due at the same instant. So an arrival at the exact end of a step is queued before the next
step is planned, and a horizon at the exact end of a step ends the run before that step
completes, whatever the order in which the events were created; both execution modes
schedule step ends at the same absolute times, so they agree on every tie.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import simpy

from sim.costmodel import CostModel
from sim.fastpath import Batch, DecodePricing, FastForward, StepEnd, check_stable_plan
from sim.kvcache import KVCache
from sim.request import FINISHED, Request
from sim.scheduling import BatchPolicy, EngineLimits, PlanError, StepContext, StepPlan
from sim.steplog import StepLog

__all__ = ["PlanError", "Replica", "StepEnd"]


class Replica:
    """Invariants: every request it holds is waiting (no KV blocks) or running (`batch`:
    holding KV blocks; see `sim.fastpath.Batch`)."""

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
        self.waiting: deque[Request] = deque()
        self.use_group = fast_forward
        self.min_fast_forward_steps = min_fast_forward_steps
        self.max_fast_forward_steps = max_fast_forward_steps
        self.check_plans = check_plans
        self.on_finish = on_finish
        self.num_outstanding_requests = 0
        self._outstanding_tokens = 0
        self.steps = StepLog()
        self._admit_seq = 0
        self._wake: simpy.Event | None = None  # set while idle; an arrival triggers it
        # True while the last plan was validated as stable by the policy and since then only
        # decode steps and completions happened: the policy would decode every running
        # request again, so the loop may skip it (an arrival or any other step clears it).
        self._stable_ok = False
        self._configure(cost_model, policy, limits, KVCache(num_kv_blocks, block_size))
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

    def _configure(self, cost_model: CostModel, policy: BatchPolicy, limits: EngineLimits, kv: KVCache) -> None:
        """Engine configuration and what is built from it (the fast path, the policy's context)."""
        self.cost_model = cost_model
        self.policy = policy
        self.limits = limits
        self.kv = kv
        self.batch = Batch(kv, limits, self.use_group)
        self.fast_forward = self.use_group and getattr(policy, "fast_forward_safe", False)
        self.ff = FastForward(self.env, self.batch, self.steps, DecodePricing(cost_model, self.check_plans),
                              self.max_fast_forward_steps)
        self.ctx = StepContext(self.replica_id, self.waiting, kv, limits, cost_model, self.batch)

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
        if request.num_computed_tokens:  # its KV came by transfer: blocks to take again
            self.batch.waiting_with_tokens += 1
        self.num_outstanding_requests += 1
        work = request.remaining_work_tokens
        self._outstanding_tokens += work
        self._work_in += work
        self._stable_ok = False
        if self.ff.event is not None:  # fast-forwarding: finish the step in flight, then reschedule
            self.ff.cut(self.process)
            return
        wake = self._wake
        if wake is not None and not wake.triggered:
            wake.succeed()

    @property
    def num_outstanding_tokens(self) -> int:
        """Tokens still to compute for the requests this replica holds, as of now (a step
        ending exactly now has not completed yet: arrivals come first)."""
        return self._outstanding_tokens - self.ff.tokens_in_flight(self.env.now)

    # ------------------------------------------------------- running requests
    @property
    def num_running(self) -> int:
        return len(self.batch)

    def running_list(self) -> list[Request]:
        """All running requests as up-to-date objects, in admission order (dissolves the group)."""
        return self.batch.requests()

    # ---------------------------------------------------------------- the loop
    def engine_loop(self):
        env = self.env
        # bound once: these objects live as long as the configuration (their contents change)
        waiting = self.waiting
        ctx, batch, ff, kv = self.ctx, self.batch, self.ff, self.kv
        group = batch.group
        schedule = self.policy.schedule
        step_time_s = self.cost_model.step_time_s
        log_step = self.steps.append
        max_num_seqs = self.limits.max_num_seqs
        min_steps = self.min_fast_forward_steps
        advance_group = self._advance_group
        check = self._check_stable if self.check_plans else None
        while True:
            if self._leaving:
                self._release_leaving()
            if not waiting and not batch.prefilling and not group.members:
                if self.on_idle is not None:
                    self.on_idle(self)  # a drain or reconfiguration may complete now
                self._wake = env.event()
                yield self._wake
                self._wake = None
                if self.on_idle is not None:  # a reconfiguration while idle replaced these
                    ctx, batch, ff, kv = self.ctx, self.batch, self.ff, self.kv
                    group = batch.group
                    schedule, step_time_s = self.policy.schedule, self.cost_model.step_time_s
                    max_num_seqs = self.limits.max_num_seqs
                continue
            if self._stable_ok and not batch.prefilling and group.members and (
                    not waiting or len(group.members) >= max_num_seqs):
                # The policy would decode the whole group again (fast_forward_safe contract;
                # under check_plans it is asked anyway): reserve the step's KV blocks, if free.
                need = group.num_new_blocks()
                if need <= kv.num_blocks - kv.num_used_blocks:
                    if check is not None:
                        check()
                    kv.num_used_blocks += need
                    if group.min_remaining() >= min_steps:
                        yield from ff.run(len(waiting), advance_group, check)
                        continue
                    # A completion is too close for a stretch to pay off: one plain decode step.
                    n = len(group.members)
                    start = env.now
                    decode_ctx = group.ctx_sum()
                    dur = ff.pricing(n)(decode_ctx)
                    kv_used = kv.num_used_blocks
                    num_waiting = len(waiting)
                    yield StepEnd(env, start + dur)
                    log_step(start, dur, 0, 0, n, decode_ctx, n, kv_used, num_waiting)
                    advance_group(1, env.now)
                    continue
            self._stable_ok = False
            start = ctx.now = env.now
            plan = schedule(ctx)
            if self.check_plans:
                self._check(plan)
            if plan.admitted or plan.preempted or plan.relegated:
                self._commit(plan)
            if not plan.scheduled and not plan.num_group_decodes:
                if plan.preempted or plan.relegated:
                    continue
                raise PlanError(
                    f"{self.name}: policy {type(self.policy).__name__} scheduled nothing at "
                    f"t={env.now:.6f}s with {len(waiting)} waiting, {self.num_running} running, "
                    f"{kv.num_free_blocks}/{kv.num_blocks} KV blocks free"
                )
            if self.fast_forward and not plan.scheduled and self._stable(plan):
                self._stable_ok = True
                yield from ff.run(len(waiting), advance_group, check)
                continue
            num_prefill, prefill_ctx, num_decodes, decode_ctx, num_batch = plan.shape(
                group.ctx_sum() if plan.num_group_decodes else 0)
            dur = step_time_s(num_prefill, prefill_ctx, num_decodes, decode_ctx, num_batch)
            kv_used = kv.num_used_blocks
            num_waiting = len(waiting)
            yield StepEnd(env, start + dur)
            log_step(start, dur, num_prefill, prefill_ctx, num_decodes, decode_ctx, num_batch, kv_used, num_waiting)
            tokens, finished = batch.apply(plan, self.steps.num_steps - 1, env.now)
            self._outstanding_tokens -= tokens
            for req in finished:
                self._finish(req, env.now)
            # Every running request now decodes in the group and nothing waits: by the
            # fast_forward_safe contract the policy would schedule exactly those decodes, so
            # the next iteration may skip asking it (KV is still checked there).
            self._stable_ok = self.fast_forward and not batch.prefilling and not waiting

    def _commit(self, plan: StepPlan) -> None:
        """Apply preemptions, relegations and admissions at the start of the step."""
        now = self.env.now
        if plan.preempted:
            victims = plan.preempted
            self.batch.preempt(victims)
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
            self.batch.prefilling.extend(admitted)

    def _finish(self, req: Request, end_s: float) -> None:
        req.finish_s = end_s
        req.outcome = FINISHED
        self.kv.free(req)
        self.num_outstanding_requests -= 1
        if self.on_finish is not None:
            self.on_finish(req)

    # ------------------------------------------------------------ fast forward
    def _stable(self, plan: StepPlan) -> bool:
        """True if the plan decodes every running request and nothing else, and nothing
        waiting could be admitted before a completion."""
        if plan.admitted or plan.preempted or plan.relegated:
            return False
        if self.waiting and self.num_running < self.limits.max_num_seqs:
            return False
        return self.batch.stable(plan, self.min_fast_forward_steps)

    def _check_stable(self) -> None:
        self.ctx.now = self.env.now
        check_stable_plan(self.policy, self.ctx, self.batch, self.name)

    def _advance_group(self, m: int, end_s: float) -> None:
        """The decode group alone computed `m` steps ending at `end_s`: advance it, retire who finished."""
        self._outstanding_tokens -= len(self.batch.group.members) * m
        for req in self.batch.advance_group(m):
            self._finish(req, end_s)

    def flush(self, horizon_s: float) -> None:
        """At the end of a run: apply fast-forwarded steps that ended before the horizon (one
        ending exactly at it had not completed when the run stopped, as step by step), and
        bring every request object up to date."""
        self.ff.flush(horizon_s, self._advance_group)
        self.batch.requests()

    # --------------------------------------------------------- cluster control
    @property
    def tokens_computed(self) -> int:
        """Tokens this replica has computed so far (as of now, fast-forward in flight included)."""
        return self._work_in - self.num_outstanding_tokens

    def held_requests(self) -> list[Request]:
        """Every request it holds (waiting, then running), without disturbing a step in flight."""
        return list(self.waiting) + self.batch.held()

    def has_leaving(self) -> bool:
        return bool(self._leaving)

    def running_requests(self) -> list[Request]:
        """Running requests in admission order, without disturbing a step in flight. Counters of
        decode-group members are as of the group's last applied step (a fast-forward stretch
        applies its steps when it ends or is cut): a controller may see them a few steps stale."""
        return self.batch.snapshot()

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
        if self.ff.event is not None:  # a fast-forward stretch: stop at the end of the step in flight
            self.ff.cut(self.process)
        else:
            self.kick()

    def _release_leaving(self) -> None:
        """At a step boundary: take the requests asked to leave off the batch."""
        leaving, self._leaving = self._leaving, []
        running = self.batch.requests()  # up-to-date objects (dissolves the decode group)
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
        if self.waiting or len(self.batch) or self.ff.in_flight is not None:
            raise RuntimeError(f"{self.name}: reconfigure needs an empty replica")
        self.model = spec.model
        self._configure(spec.cost_model, spec.policy_factory(), spec.limits,
                        KVCache(spec.resolve_kv_blocks(), spec.block_size))

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
