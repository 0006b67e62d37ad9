"""Validation machinery without vLLM: metrics parsing, the comparison, workload scaling, and the
live side's robustness (start failure, crash mid-run, request errors, timeouts, process-group
clean-up) against a small fake OpenAI-style streaming server run as a subprocess."""

from __future__ import annotations

import json
import math
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

pytest.importorskip("aiohttp", reason="aiohttp (the live client's HTTP library; comes with vllm) is not installed")
psutil = pytest.importorskip("psutil", reason="psutil (process-tree clean-up; comes with vllm) is not installed")

# the project modules below need aiohttp / psutil at import time: import them after the skips
from experiments.compare import compare_run, live_tbt_samples, percentiles, rel_error  # noqa: E402
from experiments.live.client import ReplayConfig, replay  # noqa: E402
from experiments.live.metrics import cache_config, counter_delta, parse_prometheus, snapshot  # noqa: E402
from experiments.live.server import LiveServer, ServerError, free_port  # noqa: E402
from experiments.validate import ShapeSpec, load_pool, run, run_workload, tolerance_violations  # noqa: E402
from sim.errors import InputError  # noqa: E402
from sim.paths import PROJECT_ROOT  # noqa: E402
from tests.helpers import run_simple  # noqa: E402

METRICS_TEXT = """\
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="128",cache_dtype="auto",enable_prefix_caching="False",num_gpu_blocks="1024",prefix_caching_hash_algo="sha256"} 1.0
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:iteration_tokens_total_count{engine="0",model_name="m"} 10.0
vllm:iteration_tokens_total_sum{engine="0",model_name="m"} 1000.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 2.5
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 5.0
vllm:num_preemptions_total{engine="0",model_name="m",weird="a \\"quoted\\", b"} 2.0
"""


def test_metrics_parser_reads_engine_kv_and_gauges():
    samples = parse_prometheus(METRICS_TEXT)
    kv = cache_config(samples)
    assert (kv["num_kv_blocks"], kv["block_size"]) == (1024, 128)
    snap = snapshot(samples)
    assert (snap["num_running"], snap["num_waiting"], snap["num_preemptions"]) == (3.0, 7.0, 2.0)
    assert [s.labels["weird"] for s in samples if s.name == "vllm:num_preemptions_total"] == ['a "quoted", b']
    zero = {k: 0.0 for k in snap}
    d = counter_delta(zero, snap)
    assert d["mean_tokens_per_step"] == 100.0 and d["server_mean_ttft_s"] == 0.5
    with pytest.raises(InputError, match="cache_config_info"):
        cache_config(parse_prometheus("vllm:num_requests_running 1\n"))
    with pytest.raises(InputError, match="metrics:2: "):
        parse_prometheus("ok 1\nbad line here\n")


# ------------------------------------------------------------------------------ comparison


def _sim_as_live(res, scale: float = 1.0, shift_s: float = 0.0) -> pd.DataFrame:
    """The simulated run turned into a live-style table (per-token times from the step table),
    optionally with every latency stretched by `scale` and every token delayed by `shift_s`."""
    ends = (res.steps["start_s"] + res.steps["duration_s"]).to_numpy()
    rows = []
    for r in res.requests.itertuples():
        runs = np.asarray(r.token_steps)
        times = np.concatenate([ends[a:b + 1] for a, b in zip(runs[0::2], runs[1::2])])
        times = r.arrival_s + (times - r.arrival_s) * scale + shift_s
        rows.append(times)
    live = res.requests.drop(columns=["token_steps"]).copy()
    live["token_times_s"] = rows
    live["first_token_s"] = [t[0] for t in rows]
    live["finish_s"] = [t[-1] for t in rows]
    live["ttft_s"] = live["first_token_s"] - live["arrival_s"]
    live["e2e_s"] = live["finish_s"] - live["arrival_s"]
    live["tpot_s"] = (live["finish_s"] - live["first_token_s"]) / (live["num_output_tokens"] - 1)
    return live


@pytest.fixture(scope="module")
def small_sim():
    rng = np.random.default_rng(1)
    n = 60
    rows = list(zip(np.sort(rng.uniform(0, 20, n)), rng.integers(5, 60, n), rng.integers(2, 30, n)))
    from sim.costmodels.linear import LinearRegimesCostModel, Regime

    cost = LinearRegimesCostModel([Regime(None, {"const": 0.01, "prefill_tokens": 1e-4, "num_decodes": 1e-3})],
                                  name="toy")
    return run_simple(rows, cost=cost, max_num_batched_tokens=64, max_num_seqs=8, kv_blocks=40, block_size=8)


