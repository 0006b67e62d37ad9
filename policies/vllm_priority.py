"""vLLM's priority scheduler (`scheduling_policy="priority"`), as vLLM v1 (0.32) implements it.

Source: `vllm/v1/core/sched/scheduler.py` (`Scheduler.schedule`) and `request_queue.py`
(`PriorityRequestQueue`), read for this module. Each step:

1. Running requests are served in the running list's order (admission order; decodes and
   unfinished prefill chunks alike, chunked to the token budget left), exactly as FCFS: the
   priority does not reorder running requests.
2. When a running request cannot get KV blocks, the running request with the largest
   `(priority, arrival_time)` is preempted (recompute), whether or not it was already scheduled
   this step (its tokens then go back to the budget); if that is the request itself, the step
   schedules no more running requests (`policies.edf.Victims`, shared with EDF / SRPF / Niyama).
3. If nothing was preempted, waiting requests (new and preempted alike) are admitted in
   `(priority, arrival_time, request_id)` order while the budget, `max_num_seqs` and KV blocks
   allow, stopping at the first that does not fit (head-of-line). A waiting request never
   preempts a running one. With `reserve_full_sequence` (vLLM 0.32's
   `scheduler_reserve_full_isl`, on by default: `vllm/config/scheduler.py`, applied in
   `KVCacheManager.allocate_slots(full_sequence_must_fit=...)`), a waiting request is admitted
   only if the free KV blocks hold its whole sequence so far (prompt plus output emitted, at most
   `max_model_len`), not only its first chunk; this gate is what keeps vLLM from over-admitting
   under chunked prefill and thrashing (preempting) later.

A request's priority comes from its QoS class (`priorities`: class -> integer, smaller served
first, vLLM's convention; classes not listed get `default_priority`): our design, the
simulator's requests carry a class, vLLM's carry the integer. Ties in vLLM compare the request
id string; here the integer `request_id` (equal when ids are assigned in arrival order).
The waiting queue is sorted at each step that has one (O(n log n); validation-sized queues,
not a fast path).
"""

from __future__ import annotations

from collections.abc import Mapping

from policies.common import admit_waiting
from policies.edf import Victims
from sim.request import Request
from sim.scheduling import StepContext, StepPlan


class VllmPriority:
    """vLLM v1's priority scheduler: running first in admission order, victim the largest
    (priority, arrival), waiting admitted in (priority, arrival, id) order."""

    fast_forward_safe = True  # nothing waiting and nobody preempted: the running list in order, as FCFS

    def __init__(self, priorities: Mapping[str, int] | None = None, default_priority: int = 0,
                 token_budget: int | None = None, reserve_full_sequence: bool = True) -> None:
        if token_budget is not None and token_budget < 1:
            raise ValueError(f"VllmPriority: token_budget must be >= 1 or None, got {token_budget}")
        prio = dict(priorities or {})
        for k, v in prio.items():
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"VllmPriority: priority of class {k!r} must be an integer, got {v!r}")
        if isinstance(default_priority, bool) or not isinstance(default_priority, int):
            raise ValueError(f"VllmPriority: default_priority must be an integer, got {default_priority!r}")
        self.priorities = prio
        self.default_priority = default_priority
        self.token_budget = token_budget
        """Tokens per step; None (or more than the replica's limit) = `max_num_batched_tokens`."""
        self.reserve_full_sequence = bool(reserve_full_sequence)
        """Admit a waiting request only if its whole sequence so far fits the free KV blocks (vLLM's default)."""

    def key(self, req: Request) -> tuple:
        """vLLM's `Request.__lt__` order: (priority, arrival time, id); smaller is served first."""
        return (self.priorities.get(req.qos_class, self.default_priority), req.arrival_s, req.request_id)

    def schedule(self, ctx: StepContext) -> StepPlan:
        plan = StepPlan()
        budget = ctx.limits.max_num_batched_tokens
        if self.token_budget is not None and self.token_budget < budget:
            budget = self.token_budget
        budget = self._continue_running(ctx, plan, budget)
        if not plan.preempted and ctx.waiting and budget > 0:
            queue = sorted(ctx.waiting, key=self.key)
            admit_waiting(ctx, plan, budget, self._gated(ctx, queue) if self.reserve_full_sequence else queue)
        return plan

    @staticmethod
    def _gated(ctx: StepContext, queue: list[Request]):
        """`queue` up to the first request whose whole sequence so far does not fit the free KV blocks
        (checked when `admit_waiting` asks for it, after the admissions before it took their blocks)."""
        kv, max_len = ctx.kv, ctx.limits.max_model_len
        for req in queue:
            n = req.num_prompt_tokens + req.num_output_done
            if kv.blocks_for(n if n < max_len else max_len) - req.num_blocks > kv.num_free_blocks:
                return
            yield req

    def _continue_running(self, ctx: StepContext, plan: StepPlan, budget: int) -> int:
        left = ctx.continue_running_fast(plan, budget)  # certain outcome: nobody can be preempted
        if left is not None:
            return left
        kv = ctx.kv
        victims = Victims(ctx.running, self.key)
        for req in ctx.running:
            if budget <= 0:
                break
            if victims.gone and id(req) in victims.gone:
                continue
            num_new = req.num_prompt_tokens + req.num_output_done - req.num_computed_tokens
            if num_new > budget:
                num_new = budget
            if not kv.allocate(req, num_new):
                returned = victims.make_room(kv, plan, req, num_new)
                if returned < 0:
                    break
                budget += returned
            plan.scheduled.append(req)
            plan.num_new_tokens.append(num_new)
            budget -= num_new
        return budget

    def forget(self, req: Request) -> None:
        """`req` left the replica other than by this policy's plans: nothing is kept across steps."""
