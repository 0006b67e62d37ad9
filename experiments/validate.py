"""The validate app: replay the same traffic through a real vLLM engine and through slosim.

    python -m experiments.validate                                   # conv + code, 30/60/90% load
    python -m experiments.validate loads=[0.6] 'workloads=[conv]' duration_s=30
    python -m experiments.validate tolerance.p50=0.05 tolerance.p90=0.05 tolerance.p99=0.10

One vLLM server (the engine the cost model was profiled on) is started and always stopped.
For each workload shape (Azure conversation / code lengths, scaled down for a CPU engine)
the engine's saturation rate is measured with a backlog burst; then each load (a fraction
of it) is replayed open-loop with trace-shaped arrivals, the very same requests (send
times, lengths) are simulated on one replica with the KV blocks and block size the engine
reports on /metrics and the fitted cost model, and the two request tables are compared
(`experiments.compare`). The simulated replica is built by the wiring every app uses
(`experiments.wiring`) from `cluster` (the server's limits), `policy`, `costmodel`, `router`
and `sim` in conf/validate.yaml. Writes `validation.json` (updated after every run, so a failure
keeps what was measured), per-run parquet tables and plots; prints the error table.
Exit status: 0 ok, 1 an error beyond the tolerance, 2 bad input, 3 the live side failed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from experiments.app import hydra_app
from experiments.compare import compare_run, error_table, live_tbt_samples, plot_cdfs, plot_over_time, throughput
from experiments.live.client import LiveRun, ReplayConfig, idle_health_rtt, replay, scrape_once, wait_idle
from experiments.live.metrics import cache_config
from experiments.live.server import LiveServer, ServerConfig, ServerError
from experiments.wiring import replica_specs, simulate_config
from sim.cluster import ReplicaSpec, SimResult
from sim.errors import InputError
from sim.metrics import tbt_samples
from sim.paths import project_path
from sim.request import FINISHED
from sim.scheduling import EngineLimits
from sim.workload import from_trace

log = logging.getLogger(__name__)

PERCENTILE_KEYS = {50: "p50", 90: "p90", 99: "p99"}


# --------------------------------------------------------------------------------- workloads

@dataclass(frozen=True)
class ShapeSpec:
    """A workload shape: a trace's lengths (and arrival pattern), scaled for the engine under test."""

    name: str
    """Label in tables (e.g. 'conv')."""
    path: str
    """Trace file (Azure LLM inference CSV or any `sim.workload.from_trace` format)."""
    format: str = "auto"
    """Trace format (see `sim.workload.FORMATS`)."""
    prompt_scale: float = 1.0
    """Prompt lengths are multiplied by this (then rounded, at least 1)."""
    output_scale: float = 1.0
    """Output lengths are multiplied by this (then rounded, at least 1)."""
    max_prompt_tokens: int | None = None
    """Longer prompts are clipped to this (counted)."""
    max_output_tokens: int | None = None
    """Longer outputs are clipped to this (counted)."""
    skip_requests: int = 0
    """Start this many requests into the trace."""

    def __post_init__(self) -> None:
        for name in ("prompt_scale", "output_scale"):
            if not getattr(self, name) > 0:
                raise InputError("must be > 0", field=f"workloads.{self.name}.{name}", value=getattr(self, name))
        for name in ("max_prompt_tokens", "max_output_tokens"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise InputError("must be a positive integer or null", field=f"workloads.{self.name}.{name}", value=v)
        if self.skip_requests < 0:
            raise InputError("must be >= 0", field=f"workloads.{self.name}.skip_requests", value=self.skip_requests)


@dataclass
class RequestPool:
    """A shape's requests in trace order: trace arrival times and scaled lengths, with clipping counts."""

    name: str
    trace_arrival_s: np.ndarray
    num_prompt_tokens: np.ndarray
    num_output_tokens: np.ndarray
    num_clipped: dict[str, int] = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return len(self.trace_arrival_s)


def load_pool(spec: ShapeSpec, max_model_len: int) -> RequestPool:
    """Read the trace, scale and clip lengths so every request fits the engine's `max_model_len`."""
    wl = from_trace(spec.path, format=spec.format)
    df = wl.requests.iloc[spec.skip_requests:]
    if df.empty:
        raise InputError(f"no requests left after skipping {spec.skip_requests}", path=spec.path,
                         field=f"workloads.{spec.name}.skip_requests", value=spec.skip_requests)
    p = np.maximum(1, np.rint(df["num_prompt_tokens"].to_numpy() * spec.prompt_scale)).astype(np.int64)
    o = np.maximum(1, np.rint(df["num_output_tokens"].to_numpy() * spec.output_scale)).astype(np.int64)
    clipped = {}
    if spec.max_prompt_tokens is not None:
        clipped["prompt_clipped"] = int((p > spec.max_prompt_tokens).sum())
        p = np.minimum(p, spec.max_prompt_tokens)
    if spec.max_output_tokens is not None:
        clipped["output_clipped"] = int((o > spec.max_output_tokens).sum())
        o = np.minimum(o, spec.max_output_tokens)
    o = np.minimum(o, max_model_len - 1)
    too_long = p + o > max_model_len
    clipped["prompt_clipped_to_max_model_len"] = int(too_long.sum())
    p = np.where(too_long, max_model_len - o, p)
    t = df["arrival_s"].to_numpy(dtype=float)
    return RequestPool(spec.name, t - t[0], p, o, clipped, wl.source)


ARRIVAL_PROCESSES = ("poisson", "trace")


def run_workload(pool: RequestPool, rate_qps: float, num_requests: int, arrivals: str = "poisson",
                 seed: int = 0) -> pd.DataFrame:
    """The first `num_requests` of the pool (lengths unchanged) arriving at `rate_qps` on average:
    `poisson` draws exponential gaps (the same unit gaps at every rate, from `seed`); `trace` keeps
    the trace's own arrival pattern, rescaled so the last request arrives at (n - 1) / rate_qps."""
    n = min(num_requests, len(pool))
    if n < 1 or not rate_qps > 0:
        raise InputError("a run needs >= 1 request and a rate > 0", field="rate_qps", value=rate_qps)
    if arrivals == "poisson":
        gaps = np.random.default_rng(seed).exponential(1.0, size=n)
        gaps[0] = 0.0
        arrival = np.cumsum(gaps) / rate_qps
    elif arrivals == "trace":
        t = pool.trace_arrival_s[:n]
        span = t[-1] - t[0]
        arrival = (t - t[0]) * ((n - 1) / rate_qps / span) if span > 0 else np.arange(n) / rate_qps
    else:
        raise InputError(f"unknown arrival process; choose one of {list(ARRIVAL_PROCESSES)}", field="arrivals",
                         value=arrivals)
    return _requests(pool, arrival)


def burst_workload(pool: RequestPool, num_requests: int) -> pd.DataFrame:
    """The first `num_requests` of the pool, all arriving at once (a backlog)."""
    return _requests(pool, np.zeros(min(num_requests, len(pool))))


def _requests(pool: RequestPool, arrival_s: np.ndarray) -> pd.DataFrame:
    """The first len(arrival_s) requests of the pool at the given arrival times."""
    n = len(arrival_s)
    return pd.DataFrame({"request_id": np.arange(n, dtype=np.int64), "arrival_s": arrival_s,
                         "num_prompt_tokens": pool.num_prompt_tokens[:n],
                         "num_output_tokens": pool.num_output_tokens[:n]})


# --------------------------------------------------------------------------------- simulation

@dataclass(frozen=True)
class EngineFacts:
    """What the live engine resolved: the simulated replica copies it."""

    num_kv_blocks: int
    block_size: int
    limits: EngineLimits


def engine_replica(cfg: DictConfig, engine: EngineFacts | None = None) -> ReplicaSpec:
    """The simulated replica, built by the one wiring (`experiments.wiring.replica_specs`) from
    `cfg.cluster` (one replica with the server's limits), `cfg.policy` and `cfg.costmodel`; with
    `engine`, the KV blocks and block size the live engine reports. InputError if the cluster
    is not one replica or its limits differ from the engine's."""
    node = cfg.copy()
    OmegaConf.set_struct(node, False)
    if engine is not None:
        node.cluster.num_kv_blocks = engine.num_kv_blocks
        node.cluster.block_size = engine.block_size
    specs = replica_specs(node)
    if len(specs) != 1:
        raise InputError("validation simulates the one served engine: give one replica", field="cluster.num_replicas",
                         value=len(specs))
    if engine is not None and specs[0].limits != engine.limits:
        raise InputError(f"the simulated replica's limits {specs[0].limits} differ from the served engine's "
                         f"{engine.limits}; leave cluster's limits to the server settings", field="cluster")
    return specs[0]


def simulate_like_engine(cfg: DictConfig, requests: pd.DataFrame, replica: ReplicaSpec,
                         cost_model=None) -> SimResult:
    """Simulate `requests` (arrival_s = when the live client sent them) on `replica`
    (`engine_replica`), priced by `cost_model` (default: the replica's own), with the router
    and `sim` options of `cfg`."""
    spec = replica if cost_model is None else dataclasses.replace(replica, cost_model=cost_model)
    wl = requests[["request_id", "arrival_s", "num_prompt_tokens", "num_output_tokens"]].sort_values(
        "arrival_s", kind="stable")
    return simulate_config(cfg, wl, replicas=[spec], progress=False)


class ServingOverheadCostModel:
    """A profiled cost model plus the per-step time the *serving* engine adds: `base(shape) +
    const_s + per_request_s * batch_size + per_prefill_token_s * num_prefill_tokens`. vLLM's
    profiled steps run the engine core in-process; behind the OpenAI server the engine core
    talks to a separate worker process and serialises every request's output for the API
    server process (sharing the CPU with it), which the profile never timed. The numbers come
    from `_serving_overhead`, a calibration on its own traffic before the validation runs
    (steady decode batches and lone prefills); `per_prefill_token_s` is an empirical correction
    (it came out negative: long served prefill steps ran faster than profile + constant)."""

    def __init__(self, base, const_s: float, per_request_s: float, per_prefill_token_s: float = 0.0) -> None:
        self.base = base
        self.const_s = float(const_s)
        self.per_request_s = float(per_request_s)
        self.per_prefill_token_s = float(per_prefill_token_s)
        self.name = (f"{getattr(base, 'name', 'cost model')}+serving({1e3 * const_s:.2f} ms"
                     f" + {1e3 * per_request_s:.3f} ms/req + {1e6 * per_prefill_token_s:.2f} us/prefill token)")

    def step_time_s(self, num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size) -> float:
        t = self.base.step_time_s(num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size)
        return max(t + self.const_s + self.per_request_s * batch_size + self.per_prefill_token_s * num_prefill_tokens,
                   1e-6)

    def step_times_s(self, num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size):
        t = self.base.step_times_s(num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size)
        return np.maximum(t + self.const_s + self.per_request_s * np.asarray(batch_size, dtype=float)
                          + self.per_prefill_token_s * np.asarray(num_prefill_tokens, dtype=float), 1e-6)

    def num_kv_blocks(self, block_size: int):
        return self.base.num_kv_blocks(block_size)

    def model_load_s(self) -> float:
        return self.base.model_load_s()


def with_frontend_latency(requests: pd.DataFrame, latency_s: float) -> pd.DataFrame:
    """Simulated requests as a client would see them: every token `latency_s` later (HTTP, API server,
    IPC to and from the engine core: time outside the engine steps the cost model prices). TTFT and
    end-to-end latency grow by it; token gaps do not change."""
    if latency_s == 0:
        return requests
    out = requests.copy()
    for col in ("first_token_s", "finish_s", "ttft_s", "e2e_s"):
        out[col] = out[col] + latency_s
    return out


# --------------------------------------------------------------------------------- the report

def _clean(o: Any) -> Any:
    """JSON-safe: NaN/inf -> null, numpy scalars -> Python."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


class Report:
    """validation.json, rewritten after every run so that a failure keeps what was measured."""

    def __init__(self, path: Path, config: dict) -> None:
        self.path = path
        self.data: dict[str, Any] = {"status": "running", "error": None, "config": config, "engine": {},
                                     "machine": machine_state(), "saturation": {}, "runs": [], "errors": []}

    def add_run(self, result: dict) -> None:
        self.data["runs"].append(result)
        self.data["errors"].extend(result["errors"])
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_clean(self.data), indent=2, allow_nan=False) + "\n")
        tmp.replace(self.path)


def machine_state() -> dict:
    """Load average and CPU count now (validation is timing-sensitive; say how busy the machine was)."""
    la = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {"loadavg_1m": la[0], "loadavg_5m": la[1], "loadavg_15m": la[2], "num_cpus": os.cpu_count()}


def live_noise(errors: list[dict]) -> list[dict]:
    """Run-to-run spread of the live side over repeats of the same (workload, load): per metric and
    percentile, the live values and their largest deviation from their mean, as a fraction."""
    df = pd.DataFrame(errors)
    if df.empty or "repeat" not in df.columns or df["repeat"].nunique() < 2:
        return []
    out = []
    for (w, load, m, q), g in df.groupby(["workload", "load", "metric", "percentile"], sort=False):
        v = g["live_s"].to_numpy(dtype=float)
        mean = float(np.mean(v))
        out.append({"workload": w, "load": load, "metric": m, "percentile": int(q), "live_s": v.tolist(),
                    "mean_s": mean, "max_dev_from_mean": float(np.max(np.abs(v / mean - 1))) if mean > 0 else None,
                    "range_over_mean": float((v.max() - v.min()) / mean) if mean > 0 else None,
                    "sim_rel_errors": g["rel_error"].tolist()})
    return out


def tolerance_violations(errors: list[dict], tolerance: dict[str, float | None]) -> list[dict]:
    """Error records whose |rel_error| exceeds the tolerance for their percentile (a missing value counts)."""
    bad = []
    for e in errors:
        tol = tolerance.get(PERCENTILE_KEYS.get(int(e["percentile"]), ""), None)
        if tol is None:
            continue
        r = e.get("rel_error")
        if r is None or not math.isfinite(r) or abs(r) > tol:
            bad.append(e)
    return bad


# --------------------------------------------------------------------------------- the app

@dataclass
class ValidationResult:
    """What `run` produced: the report's data and where it was written."""

    data: dict
    out_dir: Path


def _server_config(cfg: DictConfig) -> ServerConfig:
    d = OmegaConf.to_container(cfg.server, resolve=True)
    d.pop("command", None)
    d["extra_args"] = tuple(d.get("extra_args") or ())
    d["env"] = {str(k): str(v) for k, v in (d.get("env") or {}).items()}
    return ServerConfig(**d)


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


def _vocab_size(model_dir: str) -> int:
    p = project_path(model_dir) / "config.json"
    try:
        v = json.loads(p.read_text())["vocab_size"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read vocab_size ({e})", path=p, field="vocab_size") from None
    if not isinstance(v, int) or v < 32:
        raise InputError("vocab_size must be an integer >= 32", path=p, field="vocab_size", value=v)
    return v


def _shapes(cfg: DictConfig) -> list[ShapeSpec]:
    shapes = OmegaConf.to_container(cfg.workloads, resolve=True)
    if not isinstance(shapes, dict) or not shapes:
        raise InputError("give at least one workload shape", field="workloads", value=shapes)
    return [ShapeSpec(name=str(k), **v) for k, v in shapes.items()]


def run(cfg: DictConfig, out_dir: str | Path) -> ValidationResult:
    """Serve and simulate every (workload, load, repeat); write validation.json, tables and plots into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scfg = _server_config(cfg)
    rcfg = ReplayConfig(**OmegaConf.to_container(cfg.replay, resolve=True))
    loads = [float(x) for x in cfg.loads]
    if not loads or any(not 0 < x for x in loads):
        raise InputError("loads must be positive fractions of the saturation rate", field="loads", value=loads)
    if int(cfg.repeats) < 1:
        raise InputError("must be >= 1", field="repeats", value=cfg.repeats)
    replica = engine_replica(cfg)  # a bad cluster, policy or cost model stops here, before the server starts
    cost_model = replica.cost_model
    vocab = _vocab_size(scfg.model_dir)
    pools = [load_pool(s, scfg.max_model_len) for s in _shapes(cfg)]
    report = Report(out / "validation.json", OmegaConf.to_container(cfg, resolve=True))
    report.data["cost_model"] = {"name": getattr(cost_model, "name", type(cost_model).__name__),
                                 "kv_blocks": getattr(cost_model, "kv_blocks", None),
                                 "block_size": getattr(cost_model, "block_size", None),
                                 "provenance": getattr(cost_model, "provenance", {})}
    report.data["workloads"] = {p.name: {"source": p.source, "num_requests_in_pool": len(p),
                                         "num_clipped": p.num_clipped} for p in pools}
    report.write()
    t_start = time.perf_counter()
    old_nice = _set_nice(cfg.get("nice"))
    report.data["nice"] = cfg.get("nice")
    report.data["nice_applied"] = old_nice is not None
    server = _start_server(cfg, scfg, out)
    try:
        server.start()
        engine = _engine_facts(server, scfg)
        replica = engine_replica(cfg, engine)
        report.data["engine"] = {"num_kv_blocks": engine.num_kv_blocks, "block_size": engine.block_size,
                                 "limits": engine.limits.__dict__, "startup_s": server.startup_s,
                                 "kv_source": "vllm:cache_config_info on the live server's /metrics",
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
            for load in loads:
                rate = load * rate_sat
                n = int(np.clip(round(rate * float(cfg.duration_s)), int(cfg.min_requests), int(cfg.max_requests)))
                wl = run_workload(pool, rate, n, str(cfg.arrivals), int(cfg.seed))
                for rep in range(int(cfg.repeats)):
                    label = f"{pool.name}-load{load:g}" + (f"-r{rep}" if int(cfg.repeats) > 1 else "")
                    extra = {"repeat": rep} if int(cfg.repeats) > 1 else {}
                    res = _one_run(cfg, label, pool.name, load, wl, server, scfg, rcfg, vocab, cost_model,
                                   replica, out, extra, frontend_s, plots=bool(cfg.plots))
                    res["rate_qps"] = rate
                    res["saturation_fraction"] = load
                    report.add_run(res)
                    _print_run(res)
        report.data["status"] = "ok"
    except BaseException as e:
        report.data["status"] = "failed"
        report.data["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        rc = server.stop()
        report.data["server_exit_status"] = rc
        report.data["server_pids_left_running"] = server.survivors()
        report.data["wall_s"] = time.perf_counter() - t_start
        report.data["machine_after"] = machine_state()
        tol = {k: cfg.tolerance.get(k) for k in ("p50", "p90", "p99")}
        report.data["tolerance"] = tol
        report.data["violations"] = tolerance_violations(report.data["errors"], tol)
        report.data["live_noise"] = live_noise(report.data["errors"])
        report.write()
        if old_nice is not None:
            os.setpriority(os.PRIO_PROCESS, 0, old_nice)
    return ValidationResult(report.data, out)


def _set_nice(nice) -> int | None:
    """Run this process (the client) and the server it starts (which inherits it) at niceness `nice`;
    returns the old value to restore, None if unchanged. Raising the priority needs root; without it
    the run goes on at the current priority (logged, and recorded as `nice_applied: false`)."""
    if nice is None:
        return None
    old = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, int(nice))
    except PermissionError:
        log.warning("cannot set niceness %s (needs root or CAP_SYS_NICE); running at %s", nice, old)
        return None
    return old


def _engine_facts(server: LiveServer, scfg: ServerConfig) -> EngineFacts:
    kv = cache_config(asyncio.run(scrape_once(server.base_url)))
    limits = EngineLimits(max_num_seqs=scfg.max_num_seqs, max_num_batched_tokens=scfg.max_num_batched_tokens,
                          max_model_len=scfg.max_model_len, enable_chunked_prefill=scfg.enable_chunked_prefill)
    return EngineFacts(kv["num_kv_blocks"], kv["block_size"], limits)


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
        rate = (sat.get("rates_qps") or {}).get(pool.name)
        if rate is None or not rate > 0:
            raise InputError("saturation.method=fixed needs a positive rate for this workload",
                             field=f"saturation.rates_qps.{pool.name}", value=rate)
        return {"method": "fixed", "rate_qps": float(rate)}
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
    (run_dir / "comparison.json").write_text(json.dumps(_clean(res), indent=2, allow_nan=False) + "\n")
    return res


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
          f"e2e corr pearson {_nz(corr['pearson']):.3f}; steps live {res['steps']['live_num_steps']} "
          f"sim {res['steps']['sim_num_steps']}")
    print(f"  client: send lag p99 {1e3 * _nz(oh['send_lag_s']['p99']):.2f} ms, loop lag p99 "
          f"{1e3 * _nz(oh['loop_lag_s']['p99']):.2f} ms, cpu {100 * _nz(oh['client_cpu_fraction']):.1f}% of a core, "
          f"client-server mean TTFT {1e3 * _nz(oh.get('client_minus_server_ttft_s')):.2f} ms; "
          f"load avg {res['machine']['loadavg_1m']:.2f}")


def _nz(x) -> float:
    return math.nan if x is None else float(x)


def summary_table(errors: list[dict]) -> pd.DataFrame:
    return error_table(errors)


def _raise_on_sigterm() -> None:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so the server is stopped by `run`'s finally block."""
    def handler(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


@hydra_app(config_path="../conf", config_name="validate", prog="experiments.validate")
def main(cfg: DictConfig) -> None:
    out_dir = Path(cfg.out_dir) if cfg.get("out_dir") else Path(HydraConfig.get().runtime.output_dir)
    _raise_on_sigterm()
    try:
        res = run(cfg, out_dir)  # bad input: one line and exit 2 (experiments.app.hydra_app)
    except (ServerError, TimeoutError) as e:
        print(f"validate: the live side failed: {e}\npartial results: {out_dir / 'validation.json'}", file=sys.stderr)
        sys.exit(3)
    data = res.data
    print("\n==== live vLLM vs slosim: P50/P90/P99 (live ms, sim ms, signed error) ====")
    with pd.option_context("display.width", 220, "display.max_columns", 20, "display.max_rows", 200):
        print(summary_table(data["errors"]).to_string())
    for name, sat in data["saturation"].items():
        if sat.get("method") == "burst":
            t = sat["comparison"]["throughput"]
            print(f"saturation {name}: live {t['live']['requests_per_s']:.3f} req/s, "
                  f"sim {t['sim']['requests_per_s']:.3f} "
                  f"req/s ({100 * _nz(t['rel_error_requests_per_s']):+.1f}%)")
    print(f"engine: {data['engine'].get('num_kv_blocks')} KV blocks x {data['engine'].get('block_size')} tokens; "
          f"wall {data['wall_s']:.0f} s; load average {data['machine']['loadavg_1m']:.2f} -> "
          f"{data['machine_after']['loadavg_1m']:.2f}")
    if data["live_noise"]:
        noise = pd.DataFrame(data["live_noise"])
        noise["range_%"] = 100 * noise["range_over_mean"]
        print("\n==== live run-to-run noise over repeats (range / mean of the live value) ====")
        print(noise.pivot_table(index=["workload", "load", "metric"], columns="percentile", values="range_%",
                                sort=False).round(1).to_string())
    print(f"outputs: {out_dir}")
    if data["violations"]:
        print(f"validate: {len(data['violations'])} error(s) beyond the tolerance {data['tolerance']}", file=sys.stderr)
        for v in data["violations"][:20]:
            print(f"  {v['workload']} load {v['load']} {v['metric']} P{v['percentile']}: live {v['live_s']} "
                  f"sim {v['sim_s']} error {v['rel_error']}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
