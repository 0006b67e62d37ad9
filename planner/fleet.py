"""The fleet planner: the cheapest fleet that meets every class's SLO at a stated confidence.

A `Candidate` is a model served under a batch policy by one or more pools of replicas (a pool:
hardware, TP degree, the QoS classes it serves and their share of the traffic). `plan_fleet`
(1) searches each pool's per-replica capacity with the caller's `capacity` function (the
capacity search of `planner.capacity` in the app), pruning a candidate as soon as one point
shows it cannot beat the cheapest fleet found so far (branch and bound, our design);
(2) picks replica counts with an integer program (scipy HiGHS `milp`: cheapest counts whose
summed capacity covers each traffic group's rate); (3) drops dominated candidates (another
costs less with no less capacity headroom); (4) verifies the cheapest few by full-cluster simulation with
the caller's `verify` function, over seeds and a cost-model ensemble (`planner.uncertainty`),
moving the replica count up until the fleet meets every target at the confidence and down
while it still does. Hydra-free: the app (`experiments.plan`) supplies the two functions.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from planner.uncertainty import summarize_samples
from sim.errors import InputError

log = logging.getLogger(__name__)

TOPOLOGIES = ("shared", "siloed", "mixed")
"""shared: one pool serves every class; siloed: one pool per class group; mixed: pools of
different hardware that all serve every class (a heterogeneous fleet)."""


@dataclass(frozen=True)
class Pool:
    """Replicas of one configuration. Invariant: tp >= 1, 0 < share <= 1, min_count >= 0."""

    name: str
    """Pool name (the siloed router maps classes to pool names)."""
    hardware: str
    """A conf/hardware option (its `price_per_gpu_hour` prices the pool)."""
    tp: int
    """Tensor-parallel GPUs per replica."""
    classes: tuple[str, ...] | None = None
    """QoS classes this pool serves (None: every class)."""
    share: float = 1.0
    """Share of the requests those classes make up (1 for a pool serving every class)."""
    min_count: int = 1
    """Fewest replicas the pool may have (0: the integer program may leave it out)."""

    def __post_init__(self) -> None:
        if self.tp < 1 or not 0 < self.share <= 1 or self.min_count < 0:
            raise InputError("need tp >= 1, 0 < share <= 1, min_count >= 0", field=f"pool {self.name}",
                             value=(self.tp, self.share, self.min_count))


@dataclass(frozen=True)
class Candidate:
    """One way to serve the workload: a model, a batch policy, a topology and its pools."""

    model: str
    policy: str
    topology: str
    pools: tuple[Pool, ...]

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES or not self.pools:
            raise InputError(f"topology must be one of {list(TOPOLOGIES)}, with at least one pool",
                             field="plan.topologies", value=self.topology)

    @property
    def label(self) -> str:
        pools = "+".join(f"{p.hardware}-tp{p.tp}" if p.classes is None else f"{p.name}:{p.hardware}-tp{p.tp}"
                         for p in self.pools)
        return f"{self.model}/{self.policy}/{self.topology}/{pools}"

    def gpus(self, counts: Sequence[int]) -> int:
        """GPUs of the fleet with `counts` replicas per pool."""
        return int(sum(c * p.tp for c, p in zip(counts, self.pools)))

    def cost_per_hour(self, counts: Sequence[int], prices: Mapping[str, float]) -> float:
        """USD per hour: replicas x TP x the hardware's price per GPU-hour, summed over pools."""
        return float(sum(c * p.tp * prices[p.hardware] for c, p in zip(counts, self.pools)))


