"""Waiting-time estimators (policies/estimators/waiting.py) and QLM's MILP (policies/control/
qlm_milp.py), by hand: the released formula, the statistical one's moments, prior, quantiles
and violation probability, rates from a cost model; the MILP's known optimum on toy
instances, its feasibility with two or more replicas, and the EDF fallback when it has no
answer in time.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.control.qlm_milp import MilpInstance, solve
from policies.estimators.waiting import (Ahead, Estimate, OutputLengths, Rates, ReleasedRWT, StatisticalRWT,
                                         make_estimator, rates_from_cost_model)
from sim.costmodel import ConstantCostModel
from sim.errors import InputError


def test_released_estimate_is_groups_ahead_times_tokens_over_throughput_plus_swaps():
    est = ReleasedRWT(100)
    rates = Rates(lambda b: 50.0 * b, 1000.0, cap=10)  # 500 tokens/s at the cap
    # 7 requests in groups ahead, 3 held (ignored by the released code), one 4 s swap
    a = Ahead({"i": 5, "b": 5}, num_in_groups=7, prompt_tokens=999, done_tokens=50, swap_s=4.0)
    assert est.estimate(a, rates).mean_s == 7 * 100 / 500 + 4.0
    assert est.estimate(Ahead(), rates).mean_s == 0.0
    est.observe("i", 5000)  # it does not learn
    assert est.mean_output_tokens("i") == 100.0


def test_output_lengths_use_the_exponential_prior_then_the_empirical_moments():
    ol = OutputLengths(prior_mean=100.0, min_samples=3)
    assert ol.moments("i") == (100.0, 10000.0)
    for x in (10, 20):
        ol.add("i", x)
    assert ol.moments("i") == (100.0, 10000.0)  # still 2 < 3 samples
    ol.add("i", 60)
    mean, var = ol.moments("i")
    assert mean == pytest.approx(30.0) and var == pytest.approx(np.var([10, 20, 60], ddof=1))
    assert ol.moments("b") == (100.0, 10000.0)  # per class


def test_statistical_estimate_by_hand():
    est = StatisticalRWT(prior_mean_tokens=100.0, min_samples=2)
    for x in (40, 60):
        est.observe("i", x)  # mean 50, variance 200
    rates = Rates(lambda b: 10.0 * b, 200.0, cap=4)
    # N = 6 ahead (4 "i", 2 "b" with the prior 100 / 10^4), cap 4: the first slot frees after
    # 6 - 4 + 1 = 3 finish: share 1/2 of the work. Decode work 4 x 50 + 2 x 100 - 40 done = 360
    # tokens at batch 4 (40 tokens/s) = 9 s; prompts 400 at 200/s = 2 s; so mean
    # = 0.5 x (9 + 2) + 3 (swap) = 8.5 s; sd = 0.5 x sqrt(4 x 200 + 2 x 10^4) / 40.
    a = Ahead({"i": 4, "b": 2}, num_in_groups=6, prompt_tokens=400, done_tokens=40, swap_s=3.0)
    e = est.estimate(a, rates)
    assert e.mean_s == pytest.approx(8.5)
    assert e.sd_s == pytest.approx(0.5 * math.sqrt(20800.0) / 40.0)
    assert e.quantile_s(0.5) == pytest.approx(8.5)
    assert e.quantile_s(0.9) == pytest.approx(8.5 + 1.2815515655446004 * e.sd_s)
    assert e.quantile_s(0.1) == pytest.approx(max(3.0, 8.5 - 1.2815515655446004 * e.sd_s))
    assert e.violation_probability(8.5) == pytest.approx(0.5)
    assert e.violation_probability(2.9) == 1.0  # shorter than the swap alone
    assert e.violation_probability(math.inf) == 0.0
    # fewer ahead than the cap: a slot is free, only the swap remains
    assert est.estimate(Ahead({"i": 3}, 3, 10, 0, 1.5), rates).mean_s == 1.5


def test_calibrated_statistical_estimate_scales_by_the_realised_ratios():
    est = StatisticalRWT(prior_mean_tokens=100.0, min_samples=3, calibrate=True)
    rates = Rates(lambda b: 10.0 * b, 1e9, cap=1)
    ahead = Ahead({"i": 2}, 2, 0, 0, 0.0)  # 2 x 100 tokens at 10 tokens/s: modelled 20 s
    assert est.estimate(ahead, rates).mean_s == pytest.approx(20.0)
    est.observe_wait(2.0, 4.0)
    est.observe_wait(2.0, 2.0)
    est.observe_wait(0.1, 9.0)  # under MIN_CALIBRATED_S: ignored
    assert est.estimate(ahead, rates).mean_s == pytest.approx(20.0)  # 2 < 3 ratios: the model alone
    est.observe_wait(1.0, 3.0)  # ratios 2, 1, 3
    e = est.estimate(ahead, rates)
    assert e.raw_s == pytest.approx(20.0) and e.mean_s == pytest.approx(40.0)  # median ratio 2
    assert e.quantile_s(0.9) == pytest.approx(20.0 * 2.8)
    assert e.violation_probability(50.0) == pytest.approx(1 / 3)  # only ratio 3 > 2.5
    assert StatisticalRWT(calibrate=False).calibrate is False


def test_point_estimates_have_0_1_violation_probabilities():
    e = Estimate(5.0)
    assert e.quantile_s(0.9) == 5.0 and e.violation_probability(4.9) == 1.0 and e.violation_probability(5.0) == 0.0


def test_rates_from_a_cost_model():
    cm = ConstantCostModel(0.5)
    r = rates_from_cost_model(cm, cap=8, token_budget=2048, context_tokens=300)
    assert r.decode_at(4) == 8.0 and r.decode_at(100) == 16.0  # batch capped at 8 -> 8 / 0.5 s
    assert r.prefill_tok_s == 4096.0


def test_unknown_estimator_is_an_input_error():
    with pytest.raises(InputError) as e:
        make_estimator("oracle", 100)
    assert e.value.field == "estimator"


# ---------------------------------------------------------------------------------- MILP
def _inst(**kw):
    base = dict(deadline_s=[10.0, 3.0], size=[1, 1], model=["A", "A"], service_s=[[4.0], [2.0]],
                allowed=[[True], [True]], base_s=[0.0], current_model=["A"], load_s=[{"A": 0.0}], num_slots=2)
    base.update(kw)
    return MilpInstance(**base)


def test_milp_orders_one_queue_so_nobody_misses():
    # g0 (4 s, due 10) and g1 (2 s, due 3) on one replica: g1 first meets both (g0 starts at
    # 2 <= 10); g0 first makes g1 start at 4 > 3. Known optimum: [g1, g0], no violation.
    plan = solve(_inst(), 5.0)
    assert plan.queues == [[1, 0]] and plan.num_violations == 0 and plan.num_swaps == 0


def test_milp_trades_a_swap_against_violations():
    # Replicas 0 (A) and 1 (B); three A groups of 2 requests, each 3 s, due in 3.5 s; loading A
    # on replica 1 takes 1 s. All on replica 0: starts 0, 3, 6 -> one group misses (cost 2).
    # Swapping replica 1 to A: starts 0, 3 on r0 and 1 on r1 -> none misses, cost = the swap
    # penalty. Penalty 1 < 2: the optimum swaps; penalty 5 > 2: it keeps one group late.
    kw = dict(deadline_s=[3.5] * 3, size=[2] * 3, model=["A"] * 3, service_s=[[3.0, 3.0]] * 3,
              allowed=[[True, True]] * 3, base_s=[0.0, 0.0], current_model=["A", "B"],
              load_s=[{"A": 0.0}, {"A": 1.0}], num_slots=3)
    cheap = solve(MilpInstance(**kw, swap_penalty=1.0), 5.0)
    assert cheap.num_violations == 0 and cheap.num_swaps == 1 and len(cheap.queues[1]) == 1
    dear = solve(MilpInstance(**kw, swap_penalty=5.0), 5.0)
    assert dear.num_swaps == 0 and dear.num_violations == 2 and dear.queues[1] == []


def test_milp_respects_forbidden_pairs():
    plan = solve(_inst(allowed=[[True, False], [False, True]], service_s=[[4.0, 4.0], [2.0, 2.0]],
                       base_s=[0.0, 0.0], current_model=["A", "A"], load_s=[{"A": 0.0}, {"A": 0.0}]), 5.0)
    assert plan.queues == [[0], [1]]


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 4), st.integers(1, 6))
def test_milp_is_feasible_with_two_or_more_replicas(seed, num_replicas, num_groups):
    # the released LP (every slot filled) is infeasible as soon as slots outnumber groups;
    # here slots may stay empty, so any instance with room for every group has a plan
    rng = np.random.default_rng(seed)
    models = ["A", "B", "C"]
    inst = MilpInstance(
        deadline_s=list(rng.choice([1.0, 5.0, 30.0, math.inf], num_groups)),
        size=[int(x) for x in rng.integers(1, 6, num_groups)],
        model=[str(m) for m in rng.choice(models, num_groups)],
        service_s=rng.uniform(0.5, 10.0, (num_groups, num_replicas)).tolist(),
        allowed=[[True] * num_replicas for _ in range(num_groups)],
        base_s=rng.uniform(0.0, 3.0, num_replicas).tolist(),
        current_model=[str(m) for m in rng.choice(models, num_replicas)],
        load_s=[{m: float(rng.uniform(1.0, 5.0)) for m in models} for _ in range(num_replicas)],
        num_slots=max(1, -(-num_groups // num_replicas) + 1))
    plan = solve(inst, 10.0)
    assert plan is not None and plan.status == 0
    assert sorted(g for q in plan.queues for g in q) == list(range(num_groups))
    # the plan is at least as good as every group on its own replica in input order when that fits
    assert plan.num_violations <= sum(inst.size)


def test_milp_without_an_answer_in_time_returns_none():
    # 12 groups, 4 replicas and 1 microsecond: HiGHS stops before a feasible point
    rng = np.random.default_rng(3)
    g, r = 12, 4
    inst = MilpInstance(deadline_s=list(rng.uniform(1, 20, g)), size=[3] * g, model=["A", "B"] * (g // 2),
                        service_s=rng.uniform(1, 5, (g, r)).tolist(), allowed=[[True] * r] * g,
                        base_s=[0.0] * r, current_model=["A", "B", "A", "B"],
                        load_s=[{"A": 2.0, "B": 2.0}] * r, num_slots=5)
    assert solve(inst, 1e-6) is None
