"""Properties over random clusters under pressure (hypothesis).

Each scenario draws a workload, a cluster (1-6 replicas), a batch policy (every one: FCFS,
Sarathi, EDF, SRPF, Niyama and its three ablations), a router (every one, siloed pools
included) and engine limits, often hostile: KV caches just above one request's need, tiny
step budgets, prompts many budgets long, overload, chunked prefill on or off, a horizon.
Times are drawn to tie: step costs are powers of two (sums are exact in floating point),
arrivals fall on step boundaries, whole seconds or one instant, and horizons on the same
grids. Every scenario must hold the engine's invariants (plans checked each step: a policy
raising `PlanError` fails the test), give one outcome per request, conserve tokens, and give
identical tables twice, and with fast-forward on and off.

`make fuzz` runs these with the `fuzz` profile (tests/conftest.py): 5,000 examples per test.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies.edf import EDF
from policies.fcfs import FCFS, Sarathi
from policies.niyama import Niyama
from policies.routing import LeastOutstandingRequests, LeastOutstandingTokens, RoundRobin
from policies.siloed import SiloedRouter
from policies.srpf import SRPF
from sim.cluster import ReplicaSpec, simulate
from sim.costmodel import ConstantCostModel
from sim.costmodels.linear import LinearRegimesCostModel, Regime
from sim.scheduling import EngineLimits

PUBLISHED = LinearRegimesCostModel(
    [Regime(512, {"const": 0.014936, "total_tokens": 5.882475e-5, "prefill_tokens": 2.247956e-5,
                  "num_decodes": 3.634519e-5, "decode_context_sum": 1.111258e-7, "prefill_context": 7.554773e-7}),
     Regime(None, {"const": 0.005004, "total_tokens": 2.719050e-5, "prefill_tokens": 6.863043e-5,
                   "num_decodes": -4.143993e-5, "decode_context_sum": 1.663409e-7, "prefill_context": 2.727223e-6})],
    name="published-test")
CONST_10MS = LinearRegimesCostModel([Regime(None, {"const": 0.01})], name="const10ms")

POLICIES = {
    "fcfs": lambda sc: FCFS(),
    "sarathi": lambda sc: Sarathi(chunk_size=sc["policy_budget"] or 256),
    "edf": lambda sc: EDF(sc["slo"], token_budget=sc["policy_budget"]),
    "srpf": lambda sc: SRPF(token_budget=sc["policy_budget"]),
    "niyama": lambda sc: Niyama(sc["slo"], low_kv_free_tokens=sc["low_kv_free_tokens"]),
    "niyama_fixed_chunk": lambda sc: Niyama(sc["slo"], dynamic_chunking=False, chunk_size=sc["policy_budget"] or 256),
    "niyama_edf_order": lambda sc: Niyama(sc["slo"], hybrid_priority=False, low_kv_free_tokens=sc["low_kv_free_tokens"]),
    "niyama_no_relegation": lambda sc: Niyama(sc["slo"], relegation=False, low_kv_free_tokens=sc["low_kv_free_tokens"]),
}
ROUTERS = {
    "rr": RoundRobin, "lor": LeastOutstandingRequests, "lot": LeastOutstandingTokens,
    "siloed": lambda: SiloedRouter({"inter": ["t0"], "batch": ["t1", "t2"]}, default_pool="batch"),
}
REASONS = ("exceeds_max_model_len", "exceeds_kv_capacity", "exceeds_max_num_batched_tokens")


def _examples(n: int) -> int:
    """`n` examples, or the `fuzz` profile's count under `make fuzz` (see tests/conftest.py)."""
    return settings.default.max_examples if settings.get_current_profile_name() == "fuzz" else n


