"""Workloads: the requests that arrive at a simulated cluster, one table row per request.

`synthetic` generates them (Poisson/gamma arrivals on a rate schedule, lognormal, constant
or resampled lengths, QoS classes by share); `from_trace` loads public traces (Azure LLM
inference 2023/2024, BurstGPT, Mooncake) or a plain CSV; `trace_workload` samples a trace's
request shapes onto a synthetic arrival process. All return a `Workload`.
"""

from sim.workload.generate import ArrivalProcess, LengthDistribution, synthetic
from sim.workload.samplers import trace_workload
from sim.workload.table import COLUMNS, DEFAULT_QOS_CLASS, Workload, make_requests
from sim.workload.traces import FORMATS, detect_format, from_trace

__all__ = [
    "COLUMNS",
    "DEFAULT_QOS_CLASS",
    "FORMATS",
    "ArrivalProcess",
    "LengthDistribution",
    "Workload",
    "detect_format",
    "from_trace",
    "make_requests",
    "synthetic",
    "trace_workload",
]
