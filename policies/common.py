"""Building blocks shared by batch policies, named after what vLLM v1's scheduler does.

`continue_running` advances running requests in order (decodes and unfinished prefill
chunks), preempting from the back when KV blocks run short; `admit_waiting` then admits
queued requests in a given order while the token budget, `max_num_seqs` and KV allow.
A policy is mostly a choice of order and budget on top of these two.

Progress: whenever a replica holds a request, a plan from these two schedules or preempts
something. A running list always advances its first request or preempts; with nothing
running the whole KV cache is free, so the queue's head fits (`Replica.can_ever_fit`), and
with chunked prefill off a prompt larger than the policy's own budget runs in a step of its
own (`fits_unchunked`).
"""

from __future__ import annotations

from typing import Iterable

from sim.request import Request
from sim.scheduling import StepContext, StepPlan


def continue_running(ctx: StepContext, plan: StepPlan, token_budget: int,
                     running: list[Request] | None = None) -> int:
    """Schedule running requests in list order; preempt from the end of the list when KV is
    short (the victim is recomputed later). Returns the token budget left."""
    kv = ctx.kv
    if running is None:
        left = ctx.continue_running_fast(plan, token_budget)
        if left is not None:
            return left
        running = ctx.running
    end = len(running)
    i = 0
    while i < end and token_budget > 0:
        req = running[i]
        i += 1
        num_new = req.num_prompt_tokens + req.num_output_done - req.num_computed_tokens
        if num_new > token_budget:
            num_new = token_budget
        while not kv.allocate(req, num_new):
            end -= 1
            victim = running[end]
            kv.free(victim)
            plan.preempted.append(victim)
            if victim is req:
                break
        else:
            plan.scheduled.append(req)
            plan.num_new_tokens.append(num_new)
            token_budget -= num_new
    return token_budget


def fits_unchunked(ctx: StepContext, plan: StepPlan, num_new: int) -> bool:
    """With chunked prefill off, whether a whole prompt (or recompute) of `num_new` tokens
    larger than the token budget left may still run: only alone, in a step with nothing
    else scheduled, and within `max_num_batched_tokens`. Our design: a policy's own budget
    (Sarathi's chunk, EDF's `token_budget`, Niyama's step size) is a preference and the
    engine's limit is `max_num_batched_tokens`; without this a prompt longer than the
    policy's budget could never run (vLLM has no budget below its engine limit)."""
    return (not plan.scheduled and not plan.num_group_decodes
            and num_new <= ctx.limits.max_num_batched_tokens)


def admit_waiting(ctx: StepContext, plan: StepPlan, token_budget: int,
                  queue: Iterable[Request] | None = None) -> int:
    """Admit waiting requests in `queue` order (default: the waiting queue) while the budget,
    `max_num_seqs` and KV blocks allow; stop at the first that does not fit (head-of-line,
    as vLLM). With chunked prefill off a prompt goes whole or not at all (`fits_unchunked`).
    Returns the token budget left (>= 0)."""
    limits = ctx.limits
    free_seqs = limits.max_num_seqs - (ctx.num_running - len(plan.preempted))
    if free_seqs <= 0 or token_budget <= 0:
        return token_budget
    for req in ctx.waiting if queue is None else queue:
        num_new = req.num_prompt_tokens + req.num_output_done - req.num_computed_tokens
        if num_new > token_budget:
            if limits.enable_chunked_prefill:
                num_new = token_budget
            elif not fits_unchunked(ctx, plan, num_new):
                break
        if not ctx.kv.allocate(req, num_new):
            break
        plan.scheduled.append(req)
        plan.num_new_tokens.append(num_new)
        plan.admitted.append(req)
        token_budget -= num_new
        free_seqs -= 1
        if free_seqs == 0 or token_budget <= 0:
            return max(token_budget, 0)
    return token_budget
