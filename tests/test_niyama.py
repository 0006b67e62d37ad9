"""EDF, SRPF, Niyama and siloed pools: hand-computable cases and properties.

A constant step cost (`ConstantCostModel`) makes every timestamp exact; deadlines come from
small hand-written tiers.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies.edf import EDF
from policies.fcfs import FCFS, Sarathi
from policies.niyama import CHUNK_GRID, LOW_KV_CHUNK_GRID, Niyama, choose_step_tokens
from policies.routing import RoundRobin
from policies.siloed import SiloedRouter
from policies.srpf import SRPF
from sim.cluster import ReplicaSpec, simulate
from sim.costmodel import ConstantCostModel
from sim.errors import InputError
from sim.qos import QoS, violation_rates
from sim.scheduling import EngineLimits

COST = ConstantCostModel(1.0)


def tiers(**classes) -> dict:
    return {"classes": classes}


def run(rows, policy, *, cost=COST, kv_blocks=4000, fast_forward=True, **limits):
    """rows: (arrival_s, prompt, output, qos_class); 4000 blocks of 16 tokens: KV is not "low" for Niyama."""
    wl = pd.DataFrame(rows, columns=["arrival_s", "num_prompt_tokens", "num_output_tokens", "qos_class"])
    spec = ReplicaSpec(cost, policy, EngineLimits(**limits), num_kv_blocks=kv_blocks, block_size=16)
    return simulate(wl, [spec], RoundRobin(), check_plans=True, fast_forward=fast_forward)


def service_order(res) -> list[int]:
    r = res.requests
    return r.sort_values(["first_scheduled_s", "request_id"])["request_id"].tolist()


# ------------------------------------------------------------------ priority order


def test_edf_serves_in_first_token_deadline_order():
    slo = tiers(a={"ttft_s": 30.0}, b={"ttft_s": 10.0}, c={"ttft_s": 20.0})
    rows = [(0.0, 8, 1, "a"), (0.0, 8, 1, "b"), (0.0, 8, 1, "c")]
    res = run(rows, lambda: EDF(slo), max_num_seqs=1)
    assert service_order(res) == [1, 2, 0]
    assert res.requests.set_index("request_id")["deadline_s"].to_dict() == {0: 30.0, 1: 10.0, 2: 20.0}


def test_edf_derives_batch_deadlines_from_end_to_end_and_predicted_output():
    # tier "batch": e2e 100 s, tbt 1 s: first-token deadline = 100 - output tokens x 1 s
    slo = tiers(batch={"e2e_s": 100.0, "tbt_s": 1.0}, inter={"ttft_s": 50.0})
    rows = [(0.0, 8, 60, "batch"), (0.0, 8, 1, "inter"), (0.0, 8, 20, "batch")]
    res = run(rows, lambda: EDF(slo), max_num_seqs=1)
    # deadlines: 40, 50, 80
    assert service_order(res) == [0, 1, 2]
    assert res.requests["deadline_s"].tolist() == [40.0, 50.0, 80.0]


def test_srpf_serves_shortest_remaining_prompt_first():
    rows = [(0.0, 30, 1, "x"), (0.0, 10, 1, "x"), (0.0, 20, 1, "x")]
    res = run(rows, SRPF, max_num_seqs=1)
    assert service_order(res) == [1, 2, 0]


def test_hybrid_key_blends_deadline_and_remaining_prompt():
    # keys: deadline + 0.008 s x prompt tokens: A 6 + 8 = 14, B 6 + 0.8 = 6.8, C 10 + 0.08 = 10.08
    slo = tiers(t0={"ttft_s": 6.0}, t1={"ttft_s": 10.0})
    rows = [(0.0, 1000, 1, "t0"), (0.0, 100, 1, "t0"), (0.0, 10, 1, "t1")]
    niyama = run(rows, lambda: Niyama(slo, relegation=False), max_num_seqs=1)
    assert service_order(niyama) == [1, 2, 0]
    edf_order = run(rows, lambda: Niyama(slo, relegation=False, hybrid_priority=False), max_num_seqs=1)
    assert service_order(edf_order) == [0, 1, 2]  # A and B tie on deadline: arrival order, then C


def test_an_urgent_arrival_overtakes_a_running_lax_prefill_at_the_next_chunk():
    # budget 10 tokens/step: the lax request's 40-token prompt is chunked; the urgent one
    # arriving at 0.5 takes the next step's budget before the lax prefill continues.
    slo = tiers(lax={"ttft_s": 100.0}, urgent={"ttft_s": 5.0})
    rows = [(0.0, 40, 1, "lax"), (0.5, 10, 1, "urgent")]
    res = run(rows, lambda: EDF(slo), max_num_batched_tokens=10, max_num_seqs=10)
    r = res.requests.set_index("request_id")
    assert r.loc[1, "first_token_s"] == 2.0  # step [1, 2)
    assert r.loc[0, "first_token_s"] == 5.0  # 10 tokens in [0,1), then 3 more steps after the urgent one
    assert res.steps["num_prefill_tokens"].tolist() == [10, 10, 10, 10, 10]


# ------------------------------------------------------------------ dynamic chunking


@pytest.mark.parametrize("slack,expected", [
    (math.inf, 2552),   # no decode deadline: the largest grid value
    (0.0, 128),         # no slack: the smallest
    (-1.0, 128),
    (0.01, 128),        # nothing fits: the smallest anyway
    (0.1, 512),         # 1.2 x (0.01 + 1e-4 T) <= 0.1  <=>  T <= 733.3
    (0.2, 1536),        # T <= 1566.7
    (0.3, 2048),        # T <= 2400
    (0.35, 2552),       # T <= 2816.7
])
def test_chunk_is_the_largest_grid_value_whose_predicted_time_fits_the_slack(slack, expected):
    cost = ConstantCostModel(base_s=0.01, per_token_s=1e-4)
    got = choose_step_tokens(slack, cost, num_decodes=10, decode_context_sum=5000, prefill_context=0,
                             grid=CHUNK_GRID, safety_factor=1.2)
    assert got == expected


def test_low_kv_grid_caps_the_chunk_at_512():
    cost = ConstantCostModel(base_s=0.01, per_token_s=1e-4)
    assert choose_step_tokens(10.0, cost, num_decodes=0, decode_context_sum=0, prefill_context=0,
                              grid=LOW_KV_CHUNK_GRID) == 512


def test_niyama_sizes_the_prefill_chunk_to_the_tightest_decode_slack():
    # Cost 0.01 s + 1e-4 s/token. R0 (tbt 0.1 s, ttft 0.05 s) prefills alone at t=0 (no decode:
    # the largest step, 2552 tokens covers its 8-token prompt), emitting its first token at
    # 0.0108. R1 (a 3000-token prompt, no deadline) arrives meanwhile. At t=0.0108 R0's
    # token 1 is due at max(0.0108, 0.05) + 0.1 = 0.15: slack 0.1392 s, so T <= 1059.9 ->
    # grid value 1024, i.e. 1023 prefill tokens beside R0's decode.
    slo = tiers(inter={"ttft_s": 0.05, "tbt_s": 0.1})
    cost = ConstantCostModel(base_s=0.01, per_token_s=1e-4)
    rows = [(0.0, 8, 3, "inter"), (0.001, 3000, 1, "none")]
    res = run(rows, lambda: Niyama(slo, relegation=False), cost=cost, kv_blocks=5000, max_num_batched_tokens=4096)
    steps = res.steps
    assert steps["num_prefill_tokens"].iloc[0] == 8
    assert steps["num_decodes"].iloc[1] == 1 and steps["num_prefill_tokens"].iloc[1] == 1023
    assert (res.requests["outcome"] == "finished").all()
    # With 1000 blocks of 16 tokens free KV is "low" (< 32000 tokens): the grid stops at 512.
    low = run(rows, lambda: Niyama(slo, relegation=False), cost=cost, kv_blocks=1000, max_num_batched_tokens=4096)
    assert low.steps["num_prefill_tokens"].iloc[1] == 511


def test_fixed_chunk_ablation_uses_the_chunk_size_every_step():
    rows = [(0.0, 1000, 1, "x")]
    res = run(rows, lambda: Niyama(None, dynamic_chunking=False, chunk_size=256), max_num_batched_tokens=4096)
    assert res.steps["num_prefill_tokens"].tolist() == [256, 256, 256, 232]


# ------------------------------------------------------------------ relegation


@pytest.mark.parametrize("ttft_s,relegated", [(1.5, False), (1.49, True)])
def test_relegation_triggers_exactly_when_the_deadline_can_no_longer_be_met(ttft_s, relegated):
    # X's 1000-token prefill fills [0, 1) (observed 1000 tok/s: the estimate stays 1000).
    # R arrives at 0.5 with 1000 prompt tokens and is first considered at t=1: it needs
    # 1000 / 1000 = 1 s, so it makes a deadline of 0.5 + ttft_s iff 2.0 <= 0.5 + ttft_s.
    slo = tiers(x={"ttft_s": 100.0}, r={"ttft_s": ttft_s})
    rows = [(0.0, 1000, 1, "x"), (0.5, 1000, 3, "r")]
    res = run(rows, lambda: Niyama(slo, initial_prefill_tps=1000.0), max_num_batched_tokens=2048)
    r = res.requests.set_index("request_id")
    assert bool(r.loc[1, "relegated"]) is relegated
    assert r.loc[1, "outcome"] == "finished"  # relegated or not, it is served
    assert r.loc[1, "first_token_s"] == 2.0


def test_a_relegated_request_waits_behind_feasible_ones_but_still_finishes():
    # One sequence slot. D (doomed: deadline 1.2 s) and F (feasible) wait while X runs
    # until t=1. D's key is smaller, but at t=1 it needs 1 s more: relegated, F goes first.
    slo = tiers(x={"ttft_s": 100.0}, doomed={"ttft_s": 1.2}, ok={"ttft_s": 50.0})
    rows = [(0.0, 1000, 1, "x"), (0.1, 1000, 2, "doomed"), (0.2, 1000, 2, "ok")]
    res = run(rows, lambda: Niyama(slo, initial_prefill_tps=1000.0), max_num_seqs=1, max_num_batched_tokens=2048)
    r = res.requests.set_index("request_id")
    assert r.loc[1, "relegated"] and not r.loc[2, "relegated"]
    assert r.loc[2, "first_scheduled_s"] < r.loc[1, "first_scheduled_s"]
    assert (r["outcome"] == "finished").all()
    rates = violation_rates(res.requests, QoS.from_config(slo))
    assert rates["tiers"]["doomed"]["num_relegated"] == 1
    assert rates["tiers"]["doomed"]["num_relegated_violations"] == 1


def test_relegation_off_and_non_relegable_requests_are_never_relegated():
    slo = tiers(x={"ttft_s": 100.0}, doomed={"ttft_s": 1.2}, ok={"ttft_s": 50.0})
    rows = [(0.0, 1000, 1, "x"), (0.1, 1000, 2, "doomed"), (0.2, 1000, 2, "ok")]
    for policy in (lambda: Niyama(slo, initial_prefill_tps=1000.0, relegation=False),
                   lambda: Niyama(slo, initial_prefill_tps=1000.0, relegable_classes=["ok"]),
                   lambda: Niyama(slo, initial_prefill_tps=1000.0, relegable_share=0.0)):
        res = run(rows, policy, max_num_seqs=1, max_num_batched_tokens=2048)
        r = res.requests.set_index("request_id")
        assert not r["relegated"].any()
        assert r.loc[1, "first_scheduled_s"] < r.loc[2, "first_scheduled_s"]  # plain key order


def test_bad_niyama_settings_are_input_errors():
    with pytest.raises(InputError, match="chunk_grid"):
        Niyama(None, chunk_grid=[])
    with pytest.raises(InputError, match="prefill_tps_ema_weight"):
        Niyama(None, prefill_tps_ema_weight=1.0)


# ------------------------------------------------------------------ properties

PUBLISHED = None


def published():
    global PUBLISHED
    if PUBLISHED is None:
        from sim.costmodels.linear import LinearRegimesCostModel, Regime

        PUBLISHED = LinearRegimesCostModel(
            [Regime(512, {"const": 0.014936, "total_tokens": 5.882475e-5, "prefill_tokens": 2.247956e-5,
                          "num_decodes": 3.634519e-5, "decode_context_sum": 1.111258e-7,
                          "prefill_context": 7.554773e-7}),
             Regime(None, {"const": 0.005004, "total_tokens": 2.719050e-5, "prefill_tokens": 6.863043e-5,
                           "num_decodes": -4.143993e-5, "decode_context_sum": 1.663409e-7,
                           "prefill_context": 2.727223e-6})], name="published-test")
    return PUBLISHED


@st.composite
def workloads(draw, max_prompt=3000):
    n = draw(st.integers(1, 30))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    rate = draw(st.floats(0.5, 40.0))
    return pd.DataFrame({
        "arrival_s": np.cumsum(rng.exponential(1.0 / rate, n)),
        "num_prompt_tokens": rng.integers(1, draw(st.integers(2, max_prompt)), n),
        "num_output_tokens": rng.integers(1, draw(st.integers(2, 200)), n),
        "qos_class": rng.choice(["t0", "t1", "t2"], n),
    })


GENEROUS = tiers(t0={"ttft_s": 1e7, "tbt_s": 1e7, "violation": ["ttft", "tbt"]},
                 t1={"e2e_s": 1e7, "tbt_s": 1.0}, t2={"e2e_s": 2e7, "tpot_s": 1e7})
ALL_POLICIES = {
    "fcfs": FCFS, "sarathi": lambda: Sarathi(64), "edf": lambda: EDF(GENEROUS, 128), "srpf": lambda: SRPF(128),
    "niyama": lambda: Niyama(GENEROUS), "niyama_fixed": lambda: Niyama(GENEROUS, dynamic_chunking=False, chunk_size=128),
}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wl=workloads(), policy=st.sampled_from(sorted(ALL_POLICIES)), kv=st.integers(250, 2000),
       seqs=st.integers(1, 64))
def test_with_generous_deadlines_no_policy_violates(wl, policy, kv, seqs):
    spec = ReplicaSpec(published(), ALL_POLICIES[policy], EngineLimits(max_num_seqs=seqs, max_num_batched_tokens=2552,
                                                                      max_model_len=4000),
                       num_kv_blocks=kv, block_size=16)
    res = simulate(wl, [spec], RoundRobin(), check_plans=True)
    assert (res.requests["outcome"] == "finished").all()
    rates = violation_rates(res.requests, QoS.from_config(GENEROUS), res.steps)
    assert rates["num_violations"] == 0 and rates["num_requests"] == len(wl)


class RecordingNiyama(Niyama):
    """Niyama that records, per step, the chosen total T and the plan's token counts."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.log: list[tuple[int, int, int, int]] = []  # (budget, T or -1, decodes, prefill tokens)
        self._t = -1

    def step_tokens(self, ctx, plan, head_context):
        self._t = super().step_tokens(ctx, plan, head_context)
        return self._t

    def schedule(self, ctx):
        self._t = -1
        plan = super().schedule(ctx)
        decodes = sum(1 for r, n in zip(plan.scheduled, plan.num_new_tokens)
                      if n == 1 and r.num_prompt_tokens + r.num_output_done - r.num_computed_tokens == 1)
        self.log.append((ctx.limits.max_num_batched_tokens, self._t, decodes, sum(plan.num_new_tokens) - decodes))
        return plan


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wl=workloads(), budget=st.integers(16, 4096), kv=st.integers(250, 3000), low_kv=st.integers(0, 60000))
def test_niyama_chunk_never_exceeds_the_token_budget(wl, budget, kv, low_kv):
    slo = tiers(t0={"ttft_s": 0.5, "tbt_s": 0.05}, t1={"e2e_s": 60.0, "tbt_s": 0.4}, t2={"e2e_s": 120.0, "tbt_s": 0.4})
    made: list[RecordingNiyama] = []

    def factory():
        made.append(RecordingNiyama(slo, low_kv_free_tokens=low_kv))
        return made[-1]

    spec = ReplicaSpec(published(), factory, EngineLimits(max_num_batched_tokens=budget, max_num_seqs=min(budget, 256),
                                                          max_model_len=8000),
                       num_kv_blocks=kv, block_size=16)
    res = simulate(wl, [spec], RoundRobin(), check_plans=True)
    assert (res.requests["outcome"] != "unfinished").all()
    for limit, total, decodes, prefill in made[0].log:
        assert decodes + prefill <= limit
        if total >= 0:
            assert total <= limit and prefill <= max(0, total - decodes)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wl=workloads(max_prompt=800))
