"""Samplers over a trace: a trace's request shapes on a synthetic arrival process.

`trace_workload` draws (prompt, output) length pairs jointly, with replacement, from a trace
and puts them on an `ArrivalProcess` (the Niyama artifact's setup: trace lengths, Poisson
arrivals at a QPS). Its streams are seeded so that at every rate the same seed gives the same
requests with only the arrival times scaled, which is what a capacity search needs.
"""

from __future__ import annotations

import numpy as np

from sim.errors import InputError
from sim.paths import project_path
from sim.workload.generate import ArrivalProcess
from sim.workload.options import assign_qos_classes, plain, positive_number, qos_probabilities, whole_number
from sim.workload.table import Workload, make_requests
from sim.workload.traces import from_trace

TRACE_HELP = (
    "The Azure LLM inference traces 2023 (CC-BY 4.0) are AzureLLMInferenceTrace_code.csv and "
    "AzureLLMInferenceTrace_conv.csv in the data/ folder of the Azure/AzurePublicDataset repository "
    "on GitHub; put them in ../shared/traces/ beside the project (the default) or set workload.path=<file>."
)

_TRACE_CACHE: dict[tuple[str, float, str], Workload] = {}
"""The last trace read, by (file, modification time, format): a capacity search draws from the
same trace at every rate, and reading it again each time would dominate short runs."""


def _trace_rows(path: str, format: str) -> Workload:  # noqa: A002 - the loader's keyword
    file = project_path(path)
    if not file.exists():
        raise InputError(f"trace file not found. {TRACE_HELP}", path=file, field="workload.path")
    key = (str(file), file.stat().st_mtime, format)
    if key not in _TRACE_CACHE:
        _TRACE_CACHE.clear()
        _TRACE_CACHE[key] = from_trace(str(file), format=format)
    return _TRACE_CACHE[key]


