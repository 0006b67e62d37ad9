"""QLM (policies/control/qlm.py), hand-computed: the released waiting-time estimate on a
three-group virtual queue, the pulling cap, a model swap made exactly when the estimator
predicts a miss otherwise, eviction of batch before interactive requests, no swap or eviction
with generous SLOs, the switches, the MILP scheduler's fallback, and bad settings.

Every step costs exactly 1 s (ConstantCostModel), so a replica holding one request decodes
1 token/s: with `pull_cap: 1` the released estimator prices a request at
`released_tokens_per_request` seconds. A prompt of p tokens is one prefill step that emits
the first token; each further output token is one decode step.
"""

from __future__ import annotations

import pandas as pd
import pytest

from policies.control.qlm import QLM
from policies.fcfs import FCFS
from policies.routing import LeastOutstandingRequests
from sim.cluster import ReplicaSpec, simulate
from sim.control import SwapModel
from sim.costmodel import ConstantCostModel
from sim.errors import InputError
from sim.scheduling import EngineLimits


def spec(model: str, load_s: float = 0.0) -> ReplicaSpec:
    return ReplicaSpec(ConstantCostModel(1.0, load_s=load_s), FCFS, EngineLimits(), num_kv_blocks=1000,
                       block_size=16, model=model)


def wl(rows) -> pd.DataFrame:
    """rows: (arrival_s, prompt, output, model, qos_class)."""
    return pd.DataFrame(rows, columns=["arrival_s", "num_prompt_tokens", "num_output_tokens", "model", "qos_class"])


def slo(**ttft):
    return {"classes": {c: {"ttft_s": t} for c, t in ttft.items()}}


