"""Capacity search: the highest request rate a configuration serves with at most 1% of requests violating.

    python -m experiments.capacity                                   # the run app's config, its policy
    python -m experiments.capacity policy=niyama slo=niyama_tiers capacity.rule=overall
    python -m experiments.capacity +experiment=repro_capacity_code   # FCFS/EDF/SRPF/Niyama + ablations
    python -m experiments.capacity workload=trace workload.path=my.csv cluster=single   # a trace, rescaled

The violation rate at a rate (QPS) is measured by simulating the configured workload at that
rate, with the same seeds at every rate (the same requests; only the arrival times scale),
under the QoS tiers' own rules (`sim.qos`), summarised by `capacity.rule`: the worst tier's
rate (`max_tier`) or all requests pooled (`overall`). The search brackets the threshold by
growing (or shrinking) the rate by `growth`, bisects until the bracket is within `rel_tol`,
and reports the capacity interpolated linearly inside the final bracket.

Rejected requests (never servable at any rate: longer than the model's max_model_len, or
than a replica's KV cache) are reported apart (`num_rejected` per point) and, by default,
left out of the rates (`capacity.count_rejected: false`); `true` counts them as violations
(the reproduction experiments do, as measured). The rate is set through
`capacity.rate_key`: `auto` sets `target_qps` of a trace workload (`workload=trace`: the
trace's own arrival pattern stretched to each rate, its requests unchanged) and
`arrival.rate_qps` of a synthetic one or of `sim.workload.trace_workload` (the trace's lengths on
Poisson arrivals, as the Niyama artifact does).

A finite run hides overload that has not built up yet: a batch request violates only once
the backlog exceeds its deadline (600 s / 1800 s for Niyama's tiers), which at load rho > 1
takes about deadline / (rho - 1) seconds. With `capacity.max_drain_s` a rate must also be
sustainable: after the last arrival the cluster must clear its backlog within that time
(the drain of a stable queue is a few seconds; an overloaded one grows with the run).
Each variant (a
policy, a cluster, ...) is searched on its own. Writes `capacity.json` (every point and its
rates), `capacity_points.csv`, `capacity.png` (violation rate vs QPS per variant) and, per
variant, the request table at its highest passing rate (`requests_<label>.parquet`).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from experiments.app import check_config, hydra_app, write_json
from experiments.wiring import simulate_config
from policies.siloed import splits as replica_splits
from sim.errors import InputError
from sim.qos import QoS, RULES, rates_from_violations, violations
from sim.workload.options import plain, whole_number

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class CapacitySettings:
    """How a capacity search runs. Invariant: 0 <= max_violation < 1, qps_min < qps_start <= qps_max, growth > 1."""

    rule: str = "max_tier"
    """Violation summary compared with the threshold: "max_tier" or "overall"."""
    max_violation: float = 0.01
    """Highest violation rate that still counts as served."""
    count_rejected: bool = False
    """Whether rejected requests (never servable at any rate, e.g. longer than max_model_len)
    count as violations; False (default): they are reported apart and left out of the rates."""
    qps_start: float = 1.0
    """First rate tried."""
    growth: float = 1.5
    """Factor between bracketing rates."""
    qps_min: float = 0.05
    """Give up below this rate (capacity reported as 0 with status below_min)."""
    qps_max: float = 256.0
    """Give up above this rate (capacity reported as qps_max with status above_max)."""
    rel_tol: float = 0.03
    """Bisect until hi / lo - 1 <= rel_tol."""
    max_points: int = 16
    """Most rates evaluated per variant."""
    max_drain_s: float | None = None
    """Also require the run to be sustainable: once arrivals stop, the cluster clears its
    backlog within this many seconds (None: violations only). See module docstring."""
    seeds: tuple[int, ...] = (0,)
    """Workload seeds simulated at every rate (violations pooled over them)."""
    rate_key: str = "auto"
    """Field of the workload config set to each rate; "auto": `target_qps` for a trace
    (`sim.workload.from_trace`: its own arrival pattern rescaled to the rate), else
    `arrival.rate_qps` (synthetic arrivals, `sim.workload.trace_workload`)."""
    jobs: int = 1
    """Variants searched in parallel processes (the machine's other users share its cores)."""

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
        if self.max_points < 2 or self.jobs < 1 or not self.seeds:
            raise InputError("need max_points >= 2, jobs >= 1 and at least one seed", field="capacity",
                             value=(self.max_points, self.jobs, self.seeds))
        if not isinstance(self.count_rejected, bool):
            raise InputError("must be true or false", field="capacity.count_rejected", value=self.count_rejected)

    @classmethod
    def from_config(cls, node: Any) -> CapacitySettings:
        d = plain(node) if node is not None else {}
        known = set(cls.__dataclass_fields__)
        extra = sorted(set(d) - known - {"splits", "save_requests"})
        if extra:
            raise InputError(f"unknown key(s) {extra}; allowed: {sorted(known | {'splits', 'save_requests'})}",
                             field="capacity", value=d)
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
    found passing / lowest found failing), status and the evaluated points in order."""
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


# ---------------------------------------------------------------- one configuration at one rate


def workload_rate_key(workload: DictConfig, rate_key: str) -> str:
    """The workload config key the search sets to each rate (see `CapacitySettings.rate_key`);
    InputError if the workload has no such key (e.g. a schedule of rates, or a mistyped key)."""
    target = str(workload.get("_target_", ""))
    if rate_key == "auto":
        rate_key = "target_qps" if target.endswith("from_trace") else "arrival.rate_qps"
    if OmegaConf.select(workload, rate_key, default="<absent>") == "<absent>":
        raise InputError(f"the workload ({target or 'no _target_'}) has no key {rate_key!r} to set each rate to; "
                         "set capacity.rate_key to the key holding its rate (a synthetic or trace_workload: "
                         "arrival.rate_qps, a trace: target_qps)", field="capacity.rate_key", value=rate_key)
    return rate_key


def _workload_cfg(cfg: DictConfig, qps: float, seed: int, qos: QoS, rate_key: str) -> DictConfig:
    wl = cfg.workload.copy()
    OmegaConf.set_struct(wl, False)
    OmegaConf.update(wl, workload_rate_key(cfg.workload, rate_key), float(qps), merge=True)
    if "seed" in wl:
        wl.seed = int(seed)
    if "qos_shares" in wl and wl.qos_shares is None and qos.shares():
        wl.qos_shares = qos.shares()  # the tiers' own traffic shares when the workload gives none
    return wl


def evaluate(cfg: DictConfig, qps: float, settings: CapacitySettings, qos: QoS) -> tuple[dict, pd.DataFrame]:
    """Simulate `cfg` at `qps` for every seed; violation rates pooled over the seeds, plus the
    request tables (column `seed` added)."""
    needs_steps = any("tbt" in t.violation for t in qos.tiers.values())
    frames, tables, drains, num_steps = [], [], [], 0
    t0 = time.perf_counter()
    for seed in settings.seeds:
        workload = instantiate(_workload_cfg(cfg, qps, seed, qos, settings.rate_key))
        workload.check_qos_classes(set(qos.tiers))
        res = simulate_config(cfg, workload.requests, progress=False)
        req = res.requests
        frames.append(violations(req, qos, res.steps if needs_steps else None))
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


def score(violation: float, drain_s: float, settings: CapacitySettings) -> float:
    """What the search compares with `max_violation`: the violation rate, or, with
    `max_drain_s`, the larger of it and `max_violation * drain_s / max_drain_s` (so a rate
    passes iff both hold, and the crossing interpolates on whichever binds)."""
    if settings.max_drain_s is None:
        return violation
    return max(violation, settings.max_violation * drain_s / settings.max_drain_s)


# ---------------------------------------------------------------- variants


def variant_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """One config per variant: `variants.<label>` replaces whole groups (`policy: {...}`) and
    merges anything else (`capacity: {qps_start: 2}`); `capacity.splits` expands a siloed variant
    into one per split of N replicas between its pools. No variants: the config itself."""
    variants = cfg.get("variants") or {}
    base = cfg.copy()
    OmegaConf.set_struct(base, False)
    if "variants" in base:
        del base["variants"]
    out: dict[str, DictConfig] = {}
    for label, delta in variants.items():
        out[str(label)] = _apply(base, delta, str(label))
    splits_cfg = (cfg.get("capacity") or {}).get("splits")
    if splits_cfg:
        name = splits_cfg.get("variant")
        if name not in out:
            raise InputError(f"capacity.splits.variant must name one of the variants {list(out)}",
                             field="capacity.splits.variant", value=name)
        template = out.pop(name)
        pools = template.cluster.get("pools") or []
        if len(pools) < 2:
            raise InputError("the split variant's cluster needs two or more pools", field=f"variants.{name}.cluster.pools")
        for split in replica_splits(int(splits_cfg.num_replicas), len(pools), int(splits_cfg.get("min_per_pool", 1))):
            v = template.copy()
            for i, count in enumerate(split):
                v.cluster.pools[i].count = count
            out[f"{name}_{'_'.join(map(str, split))}"] = v
    if not out:
        out[_policy_label(base)] = base
    return out


GROUPS = ("policy", "cluster", "router", "workload", "slo", "costmodel")
"""Config groups a variant replaces as a whole (other keys are merged into the config)."""


def _apply(base: DictConfig, delta: Any, label: str) -> DictConfig:
    v = base.copy()
    for key, value in (delta or {}).items():
        key = str(key)
        if key in GROUPS:
            v[key] = value
        elif key.split(".")[0] in v:
            OmegaConf.update(v, key, value, merge=True)
        else:
            raise InputError(f"not a config key; variants replace groups {list(GROUPS)} or set existing keys",
                             field=f"variants.{label}", value=key)
    return v


def _policy_label(cfg: DictConfig) -> str:
    return str(cfg.policy.get("_target_", "policy")).rsplit(".", 1)[-1].lower()


def search_variant(label: str, container: dict) -> tuple[dict, pd.DataFrame | None]:
    """Search one variant's capacity (a plain function: also the parallel worker)."""
    cfg = OmegaConf.create(container)
    settings = CapacitySettings.from_config(cfg.capacity)
    qos = QoS.from_config(cfg.slo)
    details: dict[float, dict] = {}
    best_table: dict[str, Any] = {"qps": -1.0, "table": None}

    def violation_at(q: float) -> float:
        point, table = evaluate(cfg, q, settings, qos)
        details[round(q, 6)] = point
        if point["score"] <= settings.max_violation and q > best_table["qps"]:
            best_table.update(qps=q, table=table)
        log.info("[%s] qps=%.3f  %s violation=%.4f  overall=%.4f  drain=%.0f s  relegated=%d  rejected=%d%s  -> %s  "
                 "(%d requests, %.1f s)", label, q, settings.rule, point["violation"], point["overall"],
                 point["drain_s"], point["num_relegated"], point["num_rejected"],
                 "" if settings.count_rejected else " (not counted)",
                 "pass" if point["score"] <= settings.max_violation else "fail", point["num_requests"], point["wall_s"])
        return point["score"]

    result = search_capacity(violation_at, settings)
    result["points"] = [details[round(p["qps"], 6)] for p in result["points"]]
    result["label"] = label
    log.info("[%s] capacity %.3f qps (%s; bracket %s..%s; %d points)", label, result["capacity_qps"],
             result["status"], result["lo_qps"], result["hi_qps"], len(result["points"]))
    return result, best_table["table"]


