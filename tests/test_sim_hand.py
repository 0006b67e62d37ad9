"""Hand-computable scenarios: a constant step cost (1 s) makes every timestamp exact."""

from __future__ import annotations

import math

import numpy as np
import pytest

from policies.common import continue_running
from policies.fcfs import FCFS, Sarathi
from policies.routing import LeastOutstandingRequests, LeastOutstandingTokens, RoundRobin
from sim.costmodel import ConstantCostModel
from sim.metrics import request_tbt_s, summarize
from sim.scheduling import PlanError, StepPlan
from tests.helpers import run_simple


@pytest.mark.parametrize("ff", [False, True])
def test_two_requests_decode_first_then_chunked_prefill(ff):
    # R0 (10-token prompt) prefills in step [0,1); R1 arrives at 0.5 and is chunked into the
    # budget left after R0's decode: 15 tokens in [1,2), 5 in [2,3).
    res = run_simple([(0.0, 10, 3), (0.5, 20, 2)], max_num_batched_tokens=16, max_num_seqs=16, fast_forward=ff)
    r = res.requests.set_index("request_id")
    assert r.loc[0, "first_token_s"] == 1.0 and r.loc[0, "finish_s"] == 3.0
    assert r.loc[1, "first_scheduled_s"] == 1.0
    assert r.loc[1, "first_token_s"] == 3.0 and r.loc[1, "finish_s"] == 4.0
    assert r.loc[1, "ttft_s"] == pytest.approx(2.5)
    steps = res.steps
    assert steps["num_prefill_tokens"].tolist() == [10, 15, 5, 0]
    assert steps["num_decodes"].tolist() == [0, 1, 1, 1]
    assert (r["outcome"] == "finished").all()


def test_long_prompt_is_chunked_to_the_budget():
    res = run_simple([(0.0, 40, 1)], max_num_batched_tokens=16, max_num_seqs=16)
    assert res.steps["num_prefill_tokens"].tolist() == [16, 16, 8]
    assert res.requests.loc[0, "first_token_s"] == 3.0
    assert res.requests.loc[0, "finish_s"] == 3.0  # one output token: done at the first token


def test_without_chunked_prefill_a_long_prompt_waits_for_a_full_budget():
    # R1's 12-token prompt does not fit beside R0's decode in a 12-token budget, so it waits
    # until R0 finishes (vLLM without chunked prefill).
    res = run_simple([(0.0, 4, 3), (0.1, 12, 1)], max_num_batched_tokens=12, max_num_seqs=12, enable_chunked_prefill=False)
    r = res.requests.set_index("request_id")
    assert r.loc[0, "finish_s"] == 3.0
    assert r.loc[1, "first_scheduled_s"] == 3.0 and r.loc[1, "finish_s"] == 4.0


def test_per_token_cost_prices_the_step_shape():
    cost = ConstantCostModel(base_s=0.01, per_token_s=0.001)
    res = run_simple([(0.0, 100, 3)], cost=cost)
    # prefill 100 tokens: 0.11 s; two decodes: 0.011 s each
    assert res.requests.loc[0, "first_token_s"] == pytest.approx(0.11)
    assert res.requests.loc[0, "finish_s"] == pytest.approx(0.132)
    assert res.requests.loc[0, "tpot_s"] == pytest.approx(0.011)


def test_max_num_seqs_queues_the_third_request():
    res = run_simple([(0.0, 4, 2), (0.0, 4, 2), (0.0, 4, 2)], max_num_seqs=2)
    r = res.requests.set_index("request_id")
    assert r.loc[[0, 1], "finish_s"].tolist() == [2.0, 2.0]
    assert r.loc[2, "first_scheduled_s"] == 2.0 and r.loc[2, "finish_s"] == 4.0
    assert res.steps["batch_size"].max() == 2


def test_kv_shortage_preempts_the_newest_request_and_recomputes_it():
    # 4 blocks of 4 tokens. R0 (7 + 6 tokens) and R1 (7 + 6) each need 2 blocks at first and
    # grow; when a decode needs a 5th block, R1 (admitted last) is preempted, its blocks
    # freed, and it is recomputed (prompt + output so far) after R0 finishes.
    res = run_simple([(0.0, 7, 6), (0.0, 7, 6)], kv_blocks=4, block_size=4)
    r = res.requests.set_index("request_id")
    assert (r["outcome"] == "finished").all()
    assert r.loc[0, "num_preemptions"] == 0
    assert r.loc[1, "num_preemptions"] >= 1
    assert r.loc[1, "finish_s"] > r.loc[0, "finish_s"]
    assert res.steps["kv_blocks_used"].max() <= 4
    # the preempted request's output is not lost: it still emits exactly 6 tokens
    assert r.loc[1, "num_output_tokens_done"] == 6


