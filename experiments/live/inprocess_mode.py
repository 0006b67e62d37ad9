"""`experiments.validate mode=inprocess` (the default): replay, calibrate, simulate, compare.

For every (workload, load, repeat): time the reference steps on the engine that will serve the
replay (`calibrate_speed`), replay the requests in-process (`InProcessEngine.replay`), time the
reference steps again (the speed drift during the replay), then simulate the very same requests
twice, with the profile scaled by the calibration and with the profile alone, and compare both
with the live run. With `priority.enabled` the engine runs vLLM's priority scheduler and the
requests carry two classes; the comparison is also made per class.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from experiments.compare import compare_run, error_table, plot_cdfs, plot_over_time
from experiments.live.calibration import (
    ReferenceSteps, ScaledCostModel, SpeedCalibration, calibrate_speed, pooled, step_price_errors,
)
from experiments.live.speed_track import simulate_tracked
from experiments.live.step_replay import describe as describe_step_replay
from experiments.live.step_replay import step_replay
from experiments.live.inprocess import InProcessConfig, InProcessEngine
from experiments.live.server import ServerError
from experiments.live.simulate import (
    EngineFacts, Report, _clean, engine_replica, machine_state, simulate_like_engine, target_counts, usable_kv_blocks,
)
from experiments.live.workloads import RequestPool, burst_workload, fixed_saturation, load_runs
from sim.errors import InputError
from sim.request import FINISHED
from sim.scheduling import EngineLimits

log = logging.getLogger(__name__)

CALIBRATION_MODES = ("by_size", "per_kind", "overall", "none")


def inprocess_config(cfg: DictConfig) -> InProcessConfig:
    """The in-process engine from `server` (the engine settings both modes share) and `inprocess`."""
    s, ip = cfg.server, cfg.get("inprocess") or {}
    pri = cfg.get("priority") or {}
    return InProcessConfig(
        model_dir=str(s.model_dir), dtype=str(s.dtype), max_num_seqs=int(s.max_num_seqs),
        max_num_batched_tokens=int(s.max_num_batched_tokens), max_model_len=int(s.max_model_len),
        enforce_eager=bool(s.enforce_eager), kv_cache_space_gib=int(s.kv_cache_space_gib),
        gpu_memory_utilization=float(s.gpu_memory_utilization), num_threads=int(ip.get("num_threads", 1)),
        seed=int(s.seed), temperature=float(cfg.replay.temperature),
        scheduling_policy="priority" if pri.get("enabled") else "fcfs",
        num_gpu_blocks_override=pri.get("num_kv_blocks") if pri.get("enabled") else None)


def reference_steps(cfg: DictConfig) -> ReferenceSteps:
    r = OmegaConf.to_container(cfg.calibration.reference, resolve=True)
    try:
        return ReferenceSteps(prefill_chunks=tuple(tuple(int(v) for v in c) for c in r["prefill_chunks"]),
                              decode_batches=tuple(int(b) for b in r["decode_batches"]),
                              decode_context=int(r["decode_context"]),
                              mixed_chunks=tuple(int(m) for m in r["mixed_chunks"]),
                              repetitions=int(r["repetitions"]),
                              mixed_batches=None if r.get("mixed_batches") is None
                              else tuple(int(b) for b in r["mixed_batches"]))
    except InputError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"bad reference steps ({e})", field="calibration.reference", value=r) from None


def _calibration_mode(cfg: DictConfig) -> str:
    mode = str(cfg.calibration.mode)
    if mode not in CALIBRATION_MODES:
        raise InputError(f"unknown mode; choose one of {list(CALIBRATION_MODES)}", field="calibration.mode",
                         value=mode)
    return mode


def check_calibration(cfg: DictConfig) -> None:
    """The `calibration` settings read after a replay, checked before the engine starts (InputError
    naming the field)."""
    c = cfg.calibration
    for key in ("after", "pool_after"):
        if not isinstance(c.get(key, True), bool):
            raise InputError("must be true or false", field=f"calibration.{key}", value=c.get(key))
    for key, lo, hi in (("min_cpu_fraction", 0.0, 1.0), ("max_drift", 0.0, None), ("max_contended_time_share", 0.0, 1.0)):
        v = c.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < lo or (hi is not None and v > hi):
            raise InputError(f"must be a number in [{lo:g}, {'inf' if hi is None else f'{hi:g}'}]",
                             field=f"calibration.{key}", value=v)
    reference_steps(cfg).check_budget(int(cfg.server.max_num_batched_tokens))
    check_tracking(cfg)


def check_tracking(cfg: DictConfig) -> None:
    """The speed-track and step-replay settings (read after each replay, in both modes), checked before
    an engine or server starts (InputError naming the field)."""
    trk = cfg.calibration.get("track") or {}
    if not isinstance(trk.get("enabled", True), bool):
        raise InputError("must be true or false", field="calibration.track.enabled", value=trk.get("enabled"))
    track_window_s(cfg)
    if not isinstance(cfg.get("step_replay", True), bool):
        raise InputError("must be true or false", field="step_replay", value=cfg.get("step_replay"))


def track_window_s(cfg: DictConfig) -> float | None:
    """`calibration.track.window_s` when speed tracking is on, else None; InputError for a window that is
    not a number > 0 (checked before the engine starts)."""
    trk = cfg.calibration.get("track") or {}
    if not trk.get("enabled", True):
        return None
    w = trk.get("window_s", 5.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
        raise InputError("must be a number of seconds > 0", field="calibration.track.window_s", value=w)
    return float(w)


def priority_classes(cfg: DictConfig) -> dict[str, int] | None:
    """qos_class -> vLLM priority (smaller is served first) when the priority check is on, else None."""
    pri = cfg.get("priority") or {}
    if not pri.get("enabled"):
        return None
    classes = OmegaConf.to_container(pri.classes, resolve=True) if pri.get("classes") is not None else None
    if not isinstance(classes, dict) or len(classes) != 2 or not all(isinstance(v, int) for v in classes.values()):
        raise InputError("give two classes with integer priorities", field="priority.classes", value=classes)
    share = float(pri.get("first_class_share", 0.5))
    if not 0 < share < 1:
        raise InputError("must be in (0, 1)", field="priority.first_class_share", value=share)
    return {str(k): int(v) for k, v in classes.items()}


def with_classes(wl: pd.DataFrame, classes: dict[str, int] | None, share: float, seed: int) -> pd.DataFrame:
    """The workload with `qos_class` / `priority` columns: the first class for a seeded `share` of
    the requests, the second for the rest (unchanged without classes)."""
    if not classes:
        return wl
    names = list(classes)
    first = np.random.default_rng(seed + 17).random(len(wl)) < share
    out = wl.copy()
    out["qos_class"] = np.where(first, names[0], names[1])
    out["priority"] = out["qos_class"].map(classes).astype(np.int64)
    return out


def run_inprocess(cfg: DictConfig, out: Path, report: Report, pools: list[RequestPool], loads: list[float]) -> None:
    """Start the engine, warm it up, run every (workload, load, repeat), always stop the engine;
    `report` is updated (and written) as results come in."""
    icfg = inprocess_config(cfg)
    classes = priority_classes(cfg)
    if classes is not None and OmegaConf.select(cfg, "policy._target_") != "policies.vllm_priority.VllmPriority":
        raise InputError("the priority check simulates vLLM's priority scheduler: add policy=vllm_priority",
                         field="policy", value=OmegaConf.select(cfg, "policy._target_"))
    if classes is not None:  # the simulated policy maps the same classes to the same priorities
        cfg = cfg.copy()
        OmegaConf.set_struct(cfg, False)
        cfg.policy.priorities = classes
    ref = reference_steps(cfg)
    cal_mode = _calibration_mode(cfg)
    check_calibration(cfg)
    engine = InProcessEngine(icfg)
    report.data["mode"] = "inprocess"
    try:
        engine.start()
        limits = EngineLimits(max_num_seqs=icfg.max_num_seqs, max_num_batched_tokens=icfg.max_num_batched_tokens,
                              max_model_len=icfg.max_model_len, enable_chunked_prefill=True)
        facts = EngineFacts(usable_kv_blocks(engine.num_kv_blocks), engine.block_size, limits)
        replica = engine_replica(cfg, facts)
        base = replica.cost_model
        report.data["engine"] = {"mode": "inprocess", "num_kv_blocks": facts.num_kv_blocks,
                                 "num_gpu_blocks": engine.num_kv_blocks,
                                 "block_size": facts.block_size, "limits": limits.__dict__,
                                 "startup_s": engine.startup_s, "scheduling_policy": icfg.scheduling_policy,
                                 "kv_source": "the in-process engine's scheduler (cache_config.num_gpu_blocks "
                                              "less vLLM's null block)",
                                 "config": icfg.__dict__}
        report.write()
        _warm_up(engine, cfg)
        for pool in pools:
            sat = _saturation(cfg, pool, engine, replica, base, ref, cal_mode, out, classes)
            report.data["saturation"][pool.name] = sat
            report.write()
            share = float((cfg.get("priority") or {}).get("first_class_share", 0.5))
            for load, rate, wl, label, extra in load_runs(
                    cfg, pool, sat["rate_qps"], loads, lambda w: with_classes(w, classes, share, int(cfg.seed))):
                res = one_run(cfg, label, pool.name, load, wl, engine, replica, base, ref, cal_mode, out, extra,
                              classes, plots=bool(cfg.plots))
                res["rate_qps"] = rate
                res["saturation_fraction"] = load
                report.add_run(res)
                print_run(res)
        report.data["status"] = "ok"
    finally:
        report.data["engine_pids_left_running"] = engine.stop()
        report.data["server_pids_left_running"] = report.data["engine_pids_left_running"]


def _warm_up(engine: InProcessEngine, cfg: DictConfig) -> None:
    """A few untimed requests of assorted lengths (lazy initialisation must not land in a measured run)."""
    n = int(cfg.warmup_requests)
    if n < 1:
        return
    s = cfg.server
    lens = np.linspace(8, min(int(s.max_num_batched_tokens) * 2, int(s.max_model_len) // 2), n).astype(np.int64)
    wl = pd.DataFrame({"arrival_s": np.linspace(0, 1, n), "num_prompt_tokens": lens,
                       "num_output_tokens": np.full(n, 16)})
    live = engine.replay(wl, seed=int(cfg.replay.seed) + 99, timeout_s=float(cfg.replay.request_timeout_s))
    if live.failure:
        raise ServerError(f"the engine failed during warm-up: {live.failure}")
    bad = live.requests[live.requests["outcome"] != FINISHED]
    if len(bad):
        raise ServerError(f"{len(bad)} of {n} warm-up requests failed; first: {bad['reject_reason'].iloc[0]}")


def _saturation(cfg, pool, engine, replica, base, ref, cal_mode, out, classes) -> dict:
    """The rate the loads are fractions of: a live backlog burst (compared too), the same burst
    simulated with the profile alone (deterministic: the same requests in every session), or a fixed rate."""
    sat = OmegaConf.to_container(cfg.saturation, resolve=True)
    method = sat["method"]
    if method == "fixed":
        return fixed_saturation(sat, pool)
    burst = burst_workload(pool, int(sat["num_requests"]))
    if method == "costmodel":  # the profile alone: the same rate, so the same requests, in every session
        sim = simulate_like_engine(cfg, burst, replica, base)
        fin = sim.requests[sim.requests["outcome"] == FINISHED]
        span = float(fin["finish_s"].max() - sim.requests["arrival_s"].min()) if len(fin) else math.nan
        rate = len(fin) / span if span > 0 else math.nan
        return {"method": "costmodel", "rate_qps": rate, "num_requests": len(burst),
                "cost_model": getattr(base, "name", "")}
    if method != "burst":
        raise InputError("unknown method; choose burst, costmodel or fixed", field="saturation.method", value=method)
    wl = with_classes(burst, classes, float((cfg.get("priority") or {}).get("first_class_share", 0.5)), int(cfg.seed))
    res = one_run(cfg, f"{pool.name}-burst", pool.name, "burst", wl, engine, replica, base, ref, cal_mode, out, {},
                  classes, plots=bool(cfg.plots))
    print_run(res)
    rate = res["throughput"]["live"]["requests_per_s"]
    if not (isinstance(rate, float) and rate > 0):
        raise ServerError(f"the saturation burst for {pool.name!r} finished no request")
    return {"method": "burst", "rate_qps": rate, "num_requests": len(burst), "comparison": res}


def _scaled(base, cal: SpeedCalibration | None, mode: str):
    if cal is None or mode == "none":
        return base
    if mode == "overall":
        return ScaledCostModel(base, {k: cal.scale for k in ("prefill", "decode", "mixed")})
    if mode == "by_size":
        return ScaledCostModel(base, cal.scale_by_kind, cal.scale_by_size)
    return ScaledCostModel(base, cal.scale_by_kind)


def one_run(cfg, label, workload_name, load, wl, engine: InProcessEngine, replica, base, ref, cal_mode, out, extra,
            classes=None, *, plots: bool) -> dict:
    """Calibrate, replay `wl` in-process, calibrate again, simulate (with the profile scaled by both
    calibrations pooled, or by the one before with `calibration.pool_after=false`, and with the profile
    alone), compare; tables and plots under out/<label>/. ServerError (partial tables kept) if the engine failed."""
    run_dir = out / label
    run_dir.mkdir(parents=True, exist_ok=True)
    mcpu = float(cfg.calibration.min_cpu_fraction)
    cal = calibrate_speed(engine, base, ref, min_cpu_fraction=mcpu) if cal_mode != "none" else None
    machine = machine_state()
    log.info("%s: replaying %d requests in-process (%.1f s of arrivals)", label, len(wl), float(wl["arrival_s"].max()))
    live = engine.replay(wl, seed=int(cfg.replay.seed), min_token_id=int(cfg.replay.min_token_id),
                         timeout_s=float(cfg.replay.request_timeout_s))
    machine_after = machine_state()
    if "qos_class" in wl:
        live.requests["qos_class"] = wl["qos_class"].to_numpy()
    live.requests.to_parquet(run_dir / "requests_live.parquet", index=False)
    live.steps.to_parquet(run_dir / "steps_live.parquet", index=False)
    live.gauges.to_csv(run_dir / "gauges_live.csv", index=False)
    if live.failure:
        raise ServerError(f"{label}: {live.failure}; partial live table in {run_dir / 'requests_live.parquet'}")
    cal_after = None
    if cal is not None and bool(cfg.calibration.after):
        cal_after = calibrate_speed(engine, base, ref, min_cpu_fraction=mcpu)
    pool = bool(cfg.calibration.get("pool_after", True)) and cal_after is not None
    cal_used = pooled(cal, cal_after) if pool else cal
    cost_model = _scaled(base, cal_used, cal_mode)
    sent = live.requests[live.requests["reject_reason"] != "not_sent"]
    sim = simulate_like_engine(cfg, sent, replica, cost_model)
    sim.requests.to_parquet(run_dir / "requests_sim.parquet", index=False)
    sim.steps.to_parquet(run_dir / "steps_sim.parquet", index=False)
    res = compare_run(live.requests, sim.requests, sim.steps, live.gauges, workload=workload_name, load=load,
                      extra=extra)
    res["cost_model"] = getattr(cost_model, "name", "")
    if cost_model is not base:
        raw = simulate_like_engine(cfg, sent, replica, base)
        res["errors_uncalibrated"] = compare_run(live.requests, raw.requests, raw.steps, None, workload=workload_name,
                                                 load=load, extra=extra)["errors"]
    res["speed"] = {"mode": cal_mode, "used": "none" if cal is None else "before+after" if pool else "before",
                    # the scales the simulation used (calibration.mode decides which of the fitted ones)
                    "scale_by_kind": getattr(cost_model, "scale_by_kind", None),
                    "scale_by_size": cal_used.scale_by_size if cal_used and cal_mode == "by_size" else None,
                    "before": cal.to_dict() if cal else None,
                    "after": cal_after.to_dict() if cal_after else None,
                    "drift": (cal_after.scale / cal.scale - 1) if cal and cal_after else None}
    res["step_price_error"] = {"calibrated": step_price_errors(live.steps, cost_model),
                               "uncalibrated": step_price_errors(live.steps, base)}
    res["counts"] = {"calibrated": target_counts(res["errors"]),
                     "uncalibrated": target_counts(res.get("errors_uncalibrated", res["errors"]))}
    if classes:
        res["per_class"] = per_class(live.requests, sim.requests, sim.steps, workload_name, load, extra, classes)
    window, tsim = track_window_s(cfg), None
    if window is not None:
        # the engine's own speed over the replay (its steps against the calibrated prices): the simulator
        # checked on its scheduling, batching, KV and queueing given the engine's speed at each moment
        track, tsim = simulate_tracked(cfg, live.steps, cost_model, sent, replica, window_s=window)
        tsim.requests.to_parquet(run_dir / "requests_sim_tracked.parquet", index=False)
        res["errors_tracked"] = compare_run(live.requests, tsim.requests, tsim.steps, None, workload=workload_name,
                                            load=load, extra=extra)["errors"]
        res["speed"]["track"] = track.to_dict()
        res["counts"]["tracked"] = target_counts(res["errors_tracked"])
        if classes:
            res["per_class_tracked"] = per_class(live.requests, tsim.requests, tsim.steps, workload_name, load,
                                                 extra, classes)
    if bool(cfg.get("step_replay", True)):  # the scheduling checked step by step on the engine's own step times
        res["step_replay"] = step_replay(cfg, live.steps, sent, replica)
    res.update(label=label, mode="inprocess", live_wall_s=live.wall_s, replay_overhead=live.overhead,
               engine_counters=live.counters, machine=machine, machine_after=machine_after,
               request_failures=live.requests.loc[live.requests["outcome"] != FINISHED, "reject_reason"]
               .value_counts().head(5).to_dict())
    res["void"] = void_reasons(res, float(cfg.calibration.max_drift),
                               float(cfg.calibration.max_contended_time_share))
    res["steps"] = {"live_num_steps": live.counters["num_steps"], "sim_num_steps": int(len(sim.steps)),
                    "live_mean_tokens_per_step": live.counters["mean_tokens_per_step"],
                    "sim_mean_tokens_per_step":
                        float((sim.steps["num_prefill_tokens"] + sim.steps["num_decodes"]).mean())
                    if len(sim.steps) else math.nan,
                    "live_num_preemptions": live.counters["num_preemptions"],
                    "sim_num_preemptions": res["sim_num_preemptions"]}
    if plots:
        title = f"{label}: live vLLM (in-process) vs slosim ({len(wl)} requests)"
        plot_cdfs(live.requests, sim.requests, sim.steps, run_dir / "cdf.png",
                  f"{title}, {'calibrated' if cal is not None else 'profile alone'}")
        plot_over_time(live.requests, sim.requests, sim.steps, live.gauges, run_dir / "over_time.png", title,
                       gauge_source="live engine scheduler")
        if tsim is not None:
            plot_cdfs(live.requests, tsim.requests, tsim.steps, run_dir / "cdf_tracked.png",
                      f"{title}, speed-tracked")
    (run_dir / "comparison.json").write_text(json.dumps(_clean(res), indent=2, allow_nan=False) + "\n")
    return res


def void_reasons(res: dict, max_drift: float, max_contended: float) -> list[str]:
    """Why a replay cannot test a 5% claim (empty: it can): the reference-step speed scale moved by more
    than `max_drift` over the replay, or the engine spent more than `max_contended` of the replay's
    step time in steps that got under 80% of a core (another process took the CPU)."""
    out = []
    drift = (res.get("speed") or {}).get("drift")
    if drift is not None and abs(drift) > max_drift:
        out.append(f"speed drift {100 * drift:+.1f}% over the replay (limit {100 * max_drift:.0f}%)")
    share = (res.get("engine_counters") or {}).get("contended_time_share")
    if share is not None and math.isfinite(share) and share > max_contended:
        out.append(f"{100 * share:.0f}% of the replay's step time contended (limit {100 * max_contended:.0f}%)")
    return out


def per_class(live: pd.DataFrame, sim: pd.DataFrame, sim_steps: pd.DataFrame, workload, load, extra,
              classes: dict[str, int]) -> dict:
    """Per QoS class: the comparison's error records (TTFT, TBT, TPOT, E2E percentiles of that class's
    finished requests) and the preemption counts of the class on both sides."""
    out = {}
    for name in classes:
        lc = live[live["qos_class"] == name]
        sc = sim[sim["request_id"].isin(lc["request_id"])]
        r = compare_run(lc, sc, sim_steps, None, workload=workload, load=load, extra={**extra, "qos_class": name})
        out[name] = {"priority": classes[name], "num_requests": int(len(lc)), "errors": r["errors"],
                     "live_num_preemptions": int(lc["num_preemptions"].sum()),
                     "sim_num_preemptions": int(sc["num_preemptions"].sum()),
                     "counts": target_counts(r["errors"])}
    return out


def print_run(res: dict) -> None:
    tl, ts = res["throughput"]["live"], res["throughput"]["sim"]
    sp = res.get("speed") or {}
    before = sp.get("scale_by_kind") or (sp.get("before") or {}).get("scale_by_kind")
    print(f"\n== {res['label']} (in-process): {res['num_requests']} requests; live {res['outcomes_live']}, "
          f"sim {res['outcomes_sim']}")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(error_table(res["errors"]).to_string())
    c = res["counts"]
    tr = f" speed-tracked {c['tracked']['within_target']}/{c['tracked']['comparisons']}," if "tracked" in c else ""
    cal_label = "calibrated" if sp.get("mode", "none") != "none" else "as simulated (calibration.mode=none)"
    print(f"  within target (5/5/10%): {cal_label} {c['calibrated']['within_target']}/{c['calibrated']['comparisons']},{tr}"
          f" profile alone {c['uncalibrated']['within_target']}/{c['uncalibrated']['comparisons']}; "
          f"throughput req/s live {tl['requests_per_s']:.3f} sim {ts['requests_per_s']:.3f}; "
          f"preemptions live {res['steps']['live_num_preemptions']} sim {res['steps']['sim_num_preemptions']}")
    if res.get("void"):
        print(f"  VOID for a 5% claim: {'; '.join(res['void'])}")
    if res.get("step_replay"):
        print(f"  {describe_step_replay(res['step_replay'])}")
    if before:
        drift = sp.get("drift")
        print(f"  speed scale ({sp.get('mode')}, {sp.get('used', 'before')}) prefill {before['prefill']:.3f} "
              f"decode {before['decode']:.3f} mixed {before['mixed']:.3f}"
              + (f"; drift over the replay {100 * drift:+.1f}%" if drift is not None else "")
              + f"; load avg {res['machine']['loadavg_1m']:.2f} -> {res['machine_after']['loadavg_1m']:.2f}")
    if res.get("errors_tracked"):
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            print("  speed-tracked (the engine's own speed over the replay):")
            print(error_table(res["errors_tracked"]).to_string())
    for name, pc in (res.get("per_class") or {}).items():
        pt = (res.get("per_class_tracked") or {}).get(name)
        print(f"  class {name} (priority {pc['priority']}, {pc['num_requests']} requests): "
              f"within target {pc['counts']['within_target']}/{pc['counts']['comparisons']}"
              + (f" (speed-tracked {pt['counts']['within_target']}/{pt['counts']['comparisons']})" if pt else "")
              + ", "
              f"preemptions live {pc['live_num_preemptions']} sim {pc['sim_num_preemptions']}")