def test_comparison_of_a_run_with_itself_has_zero_error(small_sim):
    live = _sim_as_live(small_sim)
    # live TBT from per-token times equals the simulator's TBT from its step table
    assert np.allclose(np.sort(live_tbt_samples(live)), np.sort(np.repeat(*_tbt_weighted(small_sim))))
    res = compare_run(live, small_sim.requests, small_sim.steps, None, workload="toy", load=0.5)
    assert len(res["errors"]) == 12
    assert all(abs(e["rel_error"]) < 1e-9 for e in res["errors"]), res["errors"]
    assert res["e2e_correlation"]["pearson"] > 0.999999
    assert abs(res["throughput"]["rel_error_requests_per_s"]) < 1e-9


def _tbt_weighted(res):
    from sim.metrics import tbt_samples

    v, w = tbt_samples(res.requests, res.steps)
    return v, w.astype(int)


def test_comparison_reports_signed_relative_error(small_sim):
    live = _sim_as_live(small_sim, scale=1.25)  # the engine is 25% slower than simulated
    res = compare_run(live, small_sim.requests, small_sim.steps, None, workload="toy", load=0.5)
    for e in res["errors"]:
        assert e["rel_error"] == pytest.approx(1 / 1.25 - 1, abs=1e-9), e
    assert res["throughput"]["rel_error_requests_per_s"] > 0  # the simulated last request finishes sooner
    bad = tolerance_violations(res["errors"], {"p50": 0.05, "p90": 0.05, "p99": 0.30})
    assert {e["percentile"] for e in bad} == {50, 90}
    assert tolerance_violations(res["errors"], {"p50": None, "p90": None, "p99": None}) == []
    nan_err = dict(res["errors"][0], rel_error=float("nan"))
    assert tolerance_violations([nan_err], {"p50": 1.0}) == [nan_err]  # nothing to compare is a failure
    assert math.isnan(rel_error(0.0, 1.0))


def test_percentiles_use_one_definition_on_both_sides(small_sim):
    live = _sim_as_live(small_sim, shift_s=0.5)  # every token 0.5 s later: TTFT/E2E shift, TBT unchanged
    for q, v in percentiles(live, "ttft").items():
        assert v == pytest.approx(percentiles(small_sim.requests, "ttft", small_sim.steps)[q] + 0.5)
    assert percentiles(live, "tbt") == pytest.approx(percentiles(small_sim.requests, "tbt", small_sim.steps))


# ------------------------------------------------------------------------------ workloads

TRACE = PROJECT_ROOT.parent / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv"


@pytest.mark.skipif(not TRACE.exists(), reason=f"Azure trace not found at {TRACE}")
def test_workload_scaling_and_rate():
    spec = ShapeSpec("conv", str(TRACE), "azure", prompt_scale=0.25, output_scale=0.5, max_prompt_tokens=300,
                     max_output_tokens=64)
    pool = load_pool(spec, max_model_len=320)
    assert pool.num_prompt_tokens.max() <= 300 and pool.num_output_tokens.max() <= 64
    assert (pool.num_prompt_tokens + pool.num_output_tokens).max() <= 320
    assert pool.num_clipped["prompt_clipped"] > 0 and pool.num_clipped["prompt_clipped_to_max_model_len"] > 0
    wl = run_workload(pool, rate_qps=4.0, num_requests=200, arrivals="trace")
    assert len(wl) == 200 and wl["arrival_s"].iloc[0] == 0
    assert wl["arrival_s"].iloc[-1] == pytest.approx(199 / 4.0)
    assert np.all(np.diff(wl["arrival_s"]) >= 0)
    assert (wl["num_prompt_tokens"].to_numpy() == pool.num_prompt_tokens[:200]).all()
    fast, slow = (run_workload(pool, rate, 2000, "poisson", seed=3) for rate in (8.0, 2.0))
    assert 1 / np.diff(fast["arrival_s"]).mean() == pytest.approx(8.0, rel=0.1)
    assert np.allclose(fast["arrival_s"] * 4, slow["arrival_s"])  # the same pattern at every load
    with pytest.raises(InputError, match="prompt_scale"):
        ShapeSpec("x", str(TRACE), prompt_scale=0)


