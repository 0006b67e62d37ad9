"""Hydra callback: sweeps that survive failed jobs, resume, show progress and collect one table.

Every job of a multirun, under any launcher (basic, joblib, Ray: the callback runs wherever the
job runs), writes `job.json` into its folder as it ends: its number, its overrides, its status
(completed or failed) and, for a failed job, the error in one line. A failed job is recorded and
does not abort the sweep (Hydra's sweepers raise the first failure after a batch; the callback
marks the job done after recording it). Bad input (`InputError`) in a job of `experiments.run`
still ends the sweep with exit status 2: the run app exits from inside the job.

After the multirun, `sweep.csv` holds one row a job of this multirun (job folders whose
`job.json` was written after the multirun started; a sweep folder reused by an earlier multirun
keeps that run's folders, which are left out): the overrides as a label, one column per swept
parameter, status and error, then the job's results: a run's summary (`summary.json`), a
capacity search's capacities (`capacity.json`) or a plan's winner (`plan.json`). A latency CDF
overlay (`latency_cdf.png`) covers the runs that wrote requests. A progress bar counts jobs as
their `job.json` appears (polled, so parallel launchers count too).

Resume (our design): rerun the same sweep with `hydra.sweep.dir=<the killed sweep's folder>`;
`completed_job` tells an app that its folder already holds this job, completed with the same
overrides, and the capacity and plan apps then reuse its results instead of recomputing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import pandas as pd
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
"""What each job of a multirun leaves in its folder: num, overrides, status, error, ended_at_s."""


def job_labels(sweep_dir: Path, filename: str, job_dirs: Sequence[Path] | None = None) -> dict[str, Path]:
    """Label -> job directory for jobs that wrote `filename` (among `job_dirs`, default every
    folder of `sweep_dir`); a label lists the job's overrides minus those every job shares
    (e.g. `policy=sarathi`), so tables and legends stay short."""
    candidates = sweep_dir.glob(f"*/{filename}") if job_dirs is None else (Path(d) / filename for d in job_dirs)
    return _labels(sorted((p.parent for p in candidates if p.is_file()), key=_job_order))


def _labels(jobs: Sequence[Path]) -> dict[str, Path]:
    overrides = {d: _label_overrides(d) for d in jobs}
    common = set.intersection(*(set(o) for o in overrides.values())) if len(jobs) > 1 else set()
    return {",".join(o for o in overrides[d] if o not in common) or d.name: d for d in jobs}


def _job_order(d: Path) -> tuple:
    return (0, int(d.name), "") if d.name.isdigit() else (1, 0, d.name)


def _label_overrides(d: Path) -> list[str]:
    """A job's overrides, less settings that change no result (hydra.job.config.override_dirname.exclude_keys)."""
    path, hydra_yaml = d / ".hydra" / "overrides.yaml", d / ".hydra" / "hydra.yaml"
    skip = set(OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.job.config.override_dirname.exclude_keys",
                                default=[]) or []) if hydra_yaml.exists() else set()
    given = [str(o) for o in OmegaConf.load(path)] if path.exists() else []
    return [o for o in given if o.split("=", 1)[0].lstrip("+~") not in skip]


def swept_columns(overrides: Sequence[str]) -> dict[str, str]:
    """One column per overridden parameter: `policy=sarathi` -> {"policy": "sarathi"}."""
    out = {}
    for o in overrides:
        key, _, value = o.partition("=")
        out[key.lstrip("+~")] = value
    return out


def read_job(job_dir: Path) -> dict | None:
    """A job folder's job.json, or None."""
    p = Path(job_dir) / JOB_FILE
    return json.loads(p.read_text()) if p.is_file() else None


def completed_job(output_dir: str | Path, overrides: Sequence[str], result_file: str) -> bool:
    """Whether `output_dir` holds this job already completed (job.json: completed, the same
    overrides) with its `result_file`: a resumed sweep may reuse it."""
    job = read_job(Path(output_dir))
    return bool(job and job.get("status") == "completed" and list(job.get("overrides", [])) == list(overrides)
                and (Path(output_dir) / result_file).is_file())


