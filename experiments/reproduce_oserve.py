"""Reproduce OServe's claim in simulation: heterogeneous, re-planned deployments of a GPU pool
against vLLM-style data parallelism, on workloads whose mix shifts.

    python -m experiments.reproduce_oserve                    # every scenario (see docs/reproduction_oserve.md)
    python -m experiments.reproduce_oserve smoke=true         # tiny version (what the tests run)
    python -m experiments.reproduce_oserve scenarios=[oserve_llama3_70b_8gpu] workloads=[mooncake]

Scenarios are experiment files (conf/experiment/oserve_*.yaml: model and pool size on A100-80GB,
roofline costs). Per scenario and workload, four deployment strategies run on the same requests:
- `vllm_dp`: replicas of the smallest TP degree the model fits, least-outstanding-requests router;
- `best_homogeneous`: the homogeneous split the planner scores best (exhaustive), same router;
- `best_static_heterogeneous`: the upper level's deployment (merge/split search from vllm_dp)
  for the whole workload's mean demand, flow-proportional routing, no re-planning;
- `oserve`: the same start, re-planned each window by `policies.control.oserve.OServeController`.
Workloads (our construction): `azure_alternating`, segments of the Azure code and conversation
traces taking turns; `mooncake`, the Mooncake conversation trace. Arrival times are compressed
(or stretched) so that the heaviest segment's demand is `load` x what the planner says the best
homogeneous split sustains for that segment's mix (our choice of load).
Writes reproduction_oserve.json and reproduction_oserve.md into the output directory.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from analysis.oserve import claim, claim_text, markdown, ratios, summarize, switches
from experiments.app import hydra_app, write_json
from experiments.reproduce import compose_part
from experiments.wiring import replica_specs, simulate_config
from planner.deployment import (RateSettings, RequestTypes, TypeStats, deployments, feasible_configs, homogeneous,
                                rate_table)
from planner.oserve_plan import exhaustive, load_factor, lp_max_flow, max_flow, refine
from policies.control.oserve import switch_catalog
from policies.estimators.forecast import ExponentialSmoothing, LSTMForecaster, counts_per_window, one_step_errors
from sim.errors import InputError
from sim.workload import from_trace

log = logging.getLogger(__name__)

STRATEGIES = ("vllm_dp", "best_homogeneous", "best_static_heterogeneous", "oserve")
WORKLOADS = ("azure_alternating", "mooncake")
PUBLISHED = {"p99_e2e_and_throughput_vs_vllm": {"average": 1.5, "up_to": 2.0}}
"""The paper's claim (design/POLICIES.md, OServe)."""


