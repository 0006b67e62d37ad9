"""The run app: compose `conf/`, simulate one cluster on one workload, write tables and plots.

    python -m experiments.run                      # defaults: chat workload, 4 x Llama-3-8B/A100, FCFS
    python -m experiments.run policy=sarathi cluster.num_replicas=8 workload.arrival.rate_qps=20
    python -m experiments.run -m policy=fcfs,sarathi   # a sweep; collected into one table

Writes `requests.parquet`, `steps.parquet`, `replicas.csv`, `summary.json` (strict JSON:
NaN as null), `run.log` and PNG plots into Hydra's output directory. `run(cfg, out_dir)` is
the plain function behind `main`; tests and other apps call it directly. Bad input exits
with status 2 and one line (`experiments.app.hydra_app`).
"""

from __future__ import annotations

import logging
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from experiments.app import check_config, check_workload, hydra_app, workload_config, write_json
from experiments.wiring import replica_specs, simulate_config
from sim.cluster import SimResult
from sim.metrics import summarize
from sim.qos import QoS

log = logging.getLogger(__name__)


@dataclass
class RunOutput:
    """What one run produced (tables in memory plus where they were written)."""

    result: SimResult
    summary: dict[str, Any]
    workload_summary: dict[str, Any]
    out_dir: Path | None


def run(cfg: DictConfig, out_dir: str | Path | None = None, label: str = "") -> RunOutput:
    """Simulate the configured cluster on the configured workload; write outputs to `out_dir`
    (plot titles name `label`, e.g. the job's overrides). Raises InputError (or Hydra's
    InstantiationException around one) for bad input, before simulating where it can."""
    t0 = time.perf_counter()
    check_config(cfg)
    replicas = replica_specs(cfg)
    workload = instantiate(workload_config(cfg))
    warnings = check_workload(workload, cfg)
    wl = workload.summary()
    log.info("workload: %d requests from %s; left out %s; lengths changed to fit %s", wl["num_requests"],
             workload.source, wl["num_filtered"] or "none", wl["num_adjusted"] or "none")
    log.info("cluster: %d replicas (%s), policy %s, router %s, horizon %s", len(replicas),
             ", ".join(sorted({f"{s.model_spec_name or s.model or '?'} on {s.hardware or '?'}" for s in replicas})),
             cfg.policy.get("_target_", "?"), cfg.router.get("_target_", "?"), cfg.sim.get("horizon_s"))
    result = simulate_config(cfg, workload.requests, replicas=replicas)
    qos = QoS.from_config(cfg.slo) if cfg.get("slo") is not None else None
    summary = summarize(result.requests, result.steps, qos)
    log.info("outcomes: %s; rejected by reason: %s; %d engine steps, %.1f s simulated", summary["outcomes"],
             summary["reject_reasons"] or "none", result.info["num_steps"], result.end_s)
    summary["workload"] = wl
    summary["warnings"] = warnings
    summary["policy"] = str(cfg.policy.get("_target_", ""))
    summary["num_replicas"] = len(replicas)
    summary["wall_s"] = time.perf_counter() - t0
    summary["num_sim_steps"] = result.info["num_steps"]
    if "num_controller_wakes" in result.info:  # a cluster policy ran (sim.controlplane counters)
        summary["control"] = {k: v for k, v in result.info.items()
                              if k in ("num_stranded", "num_model_swaps", "num_reconfigurations", "num_evictions",
                                       "num_migrations", "num_replicas_added", "num_replicas_removed",
                                       "num_controller_wakes")}
        log.info("cluster control: %s", summary["control"])
    out = None
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result.requests.to_parquet(out / "requests.parquet", index=False)
        result.steps.to_parquet(out / "steps.parquet", index=False)
        result.replicas.to_csv(out / "replicas.csv", index=False)
        write_json(out / "summary.json", summary)
        if cfg.output.plots:
            from analysis.plots import latency_cdfs, timeseries

            name = cfg.policy.get("_target_", "run").rsplit(".", 1)[-1]
            about = textwrap.shorten(f"{name}, {label}" if label else name, width=150, placeholder=" ...")
            latency_cdfs({name: result.requests}, out / "latency_cdf.png", title=f"Latency CDFs: {about}")
            timeseries(result.steps, result.replicas, out / "timeseries.png", title=f"Replica state: {about}")
        log.info("outputs: %s", out)
    return RunOutput(result, summary, wl, out)


def summary_table(rows: dict[str, dict]) -> pd.DataFrame:
    """A compact table (one row per run label) of the headline numbers of summaries."""
    table = {}
    for label, s in rows.items():
        row = {
            "finished": s["outcomes"]["finished"],
            "rejected": s["outcomes"]["rejected"],
            "unfinished": s["outcomes"]["unfinished"],
            "not_arrived": s["outcomes"].get("not_arrived", 0),
            "ttft_p50_s": s["ttft_s"]["p50"], "ttft_p99_s": s["ttft_s"]["p99"],
            "tpot_p50_s": s["tpot_s"]["p50"], "tpot_p99_s": s["tpot_s"]["p99"],
            "tbt_p50_s": s["tbt_s"]["p50"], "tbt_p99_s": s["tbt_s"]["p99"],
            "e2e_p50_s": s["e2e_s"]["p50"], "e2e_p99_s": s["e2e_s"]["p99"],
            "req_per_s": s["throughput"]["requests_per_s"],
            "out_tok_per_s": s["throughput"]["output_tokens_per_s"],
        }
        for cls, att in s.get("slo_attainment", {}).items():
            if att.get("num_requests"):
                row[f"slo_{cls}"] = att["attainment"]  # rejected requests are counted apart, not as misses
        table[label] = row
    return pd.DataFrame.from_dict(table, orient="index").astype(float)  # summary.json's nulls -> NaN


@hydra_app(config_path="../conf", config_name="config", prog="experiments.run")
def main(cfg: DictConfig) -> float:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    label = HydraConfig.get().job.override_dirname
    output = run(cfg, out_dir, label=label)
    s = output.summary
    if cfg.output.print_summary:
        with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 3):
            print(f"\n{output.workload_summary.get('num_requests', '?')} requests from {s['workload']['source']}"
                  f" on {s['num_replicas']} replicas; simulated in {s['wall_s']:.2f} s wall"
                  f" ({s['num_sim_steps']} engine steps)")
            left_out = {**s["workload"]["num_filtered"], **s["workload"]["num_adjusted"]}
            if left_out:
                print(f"workload rows left out or changed: {left_out}")
            print(summary_table({label or "run": s}).T.to_string())
            if s["outcomes"]["rejected"]:
                print(f"rejected (never servable, counted apart from SLO misses): {s['reject_reasons']}")
            if "control" in s:
                print(f"cluster control: {s['control']}")
            for w in s["warnings"]:
                print(f"WARNING: {w}")
        print(f"outputs: {out_dir}")
    return float(s["e2e_s"]["p99"])


if __name__ == "__main__":
    main()