def trace_workload(
    *,
    path: str,
    arrival: dict,
    num_requests: int | None = None,
    duration_s: float | None = None,
    qos_shares: dict[str, float] | None = None,
    seed: int = 0,
    format: str = "auto",  # noqa: A002
    model: str = "",
    model_shares: dict[str, float] | None = None,
    max_total_tokens: int | None = None,
) -> Workload:
    """A trace's (prompt, output) length pairs, drawn jointly with replacement, on a synthetic
    arrival process (`arrival`: an `ArrivalProcess` config, e.g. {kind: poisson, rate_qps: 2}).
    Give exactly one of `num_requests` and `duration_s` (seconds of arrivals). Independent
    streams spawned from `seed` draw the arrivals' unit gaps, the rows and the QoS classes, so
    at every rate the same seed gives the same requests with arrival times scaled. Classes come
    from `qos_shares` when given, else from the trace. Raises InputError for a missing trace
    file (saying where the Azure traces come from), a bad arrival config or both/neither of
    `num_requests` and `duration_s`.

    `arrival: {kind: trace, path: <trace>, window_s, target_qps}` takes the arrival times of
    another trace instead (its own clock cut by `window_s` and stretched to `target_qps`, as
    `from_trace` does; then the first `num_requests`, or those before `duration_s`): e.g.
    ShareGPT lengths on the Azure conversation trace's bursts. `max_total_tokens` draws only
    pairs whose prompt + output fit (a model's context; the rows left out of the pool are
    counted in `num_filtered` as `over_max_total_tokens`). `model_shares` (model name -> share)
    draws each request's model from a fourth stream (the first three unchanged); `model`
    names one model for all."""
    if (num_requests is None) == (duration_s is None):
        raise InputError("give exactly one of num_requests and duration_s", field="workload.num_requests",
                         value=(num_requests, duration_s))
    qos_probabilities(qos_shares)
    models = qos_probabilities(model_shares, "model_shares")
    if models is not None and model:
        raise InputError("give model or model_shares, not both", field="model_shares", value=plain(model_shares))
    trace = _trace_rows(path, format)
    rows = trace.requests
    num_filtered = dict(trace.num_filtered)
    pool = np.arange(len(rows))
    if max_total_tokens is not None:
        max_total_tokens = whole_number(max_total_tokens, "max_total_tokens", minimum=2)
        total = rows["num_prompt_tokens"].to_numpy() + rows["num_output_tokens"].to_numpy()
        pool = pool[total <= max_total_tokens]
        if len(pool) < len(rows):
            num_filtered["over_max_total_tokens"] = int(len(rows) - len(pool))
        if not len(pool):
            raise InputError(f"no request of the trace fits {max_total_tokens} tokens", field="max_total_tokens",
                             value=max_total_tokens)
    arrival_rng, row_rng, qos_rng, model_rng = np.random.default_rng(int(seed)).spawn(4)
    plain_arrival = plain(arrival)
    if isinstance(plain_arrival, dict) and plain_arrival.get("kind") == "trace":
        arrival_s, described = _trace_arrivals(plain_arrival, num_requests, duration_s)
    else:
        process = ArrivalProcess.from_config(arrival)
        arrival_s, described = process.sample(arrival_rng, num_requests=num_requests, duration_s=duration_s), \
            process.describe()
    picks = pool[row_rng.integers(0, len(pool), size=len(arrival_s))]
    trace_classes = rows["qos_class"].to_numpy()[picks]
    drawn = assign_qos_classes(len(arrival_s), plain(qos_shares), qos_rng)
    classes = drawn if qos_shares is not None else trace_classes  # a class from the trace wins without shares
    if models is not None:
        names, probs = models
        model = np.asarray(names, dtype=object)[model_rng.choice(len(names), size=len(arrival_s), p=probs)]
    requests = make_requests(arrival_s, rows["num_prompt_tokens"].to_numpy()[picks],
                             rows["num_output_tokens"].to_numpy()[picks], model, classes)
    lines = None if trace.source_lines is None or qos_shares is not None else trace.source_lines[picks]
    return Workload(requests=requests, source=f"trace lengths {path} on {described}, seed={seed}",
                    num_filtered=num_filtered, source_path=trace.source_path if lines is not None else None,
                    source_lines=lines)


TRACE_ARRIVAL_KEYS = {"kind", "path", "format", "window_s", "target_qps"}


def _trace_arrivals(arrival: dict, num_requests: int | None, duration_s: float | None) -> tuple[np.ndarray, str]:
    """Arrival times (s, from 0) of the trace `arrival['path']` ({kind: trace, path, format,
    window_s, target_qps}; see `from_trace`), cut to the first `num_requests` or to those
    before `duration_s`. InputError for an unknown key, a missing file or too few arrivals."""
    unknown = sorted(set(arrival) - TRACE_ARRIVAL_KEYS)
    if unknown:
        raise InputError(f"unknown key(s) {unknown}; known: {sorted(TRACE_ARRIVAL_KEYS)}", field="arrival",
                         value=arrival)
    if not isinstance(arrival.get("path"), str):
        raise InputError("a trace arrival needs the trace's path", field="arrival.path", value=arrival.get("path"))
    file = project_path(arrival["path"])
    if not file.exists():
        raise InputError(f"trace file not found. {TRACE_HELP}", path=file, field="arrival.path")
    times = from_trace(str(file), format=arrival.get("format", "auto"), window_s=arrival.get("window_s"),
                       target_qps=arrival.get("target_qps")).requests["arrival_s"].to_numpy()
    if num_requests is not None:
        num_requests = whole_number(num_requests, "num_requests", minimum=1)
        if num_requests > len(times):
            raise InputError(f"the arrival trace has only {len(times)} arrivals", field="num_requests",
                             value=num_requests)
        times = times[:num_requests]
    else:
        times = times[times < positive_number(duration_s, "duration_s")]
    rate = arrival.get("target_qps")
    return times, f"arrivals of {arrival['path']}" + (f" at {rate:g} qps" if rate else "")