def test_requests_that_can_never_run_are_rejected_with_the_reason():
    res = run_simple([(0.0, 50, 60), (0.0, 5, 5), (0.0, 30, 10)], max_model_len=100, kv_blocks=2, block_size=16)
    r = res.requests.set_index("request_id")
    assert r.loc[0, "outcome"] == "rejected" and r.loc[0, "reject_reason"] == "exceeds_max_model_len"
    assert r.loc[2, "outcome"] == "rejected" and r.loc[2, "reject_reason"] == "exceeds_kv_capacity"
    assert r.loc[1, "outcome"] == "finished"


def test_horizon_leaves_requests_unfinished_with_partial_progress():
    from sim.cluster import ReplicaSpec, simulate
    from sim.scheduling import EngineLimits
    from tests.helpers import workload

    spec = ReplicaSpec(ConstantCostModel(1.0), FCFS, EngineLimits(), num_kv_blocks=100)
    for ff in (False, True):
        res = simulate(workload([(0.0, 4, 10), (20.0, 4, 2)]), [spec], RoundRobin(), horizon_s=5.5,
                       fast_forward=ff)
        r = res.requests.set_index("request_id")
        assert r["outcome"].tolist() == ["unfinished", "not_arrived"]  # request 1 arrives after the horizon
        assert r.loc[0, "num_output_tokens_done"] == 5   # tokens at t = 1..5
        assert math.isnan(r.loc[1, "first_scheduled_s"])
        assert len(res.steps) == 5


def test_token_gaps_per_request_and_pooled():
    res = run_simple([(0.0, 4, 4)], cost=ConstantCostModel(0.5))
    row = res.requests.iloc[0]
    np.testing.assert_allclose(request_tbt_s(row, res.steps), [0.5, 0.5, 0.5])
    s = summarize(res.requests, res.steps)
    assert s["tbt_s"]["p50"] == 0.5 and s["ttft_s"]["p50"] == 0.5 and s["e2e_s"]["p50"] == 2.0
    assert res.requests.loc[0, "tbt_max_s"] == 0.5


@pytest.mark.parametrize("router,expected", [
    (RoundRobin(), [0, 1, 0, 1]),
    (LeastOutstandingRequests(), [0, 1, 0, 1]),
])
def test_routers_spread_simultaneous_requests(router, expected):
    res = run_simple([(0.0, 4, 100)] * 4, num_replicas=2, router=router)
    assert res.requests["replica"].tolist() == expected


def test_least_outstanding_tokens_avoids_the_replica_with_a_long_prompt():
    res = run_simple([(0.0, 1000, 10), (0.0, 10, 10), (0.1, 10, 10)], num_replicas=2,
                     router=LeastOutstandingTokens(), max_num_batched_tokens=2048)
    assert res.requests["replica"].tolist() == [0, 1, 1]


def test_sarathi_caps_every_step_at_its_chunk():
    res = run_simple([(0.0, 1000, 5), (0.0, 300, 5)], policy=lambda: Sarathi(chunk_size=256))
    assert res.steps.eval("num_prefill_tokens + num_decodes").max() <= 256
    assert (res.requests["outcome"] == "finished").all()


# ------------------------------------------------------------ fast-path contracts


class EveryOtherStepOneDecode(FCFS):
    """Decodes only the oldest running request at every second step with nothing waiting:
    a legitimate policy, but not fast-forward safe, though it claims to be."""

    fast_forward_safe = True

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def schedule(self, ctx):
        self.calls += 1
        if self.calls % 2 or ctx.waiting:
            return super().schedule(ctx)
        plan = StepPlan()
        continue_running(ctx, plan, 1, ctx.running)
        return plan


class SkewedDecodes(ConstantCostModel):
    """Its `decode_step_time_fn` disagrees with `step_time_s` by a nanosecond."""

    def decode_step_time_fn(self, num_decodes):
        return lambda decode_context_sum: self.base_s + 1e-9


def test_check_plans_holds_a_policy_to_its_fast_forward_safe_claim():
    # Both prompts prefill in [0,1) and emit; nothing waits: the replica would skip the policy
    # from now on. Under check_plans it asks anyway, and the policy decodes only request 0.
    rows = [(0.0, 4, 10), (0.0, 4, 10)]
    with pytest.raises(PlanError, match="fast_forward_safe"):
        run_simple(rows, policy=EveryOtherStepOneDecode)
    res = run_simple(rows, policy=EveryOtherStepOneDecode, fast_forward=False)  # asked every step: fine
    # request 0 gets a token every step (finished at 10); request 1 at odd calls until then
    # (tokens at 1, 3, 5, 7, 9), then at every step alone (11 to 15)
    assert res.requests["finish_s"].tolist() == [10.0, 15.0]


def test_check_plans_holds_a_cost_model_to_its_decode_step_time_fn():
    with pytest.raises(PlanError, match="decode_step_time_fn"):
        run_simple([(0.0, 4, 10)], cost=SkewedDecodes(1.0))
    res = run_simple([(0.0, 4, 10)], cost=SkewedDecodes(1.0), fast_forward=False)  # never used step by step
    assert res.requests["finish_s"].tolist() == [10.0]
