"""The capacity app (the search itself: tests/test_planner.py), and short
versions of the three reproduction experiments (the ordering FCFS < EDF < Niyama)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hydra.utils import instantiate

from experiments.capacity import run_capacity, variant_configs, workload_rate_key
from experiments.reproduce import compose_part, reproduce
from planner.capacity import explain_status
from sim.errors import InputError
from sim.paths import PROJECT_ROOT

TRACES = PROJECT_ROOT.parent / "shared" / "traces"
CODE = TRACES / "AzureLLMInferenceTrace_code.csv"
needs_traces = pytest.mark.skipif(not CODE.exists(), reason="../shared/traces (Azure LLM inference traces 2023) is absent")


def test_capacity_app_writes_json_points_and_plot(tmp_path):
    cfg = compose_part("capacity", [
        "workload.num_requests=150", "workload.prompt_tokens.max=3000", "slo=niyama_tiers",
        "workload.qos_shares=null", "cluster.num_replicas=1", "capacity.qps_start=2.0", "capacity.rel_tol=0.1",
        "+variants.fcfs.policy._target_=policies.fcfs.Sarathi", "+variants.fcfs.policy._partial_=true",
        "+variants.edf.policy._target_=policies.edf.EDF", "+variants.edf.policy._partial_=true",
    ])
    out = run_capacity(cfg, tmp_path)
    saved = json.loads((tmp_path / "capacity.json").read_text())
    assert saved["capacity_qps"] == out["capacity_qps"] and set(saved["variants"]) == {"fcfs", "edf"}
    for res in saved["variants"].values():
        assert res["status"] == "ok" and len(res["points"]) >= 2
        assert all(set(p["tiers"]) == {"tier0", "tier1", "tier2"} for p in res["points"])
        # the capacity lies between the highest passing and lowest failing rate found
        assert res["lo_qps"] <= res["capacity_qps"] <= res["hi_qps"]
    assert (tmp_path / "capacity.png").stat().st_size > 0
    assert (tmp_path / "capacity_points.csv").read_text().startswith("variant,qps,")
    assert (tmp_path / "requests_fcfs.parquet").exists()


def test_rejected_requests_are_reported_apart_unless_the_rule_counts_them(tmp_path):
    # a 4096-token context and lengths not fitted to it: some requests can never be served, at any rate
    base = ["workload.num_requests=300", "workload.max_total_tokens=null", "cluster.max_model_len=4096",
            "capacity.qps_start=4.0", "capacity.rel_tol=0.1", "output.plots=false", "capacity.save_requests=false"]
    wl = instantiate(compose_part("capacity", base).workload).requests
    too_long = int((wl["num_prompt_tokens"] + wl["num_output_tokens"] > 4096).sum())
    assert too_long / len(wl) > 0.01  # more than the threshold: counted, no rate could pass
    apart = run_capacity(compose_part("capacity", base), tmp_path / "apart")["variants"]["fcfs"]
    assert apart["status"] == "ok" and apart["capacity_qps"] > 0
    assert all(p["num_rejected"] == too_long for p in apart["points"])
    counted = run_capacity(compose_part("capacity", [*base, "capacity.count_rejected=true"]), tmp_path / "counted")
    res = counted["variants"]["fcfs"]
    assert res["status"] == "below_min" and res["capacity_qps"] == 0.0
    assert explain_status(res, counted["settings"]).endswith(f"by reason: rejected {too_long}")
    saved = json.loads((tmp_path / "counted" / "capacity.json").read_text())
    assert saved["settings"]["count_rejected"] is True and saved["variants"]["fcfs"]["points"][0]["num_rejected"] == too_long


def test_capacity_on_a_trace_stretches_its_own_arrivals_to_each_rate(tmp_path):
    rng = np.random.default_rng(5)
    trace = tmp_path / "trace.csv"
    times = np.cumsum(rng.exponential(1.0, 200))
    rows = "".join(f"{t:.3f},{p},{o}\n" for t, p, o in zip(times, rng.integers(50, 2000, 200), rng.integers(10, 300, 200)))
    trace.write_text("arrival_s,num_prompt_tokens,num_output_tokens\n" + rows)
    cfg = compose_part("capacity", ["workload=trace", f"workload.path={trace}", "cluster=single", "output.plots=false",
                                    "capacity.qps_start=2.0", "capacity.rel_tol=0.1"])
    assert workload_rate_key(cfg.workload, "auto") == "target_qps"
    res = run_capacity(cfg, tmp_path / "out")["variants"]["fcfs"]
    assert res["status"] == "ok" and all(p["num_requests"] == 200 for p in res["points"])
    at_capacity = pd.read_parquet(tmp_path / "out" / "requests_fcfs.parquet")
    span = at_capacity["arrival_s"].max() - at_capacity["arrival_s"].min()
    assert (len(at_capacity) - 1) / span == pytest.approx(res["lo_qps"])  # the trace's mean rate set to the rate


def test_the_rate_key_must_exist_in_the_workload():
    cfg = compose_part("capacity", ["workload=surge"])  # a schedule of rates: no single rate_qps
    with pytest.raises(InputError, match="capacity.rate_key.*arrival.rate_qps"):
        workload_rate_key(cfg.workload, "auto")
    assert workload_rate_key(compose_part("capacity", []).workload, "auto") == "arrival.rate_qps"
    with pytest.raises(InputError, match="capacity.seeds"):
        run_capacity(compose_part("capacity", ["capacity.seeds=[a]"]))
    with pytest.raises(InputError, match=r"capacity.jobs' = 0"):
        run_capacity(compose_part("capacity", ["capacity.jobs=0"]))


def test_capacity_json_nulls_read_back_as_undefined_rates():
    from analysis.results import attainment_table

    point = {"qps": 1.0, "overall": None, "tiers": {"t0": None, "t1": 0.25}}  # null: no request judged
    table = attainment_table(json.loads(json.dumps({"variants": {"a": {"points": [point]}}})))
    assert table["tier"].tolist() == ["overall", "t1"]
    assert np.isnan(table["attainment"].iloc[0]) and table["attainment"].iloc[1] == 0.75


def test_siloed_splits_expand_into_one_variant_per_split():
    cfg = compose_part("capacity", ["+experiment=repro_siloed"])
    labels = list(variant_configs(cfg))
    assert labels == ["shared", "siloed_1_3", "siloed_2_2", "siloed_3_1"]
    v = variant_configs(cfg)["siloed_2_2"]
    assert [p.count for p in v.cluster.pools] == [2, 2]
    assert v.router._target_ == "policies.siloed.SiloedRouter"
    assert variant_configs(cfg)["shared"].policy._target_ == "policies.niyama.Niyama"


@needs_traces
@pytest.mark.slow
def test_short_reproduction_keeps_the_published_orderings(tmp_path):
    cfg = compose_part("reproduce", [])
    from omegaconf import OmegaConf

    summary = reproduce(["capacity_code", "capacity_conv", "siloed", "surge"], out_dir=tmp_path, smoke=True,
                        smoke_overrides=OmegaConf.to_container(cfg.smoke_overrides), smoke_all=list(cfg.smoke_all))
    for trace, caps in json.loads((tmp_path / "reproduction.json").read_text()).items():
        assert caps["fcfs"] < caps["edf"] < caps["niyama"], trace
    siloed = json.loads((tmp_path / "shared_vs_siloed.json").read_text())
    assert siloed["shared_qps"] > siloed["best_split"]["capacity_qps"]
    surge = json.loads((tmp_path / "surge.json").read_text())["variants"]
    assert surge["niyama"]["tiers"]["tier0"] < surge["fcfs"]["tiers"]["tier0"]
    assert surge["niyama"]["overall"] < surge["fcfs"]["overall"]
    assert (tmp_path / "reproduction.md").read_text().count("|") > 20
    assert summary["parts"]["surge"]["result"]["variants"]["niyama"]["num_requests"] > 1000
