"""The simulator installs and runs without torch or vLLM: nothing outside profiler/ imports them."""

import subprocess
import sys

from sim.paths import PROJECT_ROOT


def test_simulator_and_apps_do_not_import_torch_or_vllm():
    code = ("import sys, sim.cluster, sim.metrics, sim.plots, sim.workload, sim.costmodels, policies.fcfs, "
            "experiments.run, experiments.bench; "
            "bad = [m for m in ('torch', 'vllm', 'sklearn') if m in sys.modules]; print(bad); assert not bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