@pytest.mark.skipif(not TRACE.exists(), reason=f"Azure trace not found at {TRACE}")
def test_load_runs_give_each_load_its_clipped_workload_and_label_each_repeat():
    from experiments.live.inprocess_mode import with_classes
    from experiments.live.workloads import load_runs

    pool = load_pool(ShapeSpec("conv", str(TRACE)), 8192)
    cfg = OmegaConf.create({"duration_s": 10, "min_requests": 30, "max_requests": 60, "arrivals": "poisson",
                            "seed": 1, "repeats": 2})
    runs = list(load_runs(cfg, pool, 4.0, [0.5, 3.0]))
    assert [r[3] for r in runs] == ["conv-load0.5-r0", "conv-load0.5-r1", "conv-load3-r0", "conv-load3-r1"]
    assert [r[4] for r in runs] == [{"repeat": 0}, {"repeat": 1}] * 2
    assert [len(r[2]) for r in runs] == [30, 30, 60, 60]  # 20 and 120 requests, clipped to [30, 60]
    assert runs[0][2] is runs[1][2] and runs[2][1] == 12.0  # repeats replay the very same requests
    classes = {"high": 0, "low": 1}
    shaped = list(load_runs(OmegaConf.merge(cfg, {"repeats": 1}), pool, 4.0, [1.0],
                            lambda w: with_classes(w, classes, 0.3, 1)))
    assert shaped[0][3] == "conv-load1" and shaped[0][4] == {}
    assert set(shaped[0][2]["qos_class"]) == {"high", "low"}


# ------------------------------------------------------------------------------ fake server

FAKE_SERVER = textwrap.dedent('''
    """A stand-in for vLLM's OpenAI server: /health, /metrics, streaming /v1/completions."""
    import asyncio, json, os, signal, subprocess, sys
    from aiohttp import web

    mode = os.environ.get("FAKE_MODE", "ok")
    per_token_s = float(os.environ.get("FAKE_TOKEN_S", "0.002"))
    port = int(sys.argv[1])
    state = {"running": 0, "served": 0, "first_token_sum": 0.0, "itl_sum": 0.0, "itl_count": 0}
    if mode == "bad_step_log":  # an engine core whose step log (profiler.steplog) is damaged
        with open(os.environ["SLOSIM_STEP_LOG"], "w") as f:
            f.write("garbage,header\\n1,2\\n")
    if mode == "exit_at_start":
        print("fake: engine core failed to start: out of memory", flush=True)
        sys.exit(7)
    if mode == "child":
        subprocess.Popen([sys.executable, "-c",
                          "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    async def health(_):
        if mode == "never_healthy":
            return web.Response(status=503)
        return web.Response(text="")

    async def metrics(_):
        return web.Response(text=(
            'vllm:cache_config_info{block_size="16",num_gpu_blocks="512"} 1.0\\n'
            f'vllm:num_requests_running{{engine="0"}} {state["running"]}\\n'
            'vllm:num_requests_waiting{engine="0"} 0\\n'
            f'vllm:iteration_tokens_total_count{{engine="0"}} {state["served"]}\\n'
            f'vllm:request_queue_time_seconds_sum{{engine="0"}} 0.0\\n'
            f'vllm:request_queue_time_seconds_count{{engine="0"}} {state["served"]}\\n'
            f'vllm:request_prefill_time_seconds_sum{{engine="0"}} {state["first_token_sum"]}\\n'
            f'vllm:request_prefill_time_seconds_count{{engine="0"}} {state["served"]}\\n'
            f'vllm:inter_token_latency_seconds_sum{{engine="0"}} {state["itl_sum"]}\\n'
            f'vllm:inter_token_latency_seconds_count{{engine="0"}} {state["itl_count"]}\\n'))

    async def completions(request):
        body = await request.json()
        n, prompt = body["max_tokens"], body["prompt"]
        assert body["stream"] and body["ignore_eos"] and body["return_token_ids"] and isinstance(prompt[0], int)
        state["served"] += 1
        if mode.startswith("crash_after:") and state["served"] > int(mode.split(":")[1]):
            os._exit(9)
        if mode.startswith("reject_over:") and len(prompt) > int(mode.split(":")[1]):
            return web.json_response({"error": {"message": "prompt too long"}}, status=400)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        state["running"] += 1
        try:
            for i in range(n):
                await asyncio.sleep(per_token_s)
                if i == 0:
                    state["first_token_sum"] += per_token_s
                else:
                    state["itl_sum"] += per_token_s
                    state["itl_count"] += 1
                if mode.startswith("stall_over:") and len(prompt) > int(mode.split(":")[1]) and i == 1:
                    await asyncio.sleep(3600)
                chunk = {"choices": [{"index": 0, "text": "", "token_ids": [100 + i],
                                      "finish_reason": "length" if i == n - 1 else None}]}
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\\n\\n")
            await resp.write(b"data: [DONE]\\n\\n")
        finally:
            state["running"] -= 1
        return resp

    app = web.Application()
    app.add_routes([web.get("/health", health), web.get("/metrics", metrics), web.post("/v1/completions", completions)])
    web.run_app(app, host="127.0.0.1", port=port, print=None, handle_signals=mode != "child")
''')


