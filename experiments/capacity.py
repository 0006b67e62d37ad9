"""The capacity app: the highest request rate a configuration serves with at most 1% of requests violating.

    python -m experiments.capacity                                   # the run app's config, its policy
    python -m experiments.capacity policy=niyama slo=niyama_tiers capacity.rule=overall
    python -m experiments.capacity +experiment=repro_capacity_code   # FCFS/EDF/SRPF/Niyama + ablations
    python -m experiments.capacity workload=trace workload.path=my.csv cluster=single   # a trace, rescaled

Composes the config, builds `simulate(qps, seed)` from it through the one wiring
(`experiments.wiring.simulate_config`) and hands it to the capacity search of
`planner.capacity` (bracketing, bisection, the drain condition, rejected requests; the
settings under `capacity` are `planner.capacity.CapacitySettings`). This module adds what
needs the config: the rate is set through `capacity.rate_key` (`auto` sets `target_qps` of a
trace workload, `workload=trace`: the trace's own arrival pattern stretched to each rate, its
requests unchanged; and `arrival.rate_qps` of a synthetic one or of
`sim.workload.trace_workload`, the trace's lengths on Poisson arrivals as the Niyama artifact
does), the seed through the workload's `seed`, and the tiers' traffic shares when the
workload gives none. Each variant (a policy, a cluster, ...) is searched on its own
(`capacity.jobs` > 1: in parallel processes). Writes `capacity.json` (every point and its
rates), `capacity_points.csv`, `capacity.png` (violation rate vs QPS per variant,
`analysis.results`) and, per variant, the request table at its highest passing rate
(`requests_<label>.parquet`).
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from experiments.app import check_config, hydra_app, write_json
from experiments.callbacks import sweep_job
from experiments.wiring import simulate_config
from planner.capacity import CapacitySettings, best_split, explain_status, find_capacity, splits
from sim.cluster import SimResult
from sim.errors import InputError
from sim.qos import QoS
from sim.workload.options import whole_number

log = logging.getLogger(__name__)

APP_KEYS = ("rate_key", "jobs", "save_requests", "splits")
"""Keys under `capacity` this app reads itself; the others are `planner.capacity.CapacitySettings`."""


def capacity_settings(cfg: DictConfig) -> CapacitySettings:
    """The search settings under `cfg.capacity` (InputError for a bad value or an unknown key)."""
    return CapacitySettings.from_config(cfg.capacity, other_keys=APP_KEYS)


def _rate_key(cfg: DictConfig) -> str:
    return str(cfg.capacity.get("rate_key", "auto"))


def _jobs(cfg: DictConfig) -> int:
    return whole_number(cfg.capacity.get("jobs", 1), "capacity.jobs", minimum=1)


# ---------------------------------------------------------------- one configuration at one rate


def workload_rate_key(workload: DictConfig, rate_key: str) -> str:
    """The workload config key the search sets to each rate: `rate_key`, or for "auto"
    `target_qps` of a trace (`sim.workload.from_trace`: its own arrival pattern rescaled to the
    rate) and `arrival.rate_qps` otherwise (synthetic arrivals, `sim.workload.trace_workload`).
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


def simulate_at(cfg: DictConfig, qos: QoS):
    """`simulate(qps, seed)` for the planner: the configured workload at `qps` with `seed`, its
    QoS classes checked against the tiers, simulated on the configured cluster."""
    rate_key = _rate_key(cfg)

    def simulate(qps: float, seed: int) -> SimResult:
        workload = instantiate(_workload_cfg(cfg, qps, seed, qos, rate_key))
        workload.check_qos_classes(set(qos.tiers))
        return simulate_config(cfg, workload.requests, progress=False)

    return simulate


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
        for split in splits(int(splits_cfg.num_replicas), len(pools), int(splits_cfg.get("min_per_pool", 1))):
            v = template.copy()
            for i, count in enumerate(split):
                v.cluster.pools[i].count = count
            out[_split_label(name, split)] = v
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


def _split_label(variant: str, split: tuple[int, ...]) -> str:
    return f"{variant}_{'_'.join(map(str, split))}"


def _policy_label(cfg: DictConfig) -> str:
    return str(cfg.policy.get("_target_", "policy")).rsplit(".", 1)[-1].lower()


def search_variant(label: str, container: dict) -> tuple[dict, pd.DataFrame | None]:
    """Search one variant's capacity (a plain function: also the parallel worker)."""
    cfg = OmegaConf.create(container)
    qos = QoS.from_config(cfg.slo)
    return find_capacity(simulate_at(cfg, qos), capacity_settings(cfg), qos, label=label)


def run_capacity(cfg: DictConfig, out_dir: str | Path | None = None) -> dict:
    """Search every variant's capacity; write capacity.json, capacity_points.csv, capacity.png
    and the request tables at capacity into `out_dir`. Returns the capacity.json content."""
    settings = capacity_settings(cfg)
    jobs = _jobs(cfg)
    variants = variant_configs(cfg)
    for v in variants.values():  # bad input stops here, before any search
        check_config(v)
        capacity_settings(v)
        workload_rate_key(v.workload, _rate_key(v))
    # unresolved: each pool resolves its cost model for its own model, hardware and tp (experiments.wiring)
    containers = {label: OmegaConf.to_container(v, resolve=False) for label, v in variants.items()}
    log.info("capacity search: %d variant(s) %s, rule=%s, threshold=%.3g, seeds=%s",
             len(containers), list(containers), settings.rule, settings.max_violation, list(settings.seeds))
    t0 = time.perf_counter()
    if jobs > 1 and len(containers) > 1:
        with ProcessPoolExecutor(max_workers=min(jobs, len(containers))) as pool:
            futures = {label: pool.submit(search_variant, label, c) for label, c in containers.items()}
            found = {label: f.result() for label, f in futures.items()}
    else:
        found = {label: search_variant(label, c) for label, c in containers.items()}
    any_cfg = next(iter(variants.values()))
    out = {
        "rule": settings.rule,
        "max_violation": settings.max_violation,
        "settings": {**asdict(settings), "rate_key": _rate_key(cfg), "jobs": jobs},
        "workload": OmegaConf.to_container(any_cfg.workload, resolve=True),
        "slo": OmegaConf.to_container(any_cfg.slo, resolve=True),
        "wall_s": time.perf_counter() - t0,
        "variants": {label: res for label, (res, _) in found.items()},
        "capacity_qps": {label: res["capacity_qps"] for label, (res, _) in found.items()},
    }
    splits_cfg = cfg.capacity.get("splits")
    if splits_cfg:
        name = splits_cfg.variant
        num_pools = len(next(v for k, v in variants.items() if k.startswith(f"{name}_")).cluster.pools)
        best = best_split(int(splits_cfg.num_replicas), num_pools,
                          lambda split: out["capacity_qps"][_split_label(name, split)],
                          int(splits_cfg.get("min_per_pool", 1)))
        out["best_split"] = {"variant": _split_label(name, best.best), "capacity_qps": best.best_capacity_qps,
                             "split": list(best.best)}
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


@hydra_app(config_path="../conf", config_name="capacity", prog="experiments.capacity")
def main(cfg: DictConfig) -> float:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    with sweep_job("capacity.json") as resumed:
        out = json.loads((out_dir / "capacity.json").read_text()) if resumed else run_capacity(cfg, out_dir)
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