@dataclass(frozen=True)
class PlanSettings:
    """How the plan is searched. Invariant: rate > 0, 0 < confidence < 1, targets in (0, 1]."""

    rate_qps: float
    """Target request rate (requests/s; the peak of a schedule)."""
    targets: Mapping[str, float]
    """QoS class -> attainment target (share of the class's requests meeting every objective)."""
    confidence: float = 0.9
    """A fleet qualifies when at least this share of the uncertainty samples meet every target."""
    num_verify: int = 3
    """Candidates (cheapest non-dominated first) verified by full-cluster simulation."""
    bound_slack: float = 0.5
    """Branch and bound: a candidate is pruned when its capacity cannot beat the best estimated
    fleet cost x (1 + bound_slack) (the slack covers estimates that verification corrects)."""
    max_extra_replicas: int = 6
    """Most replicas verification adds to an estimate before giving up on a candidate."""

    def __post_init__(self) -> None:
        if not (self.rate_qps > 0) or not 0 < self.confidence < 1 or self.num_verify < 1:
            raise InputError("need rate_qps > 0, 0 < confidence < 1, num_verify >= 1", field="plan",
                             value=(self.rate_qps, self.confidence, self.num_verify))
        for k, t in self.targets.items():
            if not 0 < t <= 1:
                raise InputError("an attainment target is a share in (0, 1]", field=f"plan.targets.{k}", value=t)
        if self.bound_slack < 0 or self.max_extra_replicas < 0:
            raise InputError("must be >= 0", field="plan.bound_slack", value=(self.bound_slack, self.max_extra_replicas))


Capacity = Callable[[Candidate, int, "float | None"], dict]
"""`capacity(candidate, pool_index, qps_floor)`: one replica of the pool, its classes' traffic
only; returns at least `capacity_qps` (0 when it cannot serve `qps_floor`, the least rate
worth knowing; None: no floor) and `num_simulations`. InputError: the pool cannot run at all
(e.g. the model does not fit at that TP)."""

Verify = Callable[[Candidate, tuple[int, ...]], dict]
"""`verify(candidate, counts)`: simulate the fleet at the target rate over the uncertainty
samples; returns `samples` (list of {class: attainment}), `num_simulations`, and `stats`
(latency percentiles, output tokens/s) of the plain simulation."""


# ---------------------------------------------------------------- replica counts


