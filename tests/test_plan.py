"""The fleet planner's library (planner/fleet.py, planner/uncertainty.py): hand-computed cases and properties.

The search is driven here by small stand-in `capacity` / `verify` functions whose truth is
known (a fleet meets its targets exactly when its replicas reach a threshold), so every
answer is computable by hand; the simulator-backed app is tested in test_plan_app.py.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.fleet import Candidate, PlanSettings, Pool, pareto_mask, plan_fleet, replica_counts
from planner.uncertainty import (LiveError, ScaledCostModel, as_live, band_factors, bootstrap_linear_models,
                                 meets, summarize_samples)
from sim.costmodel import ConstantCostModel
from sim.costmodels.files import load_cost_model
from sim.errors import InputError
from sim.paths import project_path

PRICES = {"a": 1.0, "b": 4.0, "c": 2.0, "d": 1.0}


def shared(hw: str, tp: int = 1, policy: str = "fcfs") -> Candidate:
    return Candidate("m", policy, "shared", (Pool("shared", hw, tp),))


# ---------------------------------------------------------------- replica counts (scipy milp)


def test_shared_pool_needs_the_ceiling_of_rate_over_capacity():
    assert replica_counts(shared("a"), [3.0], PRICES, 10.0) == (4,)
    assert replica_counts(shared("a"), [2.5], PRICES, 10.0) == (4,)  # exactly enough
    assert replica_counts(shared("a"), [0.0], PRICES, 10.0) is None


def test_siloed_pools_each_cover_their_classes_share():
    c = Candidate("m", "fcfs", "siloed", (Pool("interactive", "a", 1, ("interactive",), 0.7),
                                          Pool("batch", "a", 1, ("batch",), 0.3)))
    # interactive: 7 req/s / 2 per replica -> 4; batch: 3 / 5 -> 1
    assert replica_counts(c, [2.0, 5.0], PRICES, 10.0) == (4, 1)


def test_mixed_fleet_picks_the_cheapest_combination_and_breaks_cost_ties_by_gpus():
    c = Candidate("m", "fcfs", "mixed", (Pool("a", "a", 1, min_count=0), Pool("b", "b", 1, min_count=0)))
    # a: 4 req/s for $1, b: 10 req/s for $4 (1 GPU each, tp 2 below)
    assert replica_counts(c, [4.0, 10.0], PRICES, 12.0) == (3, 0)  # $3 beats 1a+1b ($5) and 2b ($8)
    c2 = Candidate("m", "fcfs", "mixed", (Pool("a", "a", 1, min_count=0), Pool("c", "c", 1, min_count=0)))
    # a: 4 req/s $1; c: 9 req/s $2. Rate 13: 4a ($4, 4 GPUs) ties 1a+1c ($3)? no: 1a+1c = $3 is cheaper
    assert replica_counts(c2, [4.0, 9.0], PRICES, 13.0) == (1, 1)
    # rate 8: 2a ($2, 2 GPUs) vs 1c ($2, 1 GPU): equal cost, fewer GPUs wins
    assert replica_counts(c2, [4.0, 9.0], PRICES, 8.0) == (0, 1)


def test_pareto_mask_by_hand():
    #          cheap+low  dear+high  dear+low (dominated)  cheap+low duplicate (not strictly worse)
    assert pareto_mask([1, 2, 2, 1], [1.0, 2.0, 1.0, 1.0]) == [True, True, False, True]
    # equal cost, less benefit: kept (a tie in estimated cost goes to verification)
    assert pareto_mask([3, 3], [1.2, 1.1]) == [True, True]


# ---------------------------------------------------------------- the search with known truth


def truth(threshold: dict[str, int]):
    """verify: a fleet meets every target iff its replicas reach the candidate's threshold."""

    def verify(c: Candidate, counts: tuple[int, ...]) -> dict:
        ok = sum(counts) >= threshold[c.pools[0].hardware]
        return {"samples": [{"x": 1.0 if ok else 0.5}] * 4, "num_simulations": 4,
                "stats": {"output_tokens_per_s": 100.0}}
    return verify


def capacities(cap: dict[str, float], infeasible: tuple[str, ...] = (), calls: list | None = None):
    def capacity(c: Candidate, i: int, floor: float | None) -> dict:
        hw = c.pools[i].hardware
        if calls is not None:
            calls.append((hw, floor))
        if hw in infeasible:
            raise InputError("does not fit", field="tp")
        q = cap[hw]
        return {"capacity_qps": q if floor is None or q >= floor else 0.0, "num_simulations": 1}
    return capacity


