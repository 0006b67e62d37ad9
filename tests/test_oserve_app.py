"""The OServe reproduction app: the smoke run end to end (every strategy, every request one
outcome, the JSON it writes) and bad pools as one line with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from experiments.reproduce_oserve import build_workload, reproduce_oserve
from sim.errors import InputError
from sim.paths import PROJECT_ROOT

TRACES = {"azure_code": "../shared/traces/AzureLLMInferenceTrace_code.csv",
          "azure_conv": "../shared/traces/AzureLLMInferenceTrace_conv.csv",
          "mooncake": "../shared/traces/mooncake_conversation_trace.jsonl"}
needs_traces = pytest.mark.skipif(not (PROJECT_ROOT / TRACES["azure_code"]).is_file(),
                                  reason="the public traces are not beside the project")


@needs_traces
def test_alternating_workload_takes_turns_and_fits_the_context():
    # the code trace is bursty (no request in its 2nd and 3rd minutes): 120-s segments, at twice its pace
    wl = build_workload("azure_alternating", TRACES, speed=2.0, segment_s=120.0, num_segments=4, max_model_len=8192,
                        max_output_tokens=1024)
    assert wl["arrival_s"].is_monotonic_increasing and wl["arrival_s"].max() < 480.0
    assert (wl.groupby("segment")["source"].first().tolist() == ["code", "conv", "code", "conv"])
    assert ((wl["num_prompt_tokens"] + wl["num_output_tokens"]) <= 8192).all()
    with pytest.raises(InputError) as e:
        build_workload("nope", TRACES, 1.0, 30.0, 2, 8192, 1024)
    assert e.value.field == "workloads"


@needs_traces
@pytest.mark.slow
def test_smoke_reproduction_runs_every_strategy(tmp_path):
    summary = reproduce_oserve(_cfg(smoke=True), tmp_path)
    data = json.loads((tmp_path / "reproduction_oserve.json").read_text())
    assert (tmp_path / "reproduction_oserve.md").is_file()
    (key, sc), = data["scenarios"].items()
    assert key == "oserve_llama3_70b_8gpu/azure_alternating"
    assert set(sc["results"]) == {"vllm_dp", "best_homogeneous", "best_static_heterogeneous", "oserve"}
    for r in sc["results"].values():
        assert sum(r["outcomes"].values()) == sc["num_requests"] == r["num_requests"]
    assert sc["ratios"]["vllm_dp"]["p99_e2e_speedup"] == pytest.approx(1.0)
    assert sum(sc["planned"]["oserve"]["deployment"]) == 8
    assert "exp_smoothing" in sc["forecast"] and "claim" in summary


def _cfg(**kw):
    cfg = OmegaConf.load(PROJECT_ROOT / "conf/reproduce_oserve.yaml")
    cfg.pop("defaults")
    cfg.pop("hydra")
    for k, v in kw.items():
        cfg[k] = v
    return cfg


@needs_traces
@pytest.mark.parametrize("overrides, field, says", [
    (["oserve.num_gpus=1"], "model", "fits no replica configuration of a 1-GPU"),
    (["oserve.num_gpus=6", "controller.tp_degrees=[4,8]"], "num_gpus", "6 GPUs do not divide"),
    (["oserve.num_gpus=0"], "oserve.num_gpus", "integer >= 1"),
])
def test_bad_pools_name_the_setting(overrides, field, says, tmp_path):
    cfg = _cfg(scenarios=["oserve_llama3_70b_8gpu"], workloads=["azure_alternating"], overrides=overrides)
    with pytest.raises(InputError) as e:
        reproduce_oserve(cfg, tmp_path)
    assert e.value.field == field and says in str(e.value)


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.reproduce_oserve", "scenarios=[oserve_llama3_70b_8gpu]",
                           f"out_dir={tmp_path}", "overrides=['oserve.num_gpus=6','controller.tp_degrees=[4,8]']"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.strip().splitlines() if x]
    assert len(lines) == 1 and "6 GPUs do not divide" in lines[0], proc.stderr
