"""The plan app: the cheapest fleet that meets every class's SLO target, and how sure that is.

    python -m experiments.plan                                     # conf/plan.yaml: 8B chat, A100 vs H100
    python -m experiments.plan +plan=llama70b_tp plan.rate_qps=20  # a scenario file (conf/plan/)
    python -m experiments.plan plan.hardware=[a100-80gb,h100-80gb,h200] plan.tp=[1,2,4] plan.policies=[fcfs,sarathi,niyama]

Turns `plan` into candidates (model x hardware x TP x policy x topology), and hands
`planner.fleet.plan_fleet` two functions built through the one wiring: the per-replica
capacity search (`planner.capacity.find_capacity` on a one-replica cluster fed the pool's
classes only) and the fleet verification (the whole cluster at the target rate, over
`plan.verify.seeds` x the cost-model ensemble of `planner.uncertainty`, each run judged once
per draw of the measured sim-vs-live error). With `plan.check.seeds` the winner and the same
fleet with one replica fewer are simulated again at those new seeds. Writes `plan.json`,
`plan.csv` (the ranked table), `candidates.csv`, `pareto.png`, `winner_requests.parquet`, and
prints the one `python -m experiments.run ...` command that re-runs the winner.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shlex
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from experiments.app import check_config, hydra_app, write_json
from experiments.callbacks import sweep_job
from experiments.capacity import _workload_cfg, workload_rate_key
from experiments.wiring import _option, replica_specs, simulate_config
from planner.capacity import CapacitySettings, find_capacity
from planner.fleet import Candidate, PlanSettings, Pool, plan_fleet
from planner.uncertainty import (LiveError, ScaledCostModel, band_factors, bootstrap_linear_models, meets,
                                 profile_of, samples_from_run, summarize_samples)
from sim.errors import InputError
from sim.qos import QoS
from sim.workload.options import whole_number

log = logging.getLogger(__name__)

SHARED_ROUTER = "least_outstanding_requests"
"""Router of a one-replica capacity run and of a shared or mixed fleet unless `router` names another."""


# ---------------------------------------------------------------- settings


def target_rate(cfg: DictConfig) -> float:
    """`plan.rate_qps`, else the peak of `workload.arrival.schedule`, else `workload.arrival.rate_qps`."""
    rate = cfg.plan.get("rate_qps")
    if rate is None:
        arrival = cfg.workload.get("arrival") or {}
        if arrival.get("schedule"):
            rate = max(float(r) for _, r in arrival.schedule)
        else:
            rate = arrival.get("rate_qps")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
        raise InputError("need a target rate > 0 (plan.rate_qps, or the workload's arrival rate or schedule)",
                         field="plan.rate_qps", value=rate)
    return float(rate)


def plan_settings(cfg: DictConfig, qos: QoS) -> PlanSettings:
    """PlanSettings from `plan`: targets per class (a number applies to every class of the slo)."""
    p = cfg.plan
    targets = p.get("targets")
    if isinstance(targets, (int, float)) and not isinstance(targets, bool):
        targets = {k: float(targets) for k in qos.tiers}
    elif targets is not None and OmegaConf.is_dict(targets):
        targets = {str(k): float(v) for k, v in targets.items()}
        unknown = sorted(set(targets) - set(qos.tiers))
        if unknown:
            raise InputError(f"classes {unknown} have no objectives in slo; known: {sorted(qos.tiers)}",
                             field="plan.targets")
    else:
        raise InputError("a share in (0, 1] or a mapping class -> share", field="plan.targets", value=targets)
    return PlanSettings(rate_qps=target_rate(cfg), targets=targets, confidence=float(p.confidence),
                        num_verify=whole_number(p.num_verify, "plan.num_verify", minimum=1),
                        bound_slack=float(p.bound_slack),
                        max_extra_replicas=whole_number(p.max_extra_replicas, "plan.max_extra_replicas", minimum=0))


def capacity_settings(cfg: DictConfig, settings: PlanSettings) -> CapacitySettings:
    """Per-replica search settings (`plan.capacity`); max_violation defaults to 1 - the lowest target."""
    node = OmegaConf.to_container(cfg.plan.capacity, resolve=True) if cfg.plan.get("capacity") else {}
    if node.get("max_violation") is None:
        node["max_violation"] = round(1 - min(settings.targets.values()), 12)
    try:
        return CapacitySettings.from_config(node)
    except InputError as e:
        raise InputError(e.problem, field=f"plan.{e.field}" if e.field else "plan.capacity", value=e.value) from None


def hardware_option(cfg: DictConfig, name: str) -> str | dict:
    """What a pool's `hardware` key gets for `name`: the conf/hardware option name, or the
    mapping given inline under `plan.hardware_specs.<name>` (e.g. a CPU VM the planner prices)."""
    inline = cfg.plan.get("hardware_specs") or {}
    if name in inline:
        return OmegaConf.to_container(inline[name], resolve=True)
    _option("hardware", name, "plan.hardware")  # InputError naming the key for an unknown option
    return name


def prices(cfg: DictConfig) -> dict[str, float]:
    """USD per GPU-hour of every planned hardware: `plan.prices.<name>`, else the conf/hardware file's
    `price_per_gpu_hour`. InputError for a hardware without a price."""
    out = {}
    node = cfg.plan.get("prices")
    given = OmegaConf.to_container(node, resolve=True) if node else {}
    for hw in _list(cfg, "hardware"):
        price = given.get(hw)
        if price is None:
            spec = hardware_option(cfg, hw)
            price = (spec if isinstance(spec, dict) else _option("hardware", hw, "plan.hardware")).get(
                "price_per_gpu_hour")
        if isinstance(price, bool) or not isinstance(price, (int, float)) or not price > 0:
            raise InputError(f"no price per GPU-hour for {hw}: set plan.prices.{hw}=<USD> (or price_per_gpu_hour "
                             f"in conf/hardware/{hw}.yaml, with its source)", field=f"plan.prices.{hw}", value=price)
        out[hw] = float(price)
    return out


def _list(cfg: DictConfig, key: str) -> list:
    value = cfg.plan.get(key)
    value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_list(value) else value
    if not isinstance(value, list) or not value:
        raise InputError("must be a non-empty list", field=f"plan.{key}", value=value)
    return value


def class_shares(cfg: DictConfig, qos: QoS) -> dict[str, float]:
    """Traffic share of each QoS class: `workload.qos_shares`, else the tiers' own shares."""
    shares = cfg.workload.get("qos_shares")
    shares = OmegaConf.to_container(shares, resolve=True) if shares is not None else qos.shares()
    if not shares:
        raise InputError("siloed pools need the traffic share of each class: set workload.qos_shares",
                         field="workload.qos_shares")
    total = float(sum(shares.values()))
    return {str(k): float(v) / total for k, v in shares.items()}


