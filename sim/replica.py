"""A replica: one inference engine (model instance) running continuous batching.

`engine_loop` is the replica's SimPy process. Each step the batch policy returns a plan;
preemptions and admissions take effect at once (as in vLLM), the cost model prices the
step's shape, the process waits that long, then the computed tokens are applied and output
tokens emitted. When the batch is stable (only decodes, nothing admissible waiting), the
loop advances many decode steps at once in closed form until the next event that could
change the batch: a completion, a KV shortage, or an arrival (which wakes it; the step in
flight then finishes, exactly as it would step by step).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import numpy as np
import simpy

from sim.costmodel import CostModel
from sim.kvcache import KVCache
from sim.request import FINISHED, Request
from sim.scheduling import BatchPolicy, EngineLimits, StepContext, StepPlan
from sim.steplog import StepLog


class PlanError(RuntimeError):
    """A batch policy returned a plan that breaks the engine's invariants (a policy bug)."""


class Replica:
    """Invariants: every request it holds is in exactly one of `waiting` or `running`;
    running requests hold KV blocks, waiting ones hold none."""

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
        self.ctx = StepContext(replica_id, self.waiting, self.running, self.kv, limits, cost_model)
        self.fast_forward = fast_forward and getattr(policy, "fast_forward_safe", False)
        self.max_fast_forward_steps = max_fast_forward_steps
        self.check_plans = check_plans
        self.on_finish = on_finish
        self.num_outstanding_requests = 0
        self._outstanding_tokens = 0
        self.steps = StepLog()
        self._admit_seq = 0
        self._wake: simpy.Event | None = None
        self._ff: tuple | None = None  # fast-forward in flight: (ends, starts, durations, kv_used, n)
        self.process = env.process(self.engine_loop())

    # ----------------------------------------------------------------- arrivals
    def can_ever_fit(self, request: Request) -> str:
        """Why `request` can never run here ('' if it can)."""
        if request.num_prompt_tokens + request.num_output_tokens > self.limits.max_model_len:
            return "exceeds_max_model_len"
        if self.kv.blocks_for(request.max_tokens_needed) > self.kv.num_blocks:
            return "exceeds_kv_capacity"
        return ""

    def submit(self, request: Request) -> None:
        """Queue an arriving request (already checked with `can_ever_fit`)."""
        request.replica = self.replica_id
        self.waiting.append(request)
        self.num_outstanding_requests += 1
        self._outstanding_tokens += request.remaining_work_tokens
        wake = self._wake
        if wake is not None and not wake.triggered:
            wake.succeed()

    @property
    def num_outstanding_tokens(self) -> int:
        """Tokens still to compute for the requests this replica holds, as of now."""
        ff = self._ff
        if ff is None:
            return self._outstanding_tokens
        done = int(np.searchsorted(ff[0], self.env.now, side="right"))
        return self._outstanding_tokens - ff[4] * done

    # ---------------------------------------------------------------- the loop
    def engine_loop(self):
        env = self.env
        ctx = self.ctx
        cost = self.cost_model
        while True:
            if not self.waiting and not self.running:
                self._wake = env.event()
                yield self._wake
                self._wake = None
            ctx.now = env.now
            plan = self.policy.schedule(ctx)
            if self.check_plans:
                self._check(plan)
            self._commit(plan)
            if not plan.scheduled:
                if plan.preempted or plan.relegated:
                    continue
                raise PlanError(
                    f"{self.name}: policy {type(self.policy).__name__} scheduled nothing at "
                    f"t={env.now:.6f}s with {len(self.waiting)} waiting, {len(self.running)} running, "
                    f"{self.kv.num_free_blocks}/{self.kv.num_blocks} KV blocks free"
                )
            if self.fast_forward and self._stable(plan):
                yield from self._fast_forward()
                continue
            num_prefill = prefill_ctx = num_decodes = decode_ctx = 0
            for req, n in zip(plan.scheduled, plan.num_new_tokens):
                c = req.num_computed_tokens
                if n == 1 and req.num_prompt_tokens + req.num_output_done - c == 1:
                    num_decodes += 1
                    decode_ctx += c
                else:
                    num_prefill += n
                    prefill_ctx += c
            batch = len(plan.scheduled)
            dur = cost.step_time_s(num_prefill, prefill_ctx, num_decodes, decode_ctx, batch)
            start = env.now
            kv_used = self.kv.num_used_blocks
            num_waiting = len(self.waiting)
            yield env.timeout(dur)
            self.steps.append(start, dur, num_prefill, prefill_ctx, num_decodes, decode_ctx, batch,
                              kv_used, num_waiting)
            self._advance(plan, env.now)

    def _commit(self, plan: StepPlan) -> None:
        """Apply preemptions and admissions at the start of the step."""
        now = self.env.now
        if plan.preempted:
            victims = plan.preempted
            ids = {id(v) for v in victims}
            self.running[:] = [r for r in self.running if id(r) not in ids]
            for v in reversed(victims):  # first-preempted ends up at the queue's front
                self._outstanding_tokens += v.num_computed_tokens
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
            if all(waiting[i] is r for i, r in enumerate(admitted)):
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
        self._outstanding_tokens -= tokens
        if done:
            self._retire(end_s)

    def _retire(self, end_s: float) -> None:
        kept = []
        for req in self.running:
            if req.num_output_done == req.num_output_tokens:
                req.finish_s = end_s
                req.outcome = FINISHED
                self.kv.free(req)
                self.num_outstanding_requests -= 1
                if self.on_finish is not None:
                    self.on_finish(req)
            else:
                kept.append(req)
        self.running[:] = kept

    # ------------------------------------------------------------ fast forward
    def _stable(self, plan: StepPlan) -> bool:
        """True if the plan decodes every running request and nothing else, and nothing
        waiting could be admitted before a completion."""
        running = self.running
        n = len(running)
        if plan.admitted or plan.preempted or len(plan.scheduled) != n or n == 0:
            return False
        if self.waiting and n < self.limits.max_num_seqs:
            return False
        if sum(plan.num_new_tokens) != n:
            return False
        for req in running:
            if req.num_output_done == 0 or req.num_prompt_tokens + req.num_output_done - req.num_computed_tokens != 1:
                return False
        return True

    def _fast_forward(self):
        """Advance a stable decode batch by many steps (the first step's KV is already reserved)."""
        env = self.env
        running = self.running
        n = len(running)
        bs = self.kv.block_size
        ctxs = np.fromiter((r.num_computed_tokens for r in running), dtype=np.int64, count=n)
        remaining = np.fromiter((r.num_output_tokens - r.num_output_done for r in running),
                                dtype=np.int64, count=n)
        k_max = int(min(remaining.min(), self.max_fast_forward_steps))
        # New KV blocks needed at step k >= 2: requests whose (context + k) crosses a block
        # boundary, i.e. k = ((-ctx) mod bs) + 1 (mod bs) -- a periodic histogram.
        first_cross = (-ctxs) % bs + 1
        hist = np.bincount(first_cross, minlength=bs + 1)
        ks = np.arange(1, k_max + 1)
        new_blocks = hist[(ks - 1) % bs + 1]
        new_blocks[0] = 0  # step 1 was allocated by the policy
        kv_used = self.kv.num_used_blocks + np.cumsum(new_blocks)
        over = np.flatnonzero(kv_used > self.kv.num_blocks)
        if over.size:
            k_max = int(over[0])  # steps 1..k_max fit
            kv_used = kv_used[:k_max]
        ctx0 = int(ctxs.sum())
        decode_ctx = ctx0 + n * (ks[:k_max] - 1)
        ones = np.full(k_max, n, dtype=np.int64)
        zeros = np.zeros(k_max, dtype=np.int64)
        durs = np.asarray(self.cost_model.step_times_s(zeros, zeros, ones, decode_ctx, ones), dtype=float)
        start = env.now
        ends = np.cumsum(np.concatenate(([start], durs)))[1:]
        self._ff = (ends, durs, decode_ctx, kv_used, n, start, len(self.waiting))
        wake = self._wake = env.event()
        timeout = env.timeout(ends[-1] - start)
        yield timeout | wake
        self._wake = None
        if wake.triggered and not timeout.processed:
            # An arrival: the step in flight finishes, then the policy sees the new request.
            m = min(int(np.searchsorted(ends, env.now, side="left")) + 1, k_max)
            if ends[m - 1] > env.now:
                yield env.timeout(ends[m - 1] - env.now)
        else:
            m = k_max
        self._apply_fast_forward(m)

    def _apply_fast_forward(self, m: int) -> None:
        """Apply the first `m` steps of the fast-forward in flight."""
        ends, durs, decode_ctx, kv_used, n, start, num_waiting = self._ff
        self._ff = None
        base = self.steps.num_steps
        starts = np.empty(m)
        starts[0] = start
        starts[1:] = ends[: m - 1]
        self.steps.extend(starts, durs[:m], n, decode_ctx[:m], kv_used[:m], num_waiting)
        last = base + m - 1
        end_s = float(ends[m - 1])
        bs = self.kv.block_size
        finished = False
        for req in self.running:
            c = req.num_computed_tokens + m
            req.num_computed_tokens = c
            req.num_output_done += m
            if req.last_token_step == base - 1:
                req.token_steps[-1] = last
            else:
                req.token_steps.append(base)
                req.token_steps.append(last)
            req.last_token_step = last
            req.num_blocks = -(-c // bs)
            if req.num_output_done == req.num_output_tokens:
                finished = True
        self.kv.num_used_blocks = int(kv_used[m - 1])
        self._outstanding_tokens -= n * m
        if finished:
            self._retire(end_s)

    def flush(self, horizon_s: float) -> None:
        """At the end of a run: apply fast-forwarded steps that ended by the horizon."""
        if self._ff is None:
            return
        ends = self._ff[0]
        m = int(np.searchsorted(ends, horizon_s, side="right"))
        if m > 0:
            self._apply_fast_forward(m)
        else:
            self._ff = None

    # ------------------------------------------------------------------ checks
    def _check(self, plan: StepPlan) -> None:
        """Assert the plan's invariants (enabled in tests)."""
        lim = self.limits
        total = sum(plan.num_new_tokens)
        if len(plan.scheduled) > lim.max_num_seqs:
            raise PlanError(f"{self.name}: {len(plan.scheduled)} requests > max_num_seqs={lim.max_num_seqs}")
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
