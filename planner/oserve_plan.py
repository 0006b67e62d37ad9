"""OServe's two-level planning: a max-flow assigns request-type load to replicas (lower level),
and a bounded local search refines the deployment (upper level).

Lower level (networkx max-flow; the network is the paper's, the units are **our design**):
source -> type t (capacity: its rate) -> replica r (capacity: the table's rate of r's
configuration for t) -> sink. A replica serving a *mix* of types serves less than each edge
allows (its time share sum_t f(t, r) / rate(c_r, t) must stay <= 1), which a plain max-flow in
req/s cannot state; measured in work units (GPU-seconds per request) the mix becomes one
replica capacity (`max_flow`). The result is always feasible; `lp_max_flow` solves the exact
linear program (scipy HiGHS) to measure what the max-flow gives away.

Upper level (our design where the paper is vague): from a start deployment, try every merge of
two equal replicas into one of twice the TP degree and every split of one replica into two of
half; keep the move that most raises the served flow (ties: the largest uniform load factor
the deployment serves entirely); stop when none does or after `max_iters` moves.
`exhaustive` scores every deployment of the pool (for the gap on small pools).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import networkx as nx
import numpy as np

from planner.deployment import ReplicaConfig, deployments
from sim.errors import InputError

EPS = 1e-9


@dataclass
class FlowPlan:
    """A max-flow's result. `flow[t, r]`: req/s of type t sent to replica r (shape types x
    replicas); `demand`: req/s per type; `work`: GPU-seconds per request of each type
    (`work_units`). `served` is the flow's value in *demand-equivalent* req/s: the work served
    over the demand's mean work per request (the max-flow maximises work, so this value, unlike
    the raw req/s `served_requests`, is the same for every optimal flow and every replica order)."""

    deployment: tuple[int, ...]
    flow: np.ndarray
    demand: np.ndarray
    work: np.ndarray
    served: float = field(init=False)
    served_requests: float = field(init=False)

    def __post_init__(self) -> None:
        self.served_requests = float(self.flow.sum())
        w = np.where(np.isfinite(self.work), self.work, 0.0)
        done = float((self.flow.sum(axis=1) * w).sum())
        total = float(self.demand.sum())
        mean_w = float((self.demand * w).sum()) / total if total > 0 else 0.0
        self.served = done / mean_w if mean_w > 0 else 0.0

    @property
    def unserved(self) -> np.ndarray:
        """Req/s per type the deployment cannot serve within the SLO."""
        return np.maximum(self.demand - self.flow.sum(axis=1), 0.0)


def _shares(flow: np.ndarray, cap: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        per = np.where(flow > EPS, flow / np.where(cap > 0, cap, np.inf), 0.0)
    return per.sum(axis=0)


def _capacity(deployment: Sequence[int], rates: Mapping[int, np.ndarray], num_types: int) -> np.ndarray:
    """cap[t, r] = the table's rate of replica r's degree for type t (types x replicas)."""
    try:
        return np.stack([np.asarray(rates[tp], dtype=float) for tp in deployment], axis=1).reshape(num_types,
                                                                                                  len(deployment))
    except KeyError as e:
        raise InputError(f"no rate table for tp{e.args[0]}", field="deployment", value=list(deployment)) from None


def work_units(rates: Mapping[int, np.ndarray], num_types: int) -> np.ndarray:
    """GPU-seconds per request of each type at the best per-GPU rate of any degree
    (1 / max_k rate(k, t) / k); inf for a type no configuration serves."""
    per_gpu = np.max(np.stack([np.asarray(v, dtype=float) / k for k, v in rates.items()]), axis=0).reshape(num_types)
    with np.errstate(divide="ignore"):
        return np.where(per_gpu > EPS, 1.0 / np.maximum(per_gpu, EPS), np.inf)


EFFICIENCY_CUTS = (0.0, 0.5, 0.7, 0.85, 0.95)
"""Relative-efficiency thresholds `max_flow` tries (our design; see its docstring)."""


def _keep(cap: np.ndarray, w: np.ndarray, cut: float) -> tuple[np.ndarray, np.ndarray]:
    """Efficiency e(t, r) and the (type, replica) edges within `cut` of the replica's best."""
    eff = np.where((cap > EPS) & np.isfinite(w)[:, None], cap * np.where(np.isfinite(w), w, 0.0)[:, None], 0.0)
    keep = (eff >= cut * eff.max(axis=0, keepdims=True)) & (eff > EPS)
    return eff, keep


def _max_flow_once(eff: np.ndarray, keep: np.ndarray, w: np.ndarray, demand: np.ndarray) -> np.ndarray:
    # integer nodes only (source 0, sink 1, type t at 2 + t, replica r at 2 + n_t + r): a str node's
    # hash changes from process to process, and with it networkx's choice among optimal flows
    n_t, n_r = eff.shape
    src, sink = 0, 1
    g = nx.DiGraph()
    for t in range(n_t):
        if demand[t] > EPS and np.isfinite(w[t]) and keep[t].any():
            g.add_edge(src, 2 + t, capacity=float(demand[t] * w[t]))
            for r in np.flatnonzero(keep[t]):
                g.add_edge(2 + t, 2 + n_t + int(r), capacity=float(eff[t, r]))
    for r in range(n_r):
        if keep[:, r].any():
            g.add_edge(2 + n_t + r, sink, capacity=float(eff[keep[:, r], r].min()))
    flow = np.zeros((n_t, n_r))
    if src in g and sink in g:
        _, fd = nx.maximum_flow(g, src, sink)
        for t in range(n_t):
            for node, f in fd.get(2 + t, {}).items():
                flow[t, node - 2 - n_t] = f / w[t]
    return flow