def candidates(cfg: DictConfig, qos: QoS) -> list[Candidate]:
    """Every model x hardware x TP x policy x topology of `plan` (mixed: every pair of hardware at one TP)."""
    models, hardware = _list(cfg, "models"), _list(cfg, "hardware")
    tps = [whole_number(t, "plan.tp", minimum=1) for t in _list(cfg, "tp")]
    policies, topologies = _list(cfg, "policies"), _list(cfg, "topologies")
    for name in policies:
        _option("policy", name, "plan.policies")
    for name in models:
        _option("model", name, "plan.models")
    out = []
    for m in models:
        for pol in policies:
            for topo in topologies:
                if topo == "shared":
                    out += [Candidate(m, pol, "shared", (Pool("shared", hw, tp),)) for hw in hardware for tp in tps]
                elif topo == "siloed":
                    shares = class_shares(cfg, qos)
                    silos = OmegaConf.to_container(cfg.plan.silos, resolve=True)
                    for hw in hardware:
                        for tp in tps:
                            pools = tuple(Pool(name, hw, tp, tuple(classes), sum(shares.get(k, 0.0) for k in classes))
                                          for name, classes in silos.items() if sum(shares.get(k, 0.0) for k in classes) > 0)
                            out.append(Candidate(m, pol, "siloed", pools))
                elif topo == "mixed":
                    out += [Candidate(m, pol, "mixed", (Pool(h1, h1, tp, min_count=0), Pool(h2, h2, tp, min_count=0)))
                            for i, h1 in enumerate(hardware) for h2 in hardware[i + 1:] for tp in tps]
                else:
                    raise InputError("use shared, siloed or mixed", field="plan.topologies", value=topo)
    return out


