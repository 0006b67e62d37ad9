"""The in-process live mode's arithmetic (speed scales, noise accounting, target counts, classes) and
its bad-input paths; no engine needed. The engine itself: tests/test_validate_live.py."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from experiments.live.calibration import (
    ReferenceSteps, ScaledCostModel, SpeedCalibration, fit_size_scales, fit_speed_scale, pooled, step_kind,
    step_price_errors,
)
from experiments.live.speed_track import SpeedTrack, SpeedTrackedCostModel, track_speed
from experiments.live.inprocess_mode import void_reasons, with_classes
from experiments.live.simulate import noise_accounting, target_counts
from sim.costmodel import ConstantCostModel
from sim.errors import InputError
from tests.test_validate import TRACE, compose_validate


def test_step_kinds():
    assert step_kind([0, 5, 5, 0], [3, 0, 2, 0]).tolist() == ["decode", "prefill", "mixed", "decode"]


def test_speed_scales_are_measured_over_priced_time_overall_and_per_kind():
    pts = [{"kind": "prefill", "measured_s": 0.12, "price_s": 0.10},
           {"kind": "prefill", "measured_s": 0.33, "price_s": 0.30},   # prefill: 0.45 / 0.40
           {"kind": "decode", "measured_s": 0.018, "price_s": 0.020},  # decode: 0.9
           {"kind": "mixed", "measured_s": math.nan, "price_s": 0.05}]  # not timed cleanly: ignored
    overall, by_kind = fit_speed_scale(pts)
    assert overall == pytest.approx((0.12 + 0.33 + 0.018) / (0.10 + 0.30 + 0.020))
    assert by_kind["prefill"] == pytest.approx(1.125) and by_kind["decode"] == pytest.approx(0.9)
    assert by_kind["mixed"] == pytest.approx(overall)  # no point of its own
    with pytest.raises(InputError, match="no reference step"):
        fit_speed_scale([{"kind": "decode", "measured_s": math.nan, "price_s": 0.02}])


def test_scaled_cost_model_multiplies_each_step_kind_by_its_scale():
    m = ScaledCostModel(ConstantCostModel(0.01), {"prefill": 2.0, "decode": 0.5, "mixed": 1.5})
    assert m.step_time_s(100, 0, 0, 0, 1) == pytest.approx(0.02)
    assert m.step_time_s(0, 0, 4, 400, 4) == pytest.approx(0.005)
    assert m.step_time_s(100, 0, 4, 400, 5) == pytest.approx(0.015)
    assert m.step_times_s([100, 0, 100], [0, 0, 0], [0, 4, 4], [0, 400, 400], [1, 4, 5]).tolist() == pytest.approx(
        [0.02, 0.005, 0.015])
    assert m.num_kv_blocks(16) == ConstantCostModel(0.01).num_kv_blocks(16)
    with pytest.raises(InputError, match="scale_by_kind.decode"):
        ScaledCostModel(ConstantCostModel(0.01), {"prefill": 1.0, "decode": 0.0, "mixed": 1.0})


def _pt(kind, pf, nd, measured, price):
    return {"kind": kind, "num_prefill_tokens": pf, "num_decodes": nd, "measured_s": measured, "price_s": price}


def test_size_scales_are_measured_over_priced_time_at_each_size_of_each_kind():
    pts = [_pt("decode", 0, 1, 0.009, 0.010), _pt("decode", 0, 4, 0.014, 0.020),
           _pt("mixed", 128, 2, 0.05, 0.05), _pt("mixed", 128, 8, 0.07, 0.05),  # same chunk: pooled as sums
           _pt("mixed", 384, 8, 0.11, 0.10), _pt("prefill", 64, 0, math.nan, 0.02)]  # not timed cleanly
    s = fit_size_scales(pts)
    assert s["decode"] == [[1.0, pytest.approx(0.9)], [4.0, pytest.approx(0.7)]]
    assert s["mixed"] == [[128.0, pytest.approx(1.2)], [384.0, pytest.approx(1.1)]]
    assert "prefill" not in s


def test_size_scaled_cost_model_interpolates_in_log_size_and_holds_the_ends():
    base = ConstantCostModel(0.01)
    m = ScaledCostModel(base, {"prefill": 2.0, "decode": 0.5, "mixed": 1.5},
                        {"decode": [[1, 0.9], [4, 0.7], [64, 1.0]], "mixed": [[128, 1.2], [384, 1.1]]})
    assert m.step_time_s(0, 0, 1, 100, 1) == pytest.approx(0.009)
    assert m.step_time_s(0, 0, 2, 100, 2) == pytest.approx(0.008)       # halfway between 1 and 4 in log size
    assert m.step_time_s(0, 0, 16, 100, 16) == pytest.approx(0.0085)    # halfway between 4 and 64
    assert m.step_time_s(0, 0, 128, 100, 128) == pytest.approx(0.010)   # beyond the last knot: held
    assert m.step_time_s(64, 0, 3, 100, 4) == pytest.approx(0.012)      # mixed: by prefill tokens, held below
    assert m.step_time_s(100, 0, 0, 0, 1) == pytest.approx(0.02)        # prefill: no knots, the kind's scale
    pf = np.array([0, 0, 0, 64, 200, 100, 512])
    nd = np.array([1, 2, 16, 3, 5, 0, 9])
    vec = m.step_times_s(pf, np.zeros(7), nd, np.full(7, 100), pf + nd)
    assert vec.tolist() == pytest.approx([m.step_time_s(int(a), 0, int(b), 100, int(a + b)) for a, b in zip(pf, nd)])
    with pytest.raises(InputError, match="scale_by_size"):
        ScaledCostModel(base, {"prefill": 1.0, "decode": 1.0, "mixed": 1.0}, {"decode": [[1, 0.9], [1, 0.8]]})
    with pytest.raises(InputError, match="scale_by_size"):
        ScaledCostModel(base, {"prefill": 1.0, "decode": 1.0, "mixed": 1.0}, {"decode": [[2, -1.0]]})


def test_pooled_calibration_refits_on_the_timings_before_and_after():
    before = SpeedCalibration(0.9, {}, [_pt("decode", 0, 4, 0.018, 0.020)], 10.0, 1, [64])
    after = SpeedCalibration(1.1, {}, [_pt("decode", 0, 4, 0.022, 0.020), _pt("prefill", 256, 0, 0.1, 0.08)],
                             11.0, 0, [])
    p = pooled(before, after)
    assert p.scale_by_size["decode"] == [[4.0, pytest.approx(1.0)]]
    assert p.scale_by_kind["decode"] == pytest.approx(1.0) and p.scale_by_kind["prefill"] == pytest.approx(1.25)
    assert p.wall_s == 21.0 and p.num_discarded == 1 and p.skipped_decode_batches == [64]
    assert pooled(before, None) is before


def test_step_price_errors_per_kind():
    steps = pd.DataFrame({"num_prefill_tokens": [100, 0, 0], "prefill_context": 0, "num_decodes": [0, 2, 2],
                          "decode_context_sum": [0, 50, 52], "batch_size": [1, 2, 2], "wall_s": [0.02, 0.01, 0.005]})
    e = step_price_errors(steps, ConstantCostModel(0.01))
    assert e["prefill"]["median_rel_error"] == pytest.approx(-0.5)
    assert e["decode"]["num_steps"] == 2 and e["decode"]["sum_rel_error"] == pytest.approx(0.02 / 0.015 - 1)
    assert "mixed" not in e and e["all"]["measured_sum_s"] == pytest.approx(0.035)
    assert e["decode"]["by_size"] == {"(1, 2]": {"num_steps": 2, "median_rel_error": pytest.approx(0.5),
                                                 "sum_rel_error": pytest.approx(0.02 / 0.015 - 1)}}
    assert list(e["prefill"]["by_size"]) == ["(64, 128]"]
    # an engine step that scheduled nothing (vLLM runs a few) is no decode step
    empty = pd.DataFrame({"num_prefill_tokens": [0], "prefill_context": 0, "num_decodes": [0],
                          "decode_context_sum": [0], "batch_size": [0], "wall_s": [0.0002]})
    e2 = step_price_errors(pd.concat([steps, empty]), ConstantCostModel(0.01))
    assert e2["decode"] == e["decode"] and e2["all"]["num_steps"] == 3


def _err(metric, q, rep, live, sim):
    return {"workload": "conv", "load": 0.6, "metric": metric, "percentile": q, "repeat": rep, "live_s": live,
            "sim_s": sim, "rel_error": (sim - live) / live}


def test_noise_accounting_by_hand():
    errors = [
        # live 1.00 / 1.10 / 0.95 -> median 1.00, spread 0.15; sim median 1.08: +8% <= 15% within noise, > 5% target
        _err("ttft", 50, 0, 1.00, 1.10), _err("ttft", 50, 1, 1.10, 1.08), _err("ttft", 50, 2, 0.95, 1.02),
        # live 2.00 / 2.02 / 2.01 -> spread 1%; sim 2.06 (+2.5%): outside the noise, within the 5% target
        _err("e2e", 90, 0, 2.00, 2.06), _err("e2e", 90, 1, 2.02, 2.06), _err("e2e", 90, 2, 2.01, 2.06),
        # P99 target is 10%: live 3.0 / 3.3 -> median 3.15, spread 0.3/3.15; sim 3.4 (+7.9%): both
        _err("tbt", 99, 0, 3.0, 3.4), _err("tbt", 99, 1, 3.3, 3.4),
    ]
    out = noise_accounting(errors)
    rows = {(r["metric"], r["percentile"]): r for r in out["rows"]}
    r = rows[("ttft", 50)]
    assert r["live_median_s"] == 1.00 and r["live_spread"] == pytest.approx(0.15)
    assert r["sim_error_vs_live_median"] == pytest.approx(0.08)
    assert r["within_noise"] and not r["within_target"]
    r = rows[("e2e", 90)]
    assert r["live_spread"] == pytest.approx(0.02 / 2.01)
    assert r["sim_error_vs_live_median"] == pytest.approx(0.05 / 2.01)
    assert not r["within_noise"] and r["within_target"]
    r = rows[("tbt", 99)]
    assert r["within_noise"] and r["within_target"]
    assert out["counts"] == {"comparisons": 3, "within_noise": 2, "within_target": 2}
    assert noise_accounting([e for e in errors if e["repeat"] == 0])["counts"]["comparisons"] == 0


def test_target_counts_use_the_percentile_targets_and_count_missing_errors_as_misses():
    errors = [{"percentile": 50, "rel_error": 0.049}, {"percentile": 90, "rel_error": -0.051},
              {"percentile": 99, "rel_error": 0.099}, {"percentile": 99, "rel_error": None},
              {"percentile": 50, "rel_error": float("nan")}]
    assert target_counts(errors) == {"comparisons": 5, "within_target": 2}


def test_two_classes_are_drawn_by_share_and_seed():
    wl = pd.DataFrame({"arrival_s": np.arange(2000) / 10.0, "num_prompt_tokens": 10, "num_output_tokens": 5})
    a = with_classes(wl, {"high": 0, "low": 1}, 0.3, seed=0)
    assert (a["qos_class"] == "high").mean() == pytest.approx(0.3, abs=0.03)
    assert (a.loc[a["qos_class"] == "high", "priority"] == 0).all()
    assert (a.loc[a["qos_class"] == "low", "priority"] == 1).all()
    assert a.equals(with_classes(wl, {"high": 0, "low": 1}, 0.3, seed=0))
    assert with_classes(wl, None, 0.3, seed=0) is wl


def test_reference_steps_fit_the_token_budget():
    prefill, groups = ReferenceSteps().shapes(max_tokens=256)
    assert [s.prefill_chunks for s in prefill] == [((64, 0),), ((256, 0),), ((256, 512),)]
    assert [g.num_decodes for g in groups] == [1, 16, 48]
    assert [s.num_tokens for g in groups for s in g.shapes] == [1, 16, 16 + 128, 48, 48 + 128]
    with pytest.raises(InputError, match="calibration.reference"):
        ReferenceSteps(repetitions=0)
    _, groups = ReferenceSteps(decode_batches=(1, 2, 8), mixed_chunks=(32,), mixed_batches=(1, 8)).shapes(512)
    assert [s.num_tokens for g in groups for s in g.shapes] == [1, 1 + 32, 2, 8, 8 + 32]
    with pytest.raises(InputError, match="mixed_batches"):
        ReferenceSteps(decode_batches=(1, 2), mixed_batches=(4,))


@pytest.mark.skipif(not TRACE.exists(), reason=f"Azure trace not found at {TRACE}")
@pytest.mark.parametrize("override,expected", [
    (["mode=bogus"], "field 'mode'"),
    (["priority.enabled=true"], "policy=vllm_priority"),
    (["calibration.mode=sometimes"], "calibration.mode"),
    (["calibration.track.window_s=0"], "calibration.track.window_s"),
    (["calibration.reference.mixed_batches=[3]"], "calibration.reference.mixed_batches"),
    (["tolerance.view=both"], "tolerance.view"),
    (["calibration.max_drift=abc"], "calibration.max_drift"),
    (["calibration.min_cpu_fraction=1.5"], "calibration.min_cpu_fraction"),
    (["calibration.track.enabled=maybe"], "calibration.track.enabled"),
    (["step_replay=sometimes"], "step_replay"),
    # server mode reads these after each replay too: checked before the server starts
    (["mode=server", "calibration.track.window_s=-1"], "calibration.track.window_s"),
    (["mode=server", "step_replay=maybe"], "step_replay"),
    (["mode=server", "calibration.track.enabled=maybe"], "calibration.track.enabled"),
    (["calibration.reference.mixed_chunks=[9999]"], "calibration.reference.mixed_chunks"),
    (["calibration.reference.decode_batches=[0]"], "calibration.reference.decode_batches"),
    (["calibration.reference.decode_batches=[]"], "calibration.reference.decode_batches"),
    (["calibration.reference.prefill_chunks=[[-5,0]]"], "calibration.reference.prefill_chunks"),
    (["policy=vllm_priority", "priority.enabled=true", "priority.classes.low=x"], "priority.classes"),
])
def test_bad_inprocess_settings_stop_before_an_engine_starts(tmp_path, override, expected):
    from experiments.validate import run

    cfg = compose_validate(["~workloads.code", *override])
    with pytest.raises(InputError, match=expected.replace(".", r"\.")):
        run(cfg, tmp_path)
    if override[0].startswith("mode="):  # no report claiming a run is under way
        assert not (tmp_path / "validation.json").exists()


def test_each_run_is_checked_on_its_tracked_errors_or_else_its_calibrated_ones(tmp_path):
    """A run without a speed-tracked view (no step log) is still held to the tolerance (tolerance.view=tracked)."""
    from experiments.live.simulate import Report
    from experiments.validate import _finish

    def err(rel):
        return [{"workload": "conv", "load": 0.3, "metric": "ttft", "percentile": 50, "live_s": 1.0,
                 "sim_s": 1.0 + rel, "rel_error": rel}]

    cfg = compose_validate(["tolerance.p50=0.05"])
    report = Report(tmp_path / "validation.json", {})
    report.add_run({"label": "a", "errors": err(0.30), "errors_tracked": err(0.01)})
    report.add_run({"label": "b", "errors": err(0.20)})  # no tracked view
    _finish(report, cfg, 0.0)
    assert [v["sim_s"] for v in report.data["violations"]] == [1.2]
    assert report.data["tolerance_view"] == "tracked (calibrated for ['b'])"
    cfg = compose_validate(["tolerance.p50=0.05", "tolerance.view=calibrated"])
    _finish(report, cfg, 0.0)
    assert [v["sim_s"] for v in report.data["violations"]] == [1.3, 1.2]


def test_a_replay_is_void_for_a_5_percent_claim_when_the_speed_moved_or_the_cpu_was_taken():
    def res(drift, share):
        return {"speed": {"drift": drift}, "engine_counters": {"contended_time_share": share}}

    assert void_reasons(res(0.049, 0.05), 0.05, 0.05) == []
    assert void_reasons(res(None, 0.0), 0.05, 0.05) == []  # calibration off: nothing to compare
    [why] = void_reasons(res(-0.08, 0.01), 0.05, 0.05)
    assert "speed drift -8.0%" in why
    [why] = void_reasons(res(0.0, 0.2), 0.05, 0.05)
    assert "20% of the replay's step time contended" in why
    assert len(void_reasons(res(0.3, 0.3), 0.05, 0.05)) == 2


def _steps(start, nd, pf, wall):
    n = len(start)
    return pd.DataFrame({"start_s": start, "num_prefill_tokens": pf, "prefill_context": np.zeros(n, int),
                         "num_decodes": nd, "decode_context_sum": np.asarray(nd) * 100, "batch_size": np.asarray(nd) + (
                             np.asarray(pf) > 0), "wall_s": wall})


def test_speed_track_follows_a_switch_of_the_engine_speed_per_kind():
    # decode steps priced 10 ms: the engine ran them at 10 ms for 10 s, then at 13 ms; prefill steps
    # (priced 10 ms) ran 20 ms throughout; no mixed step
    t = np.arange(0, 20, 0.1)
    wall = np.where(t < 10, 0.010, 0.013)
    steps = pd.concat([_steps(t, np.full(len(t), 4), np.zeros(len(t), int), wall),
                       _steps(np.arange(0, 20, 1.0), np.zeros(20, int), np.full(20, 64), np.full(20, 0.02)),
                       _steps([5.0, 15.0], [0, 0], [0, 0], [0.0002, 0.0002])])  # empty engine steps: no kind
    tr = track_speed(steps, ConstantCostModel(0.01), window_s=2.0, every_s=0.5)
    lv = dict(zip(tr.times_s, tr.levels["decode"]))
    assert lv[5.0] == pytest.approx(1.0) and lv[15.0] == pytest.approx(1.3)
    assert set(np.round(tr.levels["prefill"], 9)) == {2.0}
    assert tr.levels["mixed"] == [1.0] * len(tr.times_s)   # no step of the kind: unscaled
    m = SpeedTrackedCostModel(ConstantCostModel(0.01), tr)
    clock = [5.0]
    m.bind_clock(lambda: clock[0])
    assert m.step_time_s(0, 0, 4, 400, 4) == pytest.approx(0.010)
    assert m.step_time_s(64, 0, 0, 0, 1) == pytest.approx(0.020)
    clock[0] = 15.0
    assert m.step_time_s(0, 0, 4, 400, 4) == pytest.approx(0.013)
    assert m.step_times_s([0, 64, 64], [0, 0, 0], [4, 0, 2], [400, 0, 200], [4, 1, 3]).tolist() == pytest.approx(
        [0.013, 0.020, 0.010])
    clock[0] = 99.0  # past the last step: the last level
    assert m.step_time_s(0, 0, 4, 400, 4) == pytest.approx(0.013)
    with pytest.raises(InputError, match="calibration.track"):
        track_speed(steps, ConstantCostModel(0.01), window_s=0)


def test_a_tracked_cost_model_is_priced_on_the_simulation_clock():
    """`simulate` hands a time-varying cost model its clock: the same request takes 1.3x as long
    once the tracked speed has slowed by 1.3x."""
    from policies.fcfs import FCFS
    from policies.routing import RoundRobin
    from sim.cluster import ReplicaSpec, simulate
    from sim.scheduling import EngineLimits

    tr = SpeedTrack([0.0, 10.0], {"prefill": [1.0, 1.3], "decode": [1.0, 1.3], "mixed": [1.0, 1.3]}, 1.0)
    spec = ReplicaSpec(cost_model=SpeedTrackedCostModel(ConstantCostModel(0.01), tr), policy_factory=FCFS,
                       limits=EngineLimits(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=4096),
                       num_kv_blocks=100, block_size=16)
    wl = pd.DataFrame({"arrival_s": [0.0, 20.0], "num_prompt_tokens": [100, 100], "num_output_tokens": [10, 10]})
    res = simulate(wl, [spec], RoundRobin(), fast_forward=False)
    e2e = res.requests.sort_values("arrival_s")["e2e_s"].to_numpy()
    assert e2e[1] == pytest.approx(1.3 * e2e[0])


def _sim_steps_as_live(sim) -> pd.DataFrame:
    """A simulated step table in the live step table's columns (what an engine that behaved exactly as the
    simulator would have recorded)."""
    st = sim.steps.rename(columns={"duration_s": "wall_s"})
    return st[["start_s", "wall_s", "num_prefill_tokens", "prefill_context", "num_decodes", "decode_context_sum",
               "batch_size"]]


@pytest.mark.skipif(not TRACE.exists(), reason=f"Azure trace not found at {TRACE}")
@pytest.mark.parametrize("policy,kv_blocks", [("fcfs", 1023), ("fcfs", 24), ("vllm_priority", 20)])
def test_step_replay_reproduces_an_engine_that_schedules_as_the_simulator(policy, kv_blocks):
    """An "engine" that is the simulator itself (its steps as the live table) is reproduced step for step,
    preemptions included, on plenty of KV and under KV starvation (preemption storms); and a replay
    whose engine scheduled differently is caught at the step where it did."""
    from omegaconf import open_dict

    from experiments.live.simulate import EngineFacts, engine_replica, simulate_like_engine
    from experiments.live.step_replay import step_replay
    from experiments.live.workloads import ShapeSpec, load_pool, run_workload
    from sim.scheduling import EngineLimits

    over = [f"policy={policy}"] + (["priority.enabled=true"] if policy == "vllm_priority" else [])
    cfg = compose_validate(over)
    with open_dict(cfg):
        cfg.sim.fast_forward = False
        if policy == "vllm_priority":
            cfg.policy.priorities = {"high": 0, "low": 1}
    limits = EngineLimits(max_num_seqs=128, max_num_batched_tokens=512, max_model_len=8192, enable_chunked_prefill=True)
    replica = engine_replica(cfg, EngineFacts(kv_blocks, 128, limits))
    pool = load_pool(ShapeSpec("conv", str(TRACE)), 8192)
    wl = run_workload(pool, 6.0, 150, "poisson", 3)
    wl["qos_class"] = np.where(np.arange(len(wl)) % 3 == 0, "high", "low")
    # exact ties too: a burst of requests arriving at the same instant
    wl.loc[40:49, "arrival_s"] = wl["arrival_s"].iloc[40]
    live = simulate_like_engine(cfg, wl, replica)
    pre = int(live.requests["num_preemptions"].sum())
    if kv_blocks < 100:
        assert pre > 5  # the starved cases do reach preemption
    as_live = wl.merge(live.requests[["request_id", "num_preemptions"]], on="request_id")
    res = step_replay(cfg, _sim_steps_as_live(live), as_live, replica)
    assert res["first_divergence_step"] is None and res["identical_steps"] == res["num_steps_live"] == res["num_steps_sim"]
    assert res["share_identical"] == 1.0
    assert res["preemptions_sim"] == res["preemptions_live"] == pre and res["preempted_requests_differ"] == []
    # an engine that served in another order (FCFS here vs priority, or priority vs FCFS) is told apart
    other = "vllm_priority" if policy == "fcfs" else "fcfs"
    ocfg = compose_validate([f"policy={other}"] + (["priority.enabled=true"] if other == "vllm_priority" else []))
    with open_dict(ocfg):
        ocfg.sim.fast_forward = False
        if other == "vllm_priority":
            ocfg.policy.priorities = {"high": 0, "low": 1}
    olive = simulate_like_engine(ocfg, wl, engine_replica(ocfg, EngineFacts(kv_blocks, 128, limits)))
    ores = step_replay(cfg, _sim_steps_as_live(olive), wl.merge(olive.requests[["request_id", "num_preemptions"]],
                                                               on="request_id"), replica)
    assert ores["first_divergence_step"] is not None and ores["share_identical"] < 1.0
    if pre or int(olive.requests["num_preemptions"].sum()):  # under starvation the two served differently
        assert ores["preempted_requests_differ"]