def test_plan_moves_the_estimate_up_to_the_fewest_replicas_that_meet_and_prunes():
    calls: list = []
    settings_ = PlanSettings(rate_qps=20.0, targets={"x": 0.9}, num_verify=2, bound_slack=0.5)
    cands = [shared("a"), shared("b"), shared("c"), shared("d", tp=2)]
    # a: 3 req/s for $1 -> estimate 7 ($7, headroom 21/20); truth needs 8. b: 12 req/s for $4 -> 2 ($8, more
    # headroom: 24/20, so not dominated); truth 3 ($12).
    # c: 1 req/s for $2: with the bound $7 x 1.5, at most 5 replicas -> must serve 4 req/s each: pruned.
    # d: does not fit (infeasible).
    out = plan_fleet(cands, capacity=capacities({"a": 3.0, "b": 12.0, "c": 1.0, "d": 5.0}, ("d",), calls),
                     verify=truth({"a": 8, "b": 3}), prices=PRICES, settings=settings_, progress=False)
    status = {c["label"].split("/")[-1]: c["status"] for c in out["candidates"]}
    assert status == {"a-tp1": "verified", "b-tp1": "verified", "c-tp1": "pruned_bound", "d-tp2": "infeasible"}
    assert ("c", pytest.approx(4.0)) in calls  # c was asked only whether it serves the floor
    w = out["winner"]
    assert w["label"].endswith("a-tp1") and w["replicas"] == [8] and w["estimate"] == [7]
    assert w["cost_per_hour"] == 8.0 and w["gpus"] == 8
    assert w["one_fewer"] == [{"replicas": [7], "p_meet": 0.0, "meets": False, "attainment": w["one_fewer"][0]["attainment"]}]
    assert [r["label"].split("/")[-1] for r in out["ranked"]] == ["a-tp1", "b-tp1"]
    assert out["ranked"][1]["replicas"] == [3]
    # $ per million output tokens: $8/h over 100 tokens/s
    assert w["usd_per_million_output_tokens"] == pytest.approx(8.0 / (100 * 3600) * 1e6)
    n = out["counts"]
    assert (n["num_candidates"], n["num_verified"], n["num_pruned_bound"], n["num_infeasible"]) == (4, 2, 1, 1)


def test_dominated_candidates_are_not_verified():
    # same capacity, b costs more: b is dominated (more $, no more headroom)
    out = plan_fleet([shared("a"), shared("b")], capacity=capacities({"a": 5.0, "b": 5.0}),
                     verify=truth({"a": 2, "b": 2}), prices=PRICES,
                     settings=PlanSettings(rate_qps=10.0, targets={"x": 0.9}, bound_slack=10.0), progress=False)
    status = {c["label"].split("/")[-1]: c["status"] for c in out["candidates"]}
    assert status == {"a-tp1": "verified", "b-tp1": "pruned_dominated"}


def test_no_candidate_that_can_run_is_an_input_error_and_a_missing_price_too():
    with pytest.raises(InputError, match="no candidate can serve"):
        plan_fleet([shared("a")], capacity=capacities({"a": 1.0}, ("a",)), verify=truth({}), prices=PRICES,
                   settings=PlanSettings(rate_qps=1.0, targets={"x": 0.9}), progress=False)
    with pytest.raises(InputError, match="no price_per_gpu_hour"):
        plan_fleet([shared("zz")], capacity=capacities({}), verify=truth({}), prices=PRICES,
                   settings=PlanSettings(rate_qps=1.0, targets={"x": 0.9}), progress=False)


def test_a_fleet_that_never_meets_is_reported_without_a_winner():
    out = plan_fleet([shared("a")], capacity=capacities({"a": 5.0}), verify=truth({"a": 100}), prices=PRICES,
                     settings=PlanSettings(rate_qps=10.0, targets={"x": 0.9}, max_extra_replicas=2), progress=False)
    assert out["winner"] is None and out["ranked"][0]["meets"] is False
    assert [e["replicas"] for e in out["ranked"][0]["evaluated"]] == [[2], [3], [4]]


@settings(max_examples=60, deadline=None)
@given(threshold=st.integers(1, 25), capacity=st.floats(0.3, 30.0), extra=st.integers(0, 12))
def test_verification_finds_exactly_the_fewest_replicas_that_meet(threshold, capacity, extra):
    """Whatever the estimate (over or under the truth), the answer is the threshold when it is
    reachable within max_extra_replicas above the estimate, else no winner; one fewer never meets."""
    rate = 10.0
    out = plan_fleet([shared("a")], capacity=capacities({"a": capacity}), verify=truth({"a": threshold}),
                     prices=PRICES, settings=PlanSettings(rate_qps=rate, targets={"x": 0.9}, max_extra_replicas=extra),
                     progress=False)
    estimate = math.ceil(rate / capacity - 1e-9)
    if threshold <= estimate + extra:
        assert out["winner"]["replicas"] == [threshold]
        assert all(not f["meets"] for f in out["winner"]["one_fewer"])
        assert len(out["winner"]["one_fewer"]) == (threshold > 1)
    else:
        assert out["winner"] is None


def test_plan_settings_reject_bad_values():
    for kw in ({"rate_qps": 0.0}, {"confidence": 1.0}, {"targets": {"x": 1.5}}, {"num_verify": 0}):
        with pytest.raises(InputError):
            PlanSettings(**{"rate_qps": 1.0, "targets": {"x": 0.9}, **kw})
    with pytest.raises(InputError):
        Candidate("m", "fcfs", "ring", (Pool("p", "a", 1),))


# ---------------------------------------------------------------- uncertainty


