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
from sim.workload.options import assign_qos_classes, plain, qos_probabilities
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
) -> Workload:
    """A trace's (prompt, output) length pairs, drawn jointly with replacement, on a synthetic
    arrival process (`arrival`: an `ArrivalProcess` config, e.g. {kind: poisson, rate_qps: 2}).
    Give exactly one of `num_requests` and `duration_s` (seconds of arrivals). Independent
    streams spawned from `seed` draw the arrivals' unit gaps, the rows and the QoS classes, so
    at every rate the same seed gives the same requests with arrival times scaled. Classes come
    from `qos_shares` when given, else from the trace. Raises InputError for a missing trace
    file (saying where the Azure traces come from), a bad arrival config or both/neither of
    `num_requests` and `duration_s`."""
    process = ArrivalProcess.from_config(arrival)
    if (num_requests is None) == (duration_s is None):
        raise InputError("give exactly one of num_requests and duration_s", field="workload.num_requests",
                         value=(num_requests, duration_s))
    qos_probabilities(qos_shares)
    trace = _trace_rows(path, format)
    rows = trace.requests
    arrival_rng, row_rng, qos_rng = np.random.default_rng(int(seed)).spawn(3)
    arrival_s = process.sample(arrival_rng, num_requests=num_requests, duration_s=duration_s)
    picks = row_rng.integers(0, len(rows), size=len(arrival_s))
    trace_classes = rows["qos_class"].to_numpy()[picks]
    drawn = assign_qos_classes(len(arrival_s), plain(qos_shares), qos_rng)
    classes = drawn if qos_shares is not None else trace_classes  # a class from the trace wins without shares
    requests = make_requests(arrival_s, rows["num_prompt_tokens"].to_numpy()[picks],
                             rows["num_output_tokens"].to_numpy()[picks], model, classes)
    lines = None if trace.source_lines is None or qos_shares is not None else trace.source_lines[picks]
    return Workload(requests=requests, source=f"trace lengths {path} on {process.describe()}, seed={seed}",
                    num_filtered=dict(trace.num_filtered), source_path=trace.source_path if lines is not None else None,
                    source_lines=lines)