def test_niyama_with_every_mechanism_off_is_edf_with_a_fixed_chunk(wl):
    slo = tiers(t0={"ttft_s": 2.0, "tbt_s": 0.05}, t1={"e2e_s": 30.0, "tbt_s": 0.4}, t2={"e2e_s": 90.0, "tbt_s": 0.4})
    off = run(wl.itertuples(index=False), lambda: Niyama(slo, dynamic_chunking=False, chunk_size=192,
                                                         hybrid_priority=False, relegation=False),
              cost=published(), max_num_batched_tokens=2552)
    edf = run(wl.itertuples(index=False), lambda: EDF(slo, token_budget=192), cost=published(),
              max_num_batched_tokens=2552)
    cols = ["first_scheduled_s", "first_token_s", "finish_s", "num_preemptions"]
    pd.testing.assert_frame_equal(off.requests[cols], edf.requests[cols])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wl=workloads(max_prompt=800), kv=st.integers(150, 1000))
def test_niyama_fast_forward_gives_the_same_requests(wl, kv):
    slo = tiers(t0={"ttft_s": 1.0, "tbt_s": 0.05}, t1={"e2e_s": 20.0, "tbt_s": 0.4}, t2={"e2e_s": 60.0, "tbt_s": 0.4})
    rows = list(wl.itertuples(index=False))
    a = run(rows, lambda: Niyama(slo), cost=published(), kv_blocks=kv, fast_forward=True, max_num_batched_tokens=2552)
    b = run(rows, lambda: Niyama(slo), cost=published(), kv_blocks=kv, fast_forward=False, max_num_batched_tokens=2552)
    cols = ["first_scheduled_s", "first_token_s", "finish_s", "num_preemptions", "relegated"]
    pd.testing.assert_frame_equal(a.requests[cols], b.requests[cols], rtol=1e-9)


