"""Correct under pressure: hand-derived cases of KV shortage, long prompts, bad limits and ties.

Unless a test says otherwise every engine step costs exactly 10 ms (a one-regime linear cost
model with only a constant), KV blocks hold 16 tokens, and a request of P prompt tokens and
O output tokens holds at most P + O - 1 tokens of KV. So every timestamp below is a sum of
10 ms steps, derived in the comments (times compared to 1e-9 s).
"""

from __future__ import annotations

import pandas as pd
import pytest

from policies.edf import EDF
from policies.fcfs import FCFS, Sarathi
from policies.niyama import Niyama
from policies.routing import RoundRobin
from policies.srpf import SRPF
from sim.cluster import ReplicaSpec, simulate
from sim.costmodel import ConstantCostModel
from sim.costmodels.linear import LinearRegimesCostModel
from sim.errors import InputError
from sim.paths import project_path
from sim.scheduling import EngineLimits

CONST_10MS = LinearRegimesCostModel(regimes=[{"max_total_tokens": None, "coefficients": {"const": 0.01}}],
                                    name="const10ms")
TOL = 1e-9


def slo_file(name: str) -> dict:
    import yaml

    return yaml.safe_load(project_path(f"conf/slo/{name}.yaml").read_text())


def run(rows, policy, *, kv_blocks=1000, cost=CONST_10MS, fast_forward=True, replicas=1, horizon_s=None, **limits):
    """rows: (arrival_s, prompt, output[, qos_class]); checked plans; one table row per request."""
    cols = ["arrival_s", "num_prompt_tokens", "num_output_tokens", "qos_class"][:len(rows[0])]
    spec = ReplicaSpec(cost, policy, EngineLimits(**limits), num_kv_blocks=kv_blocks, block_size=16)
    return simulate(pd.DataFrame(rows, columns=cols), [spec] * replicas, RoundRobin(), check_plans=True,
                    fast_forward=fast_forward, horizon_s=horizon_s)


def latencies(res) -> dict:
    r = res.requests.set_index("request_id")
    return {i: (r.loc[i, "ttft_s"], r.loc[i, "e2e_s"], int(r.loc[i, "num_preemptions"])) for i in r.index}


def assert_latencies(res, expected: dict) -> None:
    got = latencies(res)
    assert set(got) == set(expected)
    for i, (ttft, e2e, preemptions) in expected.items():
        assert got[i][0] == pytest.approx(ttft, abs=TOL) and got[i][1] == pytest.approx(e2e, abs=TOL)
        assert got[i][2] == preemptions, f"request {i}: {got[i]}"


# ------------------------------------------------ 1. two prefills overflow the KV cache
# 100 blocks (1600 tokens); each request needs at most 1509 tokens = 95 blocks, so each fits
# alone but not both. Step budget 512 tokens.
#   t=0.00  R0 (lax) alone: 512 tokens (32 blocks).           R1 (urgent) arrives at 0.005.
#   t=0.01  R1 is more urgent: 512 tokens (32 more: 64 used).
#   t=0.02  R1 512 more (1024 tokens = 64 blocks: 96 used).
#   t=0.03  R1 needs its last 476 tokens (1500 = 94 blocks, 30 more); 4 are free. The running
#           request with the latest deadline, R0, is preempted (its 32 blocks freed) and R1
#           computes them: first token at 0.04 (TTFT 0.04 - 0.005 = 0.035). No admission in a
#           step that preempted.
#   t=0.04-0.13  R1 decodes its 9 other tokens: finishes at 0.13 (end-to-end 0.125). R0 waits:
#           its first chunk (511 tokens, 32 blocks) does not fit beside R1's 95 blocks.
#   t=0.13-0.16  R0 recomputes 512 + 512 + 476 tokens: first token at 0.16 (TTFT 0.160), then
#           9 decodes: finishes at 0.25 (end-to-end 0.250). One preemption.
EXPECTED_OVERFLOW = {0: (0.160, 0.250, 1), 1: (0.035, 0.125, 0)}


@pytest.mark.parametrize("ff", [True, False])
def test_edf_preempts_the_lax_prefill_when_two_prefills_overflow_the_kv_cache(ff):
    rows = [(0.000, 1500, 10, "batch"), (0.005, 1500, 10, "interactive")]
    res = run(rows, lambda: EDF(slo_file("interactive_batch"), token_budget=512), kv_blocks=100, fast_forward=ff)
    assert_latencies(res, EXPECTED_OVERFLOW)
    assert res.steps["num_prefill_tokens"].tolist()[:4] == [512, 512, 512, 476]


