"""The run app: compose `conf/`, simulate one cluster on one workload, write tables and plots.

    python -m experiments.run                      # defaults: chat workload, 4 x Llama-3-8B/A100, FCFS
    python -m experiments.run policy=sarathi cluster.num_replicas=8 workload.arrival.rate_qps=20
    python -m experiments.run -m policy=fcfs,sarathi   # a sweep; collected into one table

Writes `requests.parquet`, `steps.parquet`, `replicas.csv`, `summary.json`, `config.yaml`
and PNG plots into Hydra's output directory. `run(cfg, out_dir)` is the plain function
behind `main`; tests and other apps call it directly.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from experiments.wiring import replica_specs, simulate_config
from sim.cluster import SimResult
from sim.errors import InputError
from sim.metrics import summarize

log = logging.getLogger(__name__)


@dataclass
class RunOutput:
    """What one run produced (tables in memory plus where they were written)."""

    result: SimResult
    summary: dict[str, Any]
    workload_summary: dict[str, Any]
    out_dir: Path | None


def run(cfg: DictConfig, out_dir: str | Path | None = None) -> RunOutput:
    """Simulate the configured cluster on the configured workload; write outputs to `out_dir`."""
    t0 = time.perf_counter()
    workload = instantiate(cfg.workload)
    replicas = replica_specs(cfg)
    result = simulate_config(cfg, workload.requests, replicas=replicas)
    slos = OmegaConf.to_container(cfg.slo.classes, resolve=True) if cfg.get("slo") else None
    summary = summarize(result.requests, result.steps, slos)
    summary["workload"] = {"source": workload.source, "num_filtered": dict(workload.num_filtered)}
    summary["policy"] = str(cfg.policy.get("_target_", ""))
    summary["num_replicas"] = len(replicas)
    summary["wall_s"] = time.perf_counter() - t0
    summary["num_sim_steps"] = result.info["num_steps"]
    out = None
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result.requests.to_parquet(out / "requests.parquet", index=False)
        result.steps.to_parquet(out / "steps.parquet", index=False)
        result.replicas.to_csv(out / "replicas.csv", index=False)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=json_default))
        if cfg.output.plots:
            from sim.plots import latency_cdfs, timeseries

            label = cfg.policy.get("_target_", "run").rsplit(".", 1)[-1]
            latency_cdfs({label: result.requests}, out / "latency_cdf.png", title=f"{label}: latency CDFs")
            timeseries(result.steps, result.replicas, out / "timeseries.png", title=f"{label}: replica state")
    return RunOutput(result, summary, workload.summary(), out)


def summary_table(rows: dict[str, dict]) -> pd.DataFrame:
    """A compact table (one row per run label) of the headline numbers of summaries."""
    table = {}
    for label, s in rows.items():
        row = {
            "finished": s["outcomes"]["finished"],
            "rejected": s["outcomes"]["rejected"],
            "unfinished": s["outcomes"]["unfinished"],
            "ttft_p50_s": s["ttft_s"]["p50"], "ttft_p99_s": s["ttft_s"]["p99"],
            "tbt_p50_s": s["tbt_s"]["p50"], "tbt_p99_s": s["tbt_s"]["p99"],
            "e2e_p50_s": s["e2e_s"]["p50"], "e2e_p99_s": s["e2e_s"]["p99"],
            "req_per_s": s["throughput"]["requests_per_s"],
            "out_tok_per_s": s["throughput"]["output_tokens_per_s"],
        }
        for cls, att in s.get("slo_attainment", {}).items():
            if att.get("num_requests"):
                row[f"slo_{cls}"] = att["attainment"]
        table[label] = row
    return pd.DataFrame.from_dict(table, orient="index")


def explain_config_error(exc: BaseException) -> str:
    """One line for a bad config or input: the InputError behind Hydra's wrapper, with the config key."""
    key = ""
    for line in str(exc).splitlines():  # Hydra appends "full_key: <key>" to its message
        if line.startswith("full_key:"):
            key = line.split(":", 1)[1].strip()
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, InputError):
        cause = cause.__cause__
    msg = str(cause) if cause is not None else str(exc).splitlines()[0]
    return f"bad input in config '{key}': {msg}" if key else f"bad input: {msg}"


def json_default(o):
    """`json.dumps` fallback for numpy scalars and tuples."""
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        output = run(cfg, out_dir)
    except (InputError, InstantiationException) as exc:
        log.error("%s", explain_config_error(exc))
        raise SystemExit(2) from None
    s = output.summary
    if cfg.output.print_summary:
        label = HydraConfig.get().job.override_dirname or "run"
        with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 3):
            print(f"\n{output.workload_summary.get('num_requests', '?')} requests from {s['workload']['source']}"
                  f" on {s['num_replicas']} replicas; simulated in {s['wall_s']:.2f} s wall"
                  f" ({s['num_sim_steps']} engine steps)")
            print(summary_table({label: s}).T.to_string())
        print(f"outputs: {out_dir}")
    return float(s["e2e_s"]["p99"])


if __name__ == "__main__":
    main()
