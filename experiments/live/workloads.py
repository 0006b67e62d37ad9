"""Workloads of the live validation: trace-shaped request pools, open-loop and burst runs.

Shared by both live modes (server: `experiments.live.client`; in-process:
`experiments.live.inprocess`); `experiments.validate` re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from sim.errors import InputError
from sim.workload import from_trace

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



def load_runs(cfg, pool: RequestPool, saturation_qps: float, loads: list[float], shape=None):
    """The validation's replays of one workload shape, in order: for each load (a fraction of
    `saturation_qps`) the workload of `rate x cfg.duration_s` requests (clipped to
    [cfg.min_requests, cfg.max_requests]; arrivals `cfg.arrivals`, seed `cfg.seed`; passed through
    `shape` when given), `cfg.repeats` times. Yields (load, rate_qps, workload, label, extra)."""
    repeats = int(cfg.repeats)
    for load in loads:
        rate = load * saturation_qps
        n = int(np.clip(round(rate * float(cfg.duration_s)), int(cfg.min_requests), int(cfg.max_requests)))
        wl = run_workload(pool, rate, n, str(cfg.arrivals), int(cfg.seed))
        if shape is not None:
            wl = shape(wl)
        for rep in range(repeats):
            label = f"{pool.name}-load{load:g}" + (f"-r{rep}" if repeats > 1 else "")
            yield load, rate, wl, label, ({"repeat": rep} if repeats > 1 else {})


def fixed_saturation(sat: dict, pool: RequestPool) -> dict:
    """`saturation.method=fixed`: the rate given for this workload shape (`saturation.rates_qps`);
    InputError naming the key when it is missing or not positive."""
    rate = (sat.get("rates_qps") or {}).get(pool.name)
    if rate is None or not rate > 0:
        raise InputError("saturation.method=fixed needs a positive rate for this workload",
                         field=f"saturation.rates_qps.{pool.name}", value=rate)
    return {"method": "fixed", "rate_qps": float(rate)}


def burst_workload(pool: RequestPool, num_requests: int) -> pd.DataFrame:
    """The first `num_requests` of the pool, all arriving at once (a backlog)."""
    return _requests(pool, np.zeros(min(num_requests, len(pool))))


def _requests(pool: RequestPool, arrival_s: np.ndarray) -> pd.DataFrame:
    """The first len(arrival_s) requests of the pool at the given arrival times."""
    n = len(arrival_s)
    return pd.DataFrame({"request_id": np.arange(n, dtype=np.int64), "arrival_s": arrival_s,
                         "num_prompt_tokens": pool.num_prompt_tokens[:n],
                         "num_output_tokens": pool.num_output_tokens[:n]})