@pytest.mark.parametrize("ff", [True, False])
def test_niyama_preempts_the_lax_tier_when_two_prefills_overflow_the_kv_cache(ff):
    # tier1 (lax): deadline 600 - 10 x 0.4 = 596 s, tier0 (urgent) 0.005 + 6 s; hybrid keys
    # add 0.008 s per prompt token left to both. Free KV (1600 tokens) is "low", so steps are at
    # most 512 tokens: the same steps as EDF above.
    rows = [(0.000, 1500, 10, "tier1"), (0.005, 1500, 10, "tier0")]
    res = run(rows, lambda: Niyama(slo_file("niyama_tiers")), kv_blocks=100, max_num_batched_tokens=512,
              fast_forward=ff)
    assert_latencies(res, EXPECTED_OVERFLOW)
    assert not res.requests["relegated"].any()


def test_fcfs_preempts_the_newest_request_in_the_same_overflow():
    # FCFS keeps R0 (first come) running: 512 + 512 + 476 tokens, first token at 0.03, then 9
    # decodes to 0.12. R1 gets the 36 tokens left at 0.02 (3 blocks); at 0.03 its next chunk
    # (511 tokens, 32 blocks) does not fit beside R0's 94 and it is the newest: preempted. It
    # recomputes 512 + 512 + 476 from 0.12: first token 0.15 (TTFT 0.145), finish 0.24 (0.235).
    rows = [(0.000, 1500, 10), (0.005, 1500, 10)]
    res = run(rows, FCFS, kv_blocks=100, max_num_batched_tokens=512)
    assert_latencies(res, {0: (0.030, 0.120, 0), 1: (0.145, 0.235, 1)})


def test_srpf_preempts_the_longest_remaining_prefill_for_a_decode():
    # 96 blocks. R0: 1500-token prompt at 0; R1: 592 tokens (exactly 37 blocks) at 0.005.
    #   t=0.00 R0 512 (32 blocks). t=0.01 R1 (592 left) before R0 (988 left): R1 512 (64 used).
    #   t=0.02 R1 80 (592 tokens, 37 blocks: 69), R0 the 432 left of the budget (944 tokens,
    #          59 blocks: 96 used, none free). R1's first token at 0.03 (TTFT 0.025).
    #   t=0.03 R1's decode needs a 38th block: the running request with the most prompt left,
    #          R0 (556), is preempted. R1 decodes alone.
    #   t=0.04 R1 decodes, R0 is readmitted with 511 tokens; R1's third token ends it at 0.05
    #          (end-to-end 0.045). R0: 512 at 0.05, 477 at 0.06: first token 0.07 (TTFT 0.07),
    #          second 0.08.
    res = run([(0.0, 1500, 2), (0.005, 592, 3)], lambda: SRPF(512), kv_blocks=96, max_num_batched_tokens=512)
    assert_latencies(res, {0: (0.070, 0.080, 1), 1: (0.025, 0.045, 0)})


def test_a_relegated_request_is_the_first_victim_under_kv_pressure():
    # Niyama, 96 blocks, steps of at most 512 tokens (low free KV). D's first-token deadline
    # (1 ms) cannot be met at the estimated 51,200 prefill tokens/s (512 tokens per 10-ms step):
    # D is relegated when first considered, served best effort, and sorts behind everyone.
    #   t=0.00 D alone: 512 (32 blocks). U (lax, e2e 600 s) arrives at 0.005.
    #   t=0.01 U before the relegated D: 512 (64 used). t=0.02 U 512 more (96 used, none free).
    #   t=0.03 U's last 476 tokens need 30 blocks: D, relegated, has the largest key and is
    #          preempted. U's first token at 0.04 (TTFT 0.035), second 0.05 (end-to-end 0.045).
    #   t=0.05 D recomputes 512 + 80 tokens: first token 0.07, then 19 decodes to 0.26.
    slo = {"classes": {"doomed": {"ttft_s": 0.001, "tbt_s": 1.0}, "lax": {"e2e_s": 600.0, "tbt_s": 0.4}}}
    rows = [(0.0, 592, 20, "doomed"), (0.005, 1500, 2, "lax")]
    for ff in (True, False):
        res = run(rows, lambda: Niyama(slo), kv_blocks=96, max_num_batched_tokens=512, fast_forward=ff)
        assert_latencies(res, {0: (0.070, 0.260, 1), 1: (0.035, 0.045, 0)})
        assert res.requests["relegated"].tolist() == [True, False]