# ---------------------------------------------------------------- configs of a candidate


def fleet_config(cfg: DictConfig, c: Candidate, counts: tuple[int, ...]) -> DictConfig:
    """The run config of candidate `c` with `counts` replicas per pool (pools of 0 left out)."""
    out = cfg.copy()
    OmegaConf.set_struct(out, False)
    out.model = _option("model", c.model, "plan.models")
    out.policy = _option("policy", c.policy, "plan.policies")
    out.cluster.num_replicas = None
    out.cluster.pools = [{"name": p.name, "count": int(n), "model": c.model, "hardware": hardware_option(cfg, p.hardware),
                          "tp": p.tp, "policy": c.policy} for p, n in zip(c.pools, counts) if n > 0]
    if c.topology == "siloed":
        router = _option("router", "siloed", "router")
        router["pools"] = {p.name: list(p.classes) for p, n in zip(c.pools, counts) if n > 0}
        out.router = router
    elif str(cfg.router.get("_target_", "")).endswith("SiloedRouter"):
        out.router = _option("router", SHARED_ROUTER, "router")
    return out


def pool_config(cfg: DictConfig, c: Candidate, i: int, qos: QoS) -> DictConfig:
    """One replica of pool `i` of `c`, fed its classes' requests only (shares renormalised)."""
    p = c.pools[i]
    one = Candidate(c.model, c.policy, "shared", (Pool(p.name, p.hardware, p.tp),))
    out = fleet_config(cfg, one, (1,))
    if p.classes is not None:
        shares = class_shares(cfg, qos)
        mine = {k: shares.get(k, 0.0) for k in p.classes if shares.get(k, 0.0) > 0}
        out.workload.qos_shares = {k: v / sum(mine.values()) for k, v in mine.items()}
    return out


def _at_rate(cfg: DictConfig) -> DictConfig:
    """`cfg` with a scheduled arrival process replaced by constant arrivals (the rate set later)."""
    arrival = cfg.workload.get("arrival")
    if arrival is not None and arrival.get("schedule") is not None:
        cfg = cfg.copy()
        OmegaConf.set_struct(cfg, False)
        cfg.workload.arrival = {k: v for k, v in OmegaConf.to_container(arrival).items() if k not in ("schedule", "repeat")}
        cfg.workload.arrival.rate_qps = 1.0
    return cfg


def simulate_once(cfg: DictConfig, qos: QoS, qps: float, seed: int, member=None):
    """Simulate `cfg` at `qps` with workload `seed`; `member(cost_model) -> cost_model` replaces each replica's."""
    cfg = _at_rate(cfg)
    rate_key = str(cfg.get("capacity", {}).get("rate_key", "auto")) if cfg.get("capacity") else "auto"
    workload = instantiate(_workload_cfg(cfg, qps, seed, qos, rate_key))
    workload.check_qos_classes(set(qos.tiers))
    specs = replica_specs(cfg)
    if member is not None:
        specs = [replace(s, cost_model=member(s.cost_model)) for s in specs]
    return simulate_config(cfg, workload.requests, replicas=specs, progress=False)


