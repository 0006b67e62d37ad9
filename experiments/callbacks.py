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


def collect_sweep(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per job directory under `sweep_dir` that has a summary.json."""
    from experiments.run import summary_table

    sweep_dir = Path(sweep_dir)
    summaries = {}
    for summary_path in sorted(sweep_dir.glob("*/summary.json"), key=lambda p: p.parent.name):
        overrides_path = summary_path.parent / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.load(overrides_path) if overrides_path.exists() else []
        label = ",".join(str(o) for o in overrides) or summary_path.parent.name
        summaries[label] = json.loads(summary_path.read_text())
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
        runs = {}
        for req_path in sorted(sweep_dir.glob("*/requests.parquet"), key=lambda p: p.parent.name):
            overrides_path = req_path.parent / ".hydra" / "overrides.yaml"
            overrides = OmegaConf.load(overrides_path) if overrides_path.exists() else []
            label = ",".join(str(o) for o in overrides) or req_path.parent.name
            runs[label] = pd.read_parquet(req_path, columns=["outcome", "ttft_s", "e2e_s"])
        if runs:
            from sim.plots import latency_cdfs

            latency_cdfs(runs, sweep_dir / "latency_cdf.png", title="Latency CDFs across the sweep")
        with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 3):
            print("\n=== sweep summary (" + str(sweep_dir) + ") ===")
            print(table.T.to_string())
        print(f"sweep table: {sweep_dir / 'sweep.csv'}; plot: {sweep_dir / 'latency_cdf.png'}")