def test_a_waiting_request_short_of_kv_does_not_stop_a_running_prefill():
    # EDF, 90 blocks. R0 (batch, 1400 + 2 tokens: 88 blocks at most) prefills 512 + 512 by
    # 0.02 (64 blocks). W (interactive, 1000-token prompt) arrives at 0.015 and is more urgent,
    # but its first chunk (512 tokens, 32 blocks) does not fit in the 26 free: W waits (a waiting
    # request never preempts, as vLLM) and R0 computes its last 376 tokens (88 blocks): first
    # token 0.03, second 0.04 (TTFT 0.03, end-to-end 0.04). W then prefills 512 + 488 from 0.04:
    # first token 0.06 (TTFT 0.045), second 0.07 (end-to-end 0.055).
    slo = {"classes": {"interactive": {"ttft_s": 2.0}, "batch": {"e2e_s": 600.0}}}
    res = run([(0.0, 1400, 2, "batch"), (0.015, 1000, 2, "interactive")], lambda: EDF(slo, 512), kv_blocks=90,
              max_num_batched_tokens=512)
    assert_latencies(res, {0: (0.030, 0.040, 0), 1: (0.045, 0.055, 0)})


def test_decodes_keep_their_token_every_step_while_an_urgent_prompt_is_chunked():
    # EDF, 16-token steps. L (lax) prefills 4 tokens at [0, 0.01) and then decodes. U (urgent,
    # 100 tokens) arrives at 0.005: every step gives L's decode its token first and U the 15
    # tokens left, so U's prompt takes 7 steps (6 x 15 + 10) from 0.01: first token 0.08.
    slo = {"classes": {"urgent": {"ttft_s": 0.1}, "lax": {"ttft_s": 100.0}}}
    res = run([(0.0, 4, 10, "lax"), (0.005, 100, 1, "urgent")], lambda: EDF(slo), max_num_batched_tokens=16,
              max_num_seqs=16)
    steps = res.steps
    assert steps["num_decodes"].tolist()[1:8] == [1] * 7  # L never skips a step
    assert steps["num_prefill_tokens"].tolist()[1:8] == [15] * 6 + [10]
    assert_latencies(res, {0: (0.01, 0.10, 0), 1: (0.075, 0.075, 0)})


# ------------------------------------------------ 2. chunked prefill off, a prompt over the budget


@pytest.mark.parametrize("policy", [FCFS, lambda: EDF(None), SRPF, lambda: Niyama(None)])
def test_without_chunked_prefill_a_prompt_over_the_budget_is_rejected_at_arrival(policy):
    # R0's 3000-token prompt can never run in a 2048-token step without chunking: rejected at
    # arrival. R1 (100 tokens) arrives at 0.01 to an idle replica: prefill [0.01, 0.02) (TTFT
    # 0.010), three decodes to 0.05 (end-to-end 0.040).
    res = run([(0.00, 3000, 4), (0.01, 100, 4)], policy, enable_chunked_prefill=False, max_num_batched_tokens=2048)
    r = res.requests.set_index("request_id")
    assert r.loc[0, "outcome"] == "rejected" and r.loc[0, "reject_reason"] == "exceeds_max_num_batched_tokens"
    assert r.loc[1, "outcome"] == "finished"
    assert r.loc[1, "ttft_s"] == pytest.approx(0.010, abs=TOL) and r.loc[1, "e2e_s"] == pytest.approx(0.040, abs=TOL)


def test_without_chunked_prefill_the_largest_recompute_decides():
    # A recompute after preemption computes prompt + output so far in one step, at most
    # P + O - 1 tokens: 2000 + 49 - 1 = 2048 fits a 2048-token step, 2000 + 50 - 1 does not.
    res = run([(0.0, 2000, 49), (0.0, 2000, 50)], FCFS, enable_chunked_prefill=False, max_num_batched_tokens=2048)
    assert res.requests["reject_reason"].tolist() == ["", "exceeds_max_num_batched_tokens"]