class Logged(QLM):
    """QLM recording every action it takes, with the time, and the load of a replica it pulls for."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.log = []
        self.pull_loads = []

    def control(self, event, view):
        actions = super().control(event, view)
        self.log += [(round(view.now, 6), a) for a in actions]
        return actions

    def pull(self, replica, view):
        rid = super().pull(replica, view)
        if rid is not None:
            self.pull_loads.append(replica.num_running + replica.num_waiting)
        return rid


def run(rows, replicas, catalog=None, **kw):
    ctl = Logged(**kw)
    res = simulate(wl(rows), replicas, LeastOutstandingRequests(), controller=ctl, catalog=catalog,
                   check_plans=True)
    return res, ctl


def test_released_estimate_on_a_three_group_queue_by_hand():
    # One replica serving A, pull cap 1. r0 arrives at 0 and is pulled at once (queue empty:
    # prediction 0). r1..r8 arrive while it runs and wait until the tick at t=1, where they form
    # groups in queue order: G1 = (A, i) [r1, r2], G2 = (B, i) [r3, r4], G3 = (A, b) [r5..r8].
    # Released estimate, 10 tokens a request at 1 token/s = 10 s a request, plus the load time
    # wherever the model changes along the queue (A -> B: 5 s, B -> A: 4 s):
    #   r1: 0; r2: 10 (one request ahead in its group); r3: 2 x 10 + 5 = 25; r4: 35;
    #   r5: 4 x 10 + 5 + 4 = 49; r6: 59; r7: 69; r8: 79.
    catalog = {"A": spec("A", load_s=4.0), "B": spec("B", load_s=5.0)}
    rows = [(0.0, 4, 3, "A", "i"), (0.1, 4, 2, "A", "i"), (0.2, 4, 2, "A", "i"), (0.3, 4, 2, "B", "i"),
            (0.4, 4, 2, "B", "i")] + [(0.5 + 0.1 * k, 4, 2, "A", "b") for k in range(4)]
    res, ctl = run(rows, [catalog["A"]], catalog, tick_s=1.0, pull_cap=1, released_tokens_per_request=10)
    pred = pd.DataFrame(ctl.wait_predictions).set_index("request_id")
    assert list(pred["predicted_wait_s"]) == [0.0, 0.0, 10.0, 25.0, 35.0, 49.0, 59.0, 69.0, 79.0]
    assert list(pred["queue_position"]) == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert list(pred["time_s"]) == [0.0] + [1.0] * 8
    assert set(pred["replica"]) == {0}
    assert (res.requests["outcome"] == "finished").all()
    # without deadlines nothing is late: once G1 is served, the swap to B is deferred (the
    # estimator predicts no miss) and G3, of the loaded model, moves ahead of G2
    first = res.requests.set_index("request_id")["first_scheduled_s"]
    assert first[1] < first[2] < first[5] < first[6] < first[7] < first[8] < first[3] < first[4]
    assert res.info["num_model_swaps"] == 1
    assert ctl.stats()["num_groups"] == 4


def test_pulling_respects_the_cap():
    rows = [(0.01 * k, 8, 6, "A", "i") for k in range(30)]
    _, capped = run(rows, [spec("A"), spec("A")], tick_s=0.5, pull_cap=3)
    assert capped.pull_loads and max(capped.pull_loads) == 2  # pulled only while running + waiting < 3
    _, free = run(rows, [spec("A"), spec("A")], tick_s=0.5, pull_cap=None)
    assert max(free.pull_loads) > 2  # without a cap the replicas take more (the check above can fail)


@pytest.mark.parametrize("ttft_b, swap_at", [(5.5, 0.75), (6.2, 1.5), (100.0, 7.5)])
def test_a_swap_happens_exactly_when_the_estimator_predicts_a_miss_otherwise(ttft_b, swap_at):
    # One replica serving A, pull cap 1, 1 token a request (1 s), ticks every 0.75 s.
    # r0 (A) is pulled at 0 and runs until 5 (prompt 4: prefill [0,1], 4 decodes).
    # r1, r2 (A, lax) and r3 (B, first-token deadline 0.2 + ttft_b) wait; at the tick 0.75 they
    # form G_A = [r1, r2] and G_B = [r3]. Keeping A, G_B starts after G_A and a swap:
    # 2 x 1 s + load B 3 s = 5 s from now. So the swap is due at the first tick t with
    # t + 5 > 0.2 + ttft_b: ttft_b = 5.5 -> t = 0.75 (5.75 > 5.7); 6.2 -> t = 1.5 (6.5 > 6.4,
    # while 5.75 <= 6.4); 100 -> never while G_A waits: once r2 is pulled at 7 (r1 runs [5,7])
    # nothing of A is queued and B is served nowhere else, so at the next tick, 7.5.
    catalog = {"A": spec("A", load_s=2.0), "B": spec("B", load_s=3.0)}
    rows = [(0.0, 4, 5, "A", "a"), (0.05, 4, 2, "A", "a"), (0.1, 4, 2, "A", "a"), (0.2, 4, 2, "B", "b")]
    res, ctl = run(rows, [catalog["A"]], catalog, slo=slo(a=1000.0, b=ttft_b), tick_s=0.75, pull_cap=1,
                   released_tokens_per_request=1, eviction=False)
    swaps = [(t, a) for t, a in ctl.log if isinstance(a, SwapModel)]
    assert swaps[0] == (swap_at, SwapModel(0, "B"))
    assert (res.requests["outcome"] == "finished").all()
    r = res.requests.set_index("request_id")
    if swap_at < 5:  # the drain waits for r0 (until 5), then B loads for 3 s: r3's first token at 9
        assert r.loc[3, "first_token_s"] == 9.0
        assert r.loc[1, "first_scheduled_s"] > r.loc[3, "first_scheduled_s"]
    else:
        assert r.loc[3, "first_scheduled_s"] > r.loc[2, "first_scheduled_s"]


def test_eviction_takes_batch_before_interactive():
    # One replica serving A, pull cap 2: r0 (batch) and r1 (interactive) are pulled at 0 and
    # decode for a long time. r2 (interactive, first token due 3 s after arrival) waits. The
    # statistical estimator counts the held requests (prior 100 output tokens each, 2 tokens/s
    # at batch 2, half of that work before a slot frees): 50 s > 3 s, so a miss is predicted
    # at the tick 0.5 and one request of a laxer class leaves: the batch one, never r1.
    rows = [(0.0, 4, 40, "A", "batch"), (0.0, 4, 40, "A", "interactive"), (0.2, 4, 2, "A", "interactive")]
    res, ctl = run(rows, [spec("A")], slo=slo(interactive=3.0, batch=1000.0), tick_s=0.5, pull_cap=2,
                   estimator="statistical", model_swapping=False)
    r = res.requests.set_index("request_id")
    assert r.loc[0, "num_evictions"] == 1 and r.loc[1, "num_evictions"] == 0
    assert ctl.stats()["num_evictions"] == 1 and res.info["num_evictions"] == 1
    assert r.loc[2, "first_token_s"] < 3.2  # pulled as soon as the batch request left (end of its step at 1)
    assert (res.requests["outcome"] == "finished").all()
    # only interactive requests held: nothing of a laxer class to evict
    rows2 = [(0.0, 4, 40, "A", "interactive"), (0.0, 4, 40, "A", "interactive"), (0.2, 4, 2, "A", "interactive")]
    res2, ctl2 = run(rows2, [spec("A")], slo=slo(interactive=3.0, batch=1000.0), tick_s=0.5, pull_cap=2,
                     estimator="statistical", model_swapping=False)
    assert ctl2.stats()["num_evictions"] == 0 and res2.info["num_evictions"] == 0
    # eviction switched off: the batch request stays
    res3, ctl3 = run(rows, [spec("A")], slo=slo(interactive=3.0, batch=1000.0), tick_s=0.5, pull_cap=2,
                     estimator="statistical", model_swapping=False, eviction=False)
    assert res3.info["num_evictions"] == 0


def _three_models(n=120, gap=0.05):
    models = ["A", "B", "C"]
    return [(gap * k, 20 + 7 * (k % 5), 3 + k % 7, models[k % 3], ("i", "b")[k % 2]) for k in range(n)]


@pytest.mark.parametrize("estimator", ["released", "statistical"])
@pytest.mark.parametrize("scheduler", ["edf", "milp"])
def test_generous_slos_never_evict_or_swap(estimator, scheduler):
    catalog = {m: spec(m, load_s=3.0) for m in "ABC"}
    reps = [catalog["A"], catalog["B"], catalog["C"], catalog["A"]]
    res, ctl = run(_three_models(), reps, catalog, slo=slo(i=1e5, b=1e6), tick_s=0.5, pull_cap=2,
                   estimator=estimator, scheduler=scheduler, milp_interval_s=0.0)
    st = ctl.stats()
    assert st["num_swaps"] == 0 and st["num_evictions"] == 0
    assert res.info["num_model_swaps"] == 0 and res.info["num_evictions"] == 0
    assert (res.requests["outcome"] == "finished").all()
    if scheduler == "milp":
        return  # the MILP under tight SLOs: test_the_milp_falls_back_to_edf_when_it_has_no_answer_in_time
    # the same traffic with tight SLOs makes QLM act (so the zeros above are not vacuous)
    _, tight = run(_three_models(), reps, catalog, slo=slo(i=0.5, b=2.0), tick_s=0.5, pull_cap=2,
                   estimator=estimator, scheduler=scheduler)
    st = tight.stats()
    assert st["num_predicted_misses"] > 0 and st["num_reorders"] + st["num_swaps"] + st["num_evictions"] > 0


def test_the_milp_falls_back_to_edf_when_it_has_no_answer_in_time():
    catalog = {m: spec(m, load_s=3.0) for m in "ABC"}
    reps = [catalog["A"], catalog["B"], catalog["C"], catalog["A"]]
    kw = dict(slo=slo(i=0.5, b=2.0), tick_s=0.5, pull_cap=2, scheduler="milp", milp_max_groups=3,
              milp_interval_s=0.0)
    res, ctl = run(_three_models(), reps, catalog, milp_time_limit_s=1e-7, **kw)
    st = ctl.stats()
    assert st["milp_calls"] > 0 and st["milp_fallbacks"] == st["milp_calls"] and st["num_reorders"] > 0
    assert (res.requests["outcome"] == "finished").all()
    _, solved = run(_three_models(), reps, catalog, milp_time_limit_s=5.0, **kw)
    assert solved.stats()["milp_calls"] > 0 and solved.stats()["milp_fallbacks"] == 0


def test_a_model_nobody_serves_gets_exactly_one_swap_with_generous_slos():
    catalog = {m: spec(m, load_s=3.0) for m in "AB"}
    rows = [(0.1 * k, 10, 3, "A" if k % 4 else "B", "i") for k in range(40)]
    res, ctl = run(rows, [catalog["A"], catalog["A"]], catalog, slo=slo(i=1e5), tick_s=0.5, pull_cap=4)
    assert ctl.stats()["num_swaps"] == 1 and res.info["num_model_swaps"] == 1
    assert (res.requests["outcome"] == "finished").all()


def test_without_swapping_a_model_nobody_serves_is_stranded():
    catalog = {m: spec(m, load_s=3.0) for m in "AB"}
    rows = [(0.0, 10, 3, "A", "i"), (0.1, 10, 3, "B", "i")]
    res, ctl = run(rows, [catalog["A"]], catalog, slo=slo(i=1e5), tick_s=0.5, model_swapping=False)
    assert dict(res.requests.set_index("request_id")["outcome"]) == {0: "finished", 1: "unfinished"}
    assert res.info["num_stranded"] == 1 and ctl.stats()["num_swaps"] == 0


def test_without_pulling_requests_go_to_their_replica_at_arrival():
    rows = [(0.01 * k, 8, 6, "A", "i") for k in range(20)]
    res, ctl = run(rows, [spec("A"), spec("A")], tick_s=0.5, pull_cap=2, pulling=False)
    assert not ctl.pull_loads  # nothing pulled: assigned at once, beyond the cap
    assert (res.requests["outcome"] == "finished").all()
    assert res.steps["batch_size"].max() > 2


def test_group_window_null_keeps_one_fifo_group_per_model_and_class():
    rows = [(0.3 * k, 8, 30, "A", "i") for k in range(12)]
    _, windowed = run(rows, [spec("A")], tick_s=0.5, pull_cap=1, group_window_s=0.5)
    _, released = run(rows, [spec("A")], tick_s=0.5, pull_cap=1, group_window_s=None, max_group_size=None)
    assert released.stats()["num_groups"] == 2  # r0 (pulled at once), then one group for the rest
    assert windowed.stats()["num_groups"] > released.stats()["num_groups"]


BAD = [({"tick_s": 0}, "tick_s"), ({"scheduler": "lp"}, "scheduler"), ({"estimator": "oracle"}, "estimator"),
       ({"pull_cap": 0}, "pull_cap"), ({"evict_mode": "swap"}, "evict_mode"),
       ({"group_window_s": -1}, "group_window_s"), ({"max_group_size": 0}, "max_group_size"),
       ({"milp_interval_s": -1}, "milp_interval_s"), ({"milp_time_limit_s": 0}, "milp_time_limit_s"),
       ({"released_tokens_per_request": 0}, "released_tokens_per_request")]


@pytest.mark.parametrize("kw, field", BAD)
def test_bad_settings_are_input_errors_naming_the_field(kw, field):
    with pytest.raises(InputError) as e:
        QLM(**kw)
    assert e.value.field == field


def _cfg(*overrides):
    from hydra import compose, initialize_config_dir

    from sim.paths import project_path

    with initialize_config_dir(config_dir=str(project_path("conf")), version_base="1.3"):
        return compose("config", overrides=["cluster=multi_model", "costmodel=roofline", "controller=qlm",
                                            "cluster.num_replicas=3", "sim.progress=false", *overrides])


def test_the_config_builds_qlm_and_simulate_config_runs_a_given_controller():
    from hydra.utils import instantiate

    from experiments.wiring import simulate_config

    cfg = _cfg("workload.num_requests=60", "+workload.model_shares={llama3-8b: 0.6, mistral-7b: 0.4}")
    ctl = instantiate(cfg.controller)
    assert isinstance(ctl, QLM) and ctl.pull_cap == 64 and ctl.scheduler == "edf" and ctl.tick_s == 1.0
    assert set(ctl.qos.tiers) == {"interactive", "batch", "default"}  # conf/slo/interactive_batch.yaml
    res = simulate_config(cfg, instantiate(cfg.workload).requests, controller=ctl)
    assert (res.requests["outcome"] == "finished").all()
    assert len(ctl.wait_predictions) == 60 and ctl.stats()["num_ticks"] > 0  # this very object ran


def test_a_bad_controller_setting_in_the_config_is_an_input_error_naming_the_key():
    from hydra.utils import instantiate

    from experiments.wiring import simulate_config

    cfg = _cfg("controller.scheduler=lp", "workload.num_requests=5")
    with pytest.raises(InputError) as e:
        simulate_config(cfg, instantiate(cfg.workload).requests)
    assert e.value.field == "controller.scheduler" and e.value.value == "lp"


def test_the_bench_line_runs_and_reports_qlm_counters(capsys):
    from experiments.bench import main

    out = main(["--policy", "qlm", "--requests", "300", "--saturation-requests", "200"])
    assert out["finished"] == 300 and out["qlm"]["num_groups"] > 0
    assert 0 <= out["milp_share_of_wall"] <= out["qlm_control_share_of_wall"] <= 1


@pytest.mark.parametrize("load_balancing", [True, False])
@pytest.mark.parametrize("scheduler", ["edf", "milp"])
def test_requests_naming_no_model_are_served_by_any_replica(load_balancing, scheduler):
    """A request naming no model ('' = any) is served by whatever model a replica holds: it is
    never stranded in a virtual queue and never causes a swap to model ''."""
    catalog = {m: spec(m, load_s=3.0) for m in "AB"}
    reps = [catalog["A"], catalog["B"]]
    rows = [(0.05 * k, 20, 5, ("", "A", "")[k % 3], ("i", "b")[k % 2]) for k in range(60)]
    res, ctl = run(rows, reps, catalog, slo=slo(i=1.0, b=5.0), tick_s=0.5, pull_cap=2,
                   load_balancing=load_balancing, scheduler=scheduler, milp_interval_s=0.0)
    assert (res.requests["outcome"] == "finished").all(), res.requests["outcome"].value_counts().to_dict()
    assert all(a.model for _, a in ctl.log if isinstance(a, SwapModel))


def test_one_replica_swapping_between_three_models_serves_everything_instead_of_thrashing():
    """Found by the property test: with one replica, swapping on and load balancing off, a swap
    drained the replica and sent the request it had just pulled back to the cluster queue, whose
    group then swapped it back (B, C, B, C... every 7-8 s, forever, serving nothing). QLM now
    swaps only a replica with nothing waiting, so every swap cycle completes a request."""
    from policies.edf import EDF
    from sim.controlplane import ControlSettings
    from sim.scheduling import EngineLimits as Limits

    tiers = {"classes": {"interactive": {"ttft_s": 2.0, "tbt_s": 0.05, "violation": ["ttft"]},
                         "batch": {"e2e_s": 60.0, "tbt_s": 0.4, "violation": ["e2e"]}}}
    rows = [(1, 1, 2, "B", "interactive"), (2, 6, 2, "A", "other"), (2, 2, 1, "C", "other"),
            (2, 3, 2, "A", "interactive"), (5, 8, 1, "B", "interactive"), (7, 5, 1, "B", "batch"),
            (10, 3, 2, "B", "other"), (13, 1, 2, "B", "batch"), (15, 5, 1, "B", "other"), (21, 8, 1, "A", "other"),
            (21, 1, 1, "B", "batch"), (26, 3, 1, "A", "batch"), (26, 5, 2, "B", "batch"), (32, 3, 2, "C", "other"),
            (35, 8, 2, "A", "other"), (35, 3, 2, "C", "batch"), (42, 7, 2, "A", "other"), (45, 5, 1, "A", "batch"),
            (47, 4, 1, "A", "interactive"), (51, 3, 1, "C", "other"), (54, 7, 1, "B", "interactive")]
    limits = Limits(max_num_seqs=2, max_num_batched_tokens=16, max_model_len=8192, enable_chunked_prefill=True)

    def one(model, load_s):
        return ReplicaSpec(ConstantCostModel(1.0, load_s=load_s), lambda: EDF(tiers, token_budget=128), limits,
                           num_kv_blocks=9, block_size=1, model=model)

    catalog = {"A": one("A", 0.0), "B": one("B", 8.0), "C": one("C", 7.0)}
    ctl = QLM(slo=tiers, tick_s=0.5, group_window_s=None, max_group_size=None, released_tokens_per_request=1,
              pull_cap=1, eviction=False, load_balancing=False, calibrate_waits=True, min_samples=20)
    res = simulate(wl(rows), [catalog["A"]], LeastOutstandingRequests(), controller=ctl, catalog=catalog,
                   control=ControlSettings(kv_bytes_per_token=100), horizon_s=600.0, check_plans=True)
    assert (res.requests["outcome"] == "finished").all()
    assert ctl.stats()["num_swaps"] <= 2 * len(rows)  # each swap cycle served something
