"""planner.capacity without Hydra: the search on hand-made violation curves, one rate judged over
seeds, a whole search of a tiny simulated replica, and splitting replicas between pools."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from planner.capacity import (CapacitySettings, best_split, evaluate, explain_status, find_capacity, score,
                              search_capacity, splits)
from policies.fcfs import FCFS
from policies.routing import RoundRobin
from sim.cluster import ReplicaSpec, simulate
from sim.costmodel import ConstantCostModel
from sim.errors import InputError
from sim.qos import QoS
from sim.scheduling import EngineLimits


def test_search_brackets_bisects_and_interpolates():
    calls = []

    def violation(q):  # 0 up to 3 qps, then +10% per qps
        calls.append(q)
        return max(0.0, (q - 3.0) / 10.0)

    s = CapacitySettings(qps_start=1.0, growth=2.0, rel_tol=0.01, max_points=30)
    res = search_capacity(violation, s)
    assert calls[:3] == [1.0, 2.0, 4.0]  # bracketing doubles until a rate fails
    assert res["status"] == "ok"
    assert res["lo_qps"] <= 3.1 < res["hi_qps"] and res["hi_qps"] / res["lo_qps"] - 1 <= 0.01
    assert res["capacity_qps"] == pytest.approx(3.1, abs=1e-6)  # exact: linear between the bracket
    assert [p["qps"] for p in res["points"]] == calls


def test_search_shrinks_from_a_failing_start_and_reports_the_edges():
    s = CapacitySettings(qps_start=8.0, growth=2.0, rel_tol=0.05, qps_min=0.5, qps_max=20.0)
    res = search_capacity(lambda q: 0.0 if q <= 1.5 else 1.0, s)
    assert res["points"][:3] == [{"qps": 8.0, "violation": 1.0}, {"qps": 4.0, "violation": 1.0},
                                 {"qps": 2.0, "violation": 1.0}]
    assert res["lo_qps"] <= 1.5 < res["hi_qps"] <= 1.5 * 1.05
    assert res["lo_qps"] <= res["capacity_qps"] <= res["hi_qps"]
    assert search_capacity(lambda q: 1.0, s)["status"] == "below_min"
    top = search_capacity(lambda q: 0.0, s)
    assert top["status"] == "above_max" and top["capacity_qps"] == 16.0


def test_a_sustainability_limit_fails_rates_whose_backlog_outlasts_it():
    plain = CapacitySettings(max_violation=0.01)
    sustained = CapacitySettings(max_violation=0.01, max_drain_s=120.0)
    assert score(0.002, 700.0, plain) == 0.002  # violations only: passes
    assert score(0.002, 240.0, sustained) == pytest.approx(0.02)  # drain twice the limit: fails
    assert score(0.002, 60.0, sustained) == pytest.approx(0.005)  # both within limits: passes
    assert score(0.05, 10.0, sustained) == 0.05


@pytest.mark.parametrize("bad", [{"rule": "median"}, {"max_violation": 1.5}, {"growth": 1.0},
                                 {"qps_start": 0.01}, {"seeds": []}, {"max_drain_s": 0.0}, {"max_points": 1}])
def test_bad_capacity_settings_are_input_errors(bad):
    with pytest.raises(InputError):
        CapacitySettings(**{k: tuple(v) if k == "seeds" else v for k, v in bad.items()})


def test_settings_from_a_mapping_name_the_bad_key():
    with pytest.raises(InputError, match="capacity.seeds"):
        CapacitySettings.from_config({"seeds": ["a"]})
    with pytest.raises(InputError, match=r"unknown key\(s\) \['rate_key'\]"):
        CapacitySettings.from_config({"rate_key": "auto"})
    s = CapacitySettings.from_config({"seeds": [3, 4], "rate_key": "auto"}, other_keys=["rate_key"])
    assert s.seeds == (3, 4) and s.rule == "max_tier"


TIERS = QoS.from_config({"classes": {"a": {"ttft_s": 1.0}, "b": {"e2e_s": 10.0}}})


def fake_run(ttft_s, outcomes, end_s):
    """A SimResult stand-in: one request per entry, class 'a', arrivals at 0, 1, 2, ..."""
    n = len(ttft_s)
    arrival = np.arange(n, dtype=float)
    req = pd.DataFrame({"request_id": np.arange(n), "arrival_s": arrival, "qos_class": "a", "outcome": outcomes,
                        "ttft_s": ttft_s, "e2e_s": np.asarray(ttft_s) + 1.0, "tpot_s": 0.01,
                        "tbt_max_s": 0.01, "num_output_tokens": 10, "relegated": False,
                        "token_steps": [np.zeros(0, dtype=np.int32)] * n})
    return SimpleNamespace(requests=req, steps=pd.DataFrame(), end_s=end_s, info={"num_steps": 7})


def test_one_rate_is_judged_over_every_seed_pooled():
    runs = {0: fake_run([0.5, 2.0, 0.5, 0.5], ["finished"] * 4, end_s=5.0),              # 1 of 4 late
            1: fake_run([0.5, 0.5, 0.5, 9.9], ["finished"] * 3 + ["rejected"], end_s=30.0)}  # a rejected one
    s = CapacitySettings(seeds=(0, 1))
    point, table = evaluate(lambda qps, seed: runs[seed], 2.0, s, TIERS)
    assert point["violation"] == pytest.approx(1 / 7)  # rejected left out by default: 1 violation in 7 judged
    assert point["num_rejected"] == 1 and point["num_requests"] == 8 and point["violation_reasons"] == {"ttft": 1}
    assert point["drain_s"] == 27.0  # the worse seed: 30 s end - 3 s last arrival
    assert point["num_steps"] == 14 and np.isnan(point["tiers"]["b"])  # no request of class b
    assert table["seed"].tolist() == [0] * 4 + [1] * 4 and "token_steps" not in table
    counted = CapacitySettings(seeds=(0, 1), count_rejected=True, max_drain_s=54.0)
    point, _ = evaluate(lambda qps, seed: runs[seed], 2.0, counted, TIERS)
    assert point["violation"] == pytest.approx(2 / 8) and point["violation_reasons"] == {"ttft": 1, "rejected": 1}
    assert point["score"] == pytest.approx(max(2 / 8, 0.01 * 27.0 / 54.0))


def tiny_replica(qps: float, seed: int):
    """One replica, 0.1 s per step, 20-token prompts and 5-token outputs: saturates near 2 req/s."""
    rng = np.random.default_rng(seed)
    arrival = np.cumsum(rng.exponential(1.0, 300)) / qps
    wl = pd.DataFrame({"arrival_s": arrival, "num_prompt_tokens": 20, "num_output_tokens": 5, "qos_class": "a"})
    spec = ReplicaSpec(ConstantCostModel(0.1), FCFS, EngineLimits(max_num_seqs=1), num_kv_blocks=100)
    return simulate(wl, [spec], RoundRobin())


def test_a_whole_search_runs_on_a_plain_simulation_function():
    s = CapacitySettings(qps_start=0.5, growth=2.0, rel_tol=0.05, seeds=(0, 1))
    res, table = find_capacity(tiny_replica, s, QoS.from_config({"classes": {"a": {"ttft_s": 2.0}}}), label="toy")
    assert res["status"] == "ok" and res["label"] == "toy"
    assert 0.5 < res["lo_qps"] <= res["capacity_qps"] <= res["hi_qps"] < 2.0  # one request at a time: < 2 req/s
    by_qps = {p["qps"]: p for p in res["points"]}
    assert by_qps[round(res["lo_qps"], 6)]["score"] <= 0.01 < by_qps[round(res["hi_qps"], 6)]["score"]
    assert len(table) == 600 and set(table["seed"]) == {0, 1}  # the tables at the highest passing rate
    at_lo = table.loc[table["seed"] == 1, "arrival_s"].to_numpy()
    np.testing.assert_allclose(at_lo, tiny_replica(res["lo_qps"], 1).requests["arrival_s"].to_numpy())
    assert explain_status(res, {"count_rejected": False}) == ""


def test_an_unbracketed_search_explains_itself():
    res = {"status": "below_min", "points": [{"qps": 0.1, "violation": 0.5, "num_rejected": 3,
                                              "violation_reasons": {"ttft": 2}}, {"qps": 0.2, "violation": 0.9}]}
    assert explain_status(res, {"count_rejected": False}) == ("at 0.1 qps 50.00% violating, by reason: ttft 2; "
                                                             "3 rejected (not counted)")


def test_splits_and_best_split():
    assert splits(4, 2) == [(1, 3), (2, 2), (3, 1)]
    assert splits(4, 3) == [(1, 1, 2), (1, 2, 1), (2, 1, 1)]
    assert len(splits(6, 2, min_per_pool=2)) == 3
    with pytest.raises(InputError, match="cannot split 3 replicas into 2 pools of >= 2"):
        splits(3, 2, min_per_pool=2)
    # capacity limited by the scarcer pool
    result = best_split(4, 2, lambda s: min(s[0] * 4.0, s[1] * 3.0))
    assert result.best == (2, 2) and result.best_capacity_qps == 6.0
    assert set(result.capacities) == {(1, 3), (2, 2), (3, 1)}
    assert best_split(2, 2, lambda s: 1.0).best == (1, 1)
    assert best_split(3, 2, lambda s: 1.0).best == (1, 2)  # ties: the first split
