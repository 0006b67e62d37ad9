"""OServe's deployment model (planner.deployment): configurations of a GPU pool, request types,
the sustainable-rate table (hand-computed with a constant step time, checked against a
simulation of one replica with the roofline), its cache, and the errors for bad pools."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from planner.deployment import (RateSettings, ReplicaConfig, RequestTypes, TypeStats, deployments, feasible_configs,
                                homogeneous, rate_table, roofline_for, sustainable_rate)
from policies.fcfs import FCFS
from policies.routing import RoundRobin
from sim.cluster import ReplicaSpec, simulate
from sim.costmodel import ConstantCostModel
from sim.costmodels.roofline import RooflineCostModel
from sim.costmodels.specs import GpuSpec, ModelSpec
from sim.errors import InputError
from sim.scheduling import EngineLimits

LLAMA3_8B = ModelSpec(name="llama3-8b", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8,
                      intermediate_size=14336, vocab_size=128256, max_model_len=8192)
LLAMA3_70B = ModelSpec(name="llama3-70b", num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8,
                       intermediate_size=28672, vocab_size=128256, max_model_len=8192)
H100 = GpuSpec(name="h100-80gb", peak_flops=989e12, mem_bw_bytes_s=3.35e12, mem_bytes=85899345920,
               interconnect_bw_bytes_s=450e9, host_load_bw_bytes_s=3e9)


def test_feasible_configs_leave_out_what_does_not_fit_and_name_the_model_when_nothing_does():
    # 70B in bf16 is ~141 GB: one 80 GB GPU cannot hold it, two can
    assert [c.tp for c in feasible_configs(LLAMA3_70B, H100, 8)] == [2, 4, 8]
    assert [c.tp for c in feasible_configs(LLAMA3_8B, H100, 4)] == [1, 2, 4]  # tp8 needs more GPUs than 4
    with pytest.raises(InputError) as e:
        feasible_configs(LLAMA3_70B, H100, 1)
    assert e.value.field == "model" and "llama3-70b fits no replica configuration" in str(e.value)
    with pytest.raises(InputError) as e:
        feasible_configs(LLAMA3_8B, H100, 0)
    assert e.value.field == "num_gpus"
    # tp3 does not divide 32 heads: left out, and alone it is an error
    with pytest.raises(InputError, match="not divisible"):
        feasible_configs(LLAMA3_8B, H100, 8, tp_degrees=(3,))


def test_deployments_enumerate_every_split_and_a_pool_that_does_not_divide_is_an_error():
    cfg = [ReplicaConfig(t) for t in (1, 2, 4)]
    assert deployments(4, cfg) == [(4,), (2, 2), (2, 1, 1), (1, 1, 1, 1)]
    assert len(deployments(8, [ReplicaConfig(t) for t in (1, 2, 4, 8)])) == 10
    with pytest.raises(InputError) as e:
        deployments(6, [ReplicaConfig(4), ReplicaConfig(8)])
    assert e.value.field == "num_gpus" and e.value.value == 6
    assert homogeneous(8, [ReplicaConfig(2), ReplicaConfig(4)]) == (2, 2, 2, 2)
    with pytest.raises(InputError) as e:
        homogeneous(6, [ReplicaConfig(2), ReplicaConfig(4)], tp=4)
    assert e.value.field == "num_gpus"


def test_request_types_classify_by_both_lengths():
    types = RequestTypes((100, 1000), (50,))
    assert len(types) == 6
    got = types.classify([10, 100, 999, 1000, 5000, 5000], [1, 50, 49, 10, 50, 49])
    # bins are [0,100), [100,1000), [1000,inf) x [0,50), [50,inf); index = prompt_bin * 2 + output_bin
    assert got.tolist() == [0, 3, 2, 4, 5, 4]
    assert types.label(3) == "p[100,1000)xo[50,inf)"
    with pytest.raises(InputError) as e:
        RequestTypes((100, 100), ())
    assert e.value.field == "prompt_edges"
    q = RequestTypes.from_quantiles(np.arange(1, 101), np.arange(1, 101), prompt_quantiles=(0.5,),
                                    output_quantiles=(0.25, 0.75))
    assert q.prompt_edges == (50.5,) and q.output_edges == (25.75, 75.25)


def test_sustainable_rate_hand_computed_with_a_constant_step():
    # every step 10 ms; p = o = 100: B decodes need B * (1 + 1) <= 2048 tokens, B <= 256 seqs, and
    # mean KV B * (100 + 50) <= 15,000 tokens -> B <= 100; rate = B / (o * t) = 100 / (100 * 0.01) = 100/s
    cm = ConstantCostModel(base_s=0.01)
    s = RateSettings(ttft_s=2.0, tpot_s=0.1, utilization=0.8)
    assert sustainable_rate(cm, 15_000, 100, 100, 100, s) == pytest.approx(80.0)
    # the step is longer than the per-token objective: nothing is sustainable
    assert sustainable_rate(ConstantCostModel(base_s=0.2), 15_000, 100, 100, 100, s) == 0.0
    # a P90 prompt of 10,000 tokens needs ceil(10000 / (2048 - B)) steps of 10 ms: within 2 s for every B
    assert sustainable_rate(cm, 15_000, 100, 100, 10_000, s) == pytest.approx(80.0)
    # within 0.05 s only while 10,000 / (2048 - B) <= 5 steps: B <= 48, rate 0.8 * 48 / (100 * 0.01)
    tight = RateSettings(ttft_s=0.05, tpot_s=0.1, utilization=0.8)
    assert sustainable_rate(cm, 15_000, 100, 100, 10_000, tight) == pytest.approx(38.4)
    # within one step never (10,000 > 2048 - B)
    assert sustainable_rate(cm, 15_000, 100, 100, 10_000, RateSettings(ttft_s=0.01, tpot_s=0.1)) == 0.0
    # a request longer than the whole KV cache
    assert sustainable_rate(cm, 150, 100, 100, 100, s) == 0.0


def test_rate_table_favours_tp_for_long_prompts_and_is_cached(tmp_path):
    tmpl = RooflineCostModel(LLAMA3_70B, H100, tp=8)
    configs = feasible_configs(LLAMA3_70B, H100, 8)
    types = RequestTypes((1000,), ())
    stats = TypeStats.from_workload(types, [200, 300, 6000, 7000], [100, 100, 20, 20])
    s = RateSettings(ttft_s=1.0)
    rates = rate_table(tmpl, configs, stats, s, cache_dir=tmp_path)
    assert set(rates) == {2, 4, 8}
    # long prompts: tp2 cannot prefill a P90 prompt within 1 s, tp8 can; per-GPU, tp2 is best on short ones
    assert rates[2][1] == 0.0 and rates[8][1] > 0
    assert rates[2][0] / 2 > rates[8][0] / 8
    files = list(tmp_path.glob("rates-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    data["rates_per_s"]["2"][0] = 12345.0   # a cached table is read back, not recomputed
    files[0].write_text(json.dumps(data))
    assert rate_table(tmpl, configs, stats, s, cache_dir=tmp_path)[2][0] == 12345.0
    rate_table(tmpl, configs, stats, RateSettings(ttft_s=1.5), cache_dir=tmp_path)  # other inputs, other key
    assert len(list(tmp_path.glob("rates-*.json"))) == 2


def _attainment(cm, rate_per_s, p, o, seconds, ttft_s, tpot_s, seed=0):
    rng = np.random.default_rng(seed)
    n = int(rate_per_s * seconds)
    arr = np.cumsum(rng.exponential(1 / rate_per_s, n))
    wl = pd.DataFrame({"arrival_s": arr, "num_prompt_tokens": p, "num_output_tokens": o})
    spec = ReplicaSpec(cm, FCFS, EngineLimits(), name="r")
    req = simulate(wl, [spec], RoundRobin()).requests
    ttft = req["first_token_s"] - req["arrival_s"]
    tpot = (req["finish_s"] - req["first_token_s"]) / (req["num_output_tokens"] - 1)
    return float(((ttft <= ttft_s) & (tpot <= tpot_s)).mean())


def test_the_table_rate_is_met_in_simulation_and_one_and_a_half_times_the_bound_is_not():
    """The analytic bound checked by the simulator: one 8B TP1 replica, one type (p=1000, o=100)."""
    cm = roofline_for(RooflineCostModel(LLAMA3_8B, H100), 1)
    s = RateSettings(ttft_s=2.0, tpot_s=0.1)
    kv = cm.num_kv_blocks(16) * 16
    rate = sustainable_rate(cm, kv, 1000, 100, 1000, s)
    assert rate > 1
    assert _attainment(cm, rate, 1000, 100, 60, 2.0, 0.1) >= 0.95
    assert _attainment(cm, 1.5 * rate / s.utilization, 1000, 100, 60, 2.0, 0.1) < 0.5  # 1.5x the bound