def max_flow(deployment: Sequence[int], rates: Mapping[int, np.ndarray], demand) -> FlowPlan:
    """The lower level: networkx max-flow of `demand` (req/s per type) over `deployment` (TP
    degree per replica) with `rates` (degree -> req/s per type). Flow is measured in work units
    (GPU-seconds, `work_units`; our design) so that a replica's mix of types is one capacity:
    source -> t (demand_t * w_t) -> r (e(t, r) = cap(t, r) * w_t) -> sink (the least e(t, r) over
    the types r may take). So every mix a replica is given is feasible (time share
    sum_t f(t, r) / cap(t, r) <= 1, checked). A replica may take only types on which it is
    within a share `cut` of its best efficiency (a type it serves badly would otherwise set its
    capacity); the flow is solved for each cut of `EFFICIENCY_CUTS` and the best kept. Exact
    when a degree's rates are proportional across types, conservative otherwise: `lp_max_flow`
    gives the exact optimum (tests and the report measure the gap)."""
    demand = np.asarray(demand, dtype=float)
    n_t = len(demand)
    cap = _capacity(deployment, rates, n_t)
    w = work_units(rates, n_t)
    wf = np.where(np.isfinite(w), w, 0.0)
    best, best_work = None, -1.0
    tried = set()
    for cut in EFFICIENCY_CUTS:
        eff, keep = _keep(cap, w, cut)
        if keep.tobytes() in tried:  # the same network as a smaller cut's
            continue
        tried.add(keep.tobytes())
        flow = _max_flow_once(eff, keep, w, demand)
        work = float((flow.sum(axis=1) * wf).sum())
        if work > best_work * (1 + 1e-9) + 1e-12:
            best, best_work = flow, work
    share = _shares(best, cap)
    assert np.all(share <= 1 + 1e-6), share  # the replica capacity guarantees it
    return FlowPlan(tuple(deployment), best, demand, w)


def lp_max_flow(deployment: Sequence[int], rates: Mapping[int, np.ndarray], demand) -> float:
    """The exact optimum of the mixing problem `max_flow` approximates, by linear program (scipy
    HiGHS), in the same demand-equivalent req/s as `FlowPlan.served`: max sum f(t, r) * w_t s.t.
    sum_r f(t, r) <= demand_t, sum_t f(t, r) / cap(t, r) <= 1, f >= 0 (w: `work_units`)."""
    from scipy.optimize import linprog

    demand = np.asarray(demand, dtype=float)
    n_t, n_r = len(demand), len(deployment)
    cap = _capacity(deployment, rates, n_t)
    w = work_units(rates, n_t)
    wf = np.where(np.isfinite(w), w, 0.0)
    idx = np.argwhere((cap > EPS) & (wf > 0)[:, None])
    total = demand.sum()
    mean_w = float((demand * wf).sum()) / total if total > 0 else 0.0
    if len(idx) == 0 or mean_w <= 0:
        return 0.0
    a = np.zeros((n_t + n_r, len(idx)))
    for k, (t, r) in enumerate(idx):
        a[t, k] = 1.0
        a[n_t + r, k] = 1.0 / cap[t, r]
    b = np.concatenate([demand, np.ones(n_r)])
    res = linprog(-wf[idx[:, 0]], A_ub=a, b_ub=b, bounds=(0, None), method="highs")
    if res.status != 0:
        raise RuntimeError(f"HiGHS failed on the flow LP: {res.message}")
    return float(-res.fun) / mean_w


def load_factor(deployment: Sequence[int], rates: Mapping[int, np.ndarray], demand, iters: int = 9) -> float:
    """The largest a (bisection, `iters` halvings) such that `max_flow` serves all of
    a * demand: the deployment's headroom for this mix (0 when a type with demand has no
    capacity anywhere). The bracket's top is the work-unit bound (the pool's work capacity over
    the demand's work), so the result is within 2**-iters of it."""
    demand = np.asarray(demand, dtype=float)
    total = demand.sum()
    if total <= 0:
        return 0.0
    n_t = len(demand)
    cap, w = _capacity(deployment, rates, n_t), work_units(rates, n_t)
    if np.any((demand > EPS) & ~np.isfinite(w)):
        return 0.0
    work = float((demand * np.where(np.isfinite(w), w, 0.0)).sum())
    eff = np.where(cap > EPS, cap * np.where(np.isfinite(w), w, 0.0)[:, None], 0.0)
    up = float(eff.max(axis=0).sum()) / work if work > 0 else 0.0

    def ok(a: float) -> bool:
        return max_flow(deployment, rates, a * demand).served >= a * total * (1 - 1e-6)


    lo = 0.0
    for _ in range(iters):
        mid = (lo + up) / 2
        lo, up = (mid, up) if ok(mid) else (lo, mid)
    return lo