# ---------------------------------------------------------------- uncertainty


def ensemble(cfg: DictConfig, c: Candidate) -> tuple[list, str]:
    """The cost-model members for `c` (functions cost_model -> cost_model) and what they are.

    `uncertainty.cost_model`: none (the cost model as is), band (step times x factors spread
    over `uncertainty.bands.<kind>`), bootstrap (refits on resamples of a fitted model's
    profile) or auto (bootstrap for a fitted linear model with its profile, else the band of
    its kind: roofline, published, or other)."""
    u = cfg.uncertainty
    mode, n = str(u.cost_model), whole_number(u.num_members, "uncertainty.num_members", minimum=1)
    if mode == "none":
        return [None], "none: the cost model as is"
    cm = replica_specs(fleet_config(cfg, c, (1,) * len(c.pools)))[0].cost_model
    prov = getattr(cm, "provenance", None) or {}
    fitted = prov.get("kind") == "fitted" and hasattr(cm, "regimes") and profile_of(cm) is not None
    if mode == "bootstrap" or (mode == "auto" and fitted):
        if not fitted:
            raise InputError("bootstrap refits need a fitted linear cost model with its profile",
                             field="uncertainty.cost_model", value=mode)
        profile = pd.read_csv(profile_of(cm))
        members = {}

        def member(i):
            def swap(model):
                if model.name not in members:
                    members[model.name] = bootstrap_linear_models(model, profile, n, seed=int(u.seed))
                return members[model.name][i]
            return swap
        return [member(i) for i in range(n)], f"bootstrap: {n} refits on resamples of {profile_of(cm).name}"
    if mode not in ("band", "auto"):
        raise InputError("use auto, band, bootstrap or none", field="uncertainty.cost_model", value=mode)
    kind = ("roofline" if type(cm).__name__ == "RooflineCostModel" else
            "published" if prov.get("kind") == "published" else "other")
    low, high = (float(x) for x in u.bands[kind])
    factors = band_factors(low, high, n)
    return ([lambda model, f=f: ScaledCostModel(model, f) for f in factors],
            f"band ({kind}): step times x {', '.join(f'{f:.3g}' for f in factors)}")


def live_draws(cfg: DictConfig) -> tuple[list[tuple[float, float]], str]:
    """Draws of the measured sim-vs-live error (`uncertainty.live_error`; empty when none applies)."""
    live = LiveError.from_mapping(OmegaConf.to_container(cfg.uncertainty.live_error, resolve=True)
                                  if cfg.uncertainty.get("live_error") else None)
    if live is None:
        return [], "none: no sim-vs-live validation for this cost model"
    n = whole_number(cfg.uncertainty.live_draws, "uncertainty.live_draws", minimum=1)
    return live.draws(n, int(cfg.uncertainty.seed)), f"{n} draws from {len(live.ttft)} measured conditions ({live.source})"


def class_stats(tables: list[pd.DataFrame]) -> dict:
    """Per class: P50/P99 TTFT, TPOT and end-to-end (s) over the finished requests of all runs."""
    req = pd.concat(tables, ignore_index=True)
    fin = req[req["outcome"] == "finished"]
    out = {}
    for cls, g in fin.groupby("qos_class"):
        out[str(cls)] = {f"{m}_p{q}_s": float(np.nanpercentile(g[f"{m}_s"], q)) if g[f"{m}_s"].notna().any() else None
                         for m in ("ttft", "tpot", "e2e") for q in (50, 99)}
    return out


# ---------------------------------------------------------------- the plan