# ------------------------------------------------------ requests leaving by a controller


class HeldOnly:
    """A batch policy wrapper: every request a plan schedules must be held by the replica (a
    request that left is never scheduled on its old replica); records `forget` calls."""

    def __init__(self, inner, forgotten: list) -> None:
        self.inner, self.forgotten = inner, forgotten
        self.fast_forward_safe = inner.fast_forward_safe

    def schedule(self, ctx):
        plan = self.inner.schedule(ctx)
        for req in plan.scheduled + plan.admitted:
            assert req.replica == ctx.replica_id, f"{req} scheduled on replica {ctx.replica_id}, held by {req.replica}"
        return plan

    def forget(self, req) -> None:
        self.forgotten.append((req.request_id, req.replica))
        self.inner.forget(req)


class EvictAt:
    """A scripted controller: at t=1.5, evict requests 0 and 1 (recomputed wherever they resume)."""

    tick_s, wake_on, dispatch = 1.5, frozenset(), "push"

    def control(self, event, view):
        from sim.control import TICK, Evict

        return [Evict(0), Evict(1)] if event == TICK and view.now == 1.5 else []


class ToReplicaZero:
    def route(self, request, replicas, now):
        return 0


@pytest.mark.parametrize("ff", [True, False])
@pytest.mark.parametrize("make", [lambda slo: EDF(slo), lambda slo: Niyama(slo)], ids=["edf", "niyama"])
def test_a_request_evicted_waiting_or_running_is_forgotten_and_never_scheduled_on_its_old_replica(make, ff):
    # Replica 0 (budget 16 tokens, one sequence, 1 s a step) runs request 0's 64-token prompt
    # in chunks of 16 from 0 (a running prefill) while requests 1 and 2 wait. At 1.5 the
    # controller evicts request 1 (waiting: it leaves at once; idle replica 1 pulls it: tokens
    # at 2.5 and 3.5) and request 0 (running: it leaves at the end of the step in flight, at 2,
    # after 32 tokens, to the cluster queue; replica 0 then runs request 2). Replica 1 pulls
    # request 0 at 3.5 and recomputes its prompt in 4 steps: tokens at 7.5, 8.5, 9.5. The
    # policy of replica 0 forgets both and never schedules them while they are elsewhere.
    slo = tiers(t0={"ttft_s": 5.0, "tbt_s": 1.0}, t1={"ttft_s": 20.0, "tbt_s": 1.0})  # request 0 goes first
    wl = pd.DataFrame({"arrival_s": [0.0, 0.0, 0.0], "num_prompt_tokens": [64, 8, 8],
                       "num_output_tokens": [3, 2, 2], "qos_class": ["t0", "t1", "t1"], "model": ["A"] * 3})
    forgotten: dict[int, list] = {}
    policies = []

    def factory():
        policies.append(make(slo))
        return HeldOnly(policies[-1], forgotten.setdefault(len(policies) - 1, []))

    spec = ReplicaSpec(COST, factory, EngineLimits(max_num_seqs=1, max_num_batched_tokens=16), num_kv_blocks=4000,
                       block_size=16, model="A")
    res = simulate(wl, [spec, spec], ToReplicaZero(), controller=EvictAt(), check_plans=True, fast_forward=ff)
    r = res.requests.set_index("request_id")
    assert (r["outcome"] == "finished").all()
    assert r["num_evictions"].tolist() == [1, 1, 0]
    assert r["replica"].tolist() == [1, 1, 0]
    assert r["first_token_s"].tolist() == [7.5, 2.5, 3.0] and r["finish_s"].tolist() == [9.5, 3.5, 4.0]
    assert sorted(forgotten[0]) == [(0, 0), (1, 0)]
    queue, prefills = policies[0].queue, policies[0].prefills
    assert not queue._members and not queue._heap and not prefills.requests()


