"""A serving cluster: replicas behind a router, fed by a workload, run to an outcome per request.

`simulate` is the one entry point: it builds the SimPy environment, one `Replica` per
`ReplicaSpec`, an arrivals process that routes each request at its arrival time, and runs
until every request has its outcome (finished or rejected) or the horizon passes (the rest
are `unfinished`, or `not_arrived` if they arrive after it). It returns tables, never
prints; Hydra apps and notebooks format them.
"""

from __future__ import annotations

import functools
import gc
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import simpy

from sim.costmodel import CostModel
from sim.control import Controller
from sim.controlplane import ActionError, Cluster, ControlSettings, route  # noqa: F401 (ActionError re-exported)
from sim.errors import InputError
from sim.metrics import request_table
from sim.replica import Replica
from sim.request import NOT_ARRIVED, REJECTED, UNFINISHED, Request
from sim.scheduling import BatchPolicy, EngineLimits, Router
from sim.steplog import concat_columns


@dataclass(frozen=True)
class ReplicaSpec:
    """One replica's hardware, model, engine limits, cost model and batch policy."""

    cost_model: CostModel
    """Step shape -> seconds on this replica's hardware (TP degree included)."""
    policy_factory: Callable[[], BatchPolicy]
    """Builds this replica's batch policy (policies may keep per-replica state)."""
    limits: EngineLimits = field(default_factory=EngineLimits)
    """vLLM-style engine limits."""
    num_kv_blocks: int | None = None
    """KV-cache blocks; None asks the cost model (GPU memory minus weights)."""
    block_size: int = 16
    """Tokens per KV block."""
    name: str = ""
    """Label in tables and plots (default `replica<i>`)."""
    model: str = ""
    """Model name requests are routed by: requests naming another model never come here. ''
    serves any (a homogeneous cluster serves whatever model a trace names)."""
    model_spec_name: str = ""
    """The model architecture the replica loads and its cost model prices (a `conf/model`
    name, e.g. 'llama3-8b'); reported in the replica table."""
    hardware: str = ""
    """Hardware name (e.g. 'a100-80gb'); the cost model was built for it (experiments.wiring checks)."""
    tp: int = 1
    """Tensor-parallel degree; the cost model was built for it (experiments.wiring checks)."""

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise InputError("KV block size must be >= 1 token", field="block_size", value=self.block_size)
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise InputError("KV blocks must be >= 1, or null to ask the cost model", field="num_kv_blocks",
                             value=self.num_kv_blocks)

    def resolve_kv_blocks(self) -> int:
        """The KV blocks this replica has: given explicitly, else from the cost model."""
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        blocks = self.cost_model.num_kv_blocks(self.block_size)
        if blocks is None:
            raise InputError(
                f"cost model {getattr(self.cost_model, 'name', '?')!r} does not know the KV capacity; "
                "set num_kv_blocks for this replica",
                field="num_kv_blocks", value=None,
            )
        return int(blocks)


@dataclass
class SimResult:
    """Everything a run produced: one row a request, one row an engine step."""

    requests: pd.DataFrame
    steps: pd.DataFrame
    replicas: pd.DataFrame
    end_s: float
    info: dict[str, Any] = field(default_factory=dict)


