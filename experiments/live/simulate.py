"""The simulated side of the live validation and its report (validation.json).

`engine_replica` / `simulate_like_engine`: one replica built by the wiring every app uses,
with what the live engine resolved; `ServingOverheadCostModel` / `with_frontend_latency`: the
server mode's corrections; `Report`, `live_noise`, `noise_accounting`, `tolerance_violations`:
what is written. `experiments.validate` re-exports these names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from experiments.wiring import replica_specs, simulate_config
from sim.cluster import ReplicaSpec, SimResult
from sim.errors import InputError
from sim.scheduling import EngineLimits

PERCENTILE_KEYS = {50: "p50", 90: "p90", 99: "p99"}

# --------------------------------------------------------------------------------- simulation

@dataclass(frozen=True)
class EngineFacts:
    """What the live engine resolved: the simulated replica copies it."""

    num_kv_blocks: int
    block_size: int
    limits: EngineLimits


def usable_kv_blocks(num_gpu_blocks: int) -> int:
    """KV blocks requests can hold in a vLLM v1 engine that resolved `num_gpu_blocks`: one fewer,
    vLLM's block pool keeps block 0 as its null block (`vllm/v1/core/block_pool.py`, `BlockPool.__init__`:
    `self.null_block = self.free_block_queue.popleft()`; vLLM 0.32)."""
    return int(num_gpu_blocks) - 1


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
    and `sim` options of `cfg`. A `qos_class` column, if any, is passed on (the policy may read it)."""
    spec = replica if cost_model is None else dataclasses.replace(replica, cost_model=cost_model)
    cols = ["request_id", "arrival_s", "num_prompt_tokens", "num_output_tokens"]
    if "qos_class" in requests:  # the priority check: the class decides the simulated priority
        cols.append("qos_class")
    wl = requests[cols].sort_values("arrival_s", kind="stable")
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


TARGET = {"p50": 0.05, "p90": 0.05, "p99": 0.10}
"""Issue 17's accuracy target: |signed relative error| per percentile."""


def target_counts(errors: list[dict], target: dict[str, float | None] = TARGET) -> dict:
    """How many comparisons (error records) meet the absolute target: {"comparisons", "within_target"}
    (a missing or non-finite error counts as a miss)."""
    n = ok = 0
    for e in errors:
        tol = target.get(PERCENTILE_KEYS.get(int(e["percentile"]), ""))
        if tol is None:
            continue
        n += 1
        r = e.get("rel_error")
        ok += r is not None and math.isfinite(r) and abs(r) <= tol
    return {"comparisons": n, "within_target": ok}


def noise_accounting(errors: list[dict], target: dict[str, float | None] = TARGET) -> dict:
    """Live-vs-live noise against the simulator's error, over repeats of the same requests.

    Groups error records (`workload`, `load`, `metric`, `percentile`, `repeat`, `live_s`, `sim_s`)
    by all but `repeat`; a group needs >= 2 repeats. Per group: the live values, their median,
    the live spread `(max - min) / median` (how far the live replays are from each other), the
    simulator's value (median over its runs; each repeat is simulated with that repeat's own
    speed calibration) and its error against the live median `(sim - live_median) / live_median`.
    A comparison is `within_noise` when |that error| <= the live spread (issue 17's definition:
    the simulator is no further from the live median than the live runs are from each other) and
    `within_target` when it meets `target` for its percentile. Returns {"rows": [...], "counts":
    {"comparisons", "within_noise", "within_target"}}."""
    df = pd.DataFrame(errors)
    if df.empty or "repeat" not in df.columns or df["repeat"].nunique() < 2:
        return {"rows": [], "counts": {"comparisons": 0, "within_noise": 0, "within_target": 0}}
    rows = []
    for (w, load, m, q), g in df.groupby(["workload", "load", "metric", "percentile"], sort=False):
        live = g["live_s"].to_numpy(dtype=float)
        sim = g["sim_s"].to_numpy(dtype=float)
        if len(live) < 2:
            continue
        med = float(np.median(live))
        spread = float((live.max() - live.min()) / med) if med > 0 and np.all(np.isfinite(live)) else math.nan
        sim_med = float(np.median(sim))
        err = (sim_med - med) / med if med > 0 and math.isfinite(sim_med) else math.nan
        tol = target.get(PERCENTILE_KEYS.get(int(q), ""))
        rows.append({"workload": w, "load": load, "metric": m, "percentile": int(q), "live_s": live.tolist(),
                     "live_median_s": med, "live_spread": spread, "sim_s": sim.tolist(), "sim_median_s": sim_med,
                     "sim_error_vs_live_median": err,
                     "within_noise": bool(math.isfinite(err) and math.isfinite(spread) and abs(err) <= spread),
                     "within_target": bool(tol is not None and math.isfinite(err) and abs(err) <= tol)})
    counts = {"comparisons": len(rows), "within_noise": sum(r["within_noise"] for r in rows),
              "within_target": sum(r["within_target"] for r in rows)}
    return {"rows": rows, "counts": counts}
