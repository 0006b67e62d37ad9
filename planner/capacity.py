"""Capacity search: the highest request rate (QPS) served with at most a share of requests violating.

The caller supplies `simulate(qps, seed) -> SimResult`: the system under test at one rate,
with the same requests for a seed at every rate (only arrival times scale). `evaluate` judges
one rate over `settings.seeds` with the one SLO system (`sim.qos.violations`; the tiers' own
rules) and summarises the pooled violations by `settings.rule`: the worst tier's rate
(`max_tier`) or all requests pooled (`overall`). `search_capacity` brackets the threshold by
growing (or shrinking) the rate by `growth`, bisects until the bracket is within `rel_tol`,
and reports the capacity interpolated linearly inside the final bracket; `find_capacity`
does both and keeps every point.

Rejected requests (never servable at any rate: longer than the model's max_model_len, or
than a replica's KV cache) are reported apart (`num_rejected` per point) and, by default,
left out of the rates (`count_rejected=False`); `True` counts them as violations.

A finite run hides overload that has not built up yet: a batch request violates only once
the backlog exceeds its deadline (600 s / 1800 s for Niyama's tiers), which at load rho > 1
takes about deadline / (rho - 1) seconds. With `max_drain_s` a rate must also be
sustainable: after the last arrival the system must clear its backlog within that time
(the drain of a stable queue is a few seconds; an overloaded one grows with the run).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

import pandas as pd

from sim.errors import InputError
from sim.qos import QoS, RULES, needs_steps, rates_from_violations, violations
from sim.workload.options import plain, whole_number

if TYPE_CHECKING:
    from sim.cluster import SimResult

log = logging.getLogger(__name__)

Simulate = Callable[[float, int], "SimResult"]
"""`simulate(qps, seed)`: the system under test at `qps` requests/s with the workload of `seed`."""


@dataclass(frozen=True)
class CapacitySettings:
    """How a capacity search runs. Invariant: 0 <= max_violation < 1, 0 < qps_min < qps_start <= qps_max,
    growth > 1, rel_tol > 0, max_points >= 2, at least one seed."""

    rule: str = "max_tier"
    """Violation summary compared with the threshold: "max_tier" or "overall" (`sim.qos.RULES`)."""
    max_violation: float = 0.01
    """Highest violation rate (a share, 0..1) that still counts as served."""
    count_rejected: bool = False
    """Whether rejected requests (never servable at any rate, e.g. longer than max_model_len)
    count as violations; False (default): they are reported apart and left out of the rates."""
    qps_start: float = 1.0
    """First rate tried (requests/s)."""
    growth: float = 1.5
    """Factor between bracketing rates."""
    qps_min: float = 0.05
    """Give up below this rate (requests/s; capacity reported as 0 with status below_min)."""
    qps_max: float = 256.0
    """Give up above this rate (requests/s; capacity reported as the highest passing rate, status above_max)."""
    rel_tol: float = 0.03
    """Bisect until hi / lo - 1 <= rel_tol."""
    max_points: int = 16
    """Most rates evaluated per search."""
    max_drain_s: float | None = None
    """Also require the run to be sustainable: once arrivals stop, the system clears its
    backlog within this many seconds (None: violations only). See the module docstring."""
    seeds: tuple[int, ...] = (0,)
    """Workload seeds simulated at every rate (violations pooled over them)."""

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise InputError(f"use one of {list(RULES)}", field="capacity.rule", value=self.rule)
        if not 0 <= self.max_violation < 1:
            raise InputError("must be in [0, 1)", field="capacity.max_violation", value=self.max_violation)
        if not 0 < self.qps_min < self.qps_start <= self.qps_max:
            raise InputError("need 0 < qps_min < qps_start <= qps_max", field="capacity.qps_start", value=self.qps_start)
        if not self.growth > 1:
            raise InputError("must be > 1", field="capacity.growth", value=self.growth)
        if not self.rel_tol > 0:
            raise InputError("must be > 0", field="capacity.rel_tol", value=self.rel_tol)
        if self.max_drain_s is not None and not self.max_drain_s > 0:
            raise InputError("must be > 0 or null", field="capacity.max_drain_s", value=self.max_drain_s)
        if self.max_points < 2 or not self.seeds:
            raise InputError("need max_points >= 2 and at least one seed", field="capacity",
                             value=(self.max_points, self.seeds))
        if not isinstance(self.count_rejected, bool):
            raise InputError("must be true or false", field="capacity.count_rejected", value=self.count_rejected)

    @classmethod
    def from_config(cls, node: Mapping | None, other_keys: Iterable[str] = ()) -> CapacitySettings:
        """From a mapping of the fields above (e.g. an app's `capacity` config). `other_keys` are
        keys the caller reads itself (ignored here); any other unknown key is an InputError."""
        d = plain(node) if node is not None else {}
        known = set(cls.__dataclass_fields__)
        allowed = known | set(other_keys)
        extra = sorted(set(d) - allowed)
        if extra:
            raise InputError(f"unknown key(s) {extra}; allowed: {sorted(allowed)}", field="capacity", value=d)
        d = {k: v for k, v in d.items() if k in known}
        if "seeds" in d:
            if not isinstance(d["seeds"], list):
                raise InputError("must be a list of whole numbers >= 0", field="capacity.seeds", value=d["seeds"])
            d["seeds"] = tuple(whole_number(s, "capacity.seeds", minimum=0) for s in d["seeds"])
        return cls(**d)


# ---------------------------------------------------------------- the search


def search_capacity(violation_at: Callable[[float], float], s: CapacitySettings,
                    on_point: Callable[[float, float], None] | None = None) -> dict:
    """Bracket then bisect the rate at which `violation_at(qps)` crosses `s.max_violation`.
    Returns capacity_qps (interpolated inside the final bracket), lo_qps/hi_qps (highest rate
    found passing / lowest found failing), status (ok, below_min, above_max or max_points) and
    the evaluated points in order."""
    points: dict[float, float] = {}

    def ok(q: float) -> bool:
        q = round(q, 6)
        if q not in points:
            points[q] = float(violation_at(q))
            if on_point is not None:
                on_point(q, points[q])
        return points[q] <= s.max_violation

    lo = hi = None
    status = "ok"
    q = s.qps_start
    if ok(q):
        lo = q
        while hi is None and len(points) < s.max_points:
            q = lo * s.growth
            if q > s.qps_max:
                status = "above_max"
                break
            if ok(q):
                lo = q
            else:
                hi = q
    else:
        hi = q
        while lo is None and len(points) < s.max_points:
            q = hi / s.growth
            if q < s.qps_min:
                status = "below_min"
                break
            if ok(q):
                lo = q
            else:
                hi = q
    if lo is not None and hi is not None:
        while hi / lo - 1 > s.rel_tol and len(points) < s.max_points:
            mid = round((lo + hi) / 2, 6)
            if ok(mid):
                lo = mid
            else:
                hi = mid
    if lo is None and hi is None or status == "ok" and (lo is None or hi is None):
        status = "max_points"
    if lo is not None and hi is not None:
        v_lo, v_hi = points[round(lo, 6)], points[round(hi, 6)]
        frac = (s.max_violation - v_lo) / (v_hi - v_lo) if v_hi > v_lo else 0.0
        capacity = lo + min(max(frac, 0.0), 1.0) * (hi - lo)
    elif lo is not None:
        capacity = lo
    else:
        capacity = 0.0
    return {"capacity_qps": float(capacity), "lo_qps": lo, "hi_qps": hi, "status": status,
            "points": [{"qps": q, "violation": v} for q, v in points.items()]}


def score(violation: float, drain_s: float, settings: CapacitySettings) -> float:
    """What the search compares with `max_violation`: the violation rate, or, with
    `max_drain_s`, the larger of it and `max_violation * drain_s / max_drain_s` (so a rate
    passes iff both hold, and the crossing interpolates on whichever binds)."""
    if settings.max_drain_s is None:
        return violation
    return max(violation, settings.max_violation * drain_s / settings.max_drain_s)


# ---------------------------------------------------------------- one system at one rate


def evaluate(simulate: Simulate, qps: float, settings: CapacitySettings, qos: QoS) -> tuple[dict, pd.DataFrame]:
    """Simulate at `qps` for every seed and judge the requests: violation rates pooled over the
    seeds (`rule` value, overall, worst tier, per tier, by reason), counts, the drain time (s
    from the last arrival to the end of the run, the largest over the seeds) and the `score`
    the search compares; plus the request tables (column `seed` added, `token_steps` dropped)."""
    with_steps = needs_steps(qos)
    frames, tables, drains, num_steps = [], [], [], 0
    t0 = time.perf_counter()
    for seed in settings.seeds:
        res = simulate(qps, seed)
        req = res.requests
        frames.append(violations(req, qos, res.steps if with_steps else None))
        last_arrival = float(req["arrival_s"].max()) if len(req) else 0.0
        drains.append(float(res.end_s) - last_arrival)
        num_steps += int(res.info["num_steps"])
        tables.append(req.drop(columns=["token_steps"]).assign(seed=seed))
    rates = rates_from_violations(pd.concat(frames, ignore_index=True), qos, count_rejected=settings.count_rejected)
    drain_s = float(max(drains))
    reasons: dict[str, int] = {}
    for tier in rates["tiers"].values():
        for reason, n in tier["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    point = {
        "qps": float(qps),
        "violation": float(rates[settings.rule]),
        "score": score(float(rates[settings.rule]), drain_s, settings),
        "overall": rates["overall"],
        "max_tier": rates["max_tier"],
        "tiers": {k: v["violation_rate"] for k, v in rates["tiers"].items()},
        "num_requests": rates["num_requests"],
        "num_violations": rates["num_violations"],
        "violation_reasons": reasons,
        "num_rejected": rates["num_rejected"],
        "num_not_arrived": rates["num_not_arrived"],
        "num_relegated": rates["num_relegated"],
        "drain_s": drain_s,
        "num_steps": num_steps,
        "wall_s": time.perf_counter() - t0,
    }
    return point, pd.concat(tables, ignore_index=True)


def find_capacity(simulate: Simulate, settings: CapacitySettings, qos: QoS, label: str = "",
                  ) -> tuple[dict, pd.DataFrame | None]:
    """Search the capacity of the system `simulate` runs: `search_capacity` over `evaluate`'s
    score. Returns the search result (its `points` are `evaluate`'s, in evaluation order;
    `label` added and used in the log) and the request tables at the highest passing rate
    (None if no rate passed)."""
    details: dict[float, dict] = {}
    best_table: dict[str, Any] = {"qps": -1.0, "table": None}

    def violation_at(q: float) -> float:
        point, table = evaluate(simulate, q, settings, qos)
        details[round(q, 6)] = point
        passed = point["score"] <= settings.max_violation
        if passed and q > best_table["qps"]:
            best_table.update(qps=q, table=table)
        log.info("[%s] qps=%.3f  %s violation=%.4f  overall=%.4f  drain=%.0f s  relegated=%d  rejected=%d%s  -> %s  "
                 "(%d requests, %.1f s)", label, q, settings.rule, point["violation"], point["overall"],
                 point["drain_s"], point["num_relegated"], point["num_rejected"],
                 "" if settings.count_rejected else " (not counted)",
                 "pass" if passed else "fail", point["num_requests"], point["wall_s"])
        return point["score"]

    result = search_capacity(violation_at, settings)
    result["points"] = [details[round(p["qps"], 6)] for p in result["points"]]
    result["label"] = label
    log.info("[%s] capacity %.3f qps (%s; bracket %s..%s; %d points)", label, result["capacity_qps"],
             result["status"], result["lo_qps"], result["hi_qps"], len(result["points"]))
    return result, best_table["table"]


def explain_status(res: Mapping, settings: Mapping) -> str:
    """Why a search ended without a bracket: the violation at the lowest (below_min) or highest
    (above_max) rate tried, by reason, and the rejected requests there ('' when it bracketed).
    `res` is `find_capacity`'s result, `settings` the settings as a mapping (`count_rejected`)."""
    if res["status"] not in ("below_min", "above_max") or not res["points"]:
        return ""
    edge = (min if res["status"] == "below_min" else max)(res["points"], key=lambda p: p["qps"])
    rejected = edge.get("num_rejected", 0)
    text = (f"at {edge['qps']:.3g} qps {100 * edge['violation']:.2f}% violating, by reason: "
            f"{', '.join(f'{k} {v}' for k, v in edge.get('violation_reasons', {}).items()) or 'none'}")
    return text + (f"; {rejected} rejected (not counted)" if rejected and not settings.get("count_rejected") else "")


# ---------------------------------------------------------------- splitting replicas between pools


def splits(num_replicas: int, num_pools: int, min_per_pool: int = 1) -> list[tuple[int, ...]]:
    """Every way to give `num_replicas` replicas to `num_pools` pools in order, at least
    `min_per_pool` each (compositions of N), in lexicographic order. InputError if impossible."""
    if num_pools < 1 or min_per_pool < 0 or num_replicas < num_pools * min_per_pool:
        raise InputError(f"cannot split {num_replicas} replicas into {num_pools} pools of >= {min_per_pool}",
                         field="num_replicas", value=num_replicas)
    out = []
    for cuts in itertools.combinations(range(1, num_replicas - num_pools * min_per_pool + num_pools), num_pools - 1):
        bounds = (0, *cuts, num_replicas - num_pools * min_per_pool + num_pools)
        out.append(tuple(b - a - 1 + min_per_pool for a, b in zip(bounds, bounds[1:])))
    return out


@dataclass(frozen=True)
class SplitResult:
    """The best split found and every split's capacity (requests/s), in search order."""

    best: tuple[int, ...]
    best_capacity_qps: float
    capacities: dict[tuple[int, ...], float]


def best_split(num_replicas: int, num_pools: int, capacity_qps: Callable[[tuple[int, ...]], float],
               min_per_pool: int = 1) -> SplitResult:
    """Rate every split of `num_replicas` between `num_pools` pools with `capacity_qps`
    (e.g. a capacity search of the siloed cluster) and return the best (ties: the first)."""
    capacities = {s: float(capacity_qps(s)) for s in splits(num_replicas, num_pools, min_per_pool)}
    best = max(capacities, key=lambda s: capacities[s])
    return SplitResult(best, capacities[best], capacities)