def replica_counts(candidate: Candidate, capacities: Sequence[float], prices: Mapping[str, float],
                   rate_qps: float) -> tuple[int, ...] | None:
    """Cheapest replicas per pool (scipy HiGHS `milp`) such that, for every group of pools
    serving the same classes, the summed per-replica capacities cover the group's rate
    (rate x share), each pool at least `min_count` and at least one replica in all; ties go
    to fewer GPUs. None when no count covers the rate (a needed pool has no capacity)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    pools = candidate.pools
    caps = np.asarray(capacities, dtype=float)
    groups: dict[tuple | None, list[int]] = {}
    for i, p in enumerate(pools):
        groups.setdefault(p.classes, []).append(i)
    rows, lbs = [], []
    upper = np.zeros(len(pools))
    for key, idx in groups.items():
        demand = rate_qps * pools[idx[0]].share
        if not any(caps[i] > 0 for i in idx):
            return None
        row = np.zeros(len(pools))
        for i in idx:
            row[i] = caps[i]
            upper[i] = max(pools[i].min_count, math.ceil(demand / caps[i]) if caps[i] > 0 else 0)
        rows.append(row)
        lbs.append(demand)
    rows.append(np.ones(len(pools)))
    lbs.append(1)
    lower = np.array([p.min_count for p in pools], dtype=float)
    if np.any(lower > upper):
        return None
    price = np.array([p.tp * prices[p.hardware] for p in pools])
    gpus = np.array([p.tp for p in pools], dtype=float)
    c = price + 1e-6 * gpus * (price.min() if price.min() > 0 else 1.0)
    res = milp(c, constraints=LinearConstraint(np.array(rows), np.array(lbs), np.inf), integrality=np.ones(len(pools)),
               bounds=Bounds(lower, upper))
    if not res.success:
        return None
    return tuple(int(round(x)) for x in res.x)


def headroom(candidate: Candidate, counts: Sequence[int], capacities: Sequence[float], rate_qps: float) -> float:
    """Smallest over traffic groups of (summed capacity / the group's rate): > 1 means spare capacity."""
    out = math.inf
    groups: dict[tuple | None, list[int]] = {}
    for i, p in enumerate(candidate.pools):
        groups.setdefault(p.classes, []).append(i)
    for idx in groups.values():
        demand = rate_qps * candidate.pools[idx[0]].share
        out = min(out, sum(counts[i] * capacities[i] for i in idx) / demand)
    return float(out)


def pareto_mask(costs: Sequence[float], benefits: Sequence[float]) -> list[bool]:
    """True where no other point costs strictly less and gives no less benefit. Points of equal
    cost are all kept (our design: estimates are rough, so a tie in cost goes to verification)."""
    pts = list(zip(costs, benefits))
    return [not any(c2 < c and b2 >= b for c2, b2 in pts) for c, b in pts]


# ---------------------------------------------------------------- the plan


@dataclass
class _Row:
    candidate: Candidate
    status: str = "pending"
    reason: str = ""
    capacities: list[float] = field(default_factory=list)
    counts: tuple[int, ...] | None = None
    cost_per_hour: float = math.nan
    headroom: float = math.nan
    verified: dict | None = None


def plan_fleet(candidates: Sequence[Candidate], *, capacity: Capacity, verify: Verify, prices: Mapping[str, float],
               settings: PlanSettings, progress: bool = True) -> dict:
    """Search `candidates` for the cheapest fleet meeting `settings.targets` at
    `settings.confidence`. Returns a JSON-ready dict: `winner` (a ranked row or None), `ranked`
    (verified rows, cheapest qualifying first), `candidates` (every candidate with its status:
    verified, infeasible, pruned_bound, pruned_dominated, not_verified, no_capacity), `counts`
    (evaluated / pruned / simulations) and `wall_s`. InputError when a hardware has no price
    or no candidate can run at all."""
    t0 = time.perf_counter()
    missing = sorted({p.hardware for c in candidates for p in c.pools} - set(prices))
    if missing:
        raise InputError(f"no price_per_gpu_hour for hardware {missing}", field="hardware.price_per_gpu_hour")
    rows = [_Row(c) for c in _dedupe(candidates)]
    cache: dict[tuple, dict] = {}
    num_sims = 0
    best_cost = math.inf

    def pool_capacity(c: Candidate, i: int, floor: float | None) -> dict:
        nonlocal num_sims
        p = c.pools[i]
        key = (c.model, c.policy, p.hardware, p.tp, p.classes)
        hit = cache.get(key)
        # a result searched without a floor, or with a floor no higher than this one, answers it
        if hit is not None and (hit["floor"] is None or (floor is not None and hit["floor"] <= floor)
                                or hit["capacity_qps"] > 0):
            return hit
        res = dict(capacity(c, i, floor))
        num_sims += int(res.get("num_simulations", 0))
        res["floor"] = floor
        cache[key] = res
        return res

    # single-pool candidates first, cheapest replica first: they tighten the bound soonest
    order = sorted(rows, key=lambda r: (len(r.candidate.pools), r.candidate.cost_per_hour([1] * len(r.candidate.pools), prices)))
    bar = _bar(len(order), "capacity", progress)
    for row in order:
        c = row.candidate
        floor = None
        if len(c.pools) == 1 and math.isfinite(best_cost):
            n_max = math.floor(best_cost * (1 + settings.bound_slack) / c.cost_per_hour([1], prices))
            floor = settings.rate_qps / n_max if n_max >= 1 else math.inf
        try:
            if floor == math.inf:
                row.status, row.reason = "pruned_bound", "one replica costs more than the bound"
                continue
            results = [pool_capacity(c, i, floor if len(c.pools) == 1 else None) for i in range(len(c.pools))]
        except InputError as exc:
            row.status, row.reason = "infeasible", str(exc)
            continue
        finally:
            bar.update(1)
        row.capacities = [float(r["capacity_qps"]) for r in results]
        if floor is not None and row.capacities[0] <= 0:
            row.status, row.reason = "pruned_bound", (f"cannot serve {floor:.3g} qps per replica, needed to cost "
                                                      f"<= {best_cost * (1 + settings.bound_slack):.4g} $/h")
            continue
        counts = replica_counts(c, row.capacities, prices, settings.rate_qps)
        if counts is None:
            row.status, row.reason = "no_capacity", "a pool serves no rate within the SLO"
            continue
        row.counts, row.status = counts, "estimated"
        row.cost_per_hour = c.cost_per_hour(counts, prices)
        row.headroom = headroom(c, counts, row.capacities, settings.rate_qps)
        best_cost = min(best_cost, row.cost_per_hour)
    bar.close()
    estimated = [r for r in rows if r.status == "estimated"]
    if not estimated:
        reasons = sorted({r.reason for r in rows})[:3]
        raise InputError(f"no candidate can serve the workload: {'; '.join(reasons)}", field="plan")
    mask = pareto_mask([r.cost_per_hour for r in estimated], [r.headroom for r in estimated])
    for r, keep in zip(estimated, mask):
        if not keep:
            r.status, r.reason = "pruned_dominated", "another candidate costs less with no less headroom"
    front = sorted((r for r in estimated if r.status == "estimated"), key=lambda r: (r.cost_per_hour, r.candidate.label))
    for r in front[settings.num_verify:]:
        r.status = "not_verified"
    to_verify = front[:settings.num_verify]
    bar = _bar(len(to_verify), "verify", progress)
    for r in to_verify:
        r.verified, sims = _verify_counts(r, verify, prices, settings)
        num_sims += sims
        r.status = "verified"
        bar.update(1)
    bar.close()
    # ties in cost: the fleet with fewer non-empty pools (a mixed fleet that kept one type is the shared one)
    ranked = sorted((_ranked_row(r, prices, settings) for r in to_verify),
                    key=lambda x: (not x["meets"], x["cost_per_hour"], sum(n > 0 for n in x["replicas"]), x["label"]))
    winner = ranked[0] if ranked and ranked[0]["meets"] else None
    statuses = [r.status for r in rows]
    return {
        "winner": winner,
        "ranked": ranked,
        "candidates": [_candidate_row(r) for r in rows],
        "counts": {"num_candidates": len(rows), **{f"num_{s}": statuses.count(s) for s in
                   ("infeasible", "pruned_bound", "pruned_dominated", "no_capacity", "not_verified", "verified")},
                   "num_capacity_searches": len(cache), "num_simulations": num_sims},
        "settings": {**asdict(settings), "targets": dict(settings.targets)},
        "prices_per_gpu_hour": dict(prices),
        "wall_s": time.perf_counter() - t0,
    }


def _dedupe(candidates: Sequence[Candidate]) -> list[Candidate]:
    seen, out = set(), []
    for c in candidates:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def _verify_counts(row: _Row, verify: Verify, prices: Mapping[str, float], settings: PlanSettings) -> tuple[dict, int]:
    """Move the replica counts up from the estimate until the fleet meets the targets at the
    confidence, then down (one replica of one pool at a time, the largest saving first) while
    it still does. Returns the evaluations (by counts) and the final counts."""
    c = row.candidate
    evaluated: dict[tuple[int, ...], dict] = {}
    sims = 0

    def judge(counts: tuple[int, ...]) -> dict:
        nonlocal sims
        if counts not in evaluated:
            out = verify(c, counts)
            sims += int(out.get("num_simulations", 0))
            evaluated[counts] = {**out, "summary": summarize_samples(out["samples"], settings.targets,
                                                                     settings.confidence)}
        return evaluated[counts]

    counts = row.counts
    for _ in range(settings.max_extra_replicas + 1):
        if judge(counts)["summary"]["meets"]:
            break
        counts = _add_one(c, counts, judge(counts)["summary"], prices, settings)
    else:
        counts = None
    final = counts
    if final is not None:
        while True:
            fewer = sorted(_minus_one(c, final), key=lambda k: c.cost_per_hour(k, prices))
            better = next((k for k in fewer if judge(k)["summary"]["meets"]), None)
            if better is None:
                break
            final = better
    return {"counts": final, "estimate": row.counts, "evaluated": evaluated,
            "one_fewer": {k: evaluated[k] for k in _minus_one(c, final)} if final is not None else {}}, sims


def _add_one(c: Candidate, counts: tuple[int, ...], summary: dict, prices: Mapping[str, float],
             settings: PlanSettings) -> tuple[int, ...]:
    """One more replica, in the cheapest pool serving the class furthest below its target."""
    att = summary["attainment"]
    gaps = {k: att[k]["mean"] - t for k, t in settings.targets.items() if k in att}
    worst = min(gaps, key=gaps.get) if gaps else None
    serving = [i for i, p in enumerate(c.pools) if p.classes is None or worst in p.classes] or list(range(len(c.pools)))
    i = min(serving, key=lambda j: c.pools[j].tp * prices[c.pools[j].hardware])
    return tuple(n + (j == i) for j, n in enumerate(counts))


def _minus_one(c: Candidate, counts: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Counts with one replica fewer in one pool (pools at their minimum, or a fleet of one, stay)."""
    if sum(counts) <= 1:
        return []
    return [tuple(n - (j == i) for j, n in enumerate(counts)) for i, p in enumerate(c.pools) if counts[i] > p.min_count]


def _ranked_row(r: _Row, prices: Mapping[str, float], settings: PlanSettings) -> dict:
    c, v = r.candidate, r.verified
    counts = v["counts"] if v["counts"] is not None else max(v["evaluated"], key=sum)
    ev = v["evaluated"][counts]
    stats = ev.get("stats", {})
    cost = c.cost_per_hour(counts, prices)
    out_tps = stats.get("output_tokens_per_s")
    return {
        "label": c.label,
        "candidate": _candidate_dict(c),
        "meets": v["counts"] is not None,
        "replicas": list(counts),
        "num_replicas": int(sum(counts)),
        "gpus": c.gpus(counts),
        "cost_per_hour": cost,
        "usd_per_million_output_tokens": cost / (out_tps * 3600) * 1e6 if out_tps else None,
        "estimate": list(v["estimate"]),
        "p_meet": ev["summary"]["p_meet"],
        "num_samples": ev["summary"]["num_samples"],
        "attainment": ev["summary"]["attainment"],
        "stats": stats,
        "one_fewer": [{"replicas": list(k), "p_meet": e["summary"]["p_meet"], "meets": e["summary"]["meets"],
                       "attainment": e["summary"]["attainment"]} for k, e in v["one_fewer"].items()],
        "evaluated": [{"replicas": list(k), "p_meet": e["summary"]["p_meet"], "meets": e["summary"]["meets"]}
                      for k, e in v["evaluated"].items()],
    }


def _candidate_dict(c: Candidate) -> dict:
    return {"model": c.model, "policy": c.policy, "topology": c.topology,
            "pools": [{**asdict(p), "classes": list(p.classes) if p.classes is not None else None} for p in c.pools]}


def _candidate_row(r: _Row) -> dict:
    return {"label": r.candidate.label, **_candidate_dict(r.candidate), "status": r.status, "reason": r.reason,
            "capacity_qps": r.capacities, "estimate": list(r.counts) if r.counts else None,
            "cost_per_hour_estimate": r.cost_per_hour, "headroom": r.headroom}


def _bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar over jobs (a no-op object when disabled)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="job", disable=not enabled, leave=False)
