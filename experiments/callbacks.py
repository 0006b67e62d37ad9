"""Hydra callback: after a multirun, collect its jobs' summaries into one table.

Writes `sweep.csv` (one row a job, keyed by its overrides) and `latency_cdf.png` (all jobs
overlaid) into the sweep directory, and prints the table. Only the jobs of this multirun
count: a sweep directory reused by an earlier multirun keeps that run's job folders, which
are left out.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def job_labels(sweep_dir: Path, filename: str, job_dirs: Sequence[Path] | None = None) -> dict[str, Path]:
    """Label -> job directory for jobs that wrote `filename` (among `job_dirs`, default every
    folder of `sweep_dir`); a label lists the job's overrides minus those every job shares
    (e.g. `policy=sarathi`), so tables and legends stay short."""
    candidates = sweep_dir.glob(f"*/{filename}") if job_dirs is None else (Path(d) / filename for d in job_dirs)
    jobs = sorted((p.parent for p in candidates if p.is_file()), key=lambda d: d.name)
    overrides = {}
    for d in jobs:
        path, hydra_yaml = d / ".hydra" / "overrides.yaml", d / ".hydra" / "hydra.yaml"
        # settings that change no result (hydra.job.config.override_dirname.exclude_keys) stay out of labels
        skip = set(OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.job.config.override_dirname.exclude_keys",
                                    default=[]) or []) if hydra_yaml.exists() else set()
        given = [str(o) for o in OmegaConf.load(path)] if path.exists() else []
        overrides[d] = [o for o in given if o.split("=", 1)[0].lstrip("+~") not in skip]
    common = set.intersection(*(set(o) for o in overrides.values())) if len(jobs) > 1 else set()
    return {",".join(o for o in overrides[d] if o not in common) or d.name: d for d in jobs}


def collect_sweep(sweep_dir: str | Path, job_dirs: Sequence[Path] | None = None) -> pd.DataFrame:
    """One row per job directory (of `job_dirs`, default every one under `sweep_dir`) that
    has a summary.json."""
    from experiments.run import summary_table

    sweep_dir = Path(sweep_dir)
    summaries = {label: json.loads((d / "summary.json").read_text())
                 for label, d in job_labels(sweep_dir, "summary.json", job_dirs).items()}
    if not summaries:
        return pd.DataFrame()
    table = summary_table(summaries)
    table.index.name = "overrides"
    return table


class CollectSweep(Callback):
    """Collect a multirun's results into `sweep.csv` and a CDF overlay plot. Invariant: only
    the job folders this multirun's jobs ran in (recorded as each job ends) are read."""

    def __init__(self) -> None:
        self.job_dirs: list[Path] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.job_dirs = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        # the jobs run in this process with Hydra's basic launcher, the one this project uses
        if job_return.status == JobStatus.COMPLETED:
            self.job_dirs.append(Path(config.hydra.runtime.output_dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table = collect_sweep(sweep_dir, self.job_dirs)
        if table.empty:
            log.warning("no job of this multirun wrote a summary.json in %s", sweep_dir)
            return
        table.to_csv(sweep_dir / "sweep.csv")
        runs = {label: pd.read_parquet(d / "requests.parquet", columns=["outcome", "ttft_s", "e2e_s"])
                for label, d in job_labels(sweep_dir, "requests.parquet", self.job_dirs).items()}
        if runs:
            from analysis.plots import latency_cdfs

            latency_cdfs(runs, sweep_dir / "latency_cdf.png", title="Latency CDFs across the sweep")
        with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 3):
            print("\n=== sweep summary (" + str(sweep_dir) + ") ===")
            print(table.T.to_string())
        print(f"sweep table: {sweep_dir / 'sweep.csv'}; plot: {sweep_dir / 'latency_cdf.png'}")
