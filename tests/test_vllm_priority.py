"""policies.vllm_priority: vLLM's priority scheduler mirrored (hand-computed cases + properties)."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies.fcfs import FCFS
from policies.routing import RoundRobin
from policies.vllm_priority import VllmPriority
from sim.cluster import ReplicaSpec, simulate
from sim.costmodel import ConstantCostModel
from sim.scheduling import EngineLimits

PRIO = {"high": 0, "low": 1}


def _run(rows, policy, *, kv_blocks=1000, block_size=16, fast_forward=True, **limits):
    """rows: (arrival_s, prompt, output, qos_class), sorted by arrival here (ids in arrival order)."""
    wl = pd.DataFrame(sorted(rows, key=lambda x: x[0]),
                      columns=["arrival_s", "num_prompt_tokens", "num_output_tokens", "qos_class"])
    spec = ReplicaSpec(ConstantCostModel(1.0), policy, EngineLimits(**limits), num_kv_blocks=kv_blocks,
                       block_size=block_size)
    res = simulate(wl, [spec], RoundRobin(), check_plans=True, fast_forward=fast_forward)
    return res, res.requests.set_index("request_id")


PRIORITY = functools.partial(VllmPriority, priorities=PRIO)


@pytest.mark.parametrize("ff", [True, False])
def test_waiting_requests_are_admitted_by_priority_not_arrival(ff):
    # one sequence slot; R0 (low) and R1 (high) arrive together; 1 s per step. R1 runs first:
    # prefill step [0, 1) -> token 1 at 1.0, decode [1, 2) -> finished at 2.0; then R0: 3.0, 4.0.
    rows = [(0.0, 4, 2, "low"), (0.0, 4, 2, "high")]
    _, r = _run(rows, PRIORITY, max_num_seqs=1, fast_forward=ff)
    assert r.loc[1, "first_token_s"] == 1.0 and r.loc[1, "finish_s"] == 2.0
    assert r.loc[0, "first_token_s"] == 3.0 and r.loc[0, "finish_s"] == 4.0
    _, f = _run(rows, FCFS, max_num_seqs=1, fast_forward=ff)  # FCFS: arrival order
    assert f.loc[0, "finish_s"] == 2.0 and f.loc[1, "finish_s"] == 4.0


@pytest.mark.parametrize("ff", [True, False])
def test_kv_shortage_preempts_the_lowest_priority_not_the_newest(ff):
    # 4 blocks of 4 tokens. R0 (low, 7 + 6) arrives at 0, R1 (high, 7 + 6) at 0.5.
    # [0,1): R0 prefill (2 blocks), token 1. [1,2): R0 decode (8 tokens, 2 blocks) + R1 prefill
    # (2 blocks): 4 blocks used. [2,3): R0 needs a 3rd block; the victim is max (priority,
    # arrival) = R0 itself (low), so nothing more runs this step and nothing is admitted.
    # vLLM's FCFS would preempt R1 (the last admitted) instead.
    rows = [(0.0, 7, 6, "low"), (0.5, 7, 6, "high")]
    res, r = _run(rows, PRIORITY, kv_blocks=4, block_size=4, fast_forward=ff)
    assert (r["outcome"] == "finished").all()
    assert r.loc[0, "num_preemptions"] >= 1 and r.loc[1, "num_preemptions"] == 0
    assert r.loc[1, "finish_s"] < r.loc[0, "finish_s"]
    assert r.loc[0, "num_output_tokens_done"] == 6
    assert res.steps["kv_blocks_used"].max() <= 4
    _, f = _run(rows, FCFS, kv_blocks=4, block_size=4, fast_forward=ff)
    assert f.loc[1, "num_preemptions"] >= 1 and f.loc[0, "num_preemptions"] == 0


def test_a_preempted_scheduled_victim_gives_its_tokens_back():
    # R0 (low) and R1 (low) decode; R2 (high, admitted last) needs a block. Running order R0, R1,
    # R2: R0 and R1 are scheduled first; R2 short of blocks preempts max(priority, arrival) = R1
    # (already scheduled: its token goes back), and the step runs R0 and R2 only.
    rows = [(0.0, 4, 8, "low"), (0.0, 4, 8, "low"), (0.1, 3, 8, "high")]
    res, r = _run(rows, PRIORITY, kv_blocks=3, block_size=4)
    assert (r["outcome"] == "finished").all()
    assert r.loc[1, "num_preemptions"] >= 1
    assert r.loc[2, "num_preemptions"] == 0
    assert r.loc[2, "finish_s"] < r.loc[1, "finish_s"]


def test_unknown_classes_get_the_default_priority_and_bad_priorities_are_refused():
    p = VllmPriority(priorities={"high": 0}, default_priority=5)
    from sim.request import Request
    assert p.key(Request(3, 1.5, 4, 2, qos_class="other")) == (5, 1.5, 3)
    with pytest.raises(ValueError, match="integer"):
        VllmPriority(priorities={"high": 0.5})
    with pytest.raises(ValueError, match="token_budget"):
        VllmPriority(token_budget=0)


rows_strategy = st.lists(
    st.tuples(st.integers(0, 20).map(lambda t: t / 4), st.integers(1, 40), st.integers(1, 12),
              st.sampled_from(["high", "low"])), min_size=1, max_size=25)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=rows_strategy, kv_blocks=st.integers(4, 40), ff=st.booleans(), seqs=st.integers(1, 8))
def test_every_request_ends_once_under_kv_starvation_and_plans_check(rows, kv_blocks, ff, seqs):
    """Overload, KV starvation (preemption storms), exact time ties, fast-forward on and off;
    check_plans holds the policy to its fast_forward_safe claim."""
    res, r = _run(rows, PRIORITY, kv_blocks=kv_blocks, block_size=4, fast_forward=ff, max_num_seqs=seqs,
                  max_num_batched_tokens=16)
    assert len(r) == len(rows)
    assert r["outcome"].isin(["finished", "rejected"]).all()
    fin = r[r["outcome"] == "finished"]
    assert (fin["num_output_tokens_done"] == fin["num_output_tokens"]).all()
    assert len(res.steps) == 0 or res.steps["kv_blocks_used"].max() <= kv_blocks


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=rows_strategy, seqs=st.integers(1, 8))
def test_one_class_and_ample_kv_is_exactly_fcfs(rows, seqs):
    """With one priority and no KV shortage the priority order is the arrival order (ties by id),
    so every request's times equal FCFS's."""
    rows = [(t, p, o, "low") for t, p, o, _ in rows]
    _, a = _run(rows, PRIORITY, max_num_seqs=seqs, max_num_batched_tokens=16)
    _, b = _run(rows, FCFS, max_num_seqs=seqs, max_num_batched_tokens=16)
    cols = ["first_scheduled_s", "first_token_s", "finish_s", "num_preemptions"]
    pd.testing.assert_frame_equal(a[cols], b[cols])


def test_under_overload_the_high_class_waits_less():
    rng = np.random.default_rng(1)
    rows = [(float(t), int(p), int(o), "high" if h else "low")
            for t, p, o, h in zip(np.sort(rng.uniform(0, 20, 80)), rng.integers(8, 40, 80), rng.integers(2, 10, 80),
                                  rng.random(80) < 0.3)]
    _, r = _run(rows, PRIORITY, max_num_seqs=4, max_num_batched_tokens=32, kv_blocks=40, block_size=4)
    assert (r["outcome"] == "finished").all()
    ttft = r.groupby("qos_class")["ttft_s"].median()
    assert ttft["high"] < 0.5 * ttft["low"]


@pytest.mark.parametrize("ff", [True, False])
def test_a_waiting_request_is_admitted_only_when_its_whole_sequence_fits(ff):
    # 4 blocks of 4 tokens, 4 tokens a step, 1 s a step. R0 (high; 3 + 2) holds 1 block from t=0;
    # R1 (low; 13 + 2) arrives at 0.5 and needs 4 blocks for its whole prompt. At t=1 its first
    # chunk would fit (3 free blocks) but its whole sequence would not (vLLM's
    # scheduler_reserve_full_isl): it waits until R0 finishes at 2.0, then prefills 4 + 4 + 4 + 1
    # tokens ([2, 6)) and decodes once: first token at 6.0, finished at 7.0.
    rows = [(0.0, 3, 2, "high"), (0.5, 13, 2, "low")]
    _, r = _run(rows, PRIORITY, kv_blocks=4, block_size=4, max_num_batched_tokens=4, max_num_seqs=4, fast_forward=ff)
    assert r.loc[0, "finish_s"] == 2.0
    assert r.loc[1, "first_scheduled_s"] == 2.0 and r.loc[1, "first_token_s"] == 6.0 and r.loc[1, "finish_s"] == 7.0
    # without the gate (vLLM before it): admitted at 1.0 with a 3-token chunk beside R0's decode
    _, g = _run(rows, functools.partial(VllmPriority, priorities=PRIO, reserve_full_sequence=False), kv_blocks=4,
                block_size=4, max_num_batched_tokens=4, max_num_seqs=4, fast_forward=ff)
    assert g.loc[1, "first_scheduled_s"] == 1.0 and g.loc[1, "first_token_s"] == 5.0
