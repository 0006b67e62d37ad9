"""QoS tiers and the one SLO system: parsing, derived deadlines, the per-request judgement and
its aggregations (violation rates, SLO attainment, rolling rates)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from policies.edf import EDF
from policies.routing import RoundRobin
from sim.cluster import ReplicaSpec, simulate
from sim.costmodel import ConstantCostModel
from sim.errors import InputError
from sim.metrics import summarize
from sim.paths import PROJECT_ROOT
from sim.qos import (QoS, Tier, attainment_from_violations, decode_deadline_misses, rates_from_violations, rule_value,
                     violation_rates, violation_timeseries, violations)
from sim.scheduling import EngineLimits


def test_niyama_tiers_file_gives_the_published_tiers():
    qos = QoS.from_config(OmegaConf.load(PROJECT_ROOT / "conf" / "slo" / "niyama_tiers.yaml"))
    assert list(qos.tiers) == ["tier0", "tier1", "tier2"]
    t0, t1, t2 = qos.tiers.values()
    assert (t0.ttft_s, t0.tbt_s, t0.violation) == (6.0, 0.05, ("ttft",))
    assert (t1.e2e_s, t1.tbt_s, t1.violation) == (600.0, 0.4, ("e2e",))
    assert (t2.e2e_s, t2.violation) == (1800.0, ("e2e",))
    # tier 1-2 first-token deadlines: e2e - output tokens x 0.4 s (oracle output lengths)
    assert qos.first_token_deadline_s("tier1", 100) == pytest.approx(560.0)
    assert qos.first_token_deadline_s("tier2", 100) == pytest.approx(1760.0)
    assert qos.first_token_deadline_s("tier0", 100) == 6.0
    assert qos.first_token_deadline_s("unknown", 100) == math.inf
    assert qos.shares() == {"tier0": 1.0, "tier1": 1.0, "tier2": 1.0}


def test_a_constant_output_prediction_replaces_the_oracle():
    qos = QoS.from_config({"classes": {"b": {"e2e_s": 100.0, "tbt_s": 0.5}}, "output_prediction": 50})
    assert qos.first_token_deadline_s("b", 1) == 75.0 == qos.first_token_deadline_s("b", 999)


def test_the_plain_interactive_batch_file_still_parses_with_every_given_objective_counted():
    qos = QoS.from_config(OmegaConf.load(PROJECT_ROOT / "conf" / "slo" / "interactive_batch.yaml"))
    assert qos.tiers["interactive"].violation == ("ttft", "tpot")
    assert qos.tiers["batch"].violation == ("e2e",)
    assert qos.tiers["interactive"].decode_target_s == 0.1  # tpot stands in for a missing tbt


@pytest.mark.parametrize("config,match", [
    ({"classes": {"a": {"ttft": 1.0}}}, "unknown key"),
    ({"classes": {"a": {"ttft_s": -1.0}}}, "positive"),
    ({"classes": {"a": {"ttft_s": 1.0, "violation": ["e2e"]}}}, "gives no e2e_s"),
    ({"classes": {"a": {"ttft_s": 1.0, "violation": ["latency"]}}}, "unknown objective"),
    ({"classes": {"a": {}}, "output_prediction": "mean"}, "oracle"),
])
def test_bad_tier_configs_are_input_errors(config, match):
    with pytest.raises(InputError, match=match):
        QoS.from_config(config)


def table(rows) -> pd.DataFrame:
    """rows: (qos_class, outcome, ttft_s, e2e_s, tpot_s, relegated)."""
    df = pd.DataFrame(rows, columns=["qos_class", "outcome", "ttft_s", "e2e_s", "tpot_s", "relegated"])
    df.insert(0, "request_id", np.arange(len(df)))
    df.insert(1, "arrival_s", np.arange(len(df), dtype=float))
    df["num_output_tokens"] = 10
    return df


QOS = QoS.from_config({"classes": {
    "t0": {"ttft_s": 6.0, "tbt_s": 0.05, "violation": ["ttft"]},
    "t1": {"e2e_s": 600.0, "tbt_s": 0.4, "violation": ["e2e"]},
    "mean": {"tpot_s": 0.1},
}})


def test_each_tier_is_judged_by_its_own_objectives():
    nan = float("nan")
    req = table([
        ("t0", "finished", 5.9, 900.0, 1.0, False),   # ttft met; e2e and tpot do not count for t0
        ("t0", "finished", 6.1, 7.0, 0.0, False),     # ttft missed
        ("t1", "finished", 500.0, 599.0, 0.1, True),  # relegated but met its deadline
        ("t1", "finished", 1.0, 601.0, 0.1, False),   # e2e missed
        ("t1", "rejected", nan, nan, nan, False),     # never served: violated
        ("t1", "unfinished", nan, nan, nan, False),
        ("mean", "finished", 1.0, 2.0, 0.2, False),   # default rule: every objective given (tpot)
        ("other", "rejected", nan, nan, nan, False),  # no tier: counted apart, never violates
    ])
    v = violations(req, QOS)
    assert v["violated"].tolist() == [False, True, False, True, True, True, True, False]
    assert v["reason"].tolist() == ["", "ttft", "", "e2e", "rejected", "unfinished", "tpot", ""]
    rates = violation_rates(req, QOS)
    assert rates["tiers"]["t0"]["violation_rate"] == 0.5
    assert rates["tiers"]["t1"]["violation_rate"] == 0.75
    assert rates["tiers"]["t1"]["num_relegated"] == 1 and rates["tiers"]["t1"]["num_relegated_violations"] == 0
    assert rates["overall"] == pytest.approx(5 / 7)
    assert rates["max_tier"] == 1.0  # the "mean" tier: 1 of 1
    assert rates["num_without_tier"] == 1 and rates["num_requests"] == 8
    assert rule_value(rates, "overall") == rates["overall"]
    strict = QoS(QOS.tiers, relegated_is_violation=True)
    assert violations(req, strict)["reason"].tolist()[2] == "relegated"


def test_rejected_requests_can_be_left_out_and_not_arrived_ones_always_are():
    nan = float("nan")
    req = table([
        ("t0", "finished", 5.9, 900.0, 1.0, False),   # met
        ("t0", "not_arrived", nan, nan, nan, False),  # after the horizon: never violates, left out
        ("t1", "finished", 1.0, 601.0, 0.1, False),   # e2e missed
        ("t1", "rejected", nan, nan, nan, False),     # never servable
        ("t1", "unfinished", nan, nan, nan, False),   # still running at the horizon: violated
        ("t1", "finished", 1.0, 2.0, 0.1, False),     # met
    ])
    v = violations(req, QOS)
    assert v["violated"].tolist() == [False, False, True, True, True, False]
    assert v["outcome"].tolist() == req["outcome"].tolist()
    counted = violation_rates(req, QOS)  # rejected count as violations (the default)
    assert counted["tiers"]["t0"] == {**counted["tiers"]["t0"], "num_requests": 1, "violation_rate": 0.0,
                                      "num_not_arrived": 1, "num_rejected": 0}
    assert counted["tiers"]["t1"]["violation_rate"] == 0.75 and counted["overall"] == pytest.approx(3 / 5)
    apart = violation_rates(req, QOS, count_rejected=False)
    assert apart["tiers"]["t1"]["num_requests"] == 3 and apart["tiers"]["t1"]["violation_rate"] == pytest.approx(2 / 3)
    assert apart["tiers"]["t1"]["num_rejected"] == 1 and apart["overall"] == pytest.approx(2 / 4)
    assert (apart["num_rejected"], apart["num_not_arrived"], apart["num_judged"], apart["num_requests"]) == (1, 1, 4, 6)
    assert apart["count_rejected"] is False and counted["count_rejected"] is True


def test_slo_attainment_counts_rejected_and_not_arrived_requests_apart():
    nan = float("nan")
    req = table([
        ("t0", "finished", 1.0, 3.0, 0.05, False),    # meets ttft 2 s and tpot 0.1 s
        ("t0", "finished", 2.5, 3.0, 0.05, False),    # misses ttft
        ("t0", "unfinished", nan, nan, nan, False),   # misses
        ("t0", "rejected", nan, nan, nan, False),     # apart
        ("t0", "not_arrived", nan, nan, nan, False),  # apart
    ])
    qos = QoS.from_config({"classes": {"t0": {"ttft_s": 2.0, "tpot_s": 0.1}}})
    att = attainment_from_violations(violations(req, qos), qos)["t0"]
    assert (att["num_requests"], att["num_judged"], att["num_violations"]) == (5, 3, 2)
    assert (att["num_rejected"], att["num_not_arrived"]) == (1, 1)
    assert att["attainment"] == pytest.approx(1 / 3)
    assert att["attainment_counting_rejected"] == pytest.approx(1 / 4)
    assert att["objectives"] == {"ttft_s": 2.0, "tpot_s": 0.1}


def test_decode_deadlines_carry_the_slack_saved_on_prefill():
    # Constant 1 s steps; one request, 2-token prompt, 4 output tokens, alone: tokens k = 0..3 at
    # t = 1, 2, 3, 4. First-token deadline 2.5 s, so token k is due at max(1, 2.5) + tbt x k:
    # tbt 0.5 -> due 3.0, 3.5, 4.0 for k = 1..3: all met; tbt 0.4 -> token 3 due 3.7, came at 4: missed.
    wl = pd.DataFrame({"arrival_s": [0.0], "num_prompt_tokens": [2], "num_output_tokens": [4], "qos_class": ["a"]})
    spec = ReplicaSpec(ConstantCostModel(1.0), lambda: EDF(None), EngineLimits(), num_kv_blocks=10)
    res = simulate(wl, [spec], RoundRobin())
    assert res.requests["finish_s"].iloc[0] == 4.0
    for tbt, missed in ((0.5, False), (0.4, True)):
        qos = QoS.from_config({"classes": {"a": {"ttft_s": 2.5, "tbt_s": tbt, "violation": ["ttft", "tbt"]}}})
        assert decode_deadline_misses(res.requests, res.steps, qos).tolist() == [missed]
        assert violations(res.requests, qos, res.steps)["reason"].tolist() == ["tbt" if missed else ""]


def test_summaries_report_violations_per_tier():
    wl = pd.DataFrame({"arrival_s": [0.0, 0.0], "num_prompt_tokens": [4, 4], "num_output_tokens": [2, 2],
                       "qos_class": ["fast", "slow"]})
    spec = ReplicaSpec(ConstantCostModel(1.0), lambda: EDF(None), EngineLimits(max_num_seqs=1), num_kv_blocks=10)
    res = simulate(wl, [spec], RoundRobin())
    s = summarize(res.requests, res.steps, QoS.from_config({"classes": {"fast": {"ttft_s": 1.5}, "slow": {"ttft_s": 1.5}}}))
    # one at a time: the first served has its first token at 1 s, the other at 3 s
    assert s["violations"]["tiers"]["fast"]["num_violations"] + s["violations"]["tiers"]["slow"]["num_violations"] == 1
    assert s["violations"]["overall"] == 0.5
    assert sorted(a["attainment"] for a in s["slo_attainment"].values()) == [0.0, 1.0]
    with pytest.raises(TypeError, match="QoS.from_config"):
        summarize(res.requests, res.steps, {"fast": {"ttft_s": 1.5}})  # a bare classes mapping would judge nothing


def test_rolling_violation_rate_by_arrival_time():
    req = table([("t0", "finished", 1.0, 2.0, 0.0, False)] * 4 + [("t0", "finished", 9.0, 10.0, 0.0, False)] * 4)
    ts = violation_timeseries(req, QOS, window_s=4.0, step_s=2.0)
    overall = ts[ts["tier"] == "overall"].set_index("time_s")
    # arrivals at 0..7: violations from arrival 4 on; window (t-4, t]
    assert overall.loc[2.0, "violation_rate"] == 0.0 and overall.loc[2.0, "num_requests"] == 3
    assert overall.loc[6.0, "violation_rate"] == pytest.approx(3 / 4)
    assert set(ts["tier"]) == {"overall", "t0", "t1", "mean"}


def test_tier_dataclass_validates():
    with pytest.raises(InputError):
        Tier("x", ttft_s=0.0)
    assert Tier("x", e2e_s=10.0, tbt_s=1.0).first_token_deadline_s(4) == 6.0


def test_attainment_and_violation_rates_are_one_judgement_aggregated_twice():
    nan = float("nan")
    req = table([
        ("t0", "finished", 5.9, 900.0, 1.0, False),
        ("t0", "finished", 6.1, 7.0, 0.0, False),
        ("t1", "finished", 1.0, 601.0, 0.1, True),
        ("t1", "rejected", nan, nan, nan, False),
        ("t1", "unfinished", nan, nan, nan, False),
        ("t1", "not_arrived", nan, nan, nan, False),
        ("mean", "finished", 1.0, 2.0, 0.05, False),
    ])
    v = violations(req, QOS)
    att = attainment_from_violations(v, QOS)
    rates = rates_from_violations(v, QOS, count_rejected=False)
    for name in QOS.tiers:
        assert att[name]["num_violations"] == rates["tiers"][name]["num_violations"]
        assert att[name]["num_judged"] == rates["tiers"][name]["num_requests"]
        assert att[name]["attainment"] == pytest.approx(1 - rates["tiers"][name]["violation_rate"])
    assert (att["t1"]["num_judged"], att["t1"]["attainment"], att["t1"]["num_rejected"]) == (2, 0.0, 1)


def test_the_longest_token_gap_and_per_token_deadlines_are_two_named_objectives():
    # Constant 1 s steps, one request alone: tokens at t = 1, 2, 3, 4, so every gap is 1 s.
    wl = pd.DataFrame({"arrival_s": [0.0], "num_prompt_tokens": [2], "num_output_tokens": [4], "qos_class": ["a"]})
    spec = ReplicaSpec(ConstantCostModel(1.0), lambda: EDF(None), EngineLimits(), num_kv_blocks=10)
    res = simulate(wl, [spec], RoundRobin())
    assert res.requests["tbt_max_s"].iloc[0] == 1.0

    def reason(**tier):
        qos = QoS.from_config({"classes": {"a": tier}})
        return violations(res.requests, qos, res.steps)["reason"].iloc[0]

    assert reason(tbt_max_s=1.0) == "" and reason(tbt_max_s=0.9) == "tbt_max"  # counted by default when given
    # tbt: token k due max(first token, first-token deadline 3 s) + 0.9 k: the slack of the early first
    # token covers the 1 s gaps (due 3.9, 4.8, 5.7 for tokens at 2, 3, 4) while the longest gap misses 0.9 s
    assert reason(ttft_s=3.0, tbt_s=0.9, violation=["tbt"]) == ""
    assert reason(ttft_s=3.0, tbt_s=0.9, tbt_max_s=0.9, violation=["tbt", "tbt_max"]) == "tbt_max"
    assert QoS.from_config({"classes": {"a": {"ttft_s": 1.0, "tbt_max_s": 0.5}}}).tiers["a"].violation == ("ttft", "tbt_max")


def test_a_tier_without_objectives_is_violated_only_by_not_being_served():
    nan = float("nan")
    req = table([("best_effort", "finished", 99.0, 999.0, 9.0, False), ("best_effort", "unfinished", nan, nan, nan, False),
                 ("best_effort", "rejected", nan, nan, nan, False)])
    qos = QoS.from_config({"classes": {"best_effort": {"share": 1.0}}})
    assert violations(req, qos)["reason"].tolist() == ["", "unfinished", "rejected"]
    att = attainment_from_violations(violations(req, qos), qos)["best_effort"]
    assert (att["attainment"], att["attainment_counting_rejected"], att["objectives"]) == (0.5, pytest.approx(1 / 3), {})


def test_a_star_tier_judges_the_classes_without_their_own():
    req = table([("t0", "finished", 3.0, 4.0, 0.0, False), ("gold", "finished", 3.0, 4.0, 0.0, False),
                 ("silver", "finished", 1.0, 4.0, 0.0, False)])
    qos = QoS.from_config({"classes": {"t0": {"ttft_s": 6.0}, "*": {"ttft_s": 2.0}}})
    v = violations(req, qos)
    assert v["tier"].tolist() == ["t0", "*", "*"] and v["reason"].tolist() == ["", "ttft", ""]
    att = attainment_from_violations(v, qos)
    assert (att["t0"]["attainment"], att["*"]["num_requests"], att["*"]["attainment"]) == (1.0, 2, 0.5)
    assert qos.first_token_deadline_s("gold", 10) == math.inf  # schedulers see only named tiers


def test_per_token_deadlines_follow_a_request_across_replicas():
    # replica 0 steps end at 1, 2; replica 1 steps end at 50, 51, 3, 4. The request's tokens: steps 0-1
    # on replica 0 (t = 1, 2), then steps 2-3 on replica 1 (t = 3, 4); token k is due 1 + k: all met.
    steps = pd.DataFrame({"replica": [0, 0, 1, 1, 1, 1], "step": [0, 1, 0, 1, 2, 3],
                          "start_s": [0.0, 1.0, 49.0, 50.0, 2.0, 3.0], "duration_s": 1.0})
    req = pd.DataFrame({"request_id": [0], "arrival_s": [0.0], "qos_class": ["a"], "outcome": ["finished"],
                        "ttft_s": [1.0], "e2e_s": [4.0], "tpot_s": [1.0], "num_output_tokens": [4],
                        "num_output_tokens_done": [4], "replica": [1], "relegated": [False],
                        "token_steps": [np.array([0, 1, 2, 3], dtype=np.int32)],
                        "token_replicas": [np.array([0, 1], dtype=np.int32)]})
    qos = QoS.from_config({"classes": {"a": {"ttft_s": 1.0, "tbt_s": 1.0, "violation": ["ttft", "tbt"]}}})
    assert decode_deadline_misses(req, steps, qos).tolist() == [False]
    # read as if every run were on replica 1, tokens 2-3 would come at 50 and 51: late
    assert decode_deadline_misses(req.assign(token_replicas=[None]), steps, qos).tolist() == [True]