class JobFailed(RuntimeError):
    """Bad input met by one job of a multirun: raised instead of the app's exit (status 2) so
    that the sweep records the job as failed and goes on."""


@contextlib.contextmanager
def sweep_job(result_file: str) -> Iterator[bool]:
    """Around an app's work in a Hydra job: yields whether a resumed multirun already holds
    this job's `result_file` (`completed_job`; the app then reads it instead of recomputing),
    and in a multirun turns bad input into `JobFailed` (recorded by `CollectSweep`, the sweep
    goes on). Outside a multirun it changes nothing."""
    from hydra.core.hydra_config import HydraConfig

    from experiments.app import USER_ERRORS
    from sim.errors import explain

    hc = HydraConfig.get() if HydraConfig.initialized() else None
    multirun = hc is not None and hc.mode == RunMode.MULTIRUN
    resumed = multirun and completed_job(hc.runtime.output_dir, list(hc.overrides.task), result_file)
    if resumed:
        log.info("resumed: job %s already completed in %s (%s)", hc.job.num, hc.runtime.output_dir, result_file)
    try:
        yield bool(resumed)
    except USER_ERRORS as exc:
        if not multirun:
            raise
        raise JobFailed(explain(exc)) from None


def sweep_jobs(sweep_dir: Path, since_s: float | None = None) -> list[Path]:
    """Job folders of `sweep_dir` with a job.json (ended at or after `since_s`, if given), in job order."""
    out = []
    for p in Path(sweep_dir).glob(f"*/{JOB_FILE}"):
        job = json.loads(p.read_text())
        if since_s is None or job.get("ended_at_s", 0) >= since_s:
            out.append(p.parent)
    return sorted(out, key=_job_order)


def _result_columns(d: Path) -> dict[str, Any]:
    """A job's results as flat columns: capacity.json or plan.json (run summaries are added apart)."""
    if (d / "capacity.json").is_file():
        cap = json.loads((d / "capacity.json").read_text())
        caps = cap.get("capacity_qps", {})
        if len(caps) == 1:
            (label, q), = caps.items()
            return {"capacity_qps": q, "capacity_status": cap["variants"][label]["status"]}
        return {f"capacity_qps[{k}]": v for k, v in caps.items()}
    if (d / "plan.json").is_file():
        plan = json.loads((d / "plan.json").read_text())
        w = plan.get("winner") or {}
        return {"winner": w.get("label"), "replicas": "+".join(map(str, w.get("replicas", []))) or None,
                "gpus": w.get("gpus"), "usd_per_hour": w.get("cost_per_hour"), "p_meet": w.get("p_meet"),
                "num_simulations": plan.get("counts", {}).get("num_simulations")}
    return {}


def collect_sweep(sweep_dir: str | Path, job_dirs: Sequence[Path] | None = None) -> pd.DataFrame:
    """One row per job directory (of `job_dirs`, default every one under `sweep_dir` with a
    job.json or a summary.json), indexed by its overrides label: one column per swept parameter,
    status and error, then its results (run summary, capacities or plan winner)."""
    from experiments.run import summary_table

    sweep_dir = Path(sweep_dir)
    if job_dirs is None:
        job_dirs = sorted({p.parent for pattern in (f"*/{JOB_FILE}", "*/summary.json") for p in sweep_dir.glob(pattern)},
                          key=_job_order)
    job_dirs = [Path(d) for d in job_dirs]
    if not job_dirs:
        return pd.DataFrame()
    labels = {d: label for label, d in _labels(job_dirs).items()}
    summaries = {labels.get(d, d.name): json.loads((d / "summary.json").read_text())
                 for d in job_dirs if (d / "summary.json").is_file()}
    runs = summary_table(summaries) if summaries else pd.DataFrame()
    rows = {}
    for d in job_dirs:
        label = labels.get(d, d.name)
        job = read_job(d) or {"status": "completed" if label in summaries else "unknown"}
        rows[label] = {"job": int(d.name) if d.name.isdigit() else d.name, **swept_columns(_label_overrides(d)),
                       "status": job.get("status"), "error": job.get("error"), **_result_columns(d)}
    table = pd.DataFrame.from_dict(rows, orient="index")
    if len(runs):
        table = table.join(runs)
    table.index.name = "overrides"
    return table


