"""First-come-first-served batching as vLLM schedules by default, and Sarathi's fixed chunk.

FCFS: running requests first (decodes and unfinished prefill chunks, in admission order),
then waiting prompts in arrival order, chunked to the remaining token budget; when KV
blocks run short the most recently admitted request is preempted (recompute), and no new
request is admitted in a step that preempted. Sarathi is the same with a fixed per-step
token budget (256 in the Niyama experiments) instead of `max_num_batched_tokens`.
"""

from __future__ import annotations

from policies.common import admit_waiting, continue_running
from sim.scheduling import StepContext, StepPlan


class FCFS:
    """vLLM v1's default scheduler (FCFS with chunked prefill)."""

    fast_forward_safe = True

    def __init__(self, token_budget: int | None = None) -> None:
        if token_budget is not None and token_budget < 1:
            raise ValueError(f"FCFS: token_budget must be >= 1 or None, got {token_budget}")
        self.token_budget = token_budget
        """Tokens per step; None (or more than the replica's `max_num_batched_tokens`) means
        the replica's `max_num_batched_tokens`."""

    def schedule(self, ctx: StepContext) -> StepPlan:
        plan = StepPlan()
        budget = ctx.limits.max_num_batched_tokens
        if self.token_budget is not None and self.token_budget < budget:  # never above the engine's limit
            budget = self.token_budget
        budget = continue_running(ctx, plan, budget)
        if not plan.preempted and ctx.waiting:
            admit_waiting(ctx, plan, budget)
        return plan


class Sarathi(FCFS):
    """Sarathi-Serve: FCFS with a fixed per-step token budget (chunk size)."""

    def __init__(self, chunk_size: int = 256) -> None:
        super().__init__(token_budget=chunk_size)
        self.chunk_size = chunk_size
