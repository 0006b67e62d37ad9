"""Hydra callback: after a multirun, collect every job's summary into one table.

Writes `sweep.csv` (one row a job, keyed by its overrides) and `latency_cdf.png` (all jobs
overlaid) into the sweep directory, and prints the table.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def job_labels(sweep_dir: Path, filename: str) -> dict[str, Path]:
    """Label -> job directory for jobs that wrote `filename`; a label lists the job's overrides
    minus those every job shares (e.g. `policy=sarathi`), so tables and legends stay short."""
    jobs = sorted((p.parent for p in sweep_dir.glob(f"*/{filename}")), key=lambda d: d.name)
    overrides = {}
    for d in jobs:
        path = d / ".hydra" / "overrides.yaml"
        overrides[d] = [str(o) for o in OmegaConf.load(path)] if path.exists() else []
    common = set.intersection(*(set(o) for o in overrides.values())) if len(jobs) > 1 else set()
    return {",".join(o for o in overrides[d] if o not in common) or d.name: d for d in jobs}


def collect_sweep(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per job directory under `sweep_dir` that has a summary.json."""
    from experiments.run import summary_table

    sweep_dir = Path(sweep_dir)
    summaries = {label: json.loads((d / "summary.json").read_text())
                 for label, d in job_labels(sweep_dir, "summary.json").items()}
    if not summaries:
        return pd.DataFrame()
    table = summary_table(summaries)
    table.index.name = "overrides"
    return table


class CollectSweep(Callback):
    """Collect a multirun's results into `sweep.csv` and a CDF overlay plot."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table = collect_sweep(sweep_dir)
        if table.empty:
            log.warning("no job in %s wrote a summary.json", sweep_dir)
            return
        table.to_csv(sweep_dir / "sweep.csv")
        runs = {label: pd.read_parquet(d / "requests.parquet", columns=["outcome", "ttft_s", "e2e_s"])
                for label, d in job_labels(sweep_dir, "requests.parquet").items()}
        if runs:
            from sim.plots import latency_cdfs

            latency_cdfs(runs, sweep_dir / "latency_cdf.png", title="Latency CDFs across the sweep")
        with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 3):
            print("\n=== sweep summary (" + str(sweep_dir) + ") ===")
            print(table.T.to_string())
        print(f"sweep table: {sweep_dir / 'sweep.csv'}; plot: {sweep_dir / 'latency_cdf.png'}")
