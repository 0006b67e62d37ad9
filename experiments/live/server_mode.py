"""Server mode of `experiments.validate` (`mode=server`): vLLM's OpenAI server and an HTTP client, the
end-to-end path (docs/validation.md, "Server mode").

One server is started with the engine settings of the shipped profile and always stopped; its engine
core logs its steps (`profiler.steplog`, through `SLOSIM_STEP_LOG`). After a warm-up, a front-end
latency and a serving-overhead calibration on their own traffic, each workload shape's saturation is
measured and each load replayed open-loop by the client (`experiments.live.client`), simulated on the
same requests (as simulated: the profile plus the serving overhead and the front-end latency; and
speed-tracked from the engine core's step log), compared, and written under the output folder.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from experiments.compare import compare_run, error_table, live_tbt_samples, plot_cdfs, plot_over_time, throughput
from experiments.live.calibration import step_price_errors
from experiments.live.client import LiveRun, ReplayConfig, idle_health_rtt, replay, scrape_once, wait_idle
from experiments.live.inprocess_mode import track_window_s
from experiments.live.metrics import cache_config
from experiments.live.server import LiveServer, ServerConfig, ServerError
from experiments.live.simulate import (
    EngineFacts, Report, ServingOverheadCostModel, _clean, engine_replica, machine_state, simulate_like_engine,
    target_counts, usable_kv_blocks, with_frontend_latency,
)
from experiments.live.speed_track import simulate_tracked
from experiments.live.workloads import RequestPool, burst_workload, fixed_saturation, load_runs
from profiler.steplog import ENV as STEP_LOG_ENV
from profiler.steplog import read_steps
from sim.errors import InputError
from sim.metrics import tbt_samples
from sim.paths import project_path
from sim.request import FINISHED
from sim.scheduling import EngineLimits

log = logging.getLogger(__name__)

STEP_LOG = "engine_steps.csv"
"""The served engine core's step log (`profiler.steplog`), in the output folder."""


def run_server(cfg: DictConfig, out: Path, report: Report, pools: list[RequestPool], loads: list[float],
               scfg: ServerConfig, rcfg: ReplayConfig, vocab: int, cost_model) -> None:
    """Start the server, calibrate, replay every (shape, load, repeat), simulate and compare, adding each
    run to `report`; the server is always stopped (its exit status and any process left are recorded)."""
    scfg = dataclasses.replace(scfg, env={STEP_LOG_ENV: str((out / STEP_LOG).resolve()), **scfg.env})  # step log
    if step_log_blocker(cfg):
        log.warning("no speed-tracked view in this run: %s", step_log_blocker(cfg))
    server = _start_server(cfg, scfg, out)
    try:
        server.start()
        engine = _engine_facts(server, scfg)
        replica = engine_replica(cfg, engine)
        report.data["engine"] = {"num_kv_blocks": engine.num_kv_blocks, "block_size": engine.block_size,
                                 "limits": engine.limits.__dict__, "startup_s": server.startup_s,
                                 "kv_source": "vllm:cache_config_info on the live server's /metrics, less vLLM's "
                                              "null block",
                                 "idle_http_rtt_s": asyncio.run(idle_health_rtt(server.base_url)),
                                 "command": server.argv, "server_pid": server.pid}
        report.write()
        _warm_up(server, scfg, rcfg, vocab, int(cfg.warmup_requests))
        report.data["frontend"] = _frontend_latency(cfg, server, scfg, rcfg, vocab)
        report.write()
        frontend_s = float(report.data["frontend"]["latency_s"])
        report.data["serving_overhead"] = _serving_overhead(cfg, server, scfg, rcfg, vocab, cost_model,
                                                            replica)
        report.write()
        so = report.data["serving_overhead"]
        if so["const_s"] or so["per_request_s"] or so.get("per_prefill_token_s"):
            cost_model = ServingOverheadCostModel(cost_model, so["const_s"], so["per_request_s"],
                                                  so.get("per_prefill_token_s", 0.0))
        for pool in pools:
            sat = _saturation(cfg, pool, server, scfg, rcfg, vocab, cost_model, replica, out, frontend_s)
            report.data["saturation"][pool.name] = sat
            report.write()
            rate_sat = sat["rate_qps"]
            for load, rate, wl, label, extra in load_runs(cfg, pool, rate_sat, loads):
                res = _one_run(cfg, label, pool.name, load, wl, server, scfg, rcfg, vocab, cost_model,
                               replica, out, extra, frontend_s, plots=bool(cfg.plots))
                res["rate_qps"] = rate
                res["saturation_fraction"] = load
                report.add_run(res)
                _print_run(res)
        report.data["status"] = "ok"
    finally:
        rc = server.stop()
        report.data["server_exit_status"] = rc
        report.data["server_pids_left_running"] = server.survivors()


