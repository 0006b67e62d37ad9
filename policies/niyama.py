"""Niyama (published as QoServe, MSR India): QoS-aware batching on shared replicas.

Each step, on top of the priority-ordered step of `policies.edf`:
1. decode first: every running decode gets one token; the tightest decode slack is noted,
   the time until some decode's next token is due (token k of a request is due at
   `arrival + max(first_token - arrival, first-token deadline) + tbt * k`, see `sim.qos`);
2. dynamic chunking: the step's total tokens T is the largest grid value (128, 256, 512,
   768, ..., 2048, 2552; only up to 512 when free KV is low) whose predicted step time x 1.2
   fits that slack, the cost model being the predictor (T = 128 when the slack is <= 0; the
   largest T without decodes); prefills get T - num_decodes tokens;
3. hybrid priority: prefills ordered by `(relegated, deadline + alpha * remaining prompt tokens)`;
4. selective relegation: a waiting request never scheduled whose deadline cannot be met at
   the estimated prefill throughput (an exponential moving average, weight 0.995 on the old
   value, of prefill tokens per second of step time) moves behind every non-relegated
   request and is served best effort. The per-request `relegable` flag is our design.
Each mechanism switches off for ablation: fixed chunk, plain EDF order, no relegation.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from policies.edf import Deadlines, PrefillTracker, WaitingHeap, decode_pass, fast_step, schedule_prefills
from sim.costmodel import CostModel
from sim.errors import InputError
from sim.qos import QoS
from sim.request import Request
from sim.scheduling import StepContext, StepPlan

CHUNK_GRID: tuple[int, ...] = (128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2552)
"""Total tokens per step Niyama chooses from (the artifact's search space)."""
LOW_KV_CHUNK_GRID: tuple[int, ...] = (128, 256, 384, 512)
"""The grid when free KV is low (bounds how fast a step can fill the cache)."""


def choose_step_tokens(min_slack_s: float, cost_model: CostModel, *, num_decodes: int, decode_context_sum: int,
                       prefill_context: int, grid: Sequence[int], safety_factor: float = 1.2) -> int:
    """The largest total token count T in `grid` (ascending) whose predicted step time (decodes
    plus T - num_decodes prefill tokens at `prefill_context`) times `safety_factor` fits
    `min_slack_s`; the smallest when none fits or the slack is <= 0; the largest when
    `min_slack_s` is inf (no decode has a deadline)."""
    if min_slack_s == math.inf:
        return grid[-1]
    best = grid[0]
    if min_slack_s <= 0:
        return best
    step_time_s = cost_model.step_time_s
    for total in grid:
        prefill = total - num_decodes
        if prefill > 0:
            t = step_time_s(prefill, prefill_context, num_decodes, decode_context_sum, num_decodes + 1)
        else:
            t = step_time_s(0, prefill_context, num_decodes, decode_context_sum, num_decodes)
        if safety_factor * t <= min_slack_s:
            best = total
        else:
            break  # step time grows with T
    return best


def _grid(values: object, field: str) -> tuple[int, ...]:
    grid = tuple(sorted(int(v) for v in values))
    if not grid or grid[0] < 1 or any(float(v) != int(v) for v in values):
        raise InputError("must be a non-empty list of whole numbers >= 1", field=field, value=list(values))
    return grid


class Niyama:
    """Niyama's batch policy. Invariant: every plan's tokens fit `max_num_batched_tokens`; a
    relegated request stays queued (served after every non-relegated one), never dropped."""

    fast_forward_safe = True
    """An all-decode batch with nothing admissible decodes everything (as FCFS) and leaves the
    throughput estimate and every flag untouched, so fast-forward gives the same steps."""

    def __init__(
        self,
        slo: object = None,
        *,
        alpha_s_per_token: float = 0.008,
        hybrid_priority: bool = True,
        dynamic_chunking: bool = True,
        chunk_size: int = 256,
        chunk_grid: Sequence[int] = CHUNK_GRID,
        low_kv_chunk_grid: Sequence[int] = LOW_KV_CHUNK_GRID,
        low_kv_free_tokens: int = 32000,
        safety_factor: float = 1.2,
        relegation: bool = True,
        prefill_tps_ema_weight: float = 0.995,
        initial_prefill_tps: float | None = None,
        relegable_classes: Sequence[str] | None = None,
        relegable_share: float | None = None,
        relegable_seed: int = 0,
    ) -> None:
        self.qos = QoS.from_config(slo)
        """Tiers the deadlines and decode targets come from."""
        self.alpha_s_per_token = float(alpha_s_per_token)
        """Hybrid key weight: seconds of deadline per remaining prompt token."""
        self.hybrid_priority = bool(hybrid_priority)
        """False: plain EDF order (relegated last)."""
        self.dynamic_chunking = bool(dynamic_chunking)
        """False: a fixed `chunk_size` tokens per step (Sarathi-style)."""
        self.chunk_size = int(chunk_size)
        """Tokens per step when dynamic chunking is off."""
        self.chunk_grid = _grid(chunk_grid, "chunk_grid")
        self.low_kv_chunk_grid = _grid(low_kv_chunk_grid, "low_kv_chunk_grid")
        self.low_kv_free_tokens = int(low_kv_free_tokens)
        """Below this many free KV tokens, use `low_kv_chunk_grid`."""
        self.safety_factor = float(safety_factor)
        """Predicted step time is multiplied by this before comparing with the slack."""
        self.relegation = bool(relegation)
        """False: never relegate."""
        self.prefill_tps_ema_weight = float(prefill_tps_ema_weight)
        """Weight of the old estimate in the moving average of prefill throughput."""
        self.prefill_tps = None if initial_prefill_tps is None else float(initial_prefill_tps)
        """Estimated prefill tokens per second (None until the first step: from the cost model)."""
        self.relegable_classes = None if relegable_classes is None else frozenset(map(str, relegable_classes))
        """Only these QoS classes may be relegated (None: all). Our design."""
        self.relegable_share = None if relegable_share is None else float(relegable_share)
        """Only this share of requests (a seeded draw per request id) may be relegated. Our design."""
        self.relegable_seed = int(relegable_seed)
        self.deadline = Deadlines(self.qos)
        """First-token deadlines (`deadline_s` written at first admission)."""
        self.queue = WaitingHeap(self.key)
        self.prefills = PrefillTracker()
        self._tbt = {name: tier.decode_target_s for name, tier in self.qos.tiers.items()}
        self._grids: dict[tuple[bool, int], tuple[int, ...]] = {}
        self._due_fn = self._due  # one callable for StepContext.min_decode_due
        if self.alpha_s_per_token < 0:
            raise InputError("must be >= 0", field="alpha_s_per_token", value=alpha_s_per_token)
        if self.chunk_size < 1:
            raise InputError("must be >= 1", field="chunk_size", value=chunk_size)
        if not self.safety_factor > 0:
            raise InputError("must be > 0", field="safety_factor", value=safety_factor)
        if not 0 <= self.prefill_tps_ema_weight < 1:
            raise InputError("must be in [0, 1)", field="prefill_tps_ema_weight", value=prefill_tps_ema_weight)
        if self.prefill_tps is not None and not self.prefill_tps > 0:
            raise InputError("must be > 0 or null", field="initial_prefill_tps", value=initial_prefill_tps)
        if self.relegable_share is not None and not 0 <= self.relegable_share <= 1:
            raise InputError("must be in [0, 1] or null", field="relegable_share", value=relegable_share)

    # ------------------------------------------------------------------ keys
    def key(self, req: Request) -> tuple:
        d = self.deadline(req)
        if self.hybrid_priority:
            d += self.alpha_s_per_token * (req.num_prompt_tokens + req.num_output_done - req.num_computed_tokens)
        return (req.relegated, d, req.arrival_s, req.request_id)

    # -------------------------------------------------------------- the step
    def schedule(self, ctx: StepContext) -> StepPlan:
        max_tokens = ctx.limits.max_num_batched_tokens
        step_cap = max_tokens if self.dynamic_chunking else min(self.chunk_size, max_tokens)
        fast = fast_step(ctx, self.prefills, step_cap, prefills_ok=False)  # decodes only: no chunk to size
        if fast is not None:
            return fast
        plan = StepPlan()
        self.queue.sync(ctx.waiting)
        if self.prefill_tps is None:
            self.prefill_tps = self._initial_prefill_tps(ctx)
        prefills, victims = decode_pass(ctx, plan, step_cap, self.key)
        num_decodes = len(plan.scheduled) + plan.num_group_decodes
        if victims is not None and (prefills or (self.queue and not plan.preempted)):
            if self.dynamic_chunking:
                # Prefill context of the most urgent candidate (a waiting one has computed nothing).
                wk = None if plan.preempted else self.queue.peek_key()
                head_context = prefills[0][1].num_computed_tokens if prefills and (wk is None or prefills[0][0] <= wk) else 0
                total = self.step_tokens(ctx, plan, head_context)
            else:
                total = step_cap
            budget = total - num_decodes
            if budget > 0:
                schedule_prefills(ctx, plan, budget, prefills, victims, self.queue,
                                  self._should_relegate(ctx.now) if self.relegation and self.queue else None)
        if plan.preempted:
            self.queue.note_preempted(plan.preempted)
        self.prefills.note(plan)
        if plan.admitted:
            self.deadline.record(plan.admitted)
        self._observe(ctx, plan)
        return plan

    def step_tokens(self, ctx: StepContext, plan: StepPlan, head_context: int) -> int:
        """Total tokens this step (decodes already in `plan` + prefill): dynamic chunking."""
        now = ctx.now
        min_slack = math.inf
        decode_ctx = 0
        if plan.num_group_decodes:  # the decode group: its least due time, in O(1)
            decode_ctx = ctx.group_context_sum()
            min_slack = ctx.min_decode_due(self._due_fn) - now
        tbt_of = self._tbt
        for req in plan.scheduled:
            decode_ctx += req.num_computed_tokens
            tbt = tbt_of.get(req.qos_class)
            if tbt is None:
                continue
            deadline = req.deadline_s  # a decode was admitted: recorded (Deadlines.record)
            first = req.first_token_s if req.first_token_s > deadline else deadline
            slack = first + tbt * req.num_output_done - now
            if slack < min_slack:
                min_slack = slack
        kv = ctx.kv
        low = kv.num_free_blocks * kv.block_size < self.low_kv_free_tokens
        max_tokens = ctx.limits.max_num_batched_tokens
        grid = self._grids.get((low, max_tokens))
        if grid is None:
            grid = tuple(t for t in (self.low_kv_chunk_grid if low else self.chunk_grid) if t <= max_tokens) or (
                max_tokens,)
            self._grids[(low, max_tokens)] = grid
        return choose_step_tokens(min_slack, ctx.cost_model, num_decodes=len(plan.scheduled) + plan.num_group_decodes,
                                  decode_context_sum=decode_ctx, prefill_context=head_context,
                                  grid=grid, safety_factor=self.safety_factor)

    def _due(self, req: Request) -> tuple[float, float] | None:
        """When `req`'s next decode token is due: `first + tbt * num_output_done` (see
        `step_tokens`); `first` and `tbt` are fixed while it decodes."""
        tbt = self._tbt.get(req.qos_class)
        if tbt is None:
            return None
        deadline = self.deadline(req)
        return (req.first_token_s if req.first_token_s > deadline else deadline), tbt

    def forget(self, req: Request) -> None:
        """`req` left the replica other than by this policy's plans (a controller's eviction or
        migration): it is no longer queued or running here."""
        self.queue.forget(req)
        self.prefills.forget(req)

    # ------------------------------------------------------------ relegation
    def _should_relegate(self, now: float):
        deadline_of = self.deadline

        def check(req: Request) -> bool:
            deadline = deadline_of(req)
            remaining = req.num_prompt_tokens + req.num_output_done - req.num_computed_tokens
            return now + remaining / self.prefill_tps > deadline and self.may_relegate(req)

        return check

    def may_relegate(self, req: Request) -> bool:
        """Whether `req` may ever be relegated (its flag, its class, the relegable share)."""
        if not req.relegable:
            return False
        if self.relegable_classes is not None and req.qos_class not in self.relegable_classes:
            req.relegable = False
            return False
        if self.relegable_share is not None:
            draw = np.random.default_rng([self.relegable_seed, req.request_id]).random()
            if draw >= self.relegable_share:
                req.relegable = False
                return False
        return True

    # ------------------------------------------------- throughput estimation
    def _initial_prefill_tps(self, ctx: StepContext) -> float:
        """Prefill tokens per second of a full-size prefill-only step, per the cost model."""
        tokens = max((t for t in self.chunk_grid if t <= ctx.limits.max_num_batched_tokens),
                     default=ctx.limits.max_num_batched_tokens)
        return tokens / ctx.cost_model.step_time_s(tokens, 0, 0, 0, 1)

    def _observe(self, ctx: StepContext, plan: StepPlan) -> None:
        """Fold this step's prefill tokens per second (priced by the cost model: exactly what
        the simulated engine will take) into the moving average."""
        num_prefill, prefill_ctx, num_decodes, decode_ctx, batch = ctx.plan_shape(plan)
        if num_prefill == 0:
            return
        step_s = ctx.cost_model.step_time_s(num_prefill, prefill_ctx, num_decodes, decode_ctx, batch)
        w = self.prefill_tps_ema_weight
        self.prefill_tps = w * self.prefill_tps + (1.0 - w) * (num_prefill / step_s)
