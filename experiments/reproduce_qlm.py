"""Reproduce QLM's published claims in simulation: five experiments, one command.

    python -m experiments.reproduce_qlm                        # all parts (docs/reproduction_qlm.md)
    python -m experiments.reproduce_qlm parts=[hol]            # one part
    python -m experiments.reproduce_qlm smoke=true             # tiny version (what the tests run)
    python -m experiments.reproduce_qlm 'overrides=["seed=1"]'   # extra overrides for every part

Parts (each an experiment file `conf/experiment/qlm_<part>.yaml`, whose `variants` are the
policies compared):
- hol: head-of-line blocking, one model, interactive + batch, load rising past capacity;
- multi_model: three models on a shared fleet with fewer nodes than models x demand;
- bursty: the same fleet under the Azure conversation trace's arrival times;
- estimator: QLM's waiting-time estimators against the simulated waits;
- ablation: QLM with each of its four operations switched off in turn.
Each variant (those named in `qlm.variants`, default all) runs at every load of `qlm.loads`
(x `qlm.base_qps`, set at `qlm.rate_key`; a part without loads runs once). Writes into the output directory one folder per part
(`points.csv`, `config_<variant>.yaml`, plots, and per part what it measures: `timeseries.csv`,
`wait_predictions_<variant>.csv`), `reproduction_qlm.json` ({part: {variant: {load: metrics}}}
plus QLM's gains over each baseline) and `reproduction_qlm.md` (the tables).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from experiments.app import check_config, hydra_app, write_json
from experiments.capacity import variant_configs
from experiments.reproduce import compose_part
from experiments.wiring import simulate_config
from sim.errors import InputError
from sim.qos import QoS, attainment_from_violations, violation_timeseries, violations
from sim.request import FINISHED

log = logging.getLogger(__name__)

PARTS: tuple[str, ...] = ("hol", "multi_model", "bursty", "estimator", "ablation")
"""Part names; part `p` is conf/experiment/qlm_<p>.yaml."""

PUBLISHED = {"slo_attainment_gain": (0.40, 0.90), "throughput_gain": (0.20, 4.00)}
"""QLM's claims (abstract of arXiv 2407.00047): SLO attainment +40-90%, throughput +20-400%
over the compared serving systems (relative gains)."""

QLM_PREFIX = "qlm"
"""Variants whose label starts with this are QLM; the others are baselines."""


# ---------------------------------------------------------------- one run


def _rate_cfg(cfg: DictConfig, rate_qps: float | None) -> DictConfig:
    """`cfg` with the workload's rate set at `qlm.rate_key` (unchanged for None)."""
    if rate_qps is None:
        return cfg
    key = str(cfg.qlm.get("rate_key", "workload.arrival.rate_qps"))
    if OmegaConf.select(cfg, key, default="<absent>") == "<absent>":
        raise InputError("the workload has no such key to set each load's rate at", field="qlm.rate_key", value=key)
    out = cfg.copy()
    OmegaConf.set_struct(out, False)
    OmegaConf.update(out, key, float(rate_qps), merge=True)
    return out


