"""The boundary between mechanism (`sim/`) and decisions (`policies/`).

Each engine step a replica hands its batch policy a `StepContext` (queues, KV cache, limits,
cost model, `now`) and gets back a `StepPlan`: which requests advance by how many tokens,
which waiting requests were admitted and which running ones were preempted. A policy may
reserve KV blocks through `ctx.kv.allocate` (and release a victim's with `ctx.kv.free`), as
vLLM's scheduler does; everything else it only reads. Routers pick a replica per request.
"""

from __future__ import annotations

import numbers
from collections import deque
from dataclasses import dataclass
from typing import Protocol, Sequence

from sim.costmodel import CostModel
from sim.errors import InputError
from sim.kvcache import KVCache
from sim.request import Request


@dataclass(frozen=True)
class EngineLimits:
    """Per-replica engine limits, named as in vLLM.

    Checked as vLLM's `SchedulerConfig` checks them (an `InputError` naming the field and
    value): every limit a whole number >= 1, and `max_num_batched_tokens >= max_num_seqs`
    (a step that can hold more requests than tokens would silently cap concurrency).
    vLLM also refuses `max_num_batched_tokens < max_model_len` when chunked prefill is off;
    slosim does not (our design): such a replica refuses, at arrival, each request whose
    prompt could need an unchunked step larger than the budget (`Replica.can_ever_fit`,
    reason `exceeds_max_num_batched_tokens`) and serves the rest."""

    max_num_seqs: int = 256
    """Most requests in one step's batch."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step (prefill chunk tokens + one per decode)."""
    max_model_len: int = 8192
    """Longest request (prompt + output tokens) the replica accepts."""
    enable_chunked_prefill: bool = True
    """Split prompts longer than the remaining budget across steps."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise InputError("engine limit must be an integer >= 1", field=name, value=value)
            object.__setattr__(self, name, int(value))
        if not isinstance(self.enable_chunked_prefill, bool):
            raise InputError("must be true or false", field="enable_chunked_prefill", value=self.enable_chunked_prefill)
        if self.max_num_batched_tokens < self.max_num_seqs:  # vLLM SchedulerConfig.verify_max_model_len
            raise InputError(f"must be >= max_num_seqs ({self.max_num_seqs}), as vLLM requires",
                             field="max_num_batched_tokens", value=self.max_num_batched_tokens)


class PlanError(Exception):
    """A batch policy returned a plan that breaks the engine's invariants or its own contract
    (a policy bug). Not a RuntimeError, so `simulate` does not mistake it for a stalled event queue."""


class StepPlan:
    """What one engine step does. Invariants (checked by the replica): every scheduled
    request advances by >= 1 token and at most what it has left to compute; the tokens sum
    to at most the budget; at most `max_num_seqs` requests; admitted ⊆ scheduled.

    `num_group_decodes` > 0 means every member of the replica's decode group (running
    requests in steady decode, kept as aggregates) also computes one token; only the fast
    path sets it (`StepContext.continue_running_fast`, `StepContext.decode_running_fast`)."""

    __slots__ = ("scheduled", "num_new_tokens", "admitted", "preempted", "relegated", "num_group_decodes")

    def __init__(self) -> None:
        self.scheduled: list[Request] = []
        self.num_new_tokens: list[int] = []
        self.admitted: list[Request] = []
        self.preempted: list[Request] = []
        self.relegated: list[Request] = []
        self.num_group_decodes = 0

    def add(self, request: Request, num_new_tokens: int) -> None:
        self.scheduled.append(request)
        self.num_new_tokens.append(num_new_tokens)

    def shape(self, group_context_sum: int = 0) -> tuple[int, int, int, int, int]:
        """The step's cost-model shape (num_prefill_tokens, prefill_context, num_decodes,
        decode_context_sum, batch_size); a scheduled request computing its one remaining
        token counts as a decode. `group_context_sum` is the decode group's context sum when
        `num_group_decodes` > 0."""
        num_prefill = prefill_ctx = num_decodes = decode_ctx = 0
        for req, n in zip(self.scheduled, self.num_new_tokens):
            c = req.num_computed_tokens
            if n == 1 and req.num_prompt_tokens + req.num_output_done - c == 1:
                num_decodes += 1
                decode_ctx += c
            else:
                num_prefill += n
                prefill_ctx += c
        return (num_prefill, prefill_ctx, num_decodes + self.num_group_decodes, decode_ctx + group_context_sum,
                len(self.scheduled) + self.num_group_decodes)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens) + self.num_group_decodes

    def __len__(self) -> int:
        return len(self.scheduled) + self.num_group_decodes


class StepContext:
    """A replica as its batch policy sees it at the start of a step (see module docstring):
    read-only but for `kv.allocate` / `kv.free`. Running requests are reached through the
    replica's fast path (`sim.fastpath.Batch`), never the replica itself."""

    __slots__ = ("replica_id", "now", "waiting", "kv", "limits", "cost_model", "_batch")

    def __init__(self, replica_id: int, waiting: deque, kv: KVCache, limits: EngineLimits, cost_model: CostModel,
                 batch) -> None:
        self.replica_id = replica_id
        self.now = 0.0
        self.waiting: deque[Request] = waiting
        """Requests not yet running, in queue order (arrival order, preempted ones at the front)."""
        self.kv = kv
        self.limits = limits
        self.cost_model = cost_model
        self._batch = batch

    @property
    def running(self) -> list[Request]:
        """Requests admitted and holding KV blocks, in admission order, with current counters
        (materialises the decode group: the per-request path)."""
        return self._batch.requests()

    @property
    def num_running(self) -> int:
        """How many requests are running (without materialising them)."""
        return len(self._batch)

    def plan_shape(self, plan: StepPlan) -> tuple[int, int, int, int, int]:
        """The cost-model shape of `plan` on this replica (decode-group members included)."""
        return plan.shape(self._batch.group.ctx_sum() if plan.num_group_decodes else 0)

    def continue_running_fast(self, plan: StepPlan, token_budget: int) -> int | None:
        """`policies.common.continue_running` in O(1) Python work per grouped decode when its
        outcome is certain (every running request gets its full demand in admission order and
        KV suffices); returns the budget left, or None (nothing changed) to take the general path."""
        return self._batch.continue_fcfs(plan, token_budget)

    def decode_running_fast(self, plan: StepPlan, token_budget: int) -> list[Request] | None:
        """Every running decode gets one token, grouped ones as one entry (`num_group_decodes`),
        when the outcome is certain in any priority order: at most `token_budget` decodes, and
        free KV blocks for them and for whatever prefill chunks of at most `token_budget`
        tokens in all this step may take (so no running request can run short of blocks:
        nobody is preempted). Returns the running
        requests still prefilling (admission order), or None (nothing changed) to take the
        per-request path (`policies.edf.decode_first`)."""
        return self._batch.decode_all(plan, token_budget, self.waiting)

    def group_context_sum(self) -> int:
        """Context sum of the decodes a plan counts in `num_group_decodes`."""
        return self._batch.group.ctx_sum()

    def min_decode_due(self, due) -> float:
        """Least `a + s * num_output_done` over the decodes a plan counts in
        `num_group_decodes`, `(a, s) = due(request)` (None leaves a request out), exactly as a
        loop over them would compute it; inf if none. `due` must be the same callable from step
        to step and depend only on what is fixed while a request decodes (a new one re-indexes)."""
        return self._batch.group.min_due(due)


class BatchPolicy(Protocol):
    """Per-replica scheduler: one plan per engine step."""

    fast_forward_safe: bool
    """True promises: when every running request is in steady decode and nothing waiting can be
    admitted (the queue is empty or `max_num_seqs` run), the plan decodes every running request
    once and nothing else, and leaves the policy's state unchanged. The replica then skips the
    policy and may advance many decode steps at once (`sim.fastpath`; checked under
    `check_plans`). False: the policy is asked at every step."""

    def schedule(self, ctx: StepContext) -> StepPlan: ...

    # Optional: `forget(request)`, called when a request leaves the replica other than through
    # the policy's own plans (a controller's eviction or migration): a policy keeping requests
    # across steps must drop it, so it is never scheduled or counted here again.


class ReplicaLoad(Protocol):
    """What a router may read about a replica."""

    replica_id: int
    model: str
    num_outstanding_requests: int
    num_outstanding_tokens: int


class Router(Protocol):
    """Cluster-level policy: pick a replica for each arriving request."""

    def route(self, request: Request, replicas: Sequence[ReplicaLoad], now: float) -> int:
        """Index into `replicas` (all eligible for the request's model)."""
        ...
