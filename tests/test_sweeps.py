"""Sweeps that scale out (experiments/callbacks.py): a failed job is recorded and the sweep goes
on, a killed sweep resumes from the jobs already written, sweep.csv has one column per swept
parameter, and the same holds under the joblib launcher and Ray's (local mode)."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

import os

from experiments.callbacks import collect_sweep, completed_job, swept_columns
from sim.paths import PROJECT_ROOT

SMALL = ["workload.num_requests=200", "capacity.rel_tol=0.2", "output.plots=false"]


def app(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_swept_columns_split_overrides():
    assert swept_columns(["policy=sarathi", "+x.y=3", "~z="]) == {"policy": "sarathi", "x.y": "3", "z": ""}


def test_a_failed_job_is_recorded_the_sweep_goes_on_and_a_rerun_resumes(tmp_path):
    args = ["experiments.capacity", "-m", "capacity.qps_start=2,-1", *SMALL, f"hydra.sweep.dir={tmp_path}"]
    first = app(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    table = pd.read_csv(tmp_path / "sweep.csv")
    assert table["overrides"].tolist() == ["capacity.qps_start=2", "capacity.qps_start=-1"]
    assert table["capacity.qps_start"].tolist() == [2, -1]  # one column per swept parameter
    assert table["status"].tolist() == ["completed", "failed"]
    assert table["capacity_qps"].iloc[0] > 2 and pd.isna(table["capacity_qps"].iloc[1])
    assert "capacity.qps_start" in table["error"].iloc[1] and "-1" in table["error"].iloc[1]
    failed = json.loads((tmp_path / "1" / "job.json").read_text())
    assert failed["status"] == "failed" and "capacity.qps_start=-1" in failed["overrides"]
    assert "FAILED job 1" in first.stdout
    done = (tmp_path / "0" / "capacity.json").stat().st_mtime_ns
    second = app(*args)  # the same sweep into the same folder: job 0 is reused, job 1 runs (and fails) again
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed: job 0 already completed" in second.stdout + second.stderr
    assert (tmp_path / "0" / "capacity.json").stat().st_mtime_ns == done
    again = pd.read_csv(tmp_path / "sweep.csv")
    assert again["capacity_qps"].iloc[0] == table["capacity_qps"].iloc[0]
    assert again["status"].tolist() == ["completed", "failed"]


def test_only_a_completed_job_with_the_same_overrides_and_its_result_is_reused(tmp_path):
    (tmp_path / "job.json").write_text(json.dumps({"status": "completed", "overrides": ["a=1", "b=2"]}))
    assert not completed_job(tmp_path, ["a=1", "b=2"], "capacity.json")  # no result file
    (tmp_path / "capacity.json").write_text("{}")
    assert completed_job(tmp_path, ["a=1", "b=2"], "capacity.json")
    assert not completed_job(tmp_path, ["a=1", "b=3"], "capacity.json")
    assert not completed_job(tmp_path, ["b=2", "a=1"], "capacity.json")  # another job number's order
    (tmp_path / "job.json").write_text(json.dumps({"status": "failed", "overrides": ["a=1", "b=2"]}))
    assert not completed_job(tmp_path, ["a=1", "b=2"], "capacity.json")
    assert not completed_job(tmp_path / "nowhere", [], "capacity.json")


def test_joblib_launcher_runs_the_jobs_in_worker_processes_and_collects_them(tmp_path):
    proc = app("experiments.run", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "policy=fcfs,sarathi",
               "workload.num_requests=30", "sim.progress=false", "output.plots=false", "output.print_summary=false",
               f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(tmp_path / "sweep.csv")
    assert table["policy"].tolist() == ["fcfs", "sarathi"] and table["finished"].tolist() == [30, 30]
    pids = {json.loads((tmp_path / d / "job.json").read_text())["status"] for d in ("0", "1")}
    assert pids == {"completed"}


def test_collect_sweep_reads_plan_jobs(tmp_path):
    job = tmp_path / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- plan.rate_qps=5\n")
    (job / "job.json").write_text(json.dumps({"status": "completed", "overrides": ["plan.rate_qps=5"]}))
    (job / "plan.json").write_text(json.dumps({"winner": {"label": "m/fcfs/shared/h100-80gb-tp1", "replicas": [2],
                                                          "gpus": 2, "cost_per_hour": 13.76, "p_meet": 1.0},
                                               "counts": {"num_simulations": 61}}))
    row = collect_sweep(tmp_path).iloc[0]
    assert (row["plan.rate_qps"], row["replicas"], row["usd_per_hour"], row["num_simulations"]) == ("5", "2", 13.76, 61)


@pytest.mark.skipif(not os.environ.get("SLOSIM_TEST_RAY"), reason="~35 s: `make test-ray` (SLOSIM_TEST_RAY=1)")
def test_ray_launcher_in_local_mode(tmp_path):
    """The Ray launcher (hydra-ray-launcher) starts a local Ray instance and runs the jobs as Ray
    tasks; on a cluster, `hydra.launcher.ray.init.address=<head>` is the only change."""
    pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="the ray extra is not installed (pip install -e '.[ray]')")
    proc = app("experiments.capacity", "-m", "hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2",
               "+hydra.launcher.ray.init.include_dashboard=false", "capacity.qps_start=2,-1", *SMALL,
               f"hydra.sweep.dir={tmp_path}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(tmp_path / "sweep.csv")
    assert table["status"].tolist() == ["completed", "failed"] and table["capacity_qps"].iloc[0] > 2