@pytest.fixture
def fake_server_script(tmp_path):
    p = tmp_path / "fake_server.py"
    p.write_text(FAKE_SERVER)
    return p


def _fake(script, tmp_path, mode="ok", **kw) -> LiveServer:
    port = free_port()
    return LiveServer([sys.executable, str(script), str(port)], tmp_path / f"{mode.split(':')[0]}.log",
                      env={"FAKE_MODE": mode}, port=port, startup_timeout_s=kw.get("startup_timeout_s", 20),
                      shutdown_timeout_s=kw.get("shutdown_timeout_s", 2), name="fake server")


def _gone(pids) -> bool:
    deadline = time.time() + 5
    while time.time() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def _workload(n, prompt=16, output=5, gap_s=0.01):
    return pd.DataFrame({"arrival_s": np.arange(n) * gap_s, "num_prompt_tokens": np.full(n, prompt),
                         "num_output_tokens": np.full(n, output)})


def test_engine_start_failure_is_clear_and_leaves_nothing(fake_server_script, tmp_path):
    server = _fake(fake_server_script, tmp_path, "exit_at_start")
    with pytest.raises(ServerError, match=r"exited with status 7 during start-up(.|\n)*out of memory"):
        server.start()
    assert _gone([server.pid])


def test_server_never_healthy_times_out_and_is_killed(fake_server_script, tmp_path):
    server = _fake(fake_server_script, tmp_path, "never_healthy", startup_timeout_s=3)
    with pytest.raises(ServerError, match="did not become healthy within 3 s"):
        server.start()
    assert _gone([server.pid])


def test_stop_kills_the_whole_process_tree_even_if_it_ignores_sigterm(fake_server_script, tmp_path):
    server = _fake(fake_server_script, tmp_path, "child")
    with server:
        time.sleep(0.5)
        tree = [server.pid] + [c.pid for c in psutil.Process(server.pid).children(recursive=True)]
        assert len(tree) >= 2
    assert _gone(tree)


def test_replay_records_every_token_in_the_simulator_schema(fake_server_script, tmp_path):
    from sim.metrics import request_table

    with _fake(fake_server_script, tmp_path, "ok") as server:
        live = replay(server.base_url, "m", _workload(20), ReplayConfig(metrics_interval_s=0.05), vocab_size=1000,
                      alive=server.check_alive)
    assert live.failure is None
    req = live.requests
    sim_cols = list(request_table([], []).columns)
    assert list(req.columns[:len(sim_cols)]) == sim_cols  # same schema, live extras after it
    assert (req["outcome"] == "finished").all()
    assert all(len(t) == 5 for t in req["token_times_s"])
    assert (req["ttft_s"] > 0).all() and (req["e2e_s"] >= req["ttft_s"]).all()
    assert req["send_lag_s"].max() < 0.05  # sent on time
    assert live.overhead["coalesced_token_share"] == 0.0
    assert len(live.gauges) >= 2 and live.counters["num_steps"] == 20