def run_point(cfg: DictConfig) -> tuple[dict, Any, Any]:
    """Simulate one configuration; returns (metrics, SimResult, the controller or None).

    Metrics (JSON-ready): num_requests; `attainment` per class and `overall` (the share of
    judged requests that met their SLO, `sim.qos`); throughput_rps (finished requests per
    second from the first arrival to the last finish) and goodput_rps (those that met their
    SLO, per the same second); num_model_swaps, swaps_per_hour (per simulated hour of the
    run), num_evictions, num_migrations; the controller's `stats()` when it has them; wall_s."""
    t0 = time.perf_counter()
    check_config(cfg)
    qos = QoS.from_config(cfg.slo)
    workload = instantiate(cfg.workload)
    workload.check_qos_classes(set(qos.tiers))
    controller = instantiate(cfg.controller) if cfg.get("controller") is not None else None
    res = simulate_config(cfg, workload.requests, progress=False, controller=controller)
    req = res.requests
    v = violations(req, qos)
    att = attainment_from_violations(v, qos)
    judged = v["has_tier"] & ~v["outcome"].isin(["rejected", "not_arrived"])
    fin = req["outcome"] == FINISHED
    span = float(req.loc[fin, "finish_s"].max() - req["arrival_s"].min()) if fin.any() else float("nan")
    met = int((judged & ~v["violated"]).sum())
    info = res.info or {}
    swaps = int(info.get("num_model_swaps", 0))
    hours = res.end_s / 3600 if res.end_s > 0 else float("nan")
    metrics: dict[str, Any] = {
        "num_requests": int(len(req)),
        "outcomes": {str(k): int(n) for k, n in req["outcome"].value_counts().items()},
        "attainment": {**{k: a["attainment"] for k, a in att.items()},
                       "overall": met / int(judged.sum()) if judged.any() else float("nan")},
        "throughput_rps": int(fin.sum()) / span if span > 0 else float("nan"),
        "goodput_rps": met / span if span > 0 else float("nan"),
        "num_model_swaps": swaps,
        "swaps_per_hour": swaps / hours if hours > 0 else float("nan"),
        "num_evictions": int(info.get("num_evictions", 0)),
        "num_migrations": int(info.get("num_migrations", 0)),
        "num_preemptions": int(req["num_preemptions"].sum()),
        "simulated_s": float(res.end_s),
    }
    stats = getattr(controller, "stats", None)
    if callable(stats):
        metrics["controller"] = stats()
    metrics["wall_s"] = time.perf_counter() - t0
    return metrics, res, controller


# ---------------------------------------------------------------- one part


def _loads(cfg: DictConfig) -> list[float | None]:
    q = cfg.get("qlm") or {}
    loads = q.get("loads")
    if not loads:
        return [None]
    base = q.get("base_qps")
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 0:
        raise InputError("must be a number > 0 (the rate of load 1.0)", field="qlm.base_qps", value=base)
    out = []
    for x in loads:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0:
            raise InputError("every load must be a number > 0", field="qlm.loads", value=list(loads))
        out.append(float(x))
    return out


def run_part(part: str, cfg: DictConfig, out_dir: Path) -> dict:
    """Every variant of the part's config at every load: points.csv, the attainment plot and
    what the part measures (timeseries for `bursty`, wait predictions for `estimator`)."""
    import matplotlib.pyplot as plt

    from analysis.qlm import (mape_by_position, plot_attainment_over_time, plot_attainment_vs_load,
                              plot_wait_estimates, quantile_calibration, wait_errors)

    out_dir.mkdir(parents=True, exist_ok=True)
    base = (cfg.get("qlm") or {}).get("base_qps")
    window_s = float((cfg.get("qlm") or {}).get("window_s", 120.0))
    step_s = float((cfg.get("qlm") or {}).get("step_s", 30.0))
    results: dict[str, dict] = {}
    rows, series, waits = [], [], {}
    arrivals = None
    if "controller" not in cfg:  # no controller selected: the key is absent, and a variant may set one
        cfg = cfg.copy()
        OmegaConf.set_struct(cfg, False)
        cfg.controller = None
    variants = variant_configs(cfg)
    chosen = (cfg.get("qlm") or {}).get("variants")
    if chosen is not None:
        unknown = [v for v in chosen if v not in variants]
        if unknown or not chosen:
            raise InputError(f"qlm.variants must name some of {list(variants)}", field="qlm.variants",
                             value=list(chosen))
        variants = {v: variants[v] for v in chosen}
    for label, vcfg in variants.items():
        OmegaConf.save(vcfg, out_dir / f"config_{label}.yaml")  # what ran (before each load's rate)
        results[label] = {}
        for load in _loads(cfg):
            rate = None if load is None else load * float(base)
            metrics, res, controller = run_point(_rate_cfg(vcfg, rate))
            key = "all" if load is None else f"{load:g}"
            results[label][key] = {"load": load, "rate_qps": rate, **metrics}
            rows.append({"variant": label, "load": load, "rate_qps": rate, "num_requests": metrics["num_requests"],
                         **{f"attainment_{k}": a for k, a in metrics["attainment"].items()},
                         "throughput_rps": metrics["throughput_rps"], "goodput_rps": metrics["goodput_rps"],
                         "swaps_per_hour": metrics["swaps_per_hour"], "num_evictions": metrics["num_evictions"],
                         "wall_s": metrics["wall_s"]})
            log.info("[%s %s load %s] attainment %s  goodput %.3f rps  swaps %d  (%d requests, %.1f s)", part, label,
                     key, {k: round(a, 3) for k, a in metrics["attainment"].items()}, metrics["goodput_rps"],
                     metrics["num_model_swaps"], metrics["num_requests"], metrics["wall_s"])
            qos = QoS.from_config(vcfg.slo)
            if part == "bursty":
                series.append(violation_timeseries(res.requests, qos, window_s=window_s, step_s=step_s)
                              .assign(variant=label))
                arrivals = {"arrivals": res.requests["arrival_s"].to_numpy()}
            preds = getattr(controller, "wait_predictions", None)
            if part == "estimator" and preds is not None:
                errors = wait_errors(pd.DataFrame(list(preds)), res.requests)
                errors.to_csv(out_dir / f"wait_predictions_{label}.csv", index=False)
                waits[label] = errors
                results[label][key]["estimator"] = {
                    "num_predictions": int(len(errors)),
                    "mape_by_position": mape_by_position(errors).to_dict(orient="records"),
                    "quantile_calibration": quantile_calibration(errors)}
    points = pd.DataFrame(rows)
    points.to_csv(out_dir / "points.csv", index=False)
    if points["load"].notna().any():
        plt.close(plot_attainment_vs_load(points, out_dir / "attainment_vs_load.png", title=part))
    if series:
        ts = pd.concat(series, ignore_index=True)
        ts.to_csv(out_dir / "timeseries.csv", index=False)
        plt.close(plot_attainment_over_time(ts, out_dir / "attainment_over_time.png", arrivals=arrivals,
                                            title=f"{part}: rolling {window_s:g} s window"))
    if waits:
        plt.close(plot_wait_estimates(waits, out_dir / "wait_estimates.png", title="waiting-time estimators"))
    elif part == "estimator":
        raise InputError("no variant of the estimator part recorded wait predictions (a QLM controller does)",
                         field="variants")
    return {"variants": results, "gains": gains(results)}