def score(deployment: Sequence[int], rates: Mapping[int, np.ndarray], demand) -> tuple[float, float]:
    """(served req/s at `demand`, load factor): the upper level's lexicographic objective."""
    return max_flow(deployment, rates, demand).served, load_factor(deployment, rates, demand)


def _key(s: tuple[float, float]) -> tuple[float, float]:
    return round(s[0], 6), round(s[1], 3)


def neighbours(deployment: Sequence[int], configs: Sequence[ReplicaConfig]) -> list[tuple[int, ...]]:
    """Deployments one merge (two replicas of degree k -> one of 2k) or one split (one of 2k ->
    two of k) away, over the feasible degrees; sorted, largest degree first."""
    allowed = {c.tp for c in configs}
    dep = sorted(deployment, reverse=True)
    out = set()
    for k in set(dep):
        if dep.count(k) >= 2 and 2 * k in allowed:
            d = list(dep)
            d.remove(k)
            d.remove(k)
            out.add(tuple(sorted(d + [2 * k], reverse=True)))
        if k % 2 == 0 and k // 2 in allowed:
            d = list(dep)
            d.remove(k)
            out.add(tuple(sorted(d + [k // 2, k // 2], reverse=True)))
    return sorted(out, reverse=True)


@dataclass
class SearchResult:
    deployment: tuple[int, ...]
    served: float
    load_factor: float
    num_evaluated: int
    trace: list[dict]


def refine(start: Sequence[int], configs: Sequence[ReplicaConfig], rates: Mapping[int, np.ndarray], demand,
           max_iters: int = 16) -> SearchResult:
    """The upper level: bounded local search by merges and splits (module docstring)."""
    if max_iters < 0:
        raise InputError("must be >= 0", field="max_iters", value=max_iters)
    cur = tuple(sorted(start, reverse=True))
    cur_s = score(cur, rates, demand)
    seen = {cur: cur_s}
    trace = [{"deployment": list(cur), "served": cur_s[0], "load_factor": cur_s[1]}]
    for _ in range(max_iters):
        best, best_s = None, cur_s
        for nb in neighbours(cur, configs):
            if nb not in seen:
                seen[nb] = score(nb, rates, demand)
            if _key(seen[nb]) > _key(best_s):
                best, best_s = nb, seen[nb]
        if best is None:
            break
        cur, cur_s = best, best_s
        trace.append({"deployment": list(cur), "served": cur_s[0], "load_factor": cur_s[1]})
    return SearchResult(cur, cur_s[0], cur_s[1], len(seen), trace)


def exhaustive(num_gpus: int, configs: Sequence[ReplicaConfig], rates: Mapping[int, np.ndarray], demand,
               only_homogeneous: bool = False) -> SearchResult:
    """Score every deployment of the pool (or every homogeneous one) and keep the best."""
    cands = deployments(num_gpus, configs)
    if only_homogeneous:
        cands = [d for d in cands if len(set(d)) == 1]
        if not cands:
            raise InputError(f"no homogeneous split of {num_gpus} GPUs", field="num_gpus", value=num_gpus)
    scored = [(d, score(d, rates, demand)) for d in cands]
    best, s = max(scored, key=lambda x: (_key(x[1]), -len(x[0])))
    return SearchResult(best, s[0], s[1], len(scored), [])


def router_weights(plan: FlowPlan, rates: Mapping[int, np.ndarray], num_output_bins: int) -> list[dict[int, float]]:
    """Weights of a flow-proportional router per *prompt* bin (our design: a router knows a
    request's prompt length, not its output length, so a prompt bin's weight on a replica is the
    sum of its output bins' flows). Flows of replicas of the same degree are pooled and spread
    evenly over them (identical replicas, balanced load). Demand the flow cannot serve is spread
    in proportion to the replicas' rates for the type (or their TP degree if no rate is > 0),
    so every request has somewhere to go. Returns, per prompt bin, {replica index: weight}."""
    dep = plan.deployment
    n_t = len(plan.demand)
    cap = _capacity(dep, rates, n_t)
    w = plan.flow.copy()
    for tp in set(dep):
        cols = [r for r, d in enumerate(dep) if d == tp]
        w[:, cols] = w[:, cols].sum(axis=1, keepdims=True) / len(cols)
    for t in range(n_t):
        left = plan.demand[t] - w[t].sum()
        if left > EPS:
            base = cap[t] if cap[t].sum() > EPS else np.asarray(dep, dtype=float)
            w[t] += left * base / base.sum()
    n_p = n_t // num_output_bins
    per_prompt = w.reshape(n_p, num_output_bins, len(dep)).sum(axis=1)
    return [{r: float(per_prompt[i, r]) for r in range(len(dep)) if per_prompt[i, r] > EPS} for i in range(n_p)]
