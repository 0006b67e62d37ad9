"""The QLM reproduction: the smoke run end to end and the structure of what it writes, bad input
as one line and exit status 2, the new model configs' sizes (computed by hand), the workload
options it relies on (ShareGPT lengths, trace arrivals, model shares, the context cap), and the
analysis helpers on hand-made tables."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from analysis.qlm import mape_by_position, quantile_calibration, wait_errors
from experiments.reproduce_qlm import PARTS, gains, reproduce_qlm
from sim.costmodels.specs import kv_blocks_for
from sim.errors import InputError
from sim.paths import PROJECT_ROOT
from sim.workload import from_trace, trace_workload

GIB = 2**30


def load(group: str, name: str):
    return instantiate(OmegaConf.load(PROJECT_ROOT / "conf" / group / f"{name}.yaml"))


# ---------------------------------------------------------------- model configs


def test_llama2_13b_sizes_by_hand():
    m = load("model", "llama2-13b")
    # 40 layers x (q, k, v, o: 4 x 5120^2; gate, up, down: 3 x 5120 x 13824) + embedding and LM head
    # (untied, 2 x 32000 x 5120) + RMSNorm weights (2 per layer + the final one, 5120 each)
    params = 40 * (4 * 5120**2 + 3 * 5120 * 13824) + 2 * 32000 * 5120 + (2 * 40 + 1) * 5120
    assert m.num_params() == params == 13_015_864_320
    assert m.weight_bytes() == 2 * params  # float16: 26.0 GB, Vicuna-13B's "26 GB"
    assert m.kv_bytes_per_token() == 2 * 40 * 40 * 128 * 2 == 800 * 1024  # no GQA
    assert m.max_model_len == 4096


def test_llama2_70b_sizes_by_hand():
    m = load("model", "llama2-70b")
    # GQA: k and v project to 8 heads x 128 = 1024
    layer = 2 * 8192**2 + 2 * 8192 * 1024 + 3 * 8192 * 28672
    params = 80 * layer + 2 * 32000 * 8192 + (2 * 80 + 1) * 8192
    assert m.num_params() == params
    assert 68.9e9 < params < 69.1e9  # the published "70B" is 68.98 B parameters
    assert m.weight_bytes() == 2 * params  # 138 GB
    assert m.weight_bytes(4) < m.weight_bytes() / 4 + 2**27  # sharded by 4 (norms are replicated)
    assert m.kv_bytes_per_token() == 2 * 80 * 8 * 128 * 2 == 320 * 1024


def test_where_the_models_fit():
    a10, a100 = load("hardware", "a10"), load("hardware", "a100-80gb")
    m13, m70, m7 = load("model", "llama2-13b"), load("model", "llama2-70b"), load("model", "mistral-7b")
    with pytest.raises(InputError, match="does not fit on a10 at tp=1"):
        kv_blocks_for(m13, a10, 1, 16)
    for tp in (1, 2, 4):
        with pytest.raises(InputError, match="does not fit on a10"):
            kv_blocks_for(m70, a10, tp, 16)
    # A100 80 GB x 0.9 = 72 GiB minus 26.0 GB of weights and the activation reserve: thousands of blocks
    assert kv_blocks_for(m13, a100, 1, 16) > 3000
    assert kv_blocks_for(m70, a100, 4, 16) > 30000  # TP4: the fleet's choice
    assert kv_blocks_for(m70, a10, 8, 16) > 1000   # A10 needs TP8
    assert kv_blocks_for(m7, a10, 1, 16) > 3000     # experiment 1's replica
    # more KV per GPU at higher TP, and the 13B holds far less context than the 7B (no GQA)
    assert kv_blocks_for(m13, a100, 1, 16) * 6 < kv_blocks_for(m7, a100, 1, 16) * 1.0


# ---------------------------------------------------------------- workload options


@pytest.fixture
def sharegpt(tmp_path):
    path = tmp_path / "sharegpt.csv"
    path.write_text("num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n"
                    "100,50,150,2.0\n3000,2000,5000,1.5\n200,0,200,inf\n400,100,500,4.0\n")
    return path


@pytest.fixture
def azure(tmp_path):
    path = tmp_path / "azure.csv"
    rows = [f"2023-11-16 18:00:{s:02d}.0000000,10,5" for s in (0, 1, 1, 4, 10, 30)]
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    return path


def test_sharegpt_format_is_detected_and_read(sharegpt):
    w = from_trace(str(sharegpt))
    r = w.requests
    assert r["num_prompt_tokens"].tolist() == [100, 3000, 400]  # the 0-output row is left out, counted
    assert r["num_output_tokens"].tolist() == [50, 2000, 100]
    assert (r["arrival_s"] == 0).all()
    assert w.num_filtered == {"zero_output_tokens": 1}


def test_trace_workload_context_cap_model_shares_and_unchanged_streams(sharegpt):
    common = dict(path=str(sharegpt), arrival={"kind": "poisson", "rate_qps": 5.0}, num_requests=400,
                  qos_shares={"interactive": 1, "batch": 1}, seed=3)
    plain = trace_workload(**common)
    capped = trace_workload(**common, max_total_tokens=4096,
                            model_shares={"a": 0.5, "b": 0.25, "c": 0.25})
    # the 5,000-token pair never drawn, and counted as a row left out of the pool
    total = capped.requests["num_prompt_tokens"] + capped.requests["num_output_tokens"]
    assert total.max() <= 4096 and set(total) == {150, 500}
    assert capped.num_filtered == {"zero_output_tokens": 1, "over_max_total_tokens": 1}
    assert (plain.requests["num_prompt_tokens"] == 3000).any()
    # model shares come from their own stream: arrivals and classes as without them
    assert np.array_equal(plain.requests["arrival_s"], capped.requests["arrival_s"])
    assert np.array_equal(plain.requests["qos_class"], capped.requests["qos_class"])
    counts = capped.requests["model"].value_counts()
    assert set(counts.index) == {"a", "b", "c"}
    assert 160 < counts["a"] < 240  # 200 expected, binomial sd 10
    assert (plain.requests["model"] == "").all()
    with pytest.raises(InputError, match="model or model_shares"):
        trace_workload(**common, model="x", model_shares={"a": 1})
    with pytest.raises(InputError, match="no request of the trace fits"):
        trace_workload(**common, max_total_tokens=100)


def test_trace_workload_takes_arrival_times_from_another_trace(sharegpt, azure):
    base = dict(path=str(sharegpt), seed=0)
    w = trace_workload(**base, arrival={"kind": "trace", "path": str(azure)}, num_requests=4)
    assert w.requests["arrival_s"].tolist() == [0.0, 1.0, 1.0, 4.0]
    w = trace_workload(**base, arrival={"kind": "trace", "path": str(azure)}, duration_s=10)
    assert w.requests["arrival_s"].tolist() == [0.0, 1.0, 1.0, 4.0]  # t < 10
    # stretched so that (n - 1) / span = 1 qps: span 30 s -> 5 s
    w = trace_workload(**base, arrival={"kind": "trace", "path": str(azure), "target_qps": 1.0}, num_requests=6)
    assert w.requests["arrival_s"].tolist() == pytest.approx([0, 1 / 6, 1 / 6, 4 / 6, 10 / 6, 5])
    with pytest.raises(InputError, match="only 6 arrivals"):
        trace_workload(**base, arrival={"kind": "trace", "path": str(azure)}, num_requests=7)
    with pytest.raises(InputError, match="unknown key"):
        trace_workload(**base, arrival={"kind": "trace", "path": str(azure), "rate_qps": 2}, num_requests=2)
    with pytest.raises(InputError, match="not found"):
        trace_workload(**base, arrival={"kind": "trace", "path": str(azure) + ".nope"}, num_requests=2)


# ---------------------------------------------------------------- analysis helpers


def test_wait_errors_mape_and_calibration_by_hand():
    requests = pd.DataFrame({"request_id": [0, 1, 2, 3], "first_scheduled_s": [12.0, 30.0, 5.5, math.nan]})
    preds = pd.DataFrame({"request_id": [0, 1, 2, 3], "time_s": [2.0, 10.0, 5.0, 1.0],
                          "queue_position": [0, 5, 0, 9], "predicted_wait_s": [5.0, 30.0, 0.0, 1.0],
                          "p10_s": [1.0, 10.0, 0.0, 0.0], "p50_s": [5.0, 30.0, 0.1, 1.0], "p90_s": [20.0, 25.0, 1.0, 2.0]})
    e = wait_errors(preds, requests)
    assert e["actual_wait_s"].tolist() == [10.0, 20.0, 0.5]  # request 3 never scheduled: dropped
    m = mape_by_position(e, bins=(0, 1, 4)).set_index("position")
    # position 0: request 0 |5 - 10| / 10 = 0.5; request 2's 0.5 s wait is below 1 s, left out of MAPE
    assert m.loc["0", "mape"] == pytest.approx(0.5) and m.loc["0", "num_short"] == 1
    assert m.loc["4+", "mape"] == pytest.approx(0.5)  # |30 - 20| / 20
    assert m.loc["1-3", "num_predictions"] == 0 and math.isnan(m.loc["1-3", "mape"])
    cal = quantile_calibration(e)
    # actual waits 10, 20, 0.5 s: at or below p10 (1, 10, 0): none; p50 (5, 30, 0.1): one; p90 (20, 25, 1): all
    assert cal == {"p10_s": 0.0, "p50_s": pytest.approx(1 / 3), "p90_s": 1.0}
    assert quantile_calibration(e.drop(columns=["p10_s", "p50_s", "p90_s"])) == {}
    with pytest.raises(InputError, match="queue_position"):
        wait_errors(preds.drop(columns=["queue_position"]), requests)


def test_gains_by_hand():
    def m(att, good):
        return {"attainment": {"interactive": att, "overall": att}, "goodput_rps": good, "throughput_rps": good}

    results = {"vllm": {"1": m(0.5, 2.0), "2": m(0.0, 1.0)}, "qlm": {"1": m(0.8, 3.0), "2": m(0.4, 1.5)}}
    g = gains(results)
    assert list(g) == ["qlm_vs_vllm"]
    assert g["qlm_vs_vllm"]["1"]["attainment"]["interactive"] == pytest.approx(0.6)
    assert g["qlm_vs_vllm"]["1"]["goodput"] == pytest.approx(0.5)
    assert g["qlm_vs_vllm"]["2"]["attainment"]["overall"] is None  # no relative gain over 0


# ---------------------------------------------------------------- the app


SMOKE_ALL = ["workload.duration_s=60"]


def test_smoke_run_end_to_end(tmp_path):
    from hydra import initialize_config_dir

    smoke = OmegaConf.load(PROJECT_ROOT / "conf" / "reproduce_qlm.yaml")
    overrides = OmegaConf.to_container(smoke.smoke_overrides)
    overrides["hol"] = ["qlm.loads=[1.5]", "qlm.variants=[vllm,qlm]"]
    overrides["bursty"] = [*overrides["bursty"], "workload.arrival.window_s=[0,60]"]
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        summary = reproduce_qlm(list(PARTS), [], tmp_path, smoke=True, smoke_overrides=overrides,
                                smoke_all=SMOKE_ALL)
    data = json.loads((tmp_path / "reproduction_qlm.json").read_text())
    assert list(data["parts"]) == list(PARTS)
    for part, res in data["parts"].items():
        assert res["variants"], part
        for label, by_load in res["variants"].items():
            for key, point in by_load.items():
                att = point["attainment"]
                assert set(att) == {"interactive", "batch", "overall"}, (part, label)
                assert all(a is None or 0 <= a <= 1 for a in att.values())
                assert point["throughput_rps"] > 0 and point["goodput_rps"] <= point["throughput_rps"] + 1e-9
                assert point["swaps_per_hour"] >= 0 and point["num_requests"] > 0
                assert sum(point["outcomes"].values()) == point["num_requests"]  # one outcome each
                if label.startswith("qlm"):
                    assert "controller" in point
        assert any(k.startswith("qlm") for k in res["variants"]), part
        assert (tmp_path / part / "points.csv").exists()
    assert data["parts"]["hol"]["variants"]["vllm"]["1.5"]["rate_qps"] == pytest.approx(1.5 * 1.5)
    assert "qlm_vs_vllm" in data["parts"]["hol"]["gains"]
    # the on-demand swapper swaps; the static baselines never do
    mm = data["parts"]["multi_model"]["variants"]
    assert mm["vllm"]["1"]["num_model_swaps"] == 0
    est = data["parts"]["estimator"]["variants"]
    assert est["qlm"]["1"]["estimator"]["num_predictions"] > 0
    assert set(est["qlm_statistical"]["1"]["estimator"]["quantile_calibration"]) == {"p10_s", "p50_s", "p90_s"}
    for png in ("hol/attainment_vs_load.png", "bursty/attainment_over_time.png", "estimator/wait_estimates.png"):
        assert (tmp_path / png).stat().st_size > 1000, png
    assert (tmp_path / "bursty" / "timeseries.csv").exists()
    md = (tmp_path / "reproduction_qlm.md").read_text()
    assert "## multi_model" in md and "Estimator of `qlm_statistical`" in md
    assert summary["wall_s"] > 0


BAD = [
    (["parts=[nosuch]"], ["parts", "nosuch"]),
    (["parts=[hol]", "overrides=['qlm.base_qps=-1']"], ["qlm.base_qps", "-1"]),
    (["parts=[hol]", "overrides=['qlm.variants=[vllm,nosuch]']"], ["qlm.variants", "nosuch"]),
    (["parts=[bursty]", "overrides=['workload.arrival.path=/nonexistent/azure.csv']"],
     ["/nonexistent/azure.csv", "not found"]),
]


@pytest.mark.parametrize("args,words", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, args, words):
    proc = subprocess.run([sys.executable, "-m", "experiments.reproduce_qlm", *args, f"out_dir={tmp_path}"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("experiments.reproduce_qlm: ")
    for w in words:
        assert w in lines[0], (w, lines[0])
