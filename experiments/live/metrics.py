"""The engine's own view: samples of vLLM's Prometheus `/metrics` text.

vLLM exposes what its engine resolved (`vllm:cache_config_info`: KV blocks and block size),
gauges (running / waiting requests, KV use) and counters/histograms (prompt and generation
tokens, engine steps via `vllm:iteration_tokens_total`, preemptions, server-side TTFT and
end-to-end latency sums). `parse_prometheus` reads the text format; the helpers pick out
the few series validation uses and sum them over label sets (one engine, one model).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from sim.errors import InputError

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


@dataclass(frozen=True)
class Sample:
    """One Prometheus sample line: metric name, labels and value."""

    name: str
    labels: dict[str, str]
    value: float


def _labels(text: str, line_no: int) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        if m is None:
            raise InputError(f"malformed label set {text!r}", path="/metrics", line=line_no)
        out[m.group(1)] = m.group(2).replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
        pos = m.end()
    return out


def parse_prometheus(text: str) -> list[Sample]:
    """Every sample in a Prometheus text exposition (comments and blank lines skipped)."""
    out = []
    for i, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            raise InputError(f"malformed metrics line {line[:120]!r}", path="/metrics", line=i)
        try:
            value = float(m.group("value"))
        except ValueError:
            raise InputError("metric value is not a number", path="/metrics", line=i, value=m.group("value")) from None
        out.append(Sample(m.group("name"), _labels(m.group("labels") or "", i), value))
    return out


def total(samples: list[Sample], name: str) -> float:
    """Sum of a metric over all its label sets (NaN if the engine does not expose it)."""
    vals = [s.value for s in samples if s.name == name]
    return float(sum(vals)) if vals else math.nan


def cache_config(samples: list[Sample]) -> dict:
    """KV blocks and block size the engine resolved, from `vllm:cache_config_info`'s labels."""
    for s in samples:
        if s.name == "vllm:cache_config_info":
            try:
                return {"num_kv_blocks": int(s.labels["num_gpu_blocks"]), "block_size": int(s.labels["block_size"]),
                        "labels": dict(s.labels)}
            except (KeyError, ValueError):
                raise InputError("vllm:cache_config_info lacks integer num_gpu_blocks / block_size labels",
                                 path="/metrics", field="vllm:cache_config_info", value=s.labels) from None
    raise InputError("the engine's /metrics has no vllm:cache_config_info (is this a vLLM server?)",
                     path="/metrics", field="vllm:cache_config_info")


GAUGES = {
    "num_running": "vllm:num_requests_running",
    "num_waiting": "vllm:num_requests_waiting",
    "kv_cache_usage": "vllm:kv_cache_usage_perc",
}
"""Gauges sampled over time during a replay (column -> metric)."""

COUNTERS = {
    "prompt_tokens": "vllm:prompt_tokens_total",
    "generation_tokens": "vllm:generation_tokens_total",
    "num_steps": "vllm:iteration_tokens_total_count",
    "step_tokens": "vllm:iteration_tokens_total_sum",
    "num_preemptions": "vllm:num_preemptions_total",
    "ttft_sum_s": "vllm:time_to_first_token_seconds_sum",
    "ttft_count": "vllm:time_to_first_token_seconds_count",
    "e2e_sum_s": "vllm:e2e_request_latency_seconds_sum",
    "e2e_count": "vllm:e2e_request_latency_seconds_count",
    "itl_sum_s": "vllm:inter_token_latency_seconds_sum",
    "itl_count": "vllm:inter_token_latency_seconds_count",
    "queue_sum_s": "vllm:request_queue_time_seconds_sum",
    "queue_count": "vllm:request_queue_time_seconds_count",
    "prefill_sum_s": "vllm:request_prefill_time_seconds_sum",
    "prefill_count": "vllm:request_prefill_time_seconds_count",
}
"""Cumulative counters read before and after a replay (column -> metric); their differences
count what the engine did during it."""


def gauge_lines(text: str) -> str:
    """Only the lines of the sampled gauges (parsing 50 KB of histograms 2x a second would steal the
    client's event loop from timestamping tokens)."""
    wanted = tuple(GAUGES.values())
    return "\n".join(line for line in text.splitlines() if line.startswith(wanted))


def snapshot(samples: list[Sample]) -> dict[str, float]:
    """The gauges and counters above from one scrape."""
    return {k: total(samples, m) for k, m in {**GAUGES, **COUNTERS}.items()}


def counter_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What the engine counted between two snapshots, plus derived means (server-side latencies)."""
    d = {k: after[k] - before[k] for k in COUNTERS}

    def ratio(a: float, b: float) -> float:
        return a / b if b and b > 0 else math.nan

    d["mean_tokens_per_step"] = ratio(d["step_tokens"], d["num_steps"])
    d["server_mean_ttft_s"] = ratio(d["ttft_sum_s"], d["ttft_count"])
    d["server_mean_e2e_s"] = ratio(d["e2e_sum_s"], d["e2e_count"])
    d["server_mean_itl_s"] = ratio(d["itl_sum_s"], d["itl_count"])
    d["engine_mean_queue_s"] = ratio(d["queue_sum_s"], d["queue_count"])
    d["engine_mean_prefill_s"] = ratio(d["prefill_sum_s"], d["prefill_count"])
    return d
