"""Reproduce Niyama's (QoServe's) published claims in simulation: three experiments, one command.

    python -m experiments.reproduce                       # all parts (about 20 min on one core)
    python -m experiments.reproduce parts=[surge]         # one part
    python -m experiments.reproduce smoke=true            # tiny version (seconds; what the tests run)
    python -m experiments.reproduce 'overrides=["capacity.jobs=2"]'   # extra overrides for every part

Parts (each an experiment file in conf/experiment/, also runnable on its own):
- capacity_code, capacity_conv: `repro_capacity_{code,conv}`, capacity of one replica per policy;
- siloed: `repro_siloed`, a shared Niyama cluster vs every siloed split of the same replicas;
- surge: `repro_surge`, 2.0/5.0 QPS alternating every 15 min for 4 h on one replica;
- surge_scaled: `repro_surge_scaled`, the same with both rates x 1.266 (our vs the paper's capacity).
Writes into the output directory: one folder per part (capacity.json, plots, request tables),
`reproduction.json` ({trace: {policy: capacity_qps}}), `shared_vs_siloed.json`,
`surge.json`, `surge_scaled.json` and `reproduction.md` (the tables of docs/reproduction.md).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from experiments.app import check_config, hydra_app, write_json
from experiments.capacity import run_capacity, variant_configs
from experiments.wiring import simulate_config
from sim.errors import InputError
from sim.paths import PROJECT_ROOT
from sim.qos import QoS, rates_from_violations, violation_timeseries, violations

log = logging.getLogger(__name__)

PARTS: dict[str, tuple[str, str]] = {
    "capacity_code": ("capacity", "repro_capacity_code"),
    "capacity_conv": ("capacity", "repro_capacity_conv"),
    "siloed": ("capacity", "repro_siloed"),
    "surge": ("config", "repro_surge"),
    "surge_scaled": ("config", "repro_surge_scaled"),
}
"""Part -> (primary config, experiment file)."""

TRACE_OF_PART = {"capacity_code": "azure_code", "capacity_conv": "azure_conv"}

PUBLISHED = {
    "capacity_qps": {"azure_code": {"fcfs": 1.9, "edf": 2.9, "niyama": 4.1},
                     "azure_conv": {"fcfs": 2.9, "edf": 3.9, "niyama": 4.7}},
    "shared_vs_siloed_gain": 0.32,
    "surge": {"niyama": {"tier0": 0.0, "overall": 0.0875}},
}
"""The paper's numbers (design/POLICIES.md), shown beside ours."""