PROPERTY = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def scenarios(draw):
    """A workload and a cluster; see the module docstring for what is drawn and why."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n = draw(st.integers(1, 30))
    # ---- cost: a power of two per step (exact sums) or per token too; or continuous
    cost_kind = draw(st.sampled_from(["dyadic", "dyadic", "dyadic", "dyadic_per_token", "published", "const10ms"]))
    step_unit = 2.0 ** -draw(st.integers(0, 7))
    if cost_kind == "dyadic":
        cost = ConstantCostModel(base_s=step_unit)
    elif cost_kind == "dyadic_per_token":
        cost = ConstantCostModel(base_s=step_unit, per_token_s=2.0 ** -draw(st.integers(10, 16)))
    else:
        cost = PUBLISHED if cost_kind == "published" else CONST_10MS
        step_unit = 0.01 if cost_kind == "const10ms" else 2.0 ** -6
    # ---- engine limits: often tiny budgets
    budget = draw(st.sampled_from([1, 2, 8, 16, 64, 256, 2048]) | st.integers(1, 4096))
    max_num_seqs = draw(st.sampled_from([min(budget, 64), min(budget, 8)]) | st.integers(1, min(budget, 64)))
    chunked = draw(st.sampled_from([True, True, False]))
    max_model_len = draw(st.sampled_from([256, 2048, 8192, 8192]))
    policy_budget = draw(st.sampled_from([None, 1, 16, 64, 256]) | st.integers(1, 600))
    # ---- requests: prompts up to many budgets long (bounded so a scenario stays fast)
    prompt_max = min(draw(st.sampled_from([2, 64, 600, 3000])), (32 if chunked else 2) * budget + 1)
    output_max = draw(st.sampled_from([2, 20, 100, 300]))
    prompts = rng.integers(1, max(prompt_max, 2), n)
    outputs = rng.integers(1, output_max, n, endpoint=True)
    # ---- arrivals: tie-prone grids or continuous, from light load to overload
    arrival_kind = draw(st.sampled_from(["step_grid", "step_grid", "whole_seconds", "one_instant", "poisson"]))
    if arrival_kind == "step_grid":  # on multiples of (a power-of-two multiple of) the step cost
        unit = step_unit * 2.0 ** draw(st.integers(-1, 3))
        arrivals = np.sort(rng.integers(0, draw(st.integers(1, 4 * n)), n)) * unit
    elif arrival_kind == "whole_seconds":  # integer-second traces (BurstGPT): many equal times
        arrivals = np.sort(rng.integers(0, draw(st.integers(1, n)), n)).astype(float)
    elif arrival_kind == "one_instant":
        arrivals = np.full(n, float(draw(st.integers(0, 3))))
    else:
        arrivals = np.cumsum(rng.exponential(1.0 / draw(st.floats(0.5, 500.0)), n))
    qos = rng.choice(["t0", "t1", "t2", "none"], n)
    wl = pd.DataFrame({"arrival_s": arrivals, "num_prompt_tokens": prompts, "num_output_tokens": outputs,
                       "qos_class": qos})
    # ---- KV: starved (just above the largest request's need), pressed (one to three typical
    # requests' need: the larger ones are rejected, the rest fight for blocks), tiny (most
    # rejected) or ample
    block_size = draw(st.sampled_from([1, 4, 16]))
    needs = sorted(-(-(int(p) + int(o) - 1) // block_size) for p, o in zip(prompts, outputs))
    need = needs[-1]
    kv_kind = draw(st.sampled_from(["starved", "starved", "pressed", "pressed", "tiny", "ample"]))
    if kv_kind == "starved":
        kv_blocks = need + draw(st.integers(0, 3))
    elif kv_kind == "pressed":
        kv_blocks = needs[len(needs) // 2] * draw(st.integers(1, 3)) + draw(st.integers(0, 3))
    elif kv_kind == "tiny":
        kv_blocks = draw(st.integers(1, max(1, need)))
    else:
        kv_blocks = 20000
    # ---- QoS tiers: tight ones make Niyama relegate and EDF reorder
    slo = {"classes": {
        "t0": {"ttft_s": draw(st.sampled_from([0.01, 0.1, 1.0, 10.0])), "tbt_s": 0.05},
        "t1": {"e2e_s": draw(st.sampled_from([0.5, 10.0, 600.0])), "tbt_s": 0.4},
        "t2": {"e2e_s": draw(st.sampled_from([5.0, 60.0, 1800.0])), "tbt_s": draw(st.sampled_from([0.01, 0.4]))},
    }}
    router = draw(st.sampled_from(sorted(ROUTERS)))
    num_replicas = draw(st.integers(2 if router == "siloed" else 1, 6))
    horizon_kind = draw(st.sampled_from([None, None, "step_grid", "whole_seconds", "any"]))
    if horizon_kind == "step_grid":
        horizon = step_unit * draw(st.integers(1, 200))
    elif horizon_kind == "whole_seconds":
        horizon = float(draw(st.integers(1, 10)))
    elif horizon_kind == "any":
        horizon = draw(st.floats(0.001, 20.0))
    else:
        horizon = None
    return dict(
        workload=wl, cost=cost, cost_kind=cost_kind, policy=draw(st.sampled_from(sorted(POLICIES))),
        policy_budget=policy_budget, slo=slo, low_kv_free_tokens=draw(st.sampled_from([0, 32000])),
        router=router, num_replicas=num_replicas, kv_blocks=kv_blocks, block_size=block_size,
        limits=EngineLimits(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len,
                            enable_chunked_prefill=chunked),
        horizon_s=horizon,
    )


class Recorder:
    """A batch policy wrapper that books, per request id, the tokens each plan schedules, the
    computed tokens each preemption discards (read before the replica resets them) and the
    number of preemptions."""

    def __init__(self, inner, scheduled: dict, discarded: dict, preemptions: dict) -> None:
        self.inner, self.scheduled, self.discarded, self.preemptions = inner, scheduled, discarded, preemptions
        self.fast_forward_safe = inner.fast_forward_safe

    def schedule(self, ctx):
        plan = self.inner.schedule(ctx)
        assert not plan.num_group_decodes  # step by step: every token is a per-request entry
        for req, n in zip(plan.scheduled, plan.num_new_tokens):
            self.scheduled[req.request_id] += n
        for req in plan.preempted:
            self.discarded[req.request_id] += req.num_computed_tokens
            self.preemptions[req.request_id] += 1
        return plan


def run(sc, *, fast_forward=True, num_replicas=None, horizon="scenario", books=None, min_ff=2):
    """Simulate scenario `sc`; with `books` (three defaultdicts, see `Recorder`), record every plan."""
    def factory():
        policy = POLICIES[sc["policy"]](sc)
        return policy if books is None else Recorder(policy, *books)

    num = num_replicas or sc["num_replicas"]
    names = [f"{'inter' if i % 2 == 0 else 'batch'}{i}" for i in range(num)]
    specs = [ReplicaSpec(sc["cost"], factory, sc["limits"], num_kv_blocks=sc["kv_blocks"],
                         block_size=sc["block_size"], name=name) for name in names]
    return simulate(sc["workload"], specs, ROUTERS[sc["router"]](), check_plans=True, fast_forward=fast_forward,
                    horizon_s=sc["horizon_s"] if horizon == "scenario" else horizon, min_fast_forward_steps=min_ff)


def expected_reject_reason(sc, prompt: int, output: int) -> str:
    """Why a replica of the scenario can never run a request ('' if it can): Replica.can_ever_fit."""
    lim = sc["limits"]
    if prompt + output > lim.max_model_len:
        return "exceeds_max_model_len"
    if -(-(prompt + output - 1) // sc["block_size"]) > sc["kv_blocks"]:
        return "exceeds_kv_capacity"
    if not lim.enable_chunked_prefill and prompt + output - 1 > lim.max_num_batched_tokens:
        return "exceeds_max_num_batched_tokens"
    return ""


def assert_same_tables(a, b) -> None:
    """Request and step tables equal exactly (times bit for bit, every token's step)."""
    cols = [c for c in a.requests.columns if c != "token_steps"]
    pd.testing.assert_frame_equal(a.requests[cols], b.requests[cols], check_exact=True)
    for x, y in zip(a.requests["token_steps"], b.requests["token_steps"]):
        assert list(x) == list(y)
    pd.testing.assert_frame_equal(a.steps, b.steps, check_exact=True)


def check_invariants(sc, res, scheduled: dict, discarded: dict, preemptions: dict) -> None:
    req, steps = res.requests, res.steps
    lim, horizon = sc["limits"], sc["horizon_s"]
    wl = sc["workload"]
    # one outcome per request; without a horizon every request is finished or rejected
    assert len(req) == len(wl) and req["request_id"].tolist() == list(range(len(wl)))
    assert req["outcome"].notna().all()
    if horizon is None:
        assert req["outcome"].isin(["finished", "rejected"]).all()
    # rejections are exactly the requests no replica can ever run, with the reason
    for row in req.itertuples():
        why = expected_reject_reason(sc, row.num_prompt_tokens, row.num_output_tokens)
        if row.outcome == "rejected":
            assert row.reject_reason == why and why in REASONS
        elif row.outcome == "finished" or (row.outcome == "unfinished" and row.arrival_s <= horizon):
            assert why == ""
    # engine limits, step by step (plans were checked as they were made, too)
    assert (steps["kv_blocks_used"] <= sc["kv_blocks"]).all() and (steps["kv_blocks_used"] >= 0).all()
    tokens = steps["num_prefill_tokens"] + steps["num_decodes"]
    assert (tokens <= lim.max_num_batched_tokens).all() and (steps["batch_size"] <= lim.max_num_seqs).all()
    assert (tokens >= 1).all() and (steps["duration_s"] > 0).all()
    pb = sc["policy_budget"] or (256 if sc["policy"] in ("sarathi", "niyama_fixed_chunk") else None)
    if sc["policy"] in ("sarathi", "edf", "srpf", "niyama_fixed_chunk") and pb is not None:
        # the policy's own budget holds, except a whole prompt running alone with chunked prefill off
        over = tokens > pb
        assert (~over | ((steps["batch_size"] == 1) & (not lim.enable_chunked_prefill))).all()
    ends = {}
    for rep, g in steps.groupby("replica"):
        start, end = g["start_s"].to_numpy(), (g["start_s"] + g["duration_s"]).to_numpy()
        assert (start[1:] >= end[:-1]).all()  # steps on one replica never overlap
        if horizon is not None:
            assert (end < horizon).all()  # a step ending exactly at the horizon has not completed
        ends[rep] = end
    # token conservation: a finished request computed its prompt and output exactly once, net
    # of what preemptions discarded; the step table adds up to every plan's tokens
    for row in req.itertuples():
        net = scheduled[row.request_id] - discarded[row.request_id]
        if row.outcome == "finished":
            assert net == row.num_prompt_tokens + row.num_output_tokens - 1
            assert row.num_output_tokens_done == row.num_output_tokens
        else:
            assert net <= row.num_prompt_tokens + row.num_output_tokens - 1
        assert row.num_preemptions == preemptions[row.request_id]
    if horizon is None:
        assert int(tokens.sum()) == sum(scheduled.values())
    # every output token has a time; times increase and bound the request's timestamps
    for row in req.itertuples():
        runs = np.asarray(row.token_steps, dtype=np.int64)
        done = int((runs[1::2] - runs[0::2] + 1).sum()) if len(runs) else 0
        assert done == row.num_output_tokens_done
        if done == 0:
            assert math.isnan(row.first_token_s)
            continue
        times = np.concatenate([ends[row.replica][a:b + 1] for a, b in zip(runs[0::2], runs[1::2])])
        assert (np.diff(times) > 0).all()
        assert times[0] == row.first_token_s and row.arrival_s <= row.first_scheduled_s < row.first_token_s
        if row.outcome == "finished":
            assert times[-1] == row.finish_s


@settings(max_examples=_examples(100), **PROPERTY)
@given(scenarios())
def test_every_scenario_keeps_the_invariants_and_fast_forward_changes_nothing(sc):
    books = defaultdict(int), defaultdict(int), defaultdict(int)
    slow = run(sc, fast_forward=False, books=books)
    check_invariants(sc, slow, *books)
    fast = run(sc, fast_forward=True)
    assert_same_tables(fast, slow)
    assert_same_tables(fast, run(sc, fast_forward=True))  # deterministic


@settings(max_examples=_examples(30), **PROPERTY)
@given(scenarios(), st.sampled_from([1, 8]))
def test_more_replicas_never_lose_a_request_and_fast_forward_stretches_change_nothing(sc, min_ff):
    small, big = run(sc, horizon=None, min_ff=min_ff), run(sc, horizon=None, num_replicas=sc["num_replicas"] + 1)
    for res in (small, big):
        assert res.requests["outcome"].isin(["finished", "rejected"]).all()
    assert (small.requests["outcome"] == big.requests["outcome"]).all()
    assert_same_tables(small, run(sc, horizon=None, fast_forward=False))


def test_requests_are_freed_when_a_run_ends_and_the_collector_is_restored():
    # Sweeps run thousands of simulations in one process: a finished run must not keep its
    # requests alive in reference cycles that only the cyclic collector (paused while a run
    # is in progress) would free.
    import gc

    from sim.request import Request

    rng = np.random.default_rng(3)
    n = 2000
    wl = pd.DataFrame({"arrival_s": np.cumsum(rng.exponential(0.05, n)),
                       "num_prompt_tokens": rng.integers(1, 300, n), "num_output_tokens": rng.integers(1, 100, n)})
    spec = ReplicaSpec(PUBLISHED, FCFS, EngineLimits(), num_kv_blocks=4000)
    gc.collect()
    gc.disable()
    try:
        res = simulate(wl, [spec] * 2, RoundRobin())
        assert not gc.isenabled()  # a caller's choice is kept
        num_rows = len(res.requests)
        del res
        alive = sum(type(o) is Request for o in gc.get_objects())
    finally:
        gc.enable()
    assert num_rows == n
    assert alive < n / 10  # at most those in each replica's last step plan (was: all of them)
    simulate(wl.head(10), [spec], RoundRobin())
    assert gc.isenabled()


@st.composite
def due_scripts(draw):
    """Members of a decode group with due-time terms `(a, s)` and output tokens so far, built
    to tie in exact arithmetic and differ by rounding: twins `(x + s * k, s)` at `n` tokens and
    `(x, s)` at `n + k` tokens, on the tiers' grids; and a script of joins, steps, completions
    and dissolutions (every member of the group computes a token each step)."""
    slopes = draw(st.lists(st.sampled_from([0.05, 0.4, 0.1, 1 / 3, 0.0, 1e-3, 0.07]), min_size=1, max_size=3))
    members = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["twins", "twins", "twins", "any", "inf", "none"]))
        s = draw(st.sampled_from(slopes))
        done = draw(st.integers(1, 60))
        if kind == "twins":
            x = draw(st.sampled_from([0.0, 1.0, 6.0, 0.3, 600.0, 1e5])) + draw(st.sampled_from([0.0, 0.1, 1 / 7]))
            k = draw(st.integers(1, 40))
            members += [((x + s * k, s), done), ((x, s), done + k)]
        elif kind == "any":
            members.append(((draw(st.floats(-1e6, 1e6)), s), done))
        elif kind == "inf":
            members.append(((math.inf, s), done))
        else:
            members.append((None, done))
    order = draw(st.permutations(range(len(members))))
    ops = draw(st.lists(st.sampled_from(["add", "add", "step", "steps", "finish", "dissolve"]), max_size=40))
    return [members[i] for i in order], ops, draw(st.integers(0, 2**32 - 1))