def _sweep_size(config: DictConfig) -> int | None:
    """Jobs the basic or a launcher's sweep will run: the product of the sweep lists' lengths
    (command line and hydra.sweeper.params), or None when that cannot be read."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        given = [str(o) for o in config.hydra.overrides.task]
        params = config.hydra.sweeper.get("params") or {}
        given += [f"{k}={v}" for k, v in params.items()]
        n = 1
        for o in OverridesParser.create().parse_overrides(given):
            if o.is_sweep_override():
                n *= len(list(o.sweep_string_iterator()))
        return n
    except Exception:  # a sweeper of another kind (e.g. an optimiser): no total
        return None


class CollectSweep(Callback):
    """Record each job (job.json), keep a failed job from aborting the sweep, count jobs on a
    progress bar, and collect this multirun's jobs into `sweep.csv` and a CDF overlay plot.
    Invariant: only jobs whose job.json was written after this multirun started are collected."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def __getstate__(self) -> dict:
        # parallel launchers ship the callbacks to their workers: the progress thread stays here
        return {**self.__dict__, "_stop": None, "_thread": None}

    # ---- in the process that runs the sweep

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.t0 = time.time()
        total = _sweep_size(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._progress, args=(sweep_dir, total), daemon=True)
        self._thread.start()

    def _progress(self, sweep_dir: Path, total: int | None) -> None:
        from tqdm import tqdm

        with tqdm(total=total, desc="sweep", unit="job", leave=False, mininterval=2.0) as bar:
            while not self._stop.wait(0.5):
                done = len(sweep_jobs(sweep_dir, self.t0)) if sweep_dir.is_dir() else 0
                if done > bar.n:  # redraw on progress only (logs stay readable)
                    bar.update(done - bar.n)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=2)
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = sweep_jobs(sweep_dir, self.t0)
        table = collect_sweep(sweep_dir, jobs)
        if table.empty:
            log.warning("no job of this multirun finished in %s", sweep_dir)
            return
        table.to_csv(sweep_dir / "sweep.csv")
        failed = table[table["status"] == "failed"]
        runs = {label: pd.read_parquet(d / "requests.parquet", columns=["outcome", "ttft_s", "e2e_s"])
                for label, d in job_labels(sweep_dir, "requests.parquet", jobs).items()}
        if runs:
            from analysis.plots import latency_cdfs

            latency_cdfs(runs, sweep_dir / "latency_cdf.png", title="Latency CDFs across the sweep")
        with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 3):
            print("\n=== sweep summary (" + str(sweep_dir) + ") ===")
            print(table.drop(columns=["error"]).T.to_string())
        for label, row in failed.iterrows():
            print(f"FAILED job {row['job']} ({label}): {row['error']}")
        print(f"sweep table: {sweep_dir / 'sweep.csv'}" + (f"; plot: {sweep_dir / 'latency_cdf.png'}" if runs else ""))

    # ---- wherever the job runs (a joblib or Ray worker included)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:  # a single run keeps Hydra's own error handling
            return
        out_dir = Path(config.hydra.runtime.output_dir)
        failed = job_return.status == JobStatus.FAILED
        error = None
        if failed:
            exc = job_return._return_value
            error = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:2000]
            log.error("job %s failed (recorded in %s; the sweep goes on): %s", config.hydra.job.num,
                      out_dir / JOB_FILE, error)
            # the sweeper raises a failed job's exception after its batch, ending the sweep:
            # the failure is recorded here instead and the job counts as done
            job_return.status = JobStatus.COMPLETED
            job_return.return_value = None
        if out_dir.is_dir() or failed:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / JOB_FILE).write_text(json.dumps({
                "num": int(config.hydra.job.get("num", 0) or 0),
                "overrides": [str(o) for o in config.hydra.overrides.task],
                "status": "failed" if failed else "completed", "error": error,
                "app": str(config.hydra.job.get("name", "")), "ended_at_s": time.time()}, indent=2))
