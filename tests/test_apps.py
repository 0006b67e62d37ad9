"""What the Hydra apps promise a user: bad input ends as one line and exit status 2 (never a
traceback, never a leftover empty output folder), each app's --help describes that app, a
multirun collects only its own jobs, and the outputs say what happened (strict JSON, run.log,
requests arriving after the horizon counted apart)."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from experiments.run import run, summary_table
from sim.paths import PROJECT_ROOT

PLAIN_CSV = "arrival_s,num_prompt_tokens,num_output_tokens,model,qos_class\n"
QUIET = ["sim.progress=false", "output.plots=false"]


def app(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=timeout)


def compose_run(*overrides: str):
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def gold_trace(tmp_path):
    path = tmp_path / "gold.csv"
    path.write_text(PLAIN_CSV + "0.0,100,10,,interactive\n0.5,100,10,,gold\n1.0,100,10,,batch\n")
    return path


# (app, arguments, words the one line must hold); `{trace}` is a plain CSV with an unknown class
BAD_INPUT = [
    ("experiments.run", ["workload=trace"], ["workload.path", "missing value"]),
    ("experiments.run", ["cluster.num_replicas=abc"], ["cluster.num_replicas", "'abc'"]),
    ("experiments.run", ["policy=sarathi", "policy.chunk_size=0"], ["policy", "chunk_size", "0"]),
    ("experiments.run", ["policy=nosuch"], ["policy/nosuch", "fcfs", "sarathi"]),  # Hydra: unknown option
    ("experiments.run", ["sim.horizonn_s=3"], ["sim.horizonn_s", "not in struct"]),  # Hydra: misspelt key
    ("experiments.run", ["slo.classes.interactive.ttft_s=-1"], ["slo.classes.interactive.ttft_s", "-1"]),
    ("experiments.run", ["seed=abc"], ["seed", "'abc'", "whole number"]),
    ("experiments.run", ["workload=trace", "workload.path={trace}", "cluster=single"],
     ["{trace}:3", "qos_class", "'gold'", "['batch', 'default', 'interactive']"]),
    ("experiments.capacity", ["workload=trace", "workload.path={trace}", "capacity.rate_key=arrival.rate_qps"],
     ["capacity.rate_key", "target_qps"]),
    ("experiments.capacity", ["capacity.rulee=overall"], ["capacity.rulee"]),
    ("experiments.reproduce", ["parts=[nosuch]"], ["parts", "nosuch"]),
    ("experiments.validate", ["policy=nosuch"], ["policy/nosuch"]),
]


@pytest.mark.parametrize("module,args,words", BAD_INPUT, ids=[" ".join([m.split(".")[1], *a]) for m, a, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, gold_trace, module, args, words):
    out_dir = tmp_path / "out"
    args = [a.format(trace=gold_trace) for a in args]
    quiet = QUIET if module in ("experiments.run", "experiments.capacity") else []
    proc = app(module, *args, *quiet, f"hydra.run.dir={out_dir}")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{module}: bad input"), proc.stderr
    for word in words:
        assert word.format(trace=gold_trace) in lines[0], lines[0]
    assert proc.stdout == ""  # every check runs before anything is simulated or logged
    assert not out_dir.exists()  # no folder left holding only Hydra's bookkeeping


def test_the_profiler_without_torch_names_the_extra_and_leaves_no_folder(tmp_path):
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.modules['vllm'] = None; "  # as if not installed
            f"sys.argv = ['profiler.run', 'hydra.run.dir={tmp_path / 'out'}']; "
            "runpy.run_module('profiler.run', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "backend 'vllm' needs vllm and torch" in line and "pip install -e '.[profile]'" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("module,present,absent", [
    ("experiments.run", ["experiments.run: simulate", "policy: edf, fcfs", "workload:", "seed=0", "Examples"],
     ["profiler", "grid:", "Powered by Hydra"]),
    ("experiments.capacity", ["experiments.capacity: the highest request rate", "count_rejected=false", "slo:"],
     ["profiler", "grid:"]),
    ("experiments.reproduce", ["experiments.reproduce: Niyama", "parts="], ["policy:", "profiler", "grid:"]),
    ("experiments.validate", ["experiments.validate: replay", "costmodel", "tolerance.p50"],
     ["workload:", "profiler", "grid:"]),
    ("profiler.run", ["profiler.run: time real engine steps", "grid: full, quick", ".[profile]"],
     ["policy:", "workload:"]),
])
def test_each_app_has_its_own_help(module, present, absent):
    proc = app(module, "--help")
    assert proc.returncode == 0, proc.stderr
    for text in present:
        assert text in proc.stdout, text
    for text in absent:
        assert text not in proc.stdout, text


def test_two_multiruns_into_one_folder_collect_only_the_second(tmp_path):
    common = ["workload.num_requests=20", "output.print_summary=false", f"hydra.sweep.dir={tmp_path}", *QUIET]
    first = app("experiments.run", "-m", "policy=fcfs,sarathi", *common)
    assert first.returncode == 0, first.stderr[-2000:]
    assert pd.read_csv(tmp_path / "sweep.csv")["overrides"].tolist() == ["policy=fcfs", "policy=sarathi"]
    second = app("experiments.run", "-m", "policy=srpf", *common)  # one job: folder 0 again; folder 1 is stale
    assert second.returncode == 0, second.stderr[-2000:]
    table = pd.read_csv(tmp_path / "sweep.csv")
    assert table["overrides"].tolist() == ["policy=srpf,workload.num_requests=20"]  # progress/plots left out
    log = (tmp_path / "0" / "run.log").read_text()
    for text in ("workload: 20 requests", "cluster: 4 replicas", "outcomes: {'finished': 20", "outputs: "):
        assert text in log, log


def test_requests_after_the_horizon_are_not_arrived_counted_apart_and_warned(tmp_path):
    trace = tmp_path / "late.csv"
    trace.write_text(PLAIN_CSV + "10,100,10,,\n20,100,10,,\n30,100,10,,\n")
    cfg = compose_run("workload=trace", f"workload.path={trace}", "cluster=single", "sim.horizon_s=15", *QUIET)
    out = run(cfg, tmp_path / "mid")
    assert out.summary["outcomes"] == {"finished": 1, "rejected": 0, "unfinished": 0, "not_arrived": 2}
    att = out.summary["slo_attainment"]["default"]
    assert (att["num_requests"], att["num_not_arrived"], att["num_judged"], att["attainment"]) == (3, 2, 1, 1.0)
    assert out.summary["warnings"] == ["2 of 3 requests arrive after sim.horizon_s=15 s: outcome 'not_arrived', "
                                       "left out of SLO attainment"]
    early = run(compose_run("workload=trace", f"workload.path={trace}", "cluster=single", "sim.horizon_s=5", *QUIET),
                tmp_path / "early")
    assert early.summary["outcomes"]["not_arrived"] == 3
    assert "before the first arrival (10 s)" in early.summary["warnings"][0]
    text = (tmp_path / "early" / "summary.json").read_text()
    saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))  # strict: no NaN
    assert saved["slo_attainment"]["default"]["attainment"] is None and saved["ttft_s"]["p50"] is None


def test_rejected_requests_are_reported_apart_with_tpot_in_the_console_table():
    cfg = compose_run("workload.num_requests=300", "workload.max_total_tokens=null", "cluster.max_model_len=4096",
                      "workload.arrival.rate_qps=8", *QUIET)
    out = run(cfg)
    req = out.result.requests
    too_long = int((req["num_prompt_tokens"] + req["num_output_tokens"] > 4096).sum())
    assert too_long > 0 and out.summary["outcomes"]["rejected"] == too_long
    assert out.summary["reject_reasons"] == {"exceeds_max_model_len": too_long}
    assert out.summary["violations"]["num_rejected"] == too_long
    interactive = out.summary["slo_attainment"]["interactive"]
    judged = req[(req["qos_class"] == "interactive") & (req["outcome"] != "rejected")]
    assert interactive["num_judged"] == len(judged)
    assert interactive["num_rejected"] == int(((req["qos_class"] == "interactive") & (req["outcome"] == "rejected")).sum())
    row = summary_table({"run": out.summary}).loc["run"]
    assert row["rejected"] == too_long and row["slo_interactive"] == interactive["attainment"]
    assert row["tpot_p50_s"] == out.summary["tpot_s"]["p50"] and row["tpot_p99_s"] == out.summary["tpot_s"]["p99"]