class ByRequest:
    def route(self, request, replicas, now):
        return request.request_id % len(replicas)


class MigrateAt:
    """A scripted controller: at t=4.5, migrate request 0 to replica 1, moving its KV cache."""

    tick_s, wake_on, dispatch = 4.5, frozenset(), "push"

    def control(self, event, view):
        from sim.control import TICK, Migrate

        return [Migrate(0, 1, mode="transfer")] if event == TICK and view.now == 4.5 else []


@pytest.mark.parametrize("ff", [True, False])
@pytest.mark.parametrize("make", [lambda slo: EDF(slo), lambda slo: Niyama(slo)], ids=["edf", "niyama"])
def test_a_request_arriving_with_its_kv_cache_is_counted_before_the_decode_pass_is_taken_fast(make, ff):
    # 1 s steps of 32 tokens, 23 KV blocks of 16 tokens. Request 0 (urgent, prompt 165) computes
    # 160 tokens on replica 0 by 5 and is migrated with its KV (160 bytes at 320 B/s: on
    # replica 1 at 5.5, computed tokens kept, no blocks held). Replica 1 runs request 1 (lax,
    # prompt 300): 192 tokens in 12 blocks at 6, 11 free. At 6 the urgent request goes first and
    # takes all 11 blocks back (165 tokens), so the running prefill is short and is preempted:
    # the fast decode pass must not promise that nobody can be, though the step's chunks
    # (32 tokens) alone would need few blocks.
    slo = tiers(urgent={"ttft_s": 10.0, "tbt_s": 1.0}, lax={"ttft_s": 100.0, "tbt_s": 1.0})
    wl = pd.DataFrame({"arrival_s": [0.0, 0.0], "num_prompt_tokens": [165, 300], "num_output_tokens": [3, 2],
                       "qos_class": ["urgent", "lax"], "model": ["A", "A"]})
    spec = ReplicaSpec(COST, lambda: make(slo), EngineLimits(max_num_seqs=4, max_num_batched_tokens=32),
                       num_kv_blocks=23, block_size=16, model="A")
    from sim.controlplane import ControlSettings

    res = simulate(wl, [spec, spec], ByRequest(), controller=MigrateAt(), check_plans=True, fast_forward=ff,
                   control=ControlSettings(kv_bytes_per_token=1, kv_transfer_bw_bytes_s=320.0))
    r = res.requests.set_index("request_id")
    assert (r["outcome"] == "finished").all() and r["replica"].tolist() == [1, 1]
    assert r.loc[0, "num_migrations"] == 1 and r.loc[0, "first_token_s"] == 7.0  # 5 tokens in [6, 7)
    assert r.loc[1, "num_preemptions"] == 1