def step_log_blocker(cfg: DictConfig) -> str:
    """Why vLLM will not load the step-log plugin in the server ('' when nothing says so): VLLM_PLUGINS,
    in this environment or in `server.env`, lists the plugins vLLM loads, and not ours."""
    env = {**os.environ, **{str(k): str(v) for k, v in (cfg.server.get("env") or {}).items()}}
    plugins = env.get("VLLM_PLUGINS")
    if plugins is None or "slosim_step_log" in [p.strip() for p in plugins.split(",")]:
        return ""
    return f"VLLM_PLUGINS={plugins!r} leaves out slosim's step-log plugin (add slosim_step_log to it)"


def _start_server(cfg: DictConfig, scfg: ServerConfig, out_dir: Path) -> LiveServer:
    command = cfg.server.get("command")
    if not command:
        return LiveServer.from_config(scfg, out_dir / "server.log")
    from experiments.live.server import free_port

    port = free_port()
    argv = [str(a).format(port=port, python=sys.executable, model_dir=str(project_path(scfg.model_dir)))
            for a in command]
    return LiveServer(argv, out_dir / "server.log", env=scfg.environment(), port=port,
                      startup_timeout_s=scfg.startup_timeout_s, shutdown_timeout_s=scfg.shutdown_timeout_s,
                      name="server (custom command)")


def _engine_facts(server: LiveServer, scfg: ServerConfig) -> EngineFacts:
    kv = cache_config(asyncio.run(scrape_once(server.base_url)))
    limits = EngineLimits(max_num_seqs=scfg.max_num_seqs, max_num_batched_tokens=scfg.max_num_batched_tokens,
                          max_model_len=scfg.max_model_len, enable_chunked_prefill=scfg.enable_chunked_prefill)
    return EngineFacts(usable_kv_blocks(kv["num_kv_blocks"]), kv["block_size"], limits)