@pytest.mark.parametrize("policy,order", [
    (lambda: Sarathi(64), [0, 1]),
    (lambda: EDF({"classes": {"i": {"ttft_s": 2.0}, "b": {"e2e_s": 600.0}}}, 64), [1, 0]),
])
def test_without_chunked_prefill_a_prompt_over_the_policys_budget_runs_alone(policy, order):
    # A 64-token policy budget on a 2048-token engine, chunked prefill off. The 100-token
    # prompt can never fit 64 tokens: it runs in a step of its own (our design) instead of
    # waiting forever. Sarathi (arrival order): R0 alone [0, 0.01), then R0's decode + R1's 10
    # tokens [0.01, 0.02). EDF (R1 urgent): R1 10 tokens at [0, 0.01), R0 (100 > 54 left) waits
    # until the batch is empty: R1 decodes [0.01, 0.02), R0 alone [0.02, 0.03).
    res = run([(0.0, 100, 2, "b"), (0.0, 10, 2, "i")], policy, enable_chunked_prefill=False,
              max_num_batched_tokens=2048, max_num_seqs=64)
    r = res.requests.set_index("request_id")
    assert r.sort_values("first_scheduled_s").index.tolist() == order
    first, second = order
    assert r.loc[first, "first_scheduled_s"] == 0.0
    assert r.loc[second, "first_scheduled_s"] == pytest.approx(0.01 if order == [0, 1] else 0.02, abs=TOL)
    assert (r["outcome"] == "finished").all()
    big = res.steps["num_prefill_tokens"] == 100
    assert (res.steps.loc[big, "batch_size"] == 1).all() and big.sum() == 1


# ------------------------------------------------ 3. engine limits are checked as vLLM checks them


@pytest.mark.parametrize("limits,field", [
    (dict(max_num_batched_tokens=4, max_num_seqs=8), "max_num_batched_tokens"),  # vLLM: must be >= max_num_seqs
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(max_num_batched_tokens=2048.5), "max_num_batched_tokens"),
    (dict(max_model_len=True), "max_model_len"),
    (dict(enable_chunked_prefill="no"), "enable_chunked_prefill"),
])
def test_engine_limits_vllm_refuses_are_input_errors(limits, field):
    with pytest.raises(InputError) as err:
        EngineLimits(**limits)
    assert err.value.field == field and err.value.value == limits[field]
    assert "\n" not in str(err.value)


def test_engine_limits_vllm_accepts_are_accepted():
    EngineLimits(max_num_batched_tokens=8, max_num_seqs=8)
    # vLLM refuses a budget below max_model_len with chunked prefill off; slosim rejects the
    # requests that do not fit instead (test above), so the limits themselves are accepted.
    EngineLimits(max_num_batched_tokens=512, max_num_seqs=8, max_model_len=8192, enable_chunked_prefill=False)


# ------------------------------------------------ 4. ties: arrivals and horizons at step ends
# 1-s steps (ConstantCostModel(1.0)), so every step ends on a whole second.


@pytest.mark.parametrize("ff", [True, False])
def test_an_arrival_at_the_exact_end_of_a_step_joins_the_next_step(ff):
    # R0 prefills [0, 1). R1 arrives at exactly 1.0: it is queued before the step starting at
    # 1.0 is planned, so it prefills beside R0's decode in [1, 2): first token at 2.0.
    res = run([(0.0, 4, 3), (1.0, 4, 1)], FCFS, cost=ConstantCostModel(1.0), fast_forward=ff)
    r = res.requests.set_index("request_id")
    assert r.loc[1, "first_scheduled_s"] == 1.0 and r.loc[1, "first_token_s"] == 2.0


@pytest.mark.parametrize("ff", [True, False])
def test_an_arrival_at_the_end_of_a_fast_forward_chunk_is_seen_as_step_by_step(ff):
    # Two replicas, round robin. R0 (replica 0) decodes from t=1; with fast-forward its first
    # 16-step chunk ends at 17.0. R1 (t=1.5) goes to replica 1, R2 (t=17.0, exactly that chunk
    # end) to replica 0: it is admitted at 17.0 and emits its one token at 18.0, in both modes
    # (the chunk's end used to fire before the arrival, which step by step came first).
    rows = [(0.0, 1, 100), (1.5, 1, 1), (17.0, 1, 1)]
    res = run(rows, FCFS, cost=ConstantCostModel(1.0), fast_forward=ff, replicas=2)
    r = res.requests.set_index("request_id")
    assert r["replica"].tolist() == [0, 1, 0]
    assert r.loc[2, "first_scheduled_s"] == 17.0 and r.loc[2, "first_token_s"] == 18.0


@pytest.mark.parametrize("ff", [True, False])
def test_a_step_ending_exactly_at_the_horizon_has_not_completed(ff):
    # Steps [0,1) ... [4,5); the horizon is 5.0: the run stops before the step ending at 5.0
    # completes, so 4 steps and 4 tokens, in both modes.
    res = run([(0.0, 4, 10)], FCFS, cost=ConstantCostModel(1.0), fast_forward=ff, horizon_s=5.0)
    assert len(res.steps) == 4
    assert res.requests.loc[0, "num_output_tokens_done"] == 4 and res.requests.loc[0, "outcome"] == "unfinished"