def test_request_errors_and_timeouts_become_outcomes(fake_server_script, tmp_path):
    wl = _workload(6, prompt=16)
    wl.loc[[1, 4], "num_prompt_tokens"] = 50  # rejected (HTTP 400)
    with _fake(fake_server_script, tmp_path, "reject_over:40") as server:
        live = replay(server.base_url, "m", wl, ReplayConfig(), vocab_size=1000, alive=server.check_alive)
    req = live.requests
    assert list(req["outcome"]) == ["finished", "rejected", "finished", "finished", "rejected", "finished"]
    assert req.loc[1, "reject_reason"].startswith("HTTP 400") and "too long" in req.loc[1, "reject_reason"]
    wl.loc[[1, 4], "num_prompt_tokens"] = 16
    wl.loc[2, "num_prompt_tokens"] = 50  # stalls after one token
    with _fake(fake_server_script, tmp_path, "stall_over:40") as server:
        live = replay(server.base_url, "m", wl, ReplayConfig(request_timeout_s=1.0), vocab_size=1000,
                      alive=server.check_alive)
    req = live.requests
    assert req.loc[2, "outcome"] == "unfinished" and req.loc[2, "reject_reason"] == "timeout"
    assert req.loc[2, "num_output_tokens_done"] >= 1 and math.isnan(req.loc[2, "e2e_s"])
    assert (req.drop(index=2)["outcome"] == "finished").all()


def test_server_crash_mid_run_keeps_partial_results(fake_server_script, tmp_path):
    with _fake(fake_server_script, tmp_path, "crash_after:5") as server:
        live = replay(server.base_url, "m", _workload(40, output=3, gap_s=0.05), ReplayConfig(), vocab_size=1000,
                      alive=server.check_alive)
        pid = server.pid
    assert live.failure is not None and "exited" in live.failure
    req = live.requests
    assert (req["outcome"] == "finished").sum() >= 4  # what finished before the crash is kept
    assert (req["reject_reason"] == "not_sent").sum() > 10  # the rest is accounted for, not dropped
    assert len(req) == 40
    assert _gone([pid])