@settings(max_examples=_examples(200), **PROPERTY)
@given(due_scripts())
def test_the_least_due_time_of_a_decode_group_is_the_loop_over_its_members_bit_for_bit(script):
    from sim.decodes import DecodeGroup
    from sim.request import Request

    members, ops, seed = script
    rng = np.random.default_rng(seed)
    group = DecodeGroup(16)
    terms = {}

    def due(req):
        return terms[req.request_id]

    def loop_min():
        group.sync()
        best = math.inf
        for req in group.members:
            t = due(req)
            if t is not None:
                v = t[0] + t[1] * req.num_output_done
                if v < best:
                    best = v
        return best

    joined = 0
    for op in ops + ["add"] * len(members):
        if op == "add" and joined < len(members):
            joining = []
            for _ in range(min(int(rng.integers(1, 4)), len(members) - joined)):
                t, done = members[joined]
                # joins the group having done `done - steps so far` tokens: twins stay tied
                done = max(done - group.clock, 1)
                req = Request(joined, 0.0, 10, done + int(rng.integers(1, 300)))
                req.num_output_done, req.num_computed_tokens, req.admit_seq = done, 10 + done - 1, joined
                req.token_steps, req.last_token_step = [0, 0], 0
                terms[joined] = t
                joining.append(req)
                joined += 1
            group.add(joining)
        elif op in ("step", "steps") and group.members:
            group.advance(min(1 if op == "step" else int(rng.integers(2, 30)), group.min_remaining()))
            group.take_finished()
        elif op == "finish" and group.members:
            group.advance(group.min_remaining())
            group.take_finished()
        elif op == "dissolve":
            group.add(group.dissolve())
        if group.members:
            assert group.min_due(due) == loop_min()