def _warm_up(server: LiveServer, scfg: ServerConfig, rcfg: ReplayConfig, vocab: int, n: int) -> None:
    """A few untimed requests of assorted lengths, so lazy initialisation does not land in a measured run."""
    if n < 1:
        return
    lens = np.linspace(8, min(scfg.max_num_batched_tokens * 2, scfg.max_model_len // 2), n).astype(np.int64)
    wl = pd.DataFrame({"arrival_s": np.linspace(0, 1, n), "num_prompt_tokens": lens,
                       "num_output_tokens": np.full(n, 16)})
    live = replay(server.base_url, scfg.served_model_name, wl, rcfg, vocab_size=vocab, alive=server.check_alive)
    if live.failure:
        raise ServerError(f"the server failed during warm-up: {live.failure}")
    bad = live.requests[live.requests["outcome"] != FINISHED]
    if len(bad):
        raise ServerError(f"{len(bad)} of {n} warm-up requests failed; first: {bad['reject_reason'].iloc[0]}",
                          server.log_tail())
    asyncio.run(wait_idle(server.base_url, alive=server.check_alive))


def _serving_overhead(cfg, server, scfg, rcfg, vocab, cost_model, replica) -> dict:
    """Per-step time the serving engine adds to the profiled step, as `const_s + per_request_s *
    batch + per_prefill_token_s * prefill_tokens`. Decode points: for each batch size B, B
    identical requests arrive at once and decode together; the engine's own mean inter-token
    latency (vLLM's histogram, stamped by the engine core, so HTTP and client delays do not
    enter) is compared with the mean token gap of the same requests simulated with the cost
    model. Prefill points: for each prompt size P, requests sent one at a time to the idle engine;
    the engine's mean prefill time (scheduled to first token, one step) is compared with the cost
    model's price of that step. The differences are fitted by least squares (without prefill
    points, `per_prefill_token_s` is 0). Calibration traffic only (never the validation runs);
    `none` keeps the profiled cost model, `fixed` takes the numbers given."""
    c = OmegaConf.to_container(cfg.serving_overhead, resolve=True)
    mode = c["mode"]
    if mode == "none":
        return {"mode": "none", "const_s": 0.0, "per_request_s": 0.0, "per_prefill_token_s": 0.0}
    if mode == "fixed":
        return {"mode": "fixed", "const_s": float(c["const_s"]), "per_request_s": float(c["per_request_s"]),
                "per_prefill_token_s": float(c.get("per_prefill_token_s") or 0.0)}
    if mode != "calibrate":
        raise InputError("unknown mode; choose calibrate, fixed or none", field="serving_overhead.mode", value=mode)
    batches = [int(b) for b in c["batch_sizes"]]
    prefills = [int(q) for q in (c.get("prefill_prompt_tokens") or [])]
    p, o = int(c["prompt_tokens"]), int(c["output_tokens"])
    if len(set(batches)) < 2 or min(batches) < 1 or o < 3 or p < 1:
        raise InputError("needs >= 2 distinct batch sizes >= 1, prompt_tokens >= 1 and output_tokens >= 3",
                         field="serving_overhead", value=c)
    if prefills and min(prefills) < 1:
        raise InputError("prompt sizes must be >= 1", field="serving_overhead.prefill_prompt_tokens", value=prefills)
    points = []
    for b in batches:
        asyncio.run(wait_idle(server.base_url, alive=server.check_alive))
        wl = pd.DataFrame({"request_id": np.arange(b), "arrival_s": np.zeros(b), "num_prompt_tokens": np.full(b, p),
                           "num_output_tokens": np.full(b, o)})
        live = replay(server.base_url, scfg.served_model_name, wl, rcfg, vocab_size=vocab, alive=server.check_alive)
        if live.failure or (live.requests["outcome"] != FINISHED).any():
            raise ServerError(f"the serving-overhead calibration failed at batch {b}: {live.failure}")
        live_itl = float(live.counters.get("server_mean_itl_s", math.nan))
        sim = simulate_like_engine(cfg, wl, replica, cost_model)
        v, w = tbt_samples(sim.requests, sim.steps)
        sim_itl = float(np.average(v, weights=w))
        if not math.isfinite(live_itl):
            raise ServerError("serving-overhead calibration: the engine reported no inter-token latency on /metrics")
        points.append({"kind": "decode", "batch_size": b, "prefill_tokens": 0, "engine_mean_itl_s": live_itl,
                       "sim_mean_itl_s": sim_itl, "diff_s": live_itl - sim_itl,
                       "client_mean_gap_s": float(np.mean(live_tbt_samples(live.requests))),
                       "client_coalesced_token_share": live.overhead["coalesced_token_share"]})
    n_pre, gap = int(c.get("prefill_requests") or 8), float(c.get("prefill_gap_s") or 0.6)
    for q in prefills:
        asyncio.run(wait_idle(server.base_url, alive=server.check_alive))
        wl = pd.DataFrame({"request_id": np.arange(n_pre), "arrival_s": np.arange(n_pre) * gap,
                           "num_prompt_tokens": np.full(n_pre, q), "num_output_tokens": np.full(n_pre, 2)})
        live = replay(server.base_url, scfg.served_model_name, wl, rcfg, vocab_size=vocab, alive=server.check_alive)
        if live.failure or (live.requests["outcome"] != FINISHED).any():
            raise ServerError(f"the serving-overhead calibration failed at a {q}-token prefill: {live.failure}")
        live_pre = float(live.counters.get("engine_mean_prefill_s", math.nan))
        if not math.isfinite(live_pre):
            raise ServerError("serving-overhead calibration: the engine reported no prefill time on /metrics")
        sim_pre = float(cost_model.step_time_s(q, 0, 0, 0, 1))
        points.append({"kind": "prefill", "batch_size": 1, "prefill_tokens": q, "engine_mean_prefill_s": live_pre,
                       "sim_step_s": sim_pre, "diff_s": live_pre - sim_pre})
    return {"mode": "calibrate", **fit_serving_overhead(points), "points": points, "prompt_tokens": p,
            "output_tokens": o}


def fit_serving_overhead(points: list[dict]) -> dict:
    """Least-squares `diff_s ~ const_s + per_request_s * batch_size + per_prefill_token_s *
    prefill_tokens` over calibration points; without a point with prefill tokens the last
    term is 0 (it cannot be identified)."""
    x = np.array([[1.0, q["batch_size"], q["prefill_tokens"]] for q in points], dtype=float)
    y = np.array([q["diff_s"] for q in points], dtype=float)
    with_prefill = bool(np.any(x[:, 2] > 0))
    if not with_prefill:
        x = x[:, :2]
    coef = np.linalg.lstsq(x, y, rcond=None)[0]
    return {"const_s": float(coef[0]), "per_request_s": float(coef[1]),
            "per_prefill_token_s": float(coef[2]) if with_prefill else 0.0,
            "fit_residuals_s": (y - x @ coef).tolist()}


def _frontend_latency(cfg, server, scfg, rcfg, vocab) -> dict:
    """Time a request spends outside the engine steps (client, HTTP, API server, IPC), from short
    requests sent one at a time to the idle engine: mean client TTFT minus the engine core's own
    mean queue + prefill time (vLLM's histograms). Measured before, and apart from, the validation
    traffic; `fixed` takes a given value and `none` leaves the simulator's latencies as they are."""
    f = OmegaConf.to_container(cfg.frontend, resolve=True)
    mode = f["mode"]
    if mode == "none":
        return {"mode": "none", "latency_s": 0.0}
    if mode == "fixed":
        v = f.get("latency_s")
        if v is None or not v >= 0:
            raise InputError("frontend.mode=fixed needs latency_s >= 0", field="frontend.latency_s", value=v)
        return {"mode": "fixed", "latency_s": float(v)}
    if mode != "calibrate":
        raise InputError("unknown mode; choose calibrate, fixed or none", field="frontend.mode", value=mode)
    n = int(f["num_requests"])
    if n < 1:
        raise InputError("must be >= 1", field="frontend.num_requests", value=n)
    wl = pd.DataFrame({"arrival_s": np.arange(n) * float(f["gap_s"]),
                       "num_prompt_tokens": np.full(n, int(f["prompt_tokens"])), "num_output_tokens": np.full(n, 2)})
    asyncio.run(wait_idle(server.base_url, alive=server.check_alive))
    live = replay(server.base_url, scfg.served_model_name, wl, rcfg, vocab_size=vocab, alive=server.check_alive)
    if live.failure:
        raise ServerError(f"the server failed during the front-end calibration: {live.failure}")
    fin = live.requests[live.requests["outcome"] == FINISHED]
    c = live.counters
    engine_s = c.get("engine_mean_queue_s", math.nan) + c.get("engine_mean_prefill_s", math.nan)
    client_s = float(fin["ttft_s"].mean()) if len(fin) else math.nan
    latency = client_s - engine_s
    if not math.isfinite(latency):
        raise ServerError("front-end calibration: the engine reported no queue / prefill times on /metrics")
    return {"mode": "calibrate", "latency_s": max(0.0, latency), "num_requests": int(len(fin)),
            "client_mean_ttft_s": client_s, "server_mean_ttft_s": c.get("server_mean_ttft_s"),
            "engine_mean_queue_s": c.get("engine_mean_queue_s"),
            "engine_mean_prefill_s": c.get("engine_mean_prefill_s"),
            "client_minus_server_ttft_s": client_s - c.get("server_mean_ttft_s", math.nan)}


def _saturation(cfg, pool, server, scfg, rcfg, vocab, cost_model, replica, out, frontend_s) -> dict:
    """The rate the loads are fractions of: a live backlog burst (compared with its simulation too),
    the same burst simulated only, or a fixed rate."""
    sat = OmegaConf.to_container(cfg.saturation, resolve=True)
    method = sat["method"]
    if method == "fixed":
        return fixed_saturation(sat, pool)
    burst = burst_workload(pool, int(sat["num_requests"]))
    if method == "costmodel":
        sim = simulate_like_engine(cfg, burst, replica, cost_model)
        tp = throughput(sim.requests)
        return {"method": "costmodel", "rate_qps": tp["requests_per_s"], "num_requests": len(burst),
                "sim_throughput": tp}
    if method != "burst":
        raise InputError("unknown method; choose burst, costmodel or fixed", field="saturation.method", value=method)
    res = _one_run(cfg, f"{pool.name}-burst", pool.name, "burst", burst, server, scfg, rcfg, vocab, cost_model,
                   replica, out, {}, frontend_s, plots=bool(cfg.plots))
    _print_run(res)
    rate = res["throughput"]["live"]["requests_per_s"]
    if not (isinstance(rate, float) and rate > 0):
        raise ServerError(f"the saturation burst for {pool.name!r} finished no request")
    return {"method": "burst", "rate_qps": rate, "num_requests": len(burst), "comparison": res}


def _one_run(cfg, label, workload_name, load, wl, server, scfg, rcfg, vocab, cost_model, replica, out,
             extra, frontend_s: float = 0.0, *, plots: bool) -> dict:
    """Replay `wl` live, simulate what was sent, compare; tables and plots under out/<label>/."""
    run_dir = out / label
    run_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(wait_idle(server.base_url, alive=server.check_alive))
    machine = machine_state()
    log.info("%s: replaying %d requests (%.1f s of arrivals)", label, len(wl), float(wl["arrival_s"].max()))
    live: LiveRun = replay(server.base_url, scfg.served_model_name, wl, rcfg, vocab_size=vocab,
                           alive=server.check_alive)
    live.requests.to_parquet(run_dir / "requests_live.parquet", index=False)
    live.gauges.to_csv(run_dir / "gauges_live.csv", index=False)
    if live.failure:
        raise ServerError(f"{label}: the live server failed mid-run ({live.failure}); partial live table in "
                          f"{run_dir / 'requests_live.parquet'}")
    sent = live.requests[np.isfinite(live.requests["send_lag_s"])]
    sim = simulate_like_engine(cfg, sent, replica, cost_model)
    sim.requests.to_parquet(run_dir / "requests_sim.parquet", index=False)
    sim.steps.to_parquet(run_dir / "steps_sim.parquet", index=False)
    sim_seen = with_frontend_latency(sim.requests, frontend_s)
    res = compare_run(live.requests, sim_seen, sim.steps, live.gauges, workload=workload_name, load=load,
                      extra=extra)
    res["frontend_latency_s"] = frontend_s
    res["cost_model"] = getattr(cost_model, "name", "")
    base = getattr(cost_model, "base", None) if isinstance(cost_model, ServingOverheadCostModel) else cost_model
    if base is not cost_model or frontend_s:
        # the simulator as the profile alone makes it: no serving overhead, no front-end latency
        raw = simulate_like_engine(cfg, sent, replica, base)
        res["errors_uncalibrated"] = compare_run(live.requests, raw.requests, raw.steps, None,
                                                 workload=workload_name, load=load, extra=extra)["errors"]
    tsim = _served_steps(cfg, res, live, out, run_dir, base, sent, replica, frontend_s, workload_name, load, extra)
    res.update(label=label, live_wall_s=live.wall_s, client_overhead=live.overhead, engine_counters=live.counters,
               machine=machine, machine_after=machine_state(),
               request_failures=live.requests.loc[live.requests["outcome"] != FINISHED, "reject_reason"]
               .value_counts().head(5).to_dict())
    res["steps"] = {"live_num_steps": live.counters.get("num_steps"), "sim_num_steps": int(len(sim.steps)),
                    "live_mean_tokens_per_step": live.counters.get("mean_tokens_per_step"),
                    "sim_mean_tokens_per_step":
                        float((sim.steps["num_prefill_tokens"] + sim.steps["num_decodes"]).mean())
                    if len(sim.steps) else math.nan,
                    "live_num_preemptions": live.counters.get("num_preemptions"),
                    "sim_num_preemptions": res["sim_num_preemptions"]}
    if plots:
        title = f"{label}: live vLLM vs slosim ({len(wl)} requests)"
        plot_cdfs(live.requests, sim_seen, sim.steps, run_dir / "cdf.png", title)
        plot_over_time(live.requests, sim_seen, sim.steps, live.gauges, run_dir / "over_time.png", title)
        if tsim is not None:
            plot_cdfs(live.requests, with_frontend_latency(tsim.requests, frontend_s), tsim.steps,
                      run_dir / "cdf_tracked.png", f"{title}, speed-tracked")
    (run_dir / "comparison.json").write_text(json.dumps(_clean(res), indent=2, allow_nan=False) + "\n")
    return res


def _served_steps(cfg, res, live: LiveRun, out: Path, run_dir: Path, profile, sent, replica, frontend_s,
                  workload_name, load, extra):
    """The served engine's own steps over the replay (its engine core's step log, `profiler.steplog`):
    written to steps_live.parquet, priced by the profile (`step_price_error`) and, with tracking on, the
    speed-tracked view (`errors_tracked`, the profile priced at the engine's measured speed per kind, plus
    the front-end latency). Returns the tracked SimResult, or None (no log, or tracking off: said in
    `res["step_log"]`)."""
    try:
        steps = read_steps(out / STEP_LOG, live.t0_monotonic, live.wall_s)
    except ValueError as e:  # a damaged log costs the tracked view of this replay, not the run
        res["step_log"] = {"path": STEP_LOG, "missing": str(e)}
        log.warning("%s", e)
        return None
    res["step_log"] = {"path": STEP_LOG, "num_steps": int(len(steps)),
                       # vLLM's /metrics count only steps that sent outputs (profiler.steplog.COLUMNS)
                       "num_steps_with_outputs": int((steps["num_outputs"] > 0).sum()),
                       "num_steps_metrics": live.counters.get("num_steps")}
    if steps.empty:
        res["step_log"]["missing"] = (f"no engine steps in {out / STEP_LOG}: "
                                      + (step_log_blocker(cfg) or "is slosim installed in the server's Python "
                                         "(pip install -e .), so that vLLM loads its step-log plugin? (server.log "
                                         "says why if the plugin could not write the file)"))
        log.warning("%s", res["step_log"]["missing"])
        return None
    steps.to_parquet(run_dir / "steps_live.parquet", index=False)
    res["step_price_error"] = {"uncalibrated": step_price_errors(steps, profile)}
    window = track_window_s(cfg)
    if window is None:
        return None
    track, tsim = simulate_tracked(cfg, steps, profile, sent, replica, window_s=window)
    tsim.requests.to_parquet(run_dir / "requests_sim_tracked.parquet", index=False)
    res["errors_tracked"] = compare_run(live.requests, with_frontend_latency(tsim.requests, frontend_s), tsim.steps,
                                        None, workload=workload_name, load=load, extra=extra)["errors"]
    res["speed"] = {"mode": "none", "track": track.to_dict()}
    return tsim


def _print_run(res: dict) -> None:
    tl, ts = res["throughput"]["live"], res["throughput"]["sim"]
    mb = res.get("mean_batch_size", {})
    corr = res["e2e_correlation"]
    oh = res["client_overhead"]
    print(f"\n== {res['label']}: {res['num_requests']} requests; live {res['outcomes_live']}, "
          f"sim {res['outcomes_sim']}")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(error_table(res["errors"]).to_string())
    print(f"  throughput req/s live {tl['requests_per_s']:.3f} sim {ts['requests_per_s']:.3f} "
          f"({100 * _nz(res['throughput']['rel_error_requests_per_s']):+.1f}%); "
          f"mean running live {_nz(mb.get('live_s_avg')):.2f} sim {_nz(mb.get('sim_at_live_samples')):.2f}; "
          f"e2e corr pearson {_nz(corr['pearson']):.3f}; steps live {_int(res['steps']['live_num_steps'])} "
          f"sim {res['steps']['sim_num_steps']}")
    print(f"  client: send lag p99 {1e3 * _nz(oh['send_lag_s']['p99']):.2f} ms, loop lag p99 "
          f"{1e3 * _nz(oh['loop_lag_s']['p99']):.2f} ms, cpu {100 * _nz(oh['client_cpu_fraction']):.1f}% of a core, "
          f"client-server mean TTFT {1e3 * _nz(oh.get('client_minus_server_ttft_s')):.2f} ms; "
          f"load avg {res['machine']['loadavg_1m']:.2f}")
    if res.get("errors_tracked"):
        c = target_counts(res["errors_tracked"])
        print(f"  speed-tracked (the engine core's own step log over the replay), {c['within_target']}/"
              f"{c['comparisons']} within target (5/5/10%):")
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            print(error_table(res["errors_tracked"]).to_string())
    elif (res.get("step_log") or {}).get("missing"):
        print(f"  no speed-tracked view: {res['step_log']['missing']}")




def _nz(x) -> float:
    return math.nan if x is None else float(x)


def _int(x) -> str:
    return "?" if x is None or (isinstance(x, float) and math.isnan(x)) else str(int(x))