def run_capacity(cfg: DictConfig, out_dir: str | Path | None = None) -> dict:
    """Search every variant's capacity; write capacity.json, capacity_points.csv, capacity.png
    and the request tables at capacity into `out_dir`. Returns the capacity.json content."""
    settings = CapacitySettings.from_config(cfg.capacity)
    variants = variant_configs(cfg)
    for v in variants.values():  # bad input stops here, before any search
        check_config(v)
        workload_rate_key(v.workload, CapacitySettings.from_config(v.capacity).rate_key)
    # unresolved: each pool resolves its cost model for its own model, hardware and tp (experiments.wiring)
    containers = {label: OmegaConf.to_container(v, resolve=False) for label, v in variants.items()}
    log.info("capacity search: %d variant(s) %s, rule=%s, threshold=%.3g, seeds=%s",
             len(containers), list(containers), settings.rule, settings.max_violation, list(settings.seeds))
    t0 = time.perf_counter()
    if settings.jobs > 1 and len(containers) > 1:
        with ProcessPoolExecutor(max_workers=min(settings.jobs, len(containers))) as pool:
            futures = {label: pool.submit(search_variant, label, c) for label, c in containers.items()}
            found = {label: f.result() for label, f in futures.items()}
    else:
        found = {label: search_variant(label, c) for label, c in containers.items()}
    any_cfg = next(iter(variants.values()))
    out = {
        "rule": settings.rule,
        "max_violation": settings.max_violation,
        "settings": asdict(settings),
        "workload": OmegaConf.to_container(any_cfg.workload, resolve=True),
        "slo": OmegaConf.to_container(any_cfg.slo, resolve=True),
        "wall_s": time.perf_counter() - t0,
        "variants": {label: res for label, (res, _) in found.items()},
        "capacity_qps": {label: res["capacity_qps"] for label, (res, _) in found.items()},
    }
    splits_cfg = cfg.capacity.get("splits")
    if splits_cfg:
        name = splits_cfg.variant
        mine = {k: v for k, v in out["capacity_qps"].items() if k.startswith(f"{name}_")}
        best = max(mine, key=mine.get)
        out["best_split"] = {"variant": best, "capacity_qps": mine[best],
                             "split": [int(x) for x in best[len(name) + 1:].split("_")]}
    if out_dir is not None:
        from analysis.results import plot_capacity, points_table

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "capacity.json", out)
        points_table(out).to_csv(out_dir / "capacity_points.csv", index=False)
        if cfg.capacity.get("save_requests", True):
            for label, (_, table) in found.items():
                if table is not None:
                    table.to_parquet(out_dir / f"requests_{label}.parquet", index=False)
        if cfg.output.get("plots", True):
            plot_capacity(out, out_dir / "capacity.png")
    return out


