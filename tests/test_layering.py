"""The simulator installs and runs without torch or vLLM: nothing outside profiler/ imports them."""

import subprocess
import sys

from sim.paths import PROJECT_ROOT


def test_simulator_and_apps_do_not_import_torch_or_vllm():
    code = ("import sys, sim.cluster, sim.metrics, analysis.plots, sim.workload, sim.costmodels, policies.fcfs, "
            "experiments.run, experiments.bench; "
            "bad = [m for m in ('torch', 'vllm', 'sklearn') if m in sys.modules]; print(bad); assert not bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _imports(path):
    """Top-level package names a Python file imports (absolute imports, at any nesting)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _package_files(package):
    return sorted((PROJECT_ROOT / package).rglob("*.py"))


def test_import_rules_of_the_layers():
    """ARCHITECTURE.md: policies never touch SimPy; sim/ never decides policy and never wires
    apps; nothing imports the Hydra apps in experiments/ (notebooks and libraries included)."""
    forbidden = {
        "policies": {"simpy", "experiments", "hydra"},
        "sim": {"policies", "experiments", "hydra", "torch", "vllm"},
        "profiler": {"experiments", "policies"},
    }
    broken = []
    for package, bad in forbidden.items():
        for path in _package_files(package):
            hit = _imports(path) & bad
            if hit:
                broken.append(f"{path.relative_to(PROJECT_ROOT)} imports {sorted(hit)}")
    for package in ("planner", "analysis"):
        for path in _package_files(package) if (PROJECT_ROOT / package).is_dir() else []:
            if "experiments" in _imports(path):
                broken.append(f"{path.relative_to(PROJECT_ROOT)} imports experiments")
    for nb in sorted((PROJECT_ROOT / "notebooks").glob("*.ipynb")):
        if "from experiments" in nb.read_text() or "import experiments" in nb.read_text():
            broken.append(f"{nb.relative_to(PROJECT_ROOT)} imports experiments")
    assert not broken, broken


def test_the_import_rule_check_sees_a_violation(tmp_path):
    bad = tmp_path / "p.py"
    bad.write_text("import os\nfrom simpy import Environment\ndef f():\n    import experiments.run\n")
    assert _imports(bad) == {"os", "simpy", "experiments"}