def gains(results: dict[str, dict]) -> dict:
    """QLM's relative gain over each baseline at each load: attainment per class and overall
    (qlm / baseline - 1; null where the baseline's is 0) and goodput, throughput likewise."""
    qlm = [v for v in results if v.startswith(QLM_PREFIX)]
    base = [v for v in results if not v.startswith(QLM_PREFIX)]
    out: dict[str, dict] = {}

    def rel(a: float, b: float) -> float | None:
        return a / b - 1 if b and math.isfinite(a) and math.isfinite(b) else None

    for q in qlm:
        for b in base:
            per_load = {}
            for load, m in results[q].items():
                mb = results[b].get(load)
                if mb is None:
                    continue
                per_load[load] = {
                    "attainment": {k: rel(a, mb["attainment"].get(k, float("nan"))) for k, a in m["attainment"].items()},
                    "goodput": rel(m["goodput_rps"], mb["goodput_rps"]),
                    "throughput": rel(m["throughput_rps"], mb["throughput_rps"]),
                }
            out[f"{q}_vs_{b}"] = per_load
    return out


# ---------------------------------------------------------------- all parts


def reproduce_qlm(parts: Sequence[str], overrides: Sequence[str] = (), out_dir: str | Path = "outputs/reproduce_qlm",
                  smoke: bool = False, smoke_overrides: dict[str, Sequence[str]] | None = None,
                  smoke_all: Sequence[str] = ()) -> dict:
    """Run `parts` (see PARTS) with `overrides` (after `smoke_all` and the part's
    `smoke_overrides` when `smoke`); write reproduction_qlm.json and reproduction_qlm.md."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise InputError(f"unknown part(s); use any of {list(PARTS)}", field="parts", value=list(unknown))
    if not parts:
        raise InputError(f"no part given; use any of {list(PARTS)}", field="parts", value=[])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"smoke": smoke, "overrides": list(overrides), "published": PUBLISHED, "parts": {}}
    t_all = time.perf_counter()
    for part in parts:
        extra = [*smoke_all, *(smoke_overrides or {}).get(part, [])] if smoke else []
        cfg = compose_part("config", [f"+experiment=qlm_{part}", *extra, *overrides])
        log.info("=== %s: qlm_%s (%s) ===", part, part, " ".join([*extra, *overrides]) or "as configured")
        t0 = time.perf_counter()
        result = run_part(part, cfg, out_dir / part)
        summary["parts"][part] = {"wall_s": time.perf_counter() - t0, **result}
    summary["wall_s"] = time.perf_counter() - t_all
    write_json(out_dir / "reproduction_qlm.json", summary)
    (out_dir / "reproduction_qlm.md").write_text(markdown(summary))
    log.info("QLM reproduction done in %.1f s: %s", summary["wall_s"], out_dir)
    return summary


def _pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, fmt)


def markdown(summary: dict) -> str:
    """The tables of docs/reproduction_qlm.md from a summary."""
    lines = ["# QLM reproduction results", "",
             f"Measured by `python -m experiments.reproduce_qlm` ({'smoke' if summary['smoke'] else 'full'} size; "
             f"overrides: {summary['overrides'] or 'none'}), {summary['wall_s'] / 60:.1f} min.", ""]
    for part, res in summary["parts"].items():
        variants = res["variants"]
        classes = list(dict.fromkeys(k for v in variants.values() for m in v.values() for k in m["attainment"]))
        lines += [f"## {part}", "", "| policy | load | rate (qps) | " + " | ".join(f"{c} SLO" for c in classes)
                  + " | throughput (req/s) | goodput (req/s) | swaps/h | evictions |",
                  "|---|---|---|" + "---|" * len(classes) + "---|---|---|---|"]
        for label, by_load in variants.items():
            for key, m in by_load.items():
                lines.append(f"| {label} | {key} | {_num(m['rate_qps'])} | "
                             + " | ".join(_pct(m["attainment"].get(c)) for c in classes)
                             + f" | {_num(m['throughput_rps'])} | {_num(m['goodput_rps'])} | "
                             f"{_num(m['swaps_per_hour'], '.0f')} | {m['num_evictions']} |")
        lines.append("")
        for label, by_load in variants.items():
            for key, m in by_load.items():
                est = m.get("estimator")
                if not est:
                    continue
                lines += [f"Estimator of `{label}` ({est['num_predictions']} predictions; quantile coverage "
                          f"{ {k: round(c, 3) for k, c in est['quantile_calibration'].items()} or 'n/a'}):", "",
                          "| queue position | predictions | MAPE (actual >= 1 s) | median APE | mean actual (s) | mean predicted (s) |",
                          "|---|---|---|---|---|---|"]
                lines += [f"| {r['position']} | {r['num_predictions']} | {_pct(r['mape'])} | {_pct(r['median_ape'])} | "
                          f"{_num(r['mean_actual_s'], '.1f')} | {_num(r['mean_predicted_s'], '.1f')} |"
                          for r in est["mape_by_position"]]
                lines.append("")
        if res.get("gains"):
            lines += ["QLM's relative gain (overall SLO attainment / goodput):", ""]
            for pair, per_load in res["gains"].items():
                cells = ", ".join(f"load {k}: {_pct(g['attainment'].get('overall'))} / {_pct(g['goodput'])}"
                                  for k, g in per_load.items())
                lines.append(f"- {pair}: {cells}")
            lines.append("")
    lines += [f"Paper: SLO attainment +{100 * PUBLISHED['slo_attainment_gain'][0]:.0f}-"
              f"{100 * PUBLISHED['slo_attainment_gain'][1]:.0f}%, throughput +{100 * PUBLISHED['throughput_gain'][0]:.0f}-"
              f"{100 * PUBLISHED['throughput_gain'][1]:.0f}% over the compared systems.", ""]
    return "\n".join(lines)


@hydra_app(config_path="../conf", config_name="reproduce_qlm", prog="experiments.reproduce_qlm")
def main(cfg: DictConfig) -> None:
    out_dir = Path(cfg.out_dir) if cfg.get("out_dir") else Path(HydraConfig.get().runtime.output_dir)
    reproduce_qlm(list(cfg.parts), list(cfg.overrides), out_dir, smoke=bool(cfg.smoke),
                  smoke_overrides=OmegaConf.to_container(cfg.smoke_overrides, resolve=True),
                  smoke_all=list(cfg.smoke_all))
    print("\n" + (out_dir / "reproduction_qlm.md").read_text())
    print(f"outputs: {out_dir}")


if __name__ == "__main__":
    main()
