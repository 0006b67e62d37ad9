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


FORBIDDEN = {
    "policies": {"simpy", "experiments", "hydra"},
    "sim": {"policies", "planner", "analysis", "experiments", "hydra", "omegaconf", "matplotlib", "torch", "vllm"},
    "planner": {"experiments", "hydra", "omegaconf", "analysis", "matplotlib"},
    "analysis": {"experiments", "hydra", "planner"},
    "profiler": {"experiments", "policies"},
}
"""Package -> top-level packages it must not import (ARCHITECTURE.md, "Where things live")."""


def test_import_rules_of_the_layers():
    """ARCHITECTURE.md: policies never touch SimPy; sim/ is mechanism only (never decides policy,
    wires apps, reads their outputs or plots); planner/ is a library without Hydra; analysis/
    reads outputs without running apps; nothing imports the Hydra apps in experiments/
    (notebooks and libraries included)."""
    broken = []
    for package, bad in FORBIDDEN.items():
        files = _package_files(package)
        assert files, f"no Python files under {package}/: the rule would check nothing"
        for path in files:
            hit = _imports(path) & bad
            if hit:
                broken.append(f"{path.relative_to(PROJECT_ROOT)} imports {sorted(hit)}")
    for nb in sorted((PROJECT_ROOT / "notebooks").glob("*.ipynb")):
        if "from experiments" in nb.read_text() or "import experiments" in nb.read_text():
            broken.append(f"{nb.relative_to(PROJECT_ROOT)} imports experiments")
    assert not broken, broken


def test_the_import_rule_check_sees_a_violation(tmp_path):
    bad = tmp_path / "p.py"
    bad.write_text("import os\nfrom simpy import Environment\ndef f():\n    import experiments.run\n")
    assert _imports(bad) == {"os", "simpy", "experiments"}