def test_band_factors_are_the_midpoints_of_equal_slices():
    assert band_factors(1.0, 1.6, 3) == pytest.approx([1.1, 1.3, 1.5])
    assert band_factors(0.9, 1.1, 1) == pytest.approx([1.0])
    with pytest.raises(InputError):
        band_factors(1.2, 1.0, 2)


def test_scaled_cost_model_scales_every_path_and_keeps_capacity():
    base = ConstantCostModel(base_s=0.01, per_token_s=0.001, kv_blocks=77, load_s=3.0)
    s = ScaledCostModel(base, 1.5)
    assert s.step_time_s(10, 0, 2, 100, 3) == pytest.approx(1.5 * (0.01 + 0.012))
    assert s.step_times_s(np.array([10, 0]), np.zeros(2), np.array([2, 4]), np.zeros(2), np.ones(2)) == \
        pytest.approx([1.5 * 0.022, 1.5 * 0.014])
    assert s.num_kv_blocks(16) == 77 and s.model_load_s() == 3.0
    assert not hasattr(s, "decode_step_time_fn")  # the base has none: the simulator falls back to step_time_s
    lin = load_cost_model(project_path("profiles/cpu-llama-small/costmodel.json"))
    sl = ScaledCostModel(lin, 1.3)
    for n, ctx in [(1, 50), (7, 3000), (64, 100000)]:
        assert sl.decode_step_time_fn(n)(ctx) == pytest.approx(sl.step_time_s(0, 0, n, ctx, n))
    with pytest.raises(InputError):
        ScaledCostModel(base, 0.0)


def test_bootstrap_refits_spread_around_the_shipped_model():
    cm = load_cost_model(project_path("profiles/cpu-llama-small/costmodel.json"))
    profile = pd.read_csv(project_path("profiles/cpu-llama-small/profile.csv"))
    members = bootstrap_linear_models(cm, profile, 4, seed=1)
    assert members[0] is cm and len(members) == 4
    shapes = [(256, 0, 0, 0, 1), (0, 0, 32, 32 * 500, 32), (128, 512, 16, 16 * 800, 17)]
    for m in members[1:]:
        assert m.num_kv_blocks(128) == cm.num_kv_blocks(128)
        ratios = [m.step_time_s(*x) / cm.step_time_s(*x) for x in shapes]
        assert all(0.8 < r < 1.25 for r in ratios), ratios  # the CV error is ~2%: refits stay close
    assert any(m.step_time_s(*shapes[1]) != cm.step_time_s(*shapes[1]) for m in members[1:])  # and do differ
    again = bootstrap_linear_models(cm, profile, 4, seed=1)
    assert [m.step_time_s(*shapes[2]) for m in again] == [m.step_time_s(*shapes[2]) for m in members]
    with pytest.raises(InputError, match="fitted linear"):
        bootstrap_linear_models(ConstantCostModel(), profile, 2)


def test_live_error_rescales_latencies_and_rebuilds_e2e():
    req = pd.DataFrame({"ttft_s": [1.0, 2.0], "tpot_s": [0.1, np.nan], "num_output_tokens": [11, 1],
                        "e2e_s": [2.0, 2.0]})
    live = as_live(req, 0.25, -0.5)  # the sim was 25% slow on TTFT, 50% fast on TPOT
    assert live["ttft_s"].tolist() == pytest.approx([0.8, 1.6])
    assert live["tpot_s"].iloc[0] == pytest.approx(0.2)
    assert live["e2e_s"].tolist() == pytest.approx([0.8 + 0.2 * 10, 1.6])
    assert as_live(req, 0.0, 0.0) is req
    d = LiveError((0.1, -0.2), (0.05, 0.0), "t").draws(5, seed=0)
    assert d[0] == (0.0, 0.0) and len(d) == 5 and set(d[1:]) <= {(0.1, 0.05), (-0.2, 0.0)}
    with pytest.raises(InputError):
        LiveError((0.1,), (), "")
    with pytest.raises(InputError):
        LiveError.from_mapping({"ttft": [0.1], "tpot": [0.1], "oops": 1})


def test_summary_of_samples_by_hand():
    samples = [{"i": 0.995, "b": 1.0}, {"i": 0.985, "b": 1.0}, {"i": 0.999, "b": 0.97}, {"i": 0.991}]
    s = summarize_samples(samples, {"i": 0.99, "b": 0.99}, confidence=0.5)
    # meets: 1st yes, 2nd no (i), 3rd no (b), 4th yes (b not judged)
    assert s["p_meet"] == 0.5 and s["meets"] is True and s["num_samples"] == 4
    assert s["attainment"]["i"]["mean"] == pytest.approx(np.mean([0.995, 0.985, 0.999, 0.991]))
    assert s["attainment"]["i"]["low"] == pytest.approx(np.quantile([0.995, 0.985, 0.999, 0.991], 0.25))
    assert s["attainment"]["b"]["min"] == 0.97
    assert summarize_samples(samples, {"i": 0.99}, confidence=0.9)["meets"] is False
    assert meets({"i": 0.99}, {"i": 0.99, "b": 0.99})
    with pytest.raises(InputError):
        summarize_samples([], {"i": 0.9}, 0.9)
