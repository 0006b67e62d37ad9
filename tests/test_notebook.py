"""The SLO-attainment notebook runs end to end on a small output set generated here.

The outputs come from the reproduction experiment files themselves (capacity and surge),
run on a tiny trace written by the test, so no file outside the repository is needed.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from experiments.capacity import run_capacity
from experiments.reproduce import compose_part, run_surge
from sim.paths import PROJECT_ROOT

nbformat = pytest.importorskip("nbformat", reason="notebook runner not installed (pip install nbclient nbformat ipykernel)")
nbclient = pytest.importorskip("nbclient", reason="notebook runner not installed (pip install nbclient nbformat ipykernel)")
pytest.importorskip("ipykernel", reason="notebook kernel not installed (pip install ipykernel)")

NOTEBOOK = PROJECT_ROOT / "notebooks" / "slo_attainment.ipynb"


def write_trace(path) -> str:
    rng = np.random.default_rng(0)
    n = 400
    pd.DataFrame({"arrival_s": np.arange(n, dtype=float), "num_prompt_tokens": rng.integers(50, 1500, n),
                  "num_output_tokens": rng.integers(1, 120, n)}).to_csv(path, index=False)
    return str(path)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    trace = write_trace(root / "trace.csv")
    small = [f"workload.path={trace}", "workload.format=csv", "slo.classes.tier1.e2e_s=30", "slo.classes.tier2.e2e_s=60",
             "slo.classes.tier1.tbt_s=0.02", "slo.classes.tier2.tbt_s=0.02"]
    cap = compose_part("capacity", ["+experiment=repro_capacity_code", *small, "workload.duration_s=120",
                                    "~variants.srpf", "~variants.niyama_edf_order", "~variants.niyama_no_relegation",
                                    "~variants.niyama_fixed_chunk", "capacity.rel_tol=0.2", "capacity.growth=1.5"])
    run_capacity(cap, root / "capacity_small")
    surge = compose_part("config", ["+experiment=repro_surge", *small, "workload.duration_s=240",
                                    "workload.arrival.schedule=[[60,2.0],[60,6.0]]", "~variants.srpf",
                                    "surge.window_s=60", "surge.step_s=20"])
    run_surge(surge, root / "surge")
    return root


@pytest.mark.slow
def test_the_notebook_executes_on_a_small_output_set(results, monkeypatch):
    monkeypatch.setenv("SLOSIM_RESULTS", str(results))
    monkeypatch.setenv("PYTHONPATH", str(PROJECT_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(PROJECT_ROOT)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    # attainment (one capacity folder) + surge + CDFs (capacity and surge folders)
    assert len(images) >= 4
    text = "".join(o.get("text", "") for o in outputs)
    assert "capacity_small" in text and "surge" in text


PLAN_NOTEBOOK = PROJECT_ROOT / "notebooks" / "fleet_planning.ipynb"


@pytest.fixture(scope="module")
def small_plan(tmp_path_factory):
    """A two-candidate plan (A100 vs H100, 300 requests a simulation, one verification seed,
    the roofline's error band with two members, two new check seeds), written by the plan app."""
    from hydra import compose, initialize_config_dir

    from experiments.plan import run_plan

    out = tmp_path_factory.mktemp("plan")
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="plan", overrides=[
            "plan.rate_qps=3", "workload.num_requests=300", "plan.capacity_requests=300",
            "plan.verify.num_requests=300", "plan.verify.seeds=[1000]", "plan.check.seeds=[7]", "plan.progress=false",
            "uncertainty.num_members=2", "plan.capacity.rel_tol=0.1"])
    run_plan(cfg, out)
    return out


@pytest.mark.slow
def test_the_fleet_planning_notebook_executes_on_a_small_plan(small_plan, monkeypatch):
    monkeypatch.setenv("SLOSIM_PLAN", str(small_plan))
    monkeypatch.setenv("PYTHONPATH", str(PROJECT_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(PLAN_NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(PROJECT_ROOT)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # cost vs attainment with intervals; the winner's CDFs per class
    text = "".join(o.get("text", "") for o in outputs)
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert str(small_plan) in text and "winner:" in text and "interactive" in html