def explain_status(res: dict, settings: dict) -> str:
    """Why a search ended without a bracket: the violation at the lowest (below_min) or highest
    (above_max) rate tried, by reason, and the rejected requests there ('' when it bracketed)."""
    if res["status"] not in ("below_min", "above_max") or not res["points"]:
        return ""
    edge = (min if res["status"] == "below_min" else max)(res["points"], key=lambda p: p["qps"])
    rejected = edge.get("num_rejected", 0)
    text = (f"at {edge['qps']:.3g} qps {100 * edge['violation']:.2f}% violating, by reason: "
            f"{', '.join(f'{k} {v}' for k, v in edge.get('violation_reasons', {}).items()) or 'none'}")
    return text + (f"; {rejected} rejected (not counted)" if rejected and not settings.get("count_rejected") else "")


@hydra_app(config_path="../conf", config_name="capacity", prog="experiments.capacity")
def main(cfg: DictConfig) -> float:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    out = run_capacity(cfg, out_dir)
    width = max(len(k) for k in out["capacity_qps"])
    counted = "counted as violations" if out["settings"]["count_rejected"] else "reported apart, not counted"
    print("\ncapacity (highest QPS with <= {:.3g}% of requests violating, rule {}; rejected requests {}):".format(
        100 * out["max_violation"], out["rule"], counted))
    for label, res in out["variants"].items():
        at = next((p for p in res["points"] if res["lo_qps"] is not None and p["qps"] == round(res["lo_qps"], 6)), None)
        rejected = f"; {at['num_rejected']} rejected at {at['qps']:.3g} qps" if at and at.get("num_rejected") else ""
        why = explain_status(res, out["settings"])
        print(f"  {label:<{width}}  {res['capacity_qps']:7.3f} qps  ({res['status']}, {len(res['points'])} points"
              f"{rejected}){': ' + why if why else ''}")
    if "best_split" in out:
        print(f"  best split: {out['best_split']['variant']} ({out['best_split']['capacity_qps']:.3f} qps)")
    print(f"outputs: {out_dir}")
    return float(max(out["capacity_qps"].values()))


if __name__ == "__main__":
    main()