def compose_validate(overrides=()):
    """conf/validate.yaml composed as `python -m experiments.validate` would (defaults included)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("validate", overrides=list(overrides))
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return cfg


def _validate_cfg(tmp_path, script, mode, **over):
    cfg = compose_validate(["mode=server", "loads=[0.5]", "duration_s=2", "min_requests=10", "max_requests=30", "warmup_requests=2",
                            "frontend.num_requests=5", "frontend.gap_s=0.05", "serving_overhead.batch_sizes=[1,4]",
                            "serving_overhead.output_tokens=12", "serving_overhead.prefill_prompt_tokens=[]",
                            "saturation.method=fixed", "+saturation.rates_qps.conv=20.0", "~workloads.code",
                            "tolerance.p50=0.05", "tolerance.p90=0.05", "tolerance.p99=0.1"])
    toy_cost = {"_target_": "sim.costmodels.linear.LinearRegimesCostModel", "_convert_": "all", "name": "toy",
                "regimes": [{"max_total_tokens": None, "coefficients": {"const": 0.002}}]}
    cfg.costmodel = OmegaConf.create(toy_cost)
    cfg = OmegaConf.merge(cfg, {
        "server": {"command": [sys.executable, str(script), "{port}"], "env": {"FAKE_MODE": mode},
                   "startup_timeout_s": 20, "shutdown_timeout_s": 2, "max_model_len": 2048},
        "workloads": {"conv": {"path": str(TRACE), "prompt_scale": 0.05, "output_scale": 0.05,
                               "max_prompt_tokens": 200, "max_output_tokens": 8}},
    })
    return OmegaConf.merge(cfg, over)


@pytest.mark.skipif(not TRACE.exists(), reason=f"Azure trace not found at {TRACE}")
def test_validate_app_end_to_end_against_a_fake_server(fake_server_script, tmp_path):
    res = run(_validate_cfg(tmp_path, fake_server_script, "ok"), tmp_path / "out")
    data = json.loads((tmp_path / "out" / "validation.json").read_text())
    # the fake /metrics reports 512 blocks; requests can hold 511 (vLLM keeps one as its null block)
    assert data["status"] == "ok" and data["engine"]["num_kv_blocks"] == 511 and data["engine"]["block_size"] == 16
    assert data["server_pids_left_running"] == []
    assert len(data["errors"]) == 12
    assert {(e["metric"], e["percentile"]) for e in data["errors"]} == {
        (m, q) for m in ("ttft", "tbt", "tpot", "e2e") for q in (50, 90, 99)}
    # the time outside the (fake) engine is what HTTP and the client add on loopback: a few ms
    assert 0 < data["frontend"]["latency_s"] < 0.05
    run0 = data["runs"][0]
    assert run0["frontend_latency_s"] == data["frontend"]["latency_s"]
    # the fake engine reports 2 ms between tokens at any batch size, as the toy cost model prices a step
    so = data["serving_overhead"]
    assert [p["batch_size"] for p in so["points"]] == [1, 4]
    assert abs(so["const_s"]) < 1e-9 and abs(so["per_request_s"]) < 1e-9
    ttft_raw = {e["percentile"]: e["sim_s"] for e in run0["errors_uncalibrated"] if e["metric"] == "ttft"}
    ttft = {e["percentile"]: e["sim_s"] for e in run0["errors"] if e["metric"] == "ttft"}
    if so["const_s"] + so["per_request_s"] == 0:
        assert ttft[50] == pytest.approx(ttft_raw[50] + data["frontend"]["latency_s"])
    assert ttft[50] > ttft_raw[50]
    assert res.data["violations"] == [e for e in data["errors"] if abs(e["rel_error"]) > {50: .05, 90: .05, 99: .1}[
        e["percentile"]]]
    run_dir = tmp_path / "out" / "conv-load0.5"
    for name in ("requests_live.parquet", "requests_sim.parquet", "cdf.png", "over_time.png", "comparison.json"):
        assert (run_dir / name).exists(), name
    live = pd.read_parquet(run_dir / "requests_live.parquet")
    assert len(live["token_times_s"].iloc[0]) == live["num_output_tokens"].iloc[0]
    # a server without slosim's step-log plugin: no speed-tracked view, said in the report (the exit
    # status then checks the as-simulated errors, as the violations above)
    assert "step-log plugin" in run0["step_log"]["missing"] and "errors_tracked" not in run0
    assert data["tolerance_view"] == "calibrated"


@pytest.mark.skipif(not TRACE.exists(), reason=f"Azure trace not found at {TRACE}")
def test_a_damaged_engine_step_log_costs_the_tracked_view_not_the_run(fake_server_script, tmp_path):
    run(_validate_cfg(tmp_path, fake_server_script, "bad_step_log"), tmp_path / "out")
    data = json.loads((tmp_path / "out" / "validation.json").read_text())
    assert data["status"] == "ok" and len(data["errors"]) == 12
    missing = data["runs"][0]["step_log"]["missing"]
    assert "engine_steps.csv" in missing and "columns" in missing


@pytest.mark.slow
@pytest.mark.skipif(not TRACE.exists(), reason=f"Azure trace not found at {TRACE}")
def test_validate_cli_exit_status_follows_the_tolerance(fake_server_script, tmp_path):
    """`python -m experiments.validate` exits 1 when an error exceeds the tolerance, 3 when the live side fails."""
    import subprocess

    from sim.costmodels import LinearRegimesCostModel, Regime, save_cost_model

    toy = save_cost_model(LinearRegimesCostModel([Regime(None, {"const": 0.002})], name="toy"), tmp_path / "toy.json")

    def cli(mode, out, *extra):
        args = [sys.executable, "-m", "experiments.validate", "mode=server", f"out_dir={out}", "loads=[0.5]", "~workloads.code",
                "duration_s=1", "min_requests=5", "max_requests=10", "warmup_requests=1", "plots=false",
                "saturation.method=fixed", "+saturation.rates_qps.conv=20.0", "frontend.mode=none",
                "serving_overhead.mode=none",
                f"server.command=[{sys.executable},{fake_server_script},'{{port}}']", f"+server.env.FAKE_MODE={mode}",
                "server.shutdown_timeout_s=2", f"workloads.conv.path={TRACE}", "workloads.conv.prompt_scale=0.05",
                "workloads.conv.output_scale=0.05", "workloads.conv.max_output_tokens=8",
                "costmodel=file", f"costmodel.path={toy}", *extra]
        return subprocess.run(args, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)

    # a fake server streaming a token every 2 ms after HTTP time, and a 2 ms-a-step cost model that
    # knows nothing of HTTP (frontend.mode=none): TTFT cannot match to 1%
    proc = cli("ok", tmp_path / "a", "tolerance.p50=0.01")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "beyond the tolerance" in proc.stderr and "ttft" in proc.stdout
    proc = cli("ok", tmp_path / "b")  # no tolerance given: nothing to fail
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = cli("exit_at_start", tmp_path / "c")
    assert proc.returncode == 3 and "exited with status 7 during start-up" in proc.stderr, proc.stderr
    assert json.loads((tmp_path / "c" / "validation.json").read_text())["status"] == "failed"
    proc = cli("ok", tmp_path / "d", "costmodel.path=/nonexistent.json")
    assert proc.returncode == 2 and "cost model file not found" in proc.stderr, proc.stderr


@pytest.mark.skipif(not TRACE.exists(), reason=f"Azure trace not found at {TRACE}")
def test_validate_app_crash_writes_partial_report(fake_server_script, tmp_path):
    cfg = _validate_cfg(tmp_path, fake_server_script, "crash_after:18")  # after warm-up + calibrations (12)
    with pytest.raises(ServerError, match="failed mid-run"):
        run(cfg, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "validation.json").read_text())
    assert data["status"] == "failed" and "mid-run" in data["error"]
    assert (tmp_path / "out" / "conv-load0.5" / "requests_live.parquet").exists()
    assert data["server_exit_status"] is not None


def test_serving_overhead_fit_recovers_a_known_overhead_and_prices_prefill_tokens():
    from experiments.validate import ServingOverheadCostModel, fit_serving_overhead
    from sim.costmodel import ConstantCostModel

    const, per_req, per_tok = 0.003, 2e-5, -1.5e-5
    points = [{"batch_size": b, "prefill_tokens": q, "diff_s": const + per_req * b + per_tok * q}
              for b, q in [(1, 0), (8, 0), (32, 0), (64, 0), (1, 64), (1, 256), (1, 448)]]
    fit = fit_serving_overhead(points)
    assert fit["const_s"] == pytest.approx(const) and fit["per_request_s"] == pytest.approx(per_req)
    assert fit["per_prefill_token_s"] == pytest.approx(per_tok)
    # decode points alone cannot say anything about prefill tokens
    assert fit_serving_overhead([p for p in points if not p["prefill_tokens"]])["per_prefill_token_s"] == 0.0
    model = ServingOverheadCostModel(ConstantCostModel(0.1), fit["const_s"], fit["per_request_s"],
                                     fit["per_prefill_token_s"])
    assert model.step_time_s(448, 0, 16, 1000, 17) == pytest.approx(0.1 + const + per_req * 17 + per_tok * 448)
    assert model.step_times_s([448, 0], 0, [16, 4], 0, [17, 4]).tolist() == pytest.approx(
        [0.1 + const + per_req * 17 + per_tok * 448, 0.1 + const + per_req * 4])


def test_the_simulated_replica_comes_from_the_one_wiring_with_the_engines_kv():
    from experiments.validate import EngineFacts, engine_replica, simulate_like_engine
    from sim.scheduling import EngineLimits

    cfg = compose_validate()
    limits = EngineLimits(max_num_seqs=128, max_num_batched_tokens=512, max_model_len=8192, enable_chunked_prefill=True)
    replica = engine_replica(cfg, EngineFacts(num_kv_blocks=7, block_size=32, limits=limits))
    assert (replica.num_kv_blocks, replica.block_size, replica.limits) == (7, 32, limits)  # the server's limits
    assert replica.cost_model.name == engine_replica(cfg).cost_model.name  # conf/costmodel/cpu_llama_small
    # 7 blocks x 32 tokens: a 100-token prompt fits, a 300-token one can never be served
    wl = pd.DataFrame({"request_id": [0, 1], "arrival_s": [0.0, 0.0], "num_prompt_tokens": [100, 300],
                       "num_output_tokens": [4, 4]})
    assert simulate_like_engine(cfg, wl, replica).requests["outcome"].tolist() == ["finished", "rejected"]
    with pytest.raises(InputError, match="differ from the served engine"):
        engine_replica(compose_validate(["cluster.max_num_seqs=64"]), EngineFacts(7, 32, limits))
    with pytest.raises(InputError, match="cluster.num_replicas"):
        engine_replica(compose_validate(["cluster.num_replicas=2"]))


def test_a_vllm_plugins_list_without_the_step_log_is_named(monkeypatch):
    from experiments.live.server_mode import step_log_blocker

    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    assert step_log_blocker(compose_validate(["mode=server"])) == ""
    cfg = compose_validate(["mode=server", "+server.env.VLLM_PLUGINS=lora_filesystem_resolver"])
    assert "VLLM_PLUGINS='lora_filesystem_resolver' leaves out slosim's step-log plugin" in step_log_blocker(cfg)
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver, slosim_step_log")
    assert step_log_blocker(compose_validate(["mode=server"])) == ""