def compose_part(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """Compose conf/<config_name>.yaml with `overrides`, inside or outside a Hydra app."""
    if GlobalHydra.instance().is_initialized():
        return compose(config_name=config_name, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


# ---------------------------------------------------------------- surge


def run_surge(cfg: DictConfig, out_dir: str | Path | None = None) -> dict:
    """Simulate each variant once on the configured (surge) workload; violations per tier,
    overall, and a rolling violation rate by arrival time. Writes surge.json,
    surge_timeseries.csv, surge_violations.png and requests_<label>.parquet into `out_dir`."""
    window_s = float(cfg.surge.get("window_s", 300.0))
    step_s = float(cfg.surge.get("step_s", 60.0))
    results, series, tables = {}, [], {}
    for label, vcfg in variant_configs(cfg).items():
        t0 = time.perf_counter()
        check_config(vcfg)
        qos = QoS.from_config(vcfg.slo)
        workload = instantiate(vcfg.workload)
        workload.check_qos_classes(set(qos.tiers))
        res = simulate_config(vcfg, workload.requests, progress=False)
        v = violations(res.requests, qos)
        rates = rates_from_violations(v, qos)
        ts = violation_timeseries(res.requests, qos, window_s=window_s, step_s=step_s).assign(variant=label)
        series.append(ts)
        tables[label] = res.requests.drop(columns=["token_steps"])
        results[label] = {
            "overall": rates["overall"], "max_tier": rates["max_tier"],
            "tiers": {k: t["violation_rate"] for k, t in rates["tiers"].items()},
            "num_requests": rates["num_requests"], "num_violations": rates["num_violations"],
            "num_relegated": rates["num_relegated"],
            "num_relegated_by_tier": {k: t["num_relegated"] for k, t in rates["tiers"].items()},
            "peak_rolling_overall": float(np.nanmax(ts.loc[ts["tier"] == "overall", "violation_rate"])),
            "wall_s": time.perf_counter() - t0,
        }
        log.info("[surge %s] overall %.4f  %s  relegated %d  (%d requests, %.1f s)", label, rates["overall"],
                 " ".join(f"{k}={t['violation_rate']:.4f}" for k, t in rates["tiers"].items()),
                 rates["num_relegated"], rates["num_requests"], results[label]["wall_s"])
    out = {"window_s": window_s, "step_s": step_s,
           "schedule": OmegaConf.to_container(cfg.workload.get("arrival"), resolve=True),
           "variants": results}
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "surge.json", out)
        pd.concat(series, ignore_index=True).to_csv(out_dir / "surge_timeseries.csv", index=False)
        for label, table in tables.items():
            table.to_parquet(out_dir / f"requests_{label}.parquet", index=False)
        import matplotlib.pyplot as plt

        from analysis.results import plot_surge

        plt.close(plot_surge(pd.concat(series, ignore_index=True), out_dir / "surge_violations.png",
                             schedule=out["schedule"]))
    return out


# ---------------------------------------------------------------- all parts


def reproduce(parts: Sequence[str], overrides: Sequence[str] = (), out_dir: str | Path = "outputs/reproduce",
              smoke: bool = False, smoke_overrides: dict[str, Sequence[str]] | None = None,
              smoke_all: Sequence[str] = ()) -> dict:
    """Run `parts` (see PARTS) with `overrides` (after `smoke_all` and the part's
    `smoke_overrides` when `smoke`); write every output and the summary files."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise InputError(f"unknown part(s); use any of {list(PARTS)}", field="parts", value=unknown)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"parts": {}, "smoke": smoke, "overrides": list(overrides)}
    t_all = time.perf_counter()
    for part in parts:
        config_name, experiment = PARTS[part]
        extra = [*smoke_all, *(smoke_overrides or {}).get(part, [])] if smoke else []
        cfg = compose_part(config_name, [f"+experiment={experiment}", *extra, *overrides])
        t0 = time.perf_counter()
        log.info("=== %s: %s (%s) ===", part, experiment, " ".join([*extra, *overrides]) or "as configured")
        if config_name == "capacity":
            result = run_capacity(cfg, out_dir / part)
        else:
            result = run_surge(cfg, out_dir / part)
        summary["parts"][part] = {"wall_s": time.perf_counter() - t0, "result": result}
    summary["wall_s"] = time.perf_counter() - t_all
    write_summaries(summary, out_dir)
    log.info("reproduction done in %.1f s: %s", summary["wall_s"], out_dir)
    return summary


def write_summaries(summary: dict, out_dir: Path) -> None:
    """reproduction.json, shared_vs_siloed.json, surge.json and reproduction.md from the parts' results."""
    parts = summary["parts"]
    capacities = {TRACE_OF_PART[p]: r["result"]["capacity_qps"] for p, r in parts.items() if p in TRACE_OF_PART}
    if capacities:
        write_json(out_dir / "reproduction.json", capacities)
    lines = ["# Reproduction results", "",
             f"Measured by `python -m experiments.reproduce` ({'smoke' if summary['smoke'] else 'full'} size; "
             f"overrides: {summary['overrides'] or 'none'}), {summary['wall_s'] / 60:.1f} min.", ""]
    for trace, caps in capacities.items():
        pub = PUBLISHED["capacity_qps"].get(trace, {})
        lines += [f"## Capacity, {trace} (QPS at <= 1% violations, worst tier)", "",
                  "| policy | capacity (QPS) | x FCFS | paper (QPS) |", "|---|---|---|---|"]
        base = caps.get("fcfs") or float("nan")
        for label, cap in caps.items():
            lines.append(f"| {label} | {cap:.2f} | {cap / base:.2f} | {pub.get(label, '')} |")
        lines.append("")
    if "siloed" in parts:
        res = parts["siloed"]["result"]
        best = res["best_split"]
        shared = res["capacity_qps"]["shared"]
        gain = shared / best["capacity_qps"] - 1 if best["capacity_qps"] > 0 else float("nan")
        siloed = {"shared_qps": shared, "best_split": best, "splits": {k: v for k, v in res["capacity_qps"].items() if k != "shared"},
                  "gain": gain, "paper_gain": PUBLISHED["shared_vs_siloed_gain"]}
        write_json(out_dir / "shared_vs_siloed.json", siloed)
        lines += ["## Shared (Niyama) vs siloed pools", "", "| configuration | capacity (QPS) |", "|---|---|",
                  f"| shared, Niyama | {shared:.2f} |"]
        lines += [f"| {k} | {v:.2f} |" for k, v in siloed["splits"].items()]
        lines += ["", f"Shared vs best siloed split ({best['variant']}): {100 * gain:+.0f}% (paper: +32%).", ""]
    for part in ("surge", "surge_scaled"):
        if part not in parts:
            continue
        res = parts[part]["result"]
        write_json(out_dir / f"{part}.json", res)
        tiers = sorted({t for v in res["variants"].values() for t in v["tiers"]})
        rates = "/".join(f"{r:g}" for _, r in (res.get("schedule") or {}).get("schedule", []))
        lines += [f"## Surge, {part} ({rates} QPS alternating, one replica): violating requests", "",
                  "| policy | overall | " + " | ".join(tiers) + " | relegated | peak window |",
                  "|---|---|" + "---|" * len(tiers) + "---|---|"]
        for label, v in res["variants"].items():
            lines.append(f"| {label} | {100 * v['overall']:.2f}% | "
                         + " | ".join(f"{100 * v['tiers'][t]:.2f}%" for t in tiers)
                         + f" | {v['num_relegated']} | {100 * v['peak_rolling_overall']:.0f}% |")
        lines += ["", "Paper (2.0/5.0 QPS): baselines collapse; Niyama 0% tier-0 violations, ~8.75% overall.", ""]
    (out_dir / "reproduction.md").write_text("\n".join(lines))


@hydra_app(config_path="../conf", config_name="reproduce", prog="experiments.reproduce")
def main(cfg: DictConfig) -> None:
    out_dir = Path(cfg.out_dir) if cfg.get("out_dir") else Path(HydraConfig.get().runtime.output_dir)
    reproduce(list(cfg.parts), list(cfg.overrides), out_dir, smoke=bool(cfg.smoke),
              smoke_overrides=OmegaConf.to_container(cfg.smoke_overrides, resolve=True),
              smoke_all=list(cfg.smoke_all))
    md = out_dir / "reproduction.md"
    if md.exists():
        print("\n" + md.read_text())
    print(f"outputs: {out_dir}")


if __name__ == "__main__":
    main()