# ---------------------------------------------------------------- workloads
def _tiled(df: pd.DataFrame, start_s: float, length_s: float) -> pd.DataFrame:
    """Requests of [start, start + length) of the trace repeated end to end (its span as period)."""
    period = float(df["arrival_s"].max()) + 1e-6
    parts, k = [], int(start_s // period)
    while k * period < start_s + length_s:
        a = df["arrival_s"].to_numpy() + k * period
        sel = (a >= start_s) & (a < start_s + length_s)
        parts.append(df[sel].assign(arrival_s=a[sel] - start_s))
        k += 1
    return pd.concat(parts, ignore_index=True)


def build_workload(name: str, traces: dict, speed: float, segment_s: float, num_segments: int,
                   max_model_len: int, max_output_tokens: int) -> pd.DataFrame:
    """The workload table: `azure_alternating` (code, conv, code, ... segments of `segment_s`
    simulated seconds, each cut from its trace's next `segment_s * speed` seconds) or `mooncake`
    (`segment_s * num_segments` seconds); arrival times divided by `speed`. Output lengths are
    capped at `max_output_tokens` and prompts at max_model_len - output (our deviation: the
    Mooncake trace's prompts, 12k tokens on average, exceed Llama-3's 8,192-token context)."""
    if not speed > 0:
        raise InputError("must be > 0", field="speed", value=speed)
    src_len = segment_s * speed
    if name == "azure_alternating":
        code = from_trace(traces["azure_code"]).requests
        conv = from_trace(traces["azure_conv"]).requests
        parts = []
        for i in range(num_segments):
            src = code if i % 2 == 0 else conv
            seg = _tiled(src, (i // 2) * src_len, src_len)
            parts.append(seg.assign(arrival_s=i * segment_s + seg["arrival_s"] / speed,
                                    segment=i, source="code" if i % 2 == 0 else "conv"))
        wl = pd.concat(parts, ignore_index=True)
    elif name == "mooncake":
        src = from_trace(traces["mooncake"]).requests
        wl = _tiled(src, 0.0, src_len * num_segments)
        wl = wl.assign(arrival_s=wl["arrival_s"] / speed, segment=(wl["arrival_s"] // src_len).astype(int),
                       source="mooncake")
    else:
        raise InputError(f"unknown workload; use any of {list(WORKLOADS)}", field="workloads", value=name)
    wl = wl.sort_values("arrival_s", kind="stable").reset_index(drop=True)
    o = np.minimum(wl["num_output_tokens"].to_numpy(), max_output_tokens)
    p = np.minimum(wl["num_prompt_tokens"].to_numpy(), max_model_len - o)
    out = pd.DataFrame({"arrival_s": wl["arrival_s"].to_numpy(), "num_prompt_tokens": p, "num_output_tokens": o,
                        "request_id": np.arange(len(wl)), "segment": wl["segment"].to_numpy(),
                        "source": wl["source"].to_numpy()})
    return out


# ---------------------------------------------------------------- planning
def _with_pools(cfg: DictConfig, deployment: Sequence[int]) -> DictConfig:
    c = cfg.copy()
    with open_dict(c):
        degrees = sorted(set(deployment), reverse=True)
        c.cluster.pools = [{"name": f"tp{k}_", "count": deployment.count(k), "tp": int(k)} for k in degrees]
    return c


class Planner:
    """The scenario's pool, configurations, request types and rate table for one workload."""

    def __init__(self, cfg: DictConfig, num_gpus: int, wl: pd.DataFrame, settings: RateSettings,
                 cache_dir: Path | None) -> None:
        if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 1:
            raise InputError("must be an integer >= 1", field="oserve.num_gpus", value=num_gpus)
        degrees = [int(k) for k in cfg.controller.tp_degrees]
        probe, why = None, []
        for k in sorted((k for k in degrees if k <= num_gpus), reverse=True):  # any configuration that fits
            try:
                probe = replica_specs(_with_pools(cfg, [k]))[0]
                break
            except InputError as e:
                why.append(f"tp{k}: {e.problem}")
        if probe is None:
            raise InputError(f"{cfg.model.name} fits no replica configuration of a {num_gpus}-GPU pool with TP "
                             f"degrees {degrees} ({'; '.join(why) or 'every degree exceeds the pool'})",
                             field="oserve.num_gpus", value=num_gpus)
        self.template = probe.cost_model
        self.template_spec = probe
        self.num_gpus = num_gpus
        self.configs = feasible_configs(self.template.model, self.template.gpu, num_gpus, degrees)
        deployments(num_gpus, self.configs)  # InputError when the pool does not divide
        self.types = RequestTypes.from_quantiles(wl["num_prompt_tokens"], wl["num_output_tokens"])
        self.stats = TypeStats.from_workload(self.types, wl["num_prompt_tokens"], wl["num_output_tokens"])
        self.rates = rate_table(self.template, self.configs, self.stats, settings, cache_dir=cache_dir)
        self.settings = settings

    def demand(self, wl: pd.DataFrame) -> np.ndarray:
        span = max(float(wl["arrival_s"].max()), 1e-9)
        return self.stats.count / span

    def plan(self, demand: np.ndarray) -> dict[str, dict]:
        dp = homogeneous(self.num_gpus, self.configs)
        homo = exhaustive(self.num_gpus, self.configs, self.rates, demand, only_homogeneous=True)
        het = refine(dp, self.configs, self.rates, demand)
        out = {"vllm_dp": dp, "best_homogeneous": homo.deployment, "best_static_heterogeneous": het.deployment,
               "oserve": het.deployment}
        return {k: {"deployment": list(d), "served_per_s": max_flow(d, self.rates, demand).served,
                    "load_factor": load_factor(d, self.rates, demand)} for k, d in out.items()}


def segment_factors(planner: Planner, wl: pd.DataFrame, deployment: Sequence[int], segment_s: float) -> list[float]:
    """The planner's capacity factor of `deployment` for each segment's demand (req/s per type)."""
    out = []
    for _, g in wl.groupby("segment"):
        counts = TypeStats.from_workload(planner.types, g["num_prompt_tokens"], g["num_output_tokens"]).count
        out.append(load_factor(tuple(deployment), planner.rates, counts / segment_s))
    return out


def segment_capacity(planner: Planner, wl: pd.DataFrame, deployment: Sequence[int], segment_s: float) -> float:
    """The heaviest segment's capacity factor; when some type has no capacity in `deployment`
    (factor 0), the share of that segment's demand the max-flow serves instead."""
    factors = segment_factors(planner, wl, deployment, segment_s)
    if min(factors) > 0:
        return min(factors)
    served = []
    for _, g in wl.groupby("segment"):
        d = TypeStats.from_workload(planner.types, g["num_prompt_tokens"], g["num_output_tokens"]).count / segment_s
        served.append(max_flow(tuple(deployment), planner.rates, d).served / max(d.sum(), 1e-9))
    return max(min(served), 1e-3)


def planner_gaps(planner: Planner, demand: np.ndarray, pools: Sequence[int]) -> list[dict]:
    """Upper level vs exhaustive search, and max-flow vs the exact LP, on small pools."""
    rows = []
    for n in pools:
        try:
            configs = feasible_configs(planner.template.model, planner.template.gpu, n)
            dp = homogeneous(n, configs)
        except InputError as e:
            rows.append({"num_gpus": n, "skipped": str(e)})
            continue
        scale = n / planner.num_gpus
        rates = {k: v for k, v in planner.rates.items() if k in {c.tp for c in configs}}
        for mult in (1.0, 2.0):
            d = demand * scale * mult
            r = refine(dp, configs, rates, d)
            ex = exhaustive(n, configs, rates, d)
            rows.append({"num_gpus": n, "demand_x": mult, "refine": list(r.deployment), "refine_served": r.served,
                         "refine_load_factor": r.load_factor, "exhaustive": list(ex.deployment),
                         "exhaustive_served": ex.served, "exhaustive_load_factor": ex.load_factor,
                         "gap_served": 1 - r.served / ex.served if ex.served > 0 else 0.0,
                         "gap_load_factor": 1 - r.load_factor / ex.load_factor if ex.load_factor > 0 else 0.0,
                         "maxflow_vs_lp": r.served / lp_max_flow(r.deployment, rates, d)
                         if lp_max_flow(r.deployment, rates, d) > 0 else 1.0,
                         "num_evaluated_refine": r.num_evaluated, "num_evaluated_exhaustive": ex.num_evaluated})
    return rows


def forecast_errors(planner: Planner, wl: pd.DataFrame, window_s: float, lstm: dict | None, seed: int) -> dict:
    """One-step forecast error of both forecasters on the workload's per-type window counts
    (fitted on the first half of the windows; `lstm` None leaves the LSTM out)."""
    k = planner.types.classify(wl["num_prompt_tokens"], wl["num_output_tokens"])
    series = counts_per_window(wl["arrival_s"], k, len(planner.types), window_s)
    half = max(len(series) // 2, 1)
    if len(series) < 4:
        return {"skipped": f"only {len(series)} windows"}
    out = {"window_s": window_s, "num_windows": int(len(series)), "train_windows": half,
           "exp_smoothing": one_step_errors(series, ExponentialSmoothing(0.5), half)}
    if lstm is None:
        return out
    t0 = time.perf_counter()
    try:
        out["lstm"] = one_step_errors(series, LSTMForecaster(seed=seed, **lstm), half)
        out["lstm"]["fit_and_predict_s"] = time.perf_counter() - t0
    except InputError as e:  # torch missing
        out["lstm"] = {"skipped": str(e)}
    return out


def trace_forecast_errors(traces: dict, window_s: float, lstm: dict | None, seed: int) -> dict:
    """One-step forecast errors on each whole trace (as recorded, not compressed): per-type arrivals
    per `window_s`, types at the trace's own quantile edges, fitted on the first half."""
    out = {}
    for name, path in traces.items():
        w = from_trace(path).requests
        types = RequestTypes.from_quantiles(w["num_prompt_tokens"], w["num_output_tokens"])
        series = counts_per_window(w["arrival_s"], types.classify(w["num_prompt_tokens"], w["num_output_tokens"]),
                                   len(types), window_s)
        half = len(series) // 2
        row = {"window_s": window_s, "num_windows": int(len(series)), "train_windows": half,
               "exp_smoothing": one_step_errors(series, ExponentialSmoothing(0.5), half)}
        if lstm is not None:
            try:
                row["lstm"] = one_step_errors(series, LSTMForecaster(seed=seed, **lstm), half)
            except InputError as e:  # torch missing: the smoothing figures stand alone
                row["lstm"] = {"skipped": str(e)}
        out[name] = row
    return out


# ---------------------------------------------------------------- one scenario
def run_scenario(cfg: DictConfig, ocfg: DictConfig, workload: str, cache_dir: Path | None) -> dict:
    num_gpus = cfg.oserve.num_gpus
    ctl_cfg = cfg.controller
    settings = RateSettings(ttft_s=float(ctl_cfg.ttft_s), tpot_s=float(ctl_cfg.tpot_s),
                            utilization=float(ctl_cfg.utilization),
                            max_num_seqs=int(cfg.cluster.max_num_seqs),
                            max_num_batched_tokens=int(cfg.cluster.max_num_batched_tokens))
    traces = OmegaConf.to_container(ocfg.traces, resolve=True)
    mml = int(cfg.cluster.max_model_len)
    args = dict(traces=traces, segment_s=float(ocfg.segment_s), num_segments=int(ocfg.num_segments),
                max_model_len=mml, max_output_tokens=int(ocfg.max_output_tokens))
    # the load (our design): time is compressed until the planner's capacity factor of the best
    # homogeneous split, in the heaviest segment, is 1 / load (two rounds: the cut depends on the pace)
    speed = 1.0
    for _ in range(2):
        wl = build_workload(workload, speed=speed, **args)
        planner = Planner(cfg, num_gpus, wl, settings, cache_dir)
        base = segment_capacity(planner, wl, planner.plan(planner.demand(wl))["best_homogeneous"]["deployment"],
                                float(ocfg.segment_s))
        speed *= float(ocfg.load) * base
    wl = build_workload(workload, speed=speed, **args)
    planner = Planner(cfg, num_gpus, wl, settings, cache_dir)
    demand = planner.demand(wl)
    planned = planner.plan(demand)
    seg_dep = planned["best_homogeneous"]["deployment"]
    load_by_segment = [1.0 / f if f > 0 else float("inf") for f in
                       segment_factors(planner, wl, seg_dep, float(ocfg.segment_s))]
    log.info("[%s %s] %d requests, %.2f req/s (x%.2f); plans %s", cfg.model.name, workload, len(wl),
             demand.sum(), speed, {k: v["deployment"] for k, v in planned.items()})
    table = wl[["arrival_s", "num_prompt_tokens", "num_output_tokens", "request_id"]]
    results: dict[str, Any] = {}
    for strategy in ocfg.strategies:
        if strategy not in STRATEGIES:
            raise InputError(f"unknown strategy; use any of {list(STRATEGIES)}", field="strategies", value=strategy)
        t0 = time.perf_counter()
        dep = planned[strategy]["deployment"]
        scfg = _with_pools(cfg, dep)
        specs = replica_specs(scfg)
        controller, catalog = None, None
        if strategy in ("best_static_heterogeneous", "oserve"):
            s = planner.stats
            controller = instantiate(ctl_cfg, prompt_edges=list(planner.types.prompt_edges),
                                     output_edges=list(planner.types.output_edges),
                                     mean_prompt=s.mean_prompt.tolist(), mean_output=s.mean_output.tolist(),
                                     p90_prompt=s.p90_prompt.tolist(), type_counts=s.count.tolist(),
                                     initial_rate_per_s=demand.tolist(), replan=strategy == "oserve")
            catalog = switch_catalog(specs[0], planner.configs, reinit_s=float(ctl_cfg.reinit_s))
        else:
            with open_dict(scfg):
                scfg.controller = None
        res = simulate_config(scfg, table, replicas=specs, progress=False, controller=controller,
                              catalog=catalog)
        out = summarize(res.requests, settings.ttft_s, settings.tpot_s)
        if controller is not None:
            out["switches"] = switches(controller.decisions, res.replicas)
            out["decisions"] = controller.decisions
        out["wall_s"] = time.perf_counter() - t0
        out["outcomes"] = res.requests["outcome"].value_counts().to_dict()
        results[strategy] = out
        log.info("[%s %s] %-26s P99 e2e %8.2f s  goodput %7.2f req/s  SLO %5.1f%%  (%.1f s)", cfg.model.name,
                 workload, strategy, out["p99_e2e_s"], out["goodput_rps"], 100 * out["slo_attainment"], out["wall_s"])
    return {"model": cfg.model.name, "hardware": planner.template.gpu.name, "num_gpus": num_gpus,
            "workload": workload, "num_requests": int(len(wl)), "offered_rps": float(demand.sum()), "speed": speed,
            "types": [planner.types.label(t) for t in range(len(planner.types))],
            "rates_per_s": {f"tp{k}": v.tolist() for k, v in planner.rates.items()},
            "demand_per_s": demand.tolist(), "planned": planned,
            "planned_load_by_segment_best_homogeneous": load_by_segment, "results": results, "ratios": ratios(results),
            "planner_gaps": planner_gaps(planner, demand, list(ocfg.gap_pools)),
            "forecast": forecast_errors(planner, wl, float(ctl_cfg.window_s),
                                        None if ocfg.lstm is None else OmegaConf.to_container(ocfg.lstm, resolve=True),
                                        int(cfg.seed))}


# ---------------------------------------------------------------- all
def reproduce_oserve(ocfg: DictConfig, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    if ocfg.smoke:
        ocfg = OmegaConf.merge(ocfg, ocfg.smoke_settings)
    cache_dir = Path(ocfg.cache_dir) if ocfg.get("cache_dir") else None
    extra = list(ocfg.smoke_overrides) if ocfg.smoke else []
    summary: dict[str, Any] = {"smoke": bool(ocfg.smoke), "published": PUBLISHED, "scenarios": {}}
    t_all = time.perf_counter()
    for scenario in ocfg.scenarios:
        cfg = compose_part("config", [f"+experiment={scenario}", *extra, *ocfg.overrides])
        for workload in ocfg.workloads:
            summary["scenarios"][f"{scenario}/{workload}"] = run_scenario(cfg, ocfg, workload, cache_dir)
    if ocfg.get("forecast_traces_window_s"):
        summary["forecast_traces"] = trace_forecast_errors(
            OmegaConf.to_container(ocfg.traces, resolve=True), float(ocfg.forecast_traces_window_s),
            None if ocfg.lstm is None else OmegaConf.to_container(ocfg.lstm, resolve=True), 0)
    summary["wall_s"] = time.perf_counter() - t_all
    summary["claim"] = claim(summary, PUBLISHED["p99_e2e_and_throughput_vs_vllm"])
    write_json(out_dir / "reproduction_oserve.json", summary)
    (out_dir / "reproduction_oserve.md").write_text(
        f"# OServe reproduction ({'smoke' if ocfg.smoke else 'full'}; {summary['wall_s'] / 60:.1f} min)\n\n"
        + markdown(summary) + "\n" + claim_text(summary["claim"]))
    return summary


@hydra_app(config_path="../conf", config_name="reproduce_oserve", prog="experiments.reproduce_oserve")
def main(cfg: DictConfig) -> None:
    out_dir = Path(cfg.out_dir) if cfg.get("out_dir") else Path(HydraConfig.get().runtime.output_dir)
    summary = reproduce_oserve(cfg, out_dir)
    print((out_dir / "reproduction_oserve.md").read_text())
    print(f"outputs: {out_dir} ({summary['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