def run_plan(cfg: DictConfig, out_dir: str | Path | None = None, base_overrides: list[str] | None = None,
             progress: bool | None = None) -> dict:
    """Plan the fleet for `cfg`; write plan.json, plan.csv, candidates.csv, pareto.png and the
    winner's request table into `out_dir`. Returns plan.json's content. InputError for bad input."""
    t0 = time.perf_counter()
    check_config(cfg)
    qos = QoS.from_config(cfg.slo)
    settings = plan_settings(cfg, qos)
    cap_settings = capacity_settings(cfg, settings)
    price = prices(cfg)
    cands = candidates(cfg, qos)
    workload_rate_key(_at_rate(cfg).workload, str(cfg.get("capacity", {}).get("rate_key", "auto"))
                      if cfg.get("capacity") else "auto")
    verify_seeds = [whole_number(s, "plan.verify.seeds", minimum=0) for s in cfg.plan.verify.seeds]
    max_drain_s = cfg.plan.verify.get("max_drain_s")
    if max_drain_s is not None and not (isinstance(max_drain_s, (int, float)) and max_drain_s > 0):
        raise InputError("must be a number of seconds > 0 or null", field="plan.verify.max_drain_s", value=max_drain_s)
    draws, live_about = live_draws(cfg)
    progress = bool(cfg.plan.get("progress", True)) if progress is None else progress
    cap_cfg = _with_requests(cfg, cfg.plan.capacity_requests)
    ver_cfg = _with_requests(cfg, cfg.plan.verify.num_requests)
    ensembles: dict[Candidate, tuple[list, str]] = {}

    def members(c: Candidate):
        if c not in ensembles:
            ensembles[c] = ensemble(cfg, c)
        return ensembles[c]

    def capacity(c: Candidate, i: int, floor: float | None) -> dict:
        pcfg = pool_config(cap_cfg, c, i, qos)
        replica_specs(pcfg)  # InputError here (e.g. the model does not fit at this TP) marks it infeasible
        s = cap_settings
        if floor is not None:
            if floor > s.qps_max:
                return {"capacity_qps": 0.0, "num_simulations": 0, "status": "above_max"}
            s = replace(s, qps_start=floor, qps_min=floor * 0.999)
        n = [0]

        def sim(qps: float, seed: int):
            n[0] += 1
            return simulate_once(pcfg, qos, qps, seed)

        res, _ = find_capacity(sim, s, qos, label=f"{c.label}#{c.pools[i].name}")
        return {"capacity_qps": res["capacity_qps"], "status": res["status"], "num_simulations": n[0]}

    def verify(c: Candidate, counts: tuple[int, ...], seeds: list[int] = verify_seeds, nominal: bool = False) -> dict:
        """The fleet over `seeds` x the cost-model members x the live-error draws (`nominal`:
        the cost model as is and no live error)."""
        fcfg = fleet_config(ver_cfg, c, counts)
        samples, tables = [], []
        mem = [None] if nominal else members(c)[0]
        for seed in seeds:
            for m in mem:
                res = simulate_once(fcfg, qos, settings.rate_qps, seed, m)
                drain_s = float(res.end_s) - float(res.requests["arrival_s"].max())
                samples += samples_from_run(res.requests, qos, [] if nominal else draws, res.steps,
                                            sustainable=max_drain_s is None or drain_s <= max_drain_s)
                tables.append(res.requests.drop(columns=["token_steps"], errors="ignore"))
        req = pd.concat(tables, ignore_index=True)
        stats = {"classes": class_stats(tables),
                 "output_tokens_per_s": settings.rate_qps * float(req["num_output_tokens"].mean())}
        return {"samples": samples, "num_simulations": len(seeds) * len(mem), "stats": stats, "tables": tables}

    result = plan_fleet(cands, capacity=capacity, verify=lambda c, k: _drop_tables(verify(c, k)), prices=price,
                        settings=settings, progress=progress)
    result["rate_qps"] = settings.rate_qps
    result["uncertainty"] = {"cost_model": {c.label: about for c, (_, about) in ensembles.items()},
                             "live_error": live_about, "verify_seeds": verify_seeds,
                             "samples_per_fleet": None}
    winner = result["winner"]
    if winner is not None:
        c = _candidate(winner["candidate"])
        counts = tuple(winner["replicas"])
        result["uncertainty"]["samples_per_fleet"] = winner["num_samples"]
        result["command"] = run_command(fleet_config(ver_cfg, c, counts), c, counts, settings.rate_qps,
                                        base_overrides or [])
        check_seeds = [whole_number(s, "plan.check.seeds", minimum=0) for s in (cfg.plan.check.seeds or [])]
        if check_seeds:
            result["check"] = check(verify, c, counts, check_seeds, settings)
            if cfg.plan.check.get("nominal", False):
                result["check_nominal"] = check(functools.partial(verify, nominal=True), c, counts, check_seeds,
                                                settings)
    result["wall_s"] = time.perf_counter() - t0
    if out_dir is not None:
        write_outputs(result, Path(out_dir), cfg, verify if winner is not None else None)
    return result