# ------------------------------------------------------------------ siloed pools


def _siloed_specs(counts: dict[str, int]):
    specs = []
    for pool, count in counts.items():
        for _ in range(count):
            specs.append(ReplicaSpec(COST, FCFS, EngineLimits(), num_kv_blocks=500, name=f"{pool}{len(specs)}"))
    return specs


@settings(max_examples=20, deadline=None)
@given(wl=workloads(max_prompt=200), n_inter=st.integers(1, 3), n_batch=st.integers(1, 3))
def test_siloed_pools_never_share_replicas(wl, n_inter, n_batch):
    router = SiloedRouter({"inter": ["t0"], "batch": ["t1", "t2"]})
    res = simulate(wl, _siloed_specs({"inter": n_inter, "batch": n_batch}), router)
    r = res.requests
    inter_replicas = set(range(n_inter))
    assert set(r.loc[r["qos_class"] == "t0", "replica"]) <= inter_replicas
    assert not set(r.loc[r["qos_class"] != "t0", "replica"]) & inter_replicas
    assert (r["outcome"] == "finished").all()


def test_siloed_router_rejects_unknown_classes_and_empty_pools():
    router = SiloedRouter({"inter": ["t0"], "batch": ["t1"]})
    wl = pd.DataFrame({"arrival_s": [0.0], "num_prompt_tokens": [4], "num_output_tokens": [1], "qos_class": ["t9"]})
    with pytest.raises(InputError, match="t9"):
        simulate(wl, _siloed_specs({"inter": 1, "batch": 1}), router)
    wl["qos_class"] = "t1"
    with pytest.raises(InputError, match="pool 'batch' has no replica"):
        simulate(wl, _siloed_specs({"inter": 2}), router)
    with pytest.raises(InputError, match="two pools"):
        SiloedRouter({"a": ["t0"], "b": ["t0"]})