def _cyclic_gc_paused(func):
    """Run `func` with Python's cyclic garbage collector paused (restored afterwards). A run
    allocates hundreds of thousands of long-lived objects (requests, their token runs) and
    creates almost no reference cycles, so the collector's repeated passes over the growing
    heap are overhead (reference counting still frees everything as usual). The tables it
    returns hold no collector-tracked object per request, so little is left for the collector
    once it is back on: with that final collection counted, 2% fewer instructions at 50,000
    requests of the `make bench` scenario (callgrind), more for larger runs."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if not gc.isenabled():
            return func(*args, **kwargs)
        gc.disable()
        try:
            return func(*args, **kwargs)
        finally:
            gc.enable()

    return wrapper


@_cyclic_gc_paused
def simulate(
    workload: pd.DataFrame,
    replicas: Sequence[ReplicaSpec],
    router: Router,
    *,
    horizon_s: float | None = None,
    fast_forward: bool = True,
    check_plans: bool = False,
    progress: bool = False,
    min_fast_forward_steps: int = 2,
    controller: Controller | None = None,
    catalog: Mapping[str, ReplicaSpec] | None = None,
    control: ControlSettings | None = None,
) -> SimResult:
    """Run `workload` (columns arrival_s, num_prompt_tokens, num_output_tokens[, model,
    qos_class, request_id]) through the cluster; every request ends finished, rejected or
    unfinished (still in the system at `horizon_s`) or not_arrived (arriving after it).

    `fast_forward` (default on) keeps steady decodes in arrays and advances stable decode
    batches in closed form once the next completion is at least `min_fast_forward_steps`
    steps away; results equal step-by-step simulation up to floating-point rounding.

    With a `controller` (a cluster policy, `sim.control.Controller`) or a `catalog` of named
    replica configurations it may start, the replicas run under `sim.controlplane.Cluster`:
    lifecycle, cluster queue, pulls and controller actions. `control` holds the mechanism's
    settings (KV transfer bandwidth, what to do with a request for a model nobody serves:
    an InputError at start-up by default). Requests left in the cluster queue when nothing
    more can happen end `unfinished` (counted in `info['num_stranded']`)."""
    if not replicas:
        raise InputError("the cluster has no replicas", field="replicas", value=0)
    if horizon_s is not None and not horizon_s > 0:
        raise InputError("horizon must be > 0 seconds or null", field="horizon_s", value=horizon_s)
    requests = _make_requests(workload)
    env = simpy.Environment()
    for spec in [*replicas, *(catalog or {}).values()]:  # time-varying cost models read the simulation clock
        bind = getattr(spec.cost_model, "bind_clock", None)
        if bind is not None:
            bind(lambda: env.now)
    n_total = len(requests)
    done_count = [0]
    all_done = env.event()

    def on_outcome(_req: Request) -> None:
        done_count[0] += 1
        if done_count[0] == n_total and not all_done.triggered:
            all_done.succeed()

    def make_replica(i: int, spec: ReplicaSpec) -> Replica:
        return Replica(
            env, i, spec.cost_model, spec.policy_factory(), spec.limits, spec.resolve_kv_blocks(),
            spec.block_size, name=spec.name or f"replica{i}", model=spec.model,
            fast_forward=fast_forward, min_fast_forward_steps=min_fast_forward_steps,
            check_plans=check_plans, on_finish=on_outcome,
        )

    reps: list[Replica] = [make_replica(i, spec) for i, spec in enumerate(replicas)]
    specs = list(replicas)
    settings = control or ControlSettings()
    by_model: dict[str, list[Replica]] = {}

    def eligible(model: str) -> list[Replica]:
        group = by_model.get(model)
        if group is None:
            group = [r for r in reps if not r.model or not model or r.model == model]
            by_model[model] = group
        return group

    def reject(req: Request, reason: str) -> None:
        req.outcome = REJECTED
        req.reject_reason = reason
        on_outcome(req)

    def deliver(req: Request, now: float) -> None:
        if req.reject_reason:  # marked at start-up (no replica may serve its model)
            reject(req, req.reject_reason)
            return
        group = eligible(req.model)
        if not group:
            reject(req, "no_replica_for_model")
            return
        target, why = route(router, req, group, now)
        if target is None:
            reject(req, why)
        else:
            target.submit(req)

    cluster = None
    if controller is not None or catalog:
        cluster = Cluster(env, reps, specs, router, controller, catalog or {}, settings, make_replica, reject)
        cluster.on_outcome = on_outcome
        cluster.done = lambda: all_done.triggered
        deliver = cluster.deliver
    num_model_cleared = _check_models(requests, specs, catalog or {}, settings)
    arrivals = _Arrivals(env, requests, deliver, _progress_bar(progress, requests, horizon_s))
    if cluster is not None:
        cluster._requests = requests
        cluster.pending_arrivals = lambda: arrivals.next_k < n_total
        cluster.start()
    if n_total == 0:
        all_done.succeed()
    until = all_done if horizon_s is None else env.any_of([all_done, env.timeout(horizon_s)])
    num_stranded = 0
    try:
        env.run(until=until)
    except RuntimeError as exc:  # the event queue ran dry before every request ended
        stuck = [r for r in requests if r.outcome is None]
        if cluster is not None and arrivals.next_k == n_total and all(r.replica == -1 for r in stuck):
            num_stranded = len(stuck)  # left in the cluster queue with nobody to serve them
        else:
            raise RuntimeError(
                f"simulation stalled at t={env.now:.3f}s with {len(stuck)} requests unfinished "
                f"(first: {stuck[:3]}): the event queue ran dry with requests held (a mechanism bug; a policy "
                "that schedules nothing raises PlanError)"
            ) from exc
    finally:
        arrivals.close()
    end_s = env.now
    for rep in reps:
        rep.flush(end_s)
    for req in requests[arrivals.next_k:]:  # never delivered: they arrive after the horizon
        req.outcome = NOT_ARRIVED
    for req in requests:
        if req.outcome is None:
            req.outcome = UNFINISHED
    steps_df, ends = _steps_table(reps)
    req_df = request_table(requests, ends)
    rep_df = pd.DataFrame({
        "replica": [r.replica_id for r in reps],
        "name": [r.name for r in reps],
        "model": [s.model_spec_name or s.model for s in specs],
        "routes_model": [r.model for r in reps],
        "hardware": [s.hardware for s in specs],
        "tp": [s.tp for s in specs],
        "cost_model": [getattr(s.cost_model, "name", type(s.cost_model).__name__) for s in specs],
        "policy": [type(r.policy).__name__ for r in reps],
        "num_kv_blocks": [r.kv.num_blocks for r in reps],
        "block_size": [r.kv.block_size for r in reps],
        "max_num_seqs": [r.limits.max_num_seqs for r in reps],
        "max_num_batched_tokens": [r.limits.max_num_batched_tokens for r in reps],
        "num_steps": [r.steps.num_steps for r in reps],
    })
    if cluster is not None:  # lifecycle: the state each replica ended in and when it changed
        for col in ("state", "config_name", "started_s", "serving_s", "stopped_s"):
            rep_df[col.replace("config_name", "config")] = [getattr(r, col) for r in reps]
    info = {"num_requests": n_total, "num_stranded": num_stranded, "end_s": end_s, "horizon_s": horizon_s,
            "fast_forward": fast_forward, "num_steps": int(sum(r.steps.num_steps for r in reps))}
    if num_model_cleared:
        info["num_model_cleared"] = num_model_cleared
    if cluster is not None:
        info.update(cluster.counts)
    return SimResult(req_df, steps_df, rep_df, end_s, info)


class _Arrivals:
    """Hands each request to `deliver` at its arrival time. A chain of timeouts with this
    object as their callback (cheaper than a generator process); each one delivers the next
    request, then every later one due at the same instant. (An object rather than a closure
    that schedules itself: that would be a reference cycle keeping every request alive
    until the cyclic collector runs.)"""

    __slots__ = ("env", "requests", "deliver", "bar", "next_k", "last_update")

    def __init__(self, env: simpy.Environment, requests: list[Request], deliver: Callable[[Request, float], None],
                 bar) -> None:
        self.env, self.requests, self.deliver, self.bar = env, requests, deliver, bar
        self.next_k, self.last_update = 0, 0.0
        if requests:
            env.timeout(requests[0].arrival_s).callbacks.append(self)

    def __call__(self, _event) -> None:
        env, requests, deliver, bar = self.env, self.requests, self.deliver, self.bar
        now = env.now
        k = self.next_k
        n = len(requests)
        while True:
            deliver(requests[k], now)
            if bar is not None and (k & 1023) == 0:
                bar.update(now - self.last_update)
                self.last_update = now
            k += 1
            if k == n:
                break
            delay = requests[k].arrival_s - now
            if delay > 0:
                env.timeout(delay).callbacks.append(self)
                break
        self.next_k = k

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_models(requests: list[Request], specs: Sequence[ReplicaSpec], catalog: Mapping[str, ReplicaSpec],
                  settings: ControlSettings) -> int:
    """A request naming a model that no replica (nor catalog configuration) may ever serve: an
    InputError at start-up, with `unknown_model='reject'` marked for rejection at arrival, or with
    `unknown_model='any'` its model cleared (any replica serves it). Returns how many were cleared."""
    models = {s.model for s in specs} | {s.model for s in catalog.values()}
    if "" in models:
        return 0  # a replica serving any model
    unknown = sorted({r.model for r in requests if r.model and r.model not in models})
    if not unknown:
        return 0
    if settings.unknown_model == "error":
        raise InputError(f"requests name model {unknown[0]!r}, which no replica or catalog configuration serves "
                         f"(models: {sorted(models)}); add one, or set cluster.control={{unknown_model: reject}} "
                         f"(reject them) or cluster.control={{unknown_model: any}} (serve them on any replica)",
                         field="model", value=unknown[0])
    bad = set(unknown)
    cleared = 0
    for r in requests:
        if r.model in bad:
            if settings.unknown_model == "any":
                r.model = ""
                cleared += 1
            else:
                r.reject_reason = "no_replica_for_model"
    return cleared


def _make_requests(workload: pd.DataFrame) -> list[Request]:
    for col in ("arrival_s", "num_prompt_tokens", "num_output_tokens"):
        if col not in workload.columns:
            raise InputError(f"workload table lacks column {col!r} (has {list(workload.columns)})", field=col)
    arr = workload["arrival_s"].to_numpy(dtype=float)
    p = workload["num_prompt_tokens"].to_numpy()
    o = workload["num_output_tokens"].to_numpy()
    if len(arr) and (not np.all(np.isfinite(arr)) or arr.min() < 0 or np.any(np.diff(arr) < 0)):
        raise InputError("arrival_s must be finite, >= 0 and non-decreasing", field="arrival_s")
    if len(p) and (p.min() < 1 or o.min() < 1):
        raise InputError("token counts must be >= 1", field="num_prompt_tokens/num_output_tokens")
    n = len(arr)
    ids = workload["request_id"].to_numpy() if "request_id" in workload.columns else np.arange(n)
    models = workload["model"].astype(str).tolist() if "model" in workload.columns else [""] * n
    classes = workload["qos_class"].astype(str).tolist() if "qos_class" in workload.columns else ["default"] * n
    requests = [Request(int(i), float(a), int(pp), int(oo), m, q)
                for i, a, pp, oo, m, q in zip(ids.tolist(), arr.tolist(), p.tolist(), o.tolist(), models, classes)]
    if "relegable" in workload.columns:  # per-request flag for QoS policies that relegate
        for req, flag in zip(requests, workload["relegable"].astype(bool).tolist()):
            req.relegable = flag
    return requests


def _steps_table(reps: list[Replica]) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """All replicas' steps in one table (by replica, then step), and each replica's step end times."""
    counts = [rep.steps.num_steps for rep in reps]
    cols = concat_columns([rep.steps for rep in reps])
    df = pd.DataFrame({
        "replica": np.repeat(np.array([rep.replica_id for rep in reps], dtype=np.int64), counts),
        "step": np.concatenate([np.arange(c, dtype=np.int64) for c in counts]),
        **cols,
    })
    ends = np.split(cols["start_s"] + cols["duration_s"], np.cumsum(counts)[:-1])
    return df, ends


def _progress_bar(enabled: bool, requests: list[Request], horizon_s: float | None):
    if not enabled or not requests:
        return None
    from tqdm.auto import tqdm

    total = requests[-1].arrival_s if horizon_s is None else min(horizon_s, requests[-1].arrival_s)
    return tqdm(total=math.ceil(total), unit="sim-s", desc="simulating arrivals", leave=False,
                bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} sim-s [{elapsed}<{remaining}]")