def _drop_tables(out: dict) -> dict:
    out.pop("tables", None)
    return out


def _with_requests(cfg: DictConfig, num_requests: Any) -> DictConfig:
    """`cfg` with `workload.num_requests` set (None: as configured)."""
    if num_requests is None:
        return cfg
    out = cfg.copy()
    OmegaConf.set_struct(out, False)
    out.workload.num_requests = whole_number(num_requests, "plan.num_requests", minimum=1)
    if "duration_s" in out.workload:
        out.workload.duration_s = None
    return out


def _candidate(d: dict) -> Candidate:
    return Candidate(d["model"], d["policy"], d["topology"],
                     tuple(Pool(**{**p, "classes": tuple(p["classes"]) if p["classes"] is not None else None})
                           for p in d["pools"]))


def check(verify, c: Candidate, counts: tuple[int, ...], seeds: list[int], settings: PlanSettings) -> dict:
    """The winner and each fleet with one replica fewer in one pool, simulated at new `seeds`
    (same cost-model members and live-error draws): P(meet) over all samples against the plan's
    confidence, and the number of seeds at which every sample meets the targets."""
    out = {"seeds": seeds, "fleets": []}
    fewer = [tuple(n - (j == i) for j, n in enumerate(counts)) for i, p in enumerate(c.pools)
             if counts[i] > p.min_count and sum(counts) > 1]
    for k in [counts, *fewer]:
        v = verify(c, k, seeds)
        per_seed = len(v["samples"]) // len(seeds)
        seed_meets = [all(meets(s, settings.targets) for s in v["samples"][i * per_seed:(i + 1) * per_seed])
                      for i in range(len(seeds))]
        summary = summarize_samples(v["samples"], settings.targets, settings.confidence)
        out["fleets"].append({"replicas": list(k), "is_plan": k == counts, "p_meet": summary["p_meet"],
                              "meets": summary["meets"], "num_seeds_all_samples_meet": int(sum(seed_meets)),
                              "attainment": summary["attainment"]})
    return out


def run_command(fcfg: DictConfig, c: Candidate, counts: tuple[int, ...], rate_qps: float,
                base_overrides: list[str]) -> str:
    """The plain `python -m experiments.run ...` that simulates the winner once with the nominal
    cost model: the run app's defaults, the plan's own overrides and scenario file (`+plan=`),
    the plan's cost-model choice, the winner's pools and the target rate."""
    # a scenario file (+plan=<name>) stays: besides plan.* (ignored by the run app) it may set the
    # workload, slo, cluster or model the plan was made for
    keep = [o for o in base_overrides if o.startswith("+plan=") or o.lstrip("+~").split("=", 1)[0].split(".")[0]
            not in ("plan", "uncertainty", "hydra", "capacity")]
    pools = ",".join(_override_value(pool) for pool in OmegaConf.to_container(fcfg.cluster.pools))
    parts = ["python", "-m", "experiments.run", *keep, f"model={c.model}", f"policy={c.policy}",
             "cluster.num_replicas=null", f"++cluster.pools=[{pools}]",
             f"workload.num_requests={fcfg.workload.num_requests}", f"workload.arrival.rate_qps={rate_qps:g}"]
    if c.topology == "siloed":
        silos = ",".join(f"{name}:[{','.join(cl)}]" for name, cl in fcfg.router.pools.items())
        parts += ["router=siloed", f"++router.pools={{{silos}}}"]
    return " ".join(shlex.quote(p) for p in parts)


def _override_value(value: Any) -> str:
    """A value in Hydra's override grammar: mappings as {k:v,...}, lists as [...], recursively."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_override_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return "null" if value is None else str(value)


def write_outputs(result: dict, out: Path, cfg: DictConfig, verify) -> None:
    """plan.json, plan.csv, candidates.csv, pareto.png and (with a winner) winner_requests.parquet."""
    from analysis.planning import candidates_table, plot_pareto, ranked_table

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "plan.json", result)
    ranked_table(result).to_csv(out / "plan.csv", index=False)
    candidates_table(result).to_csv(out / "candidates.csv", index=False)
    if cfg.output.get("plots", True):
        plot_pareto(result, out / "pareto.png")
    if verify is not None and cfg.plan.get("save_requests", True):
        w = result["winner"]
        v = verify(_candidate(w["candidate"]), tuple(w["replicas"]), [int(result["uncertainty"]["verify_seeds"][0])])
        pd.concat([t.assign(member=i) for i, t in enumerate(v["tables"])], ignore_index=True) \
            .to_parquet(out / "winner_requests.parquet", index=False)


@hydra_app(config_path="../conf", config_name="plan", prog="experiments.plan")
def main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    if not any(o.startswith("costmodel=") for o in overrides) and hc.runtime.choices.get("costmodel"):
        overrides.append(f"costmodel={hc.runtime.choices['costmodel']}")  # conf/plan.yaml's, not the run app's default
    with sweep_job("plan.json") as resumed:
        result = (json.loads((out_dir / "plan.json").read_text()) if resumed
                  else run_plan(cfg, out_dir, base_overrides=overrides))
    from analysis.planning import ranked_table

    n = result["counts"]
    print(f"\nplan for {result['rate_qps']:g} req/s, targets {result['settings']['targets']} at "
          f"{100 * result['settings']['confidence']:.0f}% confidence: {n['num_candidates']} candidates, "
          f"{n['num_infeasible']} infeasible, {n['num_pruned_bound']} pruned by the bound, "
          f"{n['num_pruned_dominated']} dominated, {n['num_verified']} verified; "
          f"{n['num_simulations']} simulations in {result['wall_s']:.0f} s")
    table = ranked_table(result)
    if len(table):
        with pd.option_context("display.width", 250, "display.max_columns", 40, "display.precision", 3):
            print(table.to_string(index=False))
    if result["winner"] is None:
        print("no verified candidate meets the targets at the confidence: widen plan.max_extra_replicas or the search")
        print(f"outputs: {out_dir}")
        return math.inf
    w = result["winner"]
    print(f"\nwinner: {w['label']} x {w['replicas']} ({w['gpus']} GPUs, ${w['cost_per_hour']:.2f}/h, "
          f"P(meet) {w['p_meet']:.2f} over {w['num_samples']} samples)")
    for key, about in (("check", "with the uncertainty"), ("check_nominal", "nominal cost model, no live error")):
        for f in result.get(key, {}).get("fleets", []):
            print(f"  check at {len(result[key]['seeds'])} new seeds ({about}): {f['replicas']} P(meet) "
                  f"{f['p_meet']:.2f}, every sample met at {f['num_seeds_all_samples_meet']} seeds"
                  f" -> {'meets' if f['meets'] else 'does not meet'}")
    print(f"re-run the winner: {result['command']}")
    print(f"outputs: {out_dir}")
    return float(w["cost_per_hour"])


if __name__ == "__main__":
    main()
