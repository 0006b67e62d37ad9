"""OServe's deployment model: a fixed GPU pool split into replicas of several TP degrees, request
types (prompt x output length bins), and what each replica configuration sustains per type.

Known from the paper (design/POLICIES.md, OServe): short requests favour many small replicas,
long ones favour more tensor parallelism, so the pool's best split is heterogeneous. Everything
here beyond that outline is **(our design)**: the TP degrees 1/2/4/8 (no pipeline parallelism),
quantile bin edges, and the sustainable-rate table, which is an *analytic steady-state bound*
from the roofline cost model (`sustainable_rate`), not a simulation (one table has up to
4 configurations x 9 types; a capacity search by simulation per cell would take minutes on
two shared cores, the bound takes milliseconds, and the max-flow only needs a capacity).
The table is cached as JSON keyed by a SHA-256 of everything it was computed from.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from sim.costmodels.roofline import RooflineCostModel
from sim.costmodels.specs import GpuSpec, ModelSpec, kv_blocks_for
from sim.errors import InputError

DEFAULT_TP_DEGREES = (1, 2, 4, 8)
"""TP degrees a replica may take (our design: NVLink domains of 8 GPUs, powers of two)."""


# ---------------------------------------------------------------- configurations
@dataclass(frozen=True, order=True)
class ReplicaConfig:
    """One replica's parallelism: `tp` GPUs in one tensor-parallel group (PP is not modelled)."""

    tp: int

    @property
    def name(self) -> str:
        return f"tp{self.tp}"

    @property
    def num_gpus(self) -> int:
        return self.tp


def feasible_configs(model: ModelSpec, gpu: GpuSpec, num_gpus: int, tp_degrees: Sequence[int] = DEFAULT_TP_DEGREES,
                     *, block_size: int = 16, gpu_memory_utilization: float = 0.9,
                     min_kv_tokens: int = 0) -> list[ReplicaConfig]:
    """The configurations of `tp_degrees` that shard `model` (vLLM's head rules), use at most
    `num_gpus` GPUs and leave at least `min_kv_tokens` (and one block) of KV cache beside the
    weights on `gpu`. Raises InputError (field `num_gpus` / `tp_degrees` / `model`) when none is left."""
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 1:
        raise InputError("must be an integer >= 1", field="num_gpus", value=num_gpus)
    if not tp_degrees or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in tp_degrees):
        raise InputError("must be a non-empty list of integers >= 1", field="tp_degrees", value=list(tp_degrees))
    out, why = [], []
    for tp in sorted(set(tp_degrees)):
        if tp > num_gpus:
            why.append(f"tp{tp}: more GPUs than the pool's {num_gpus}")
            continue
        try:
            model.check_tp(tp)
            blocks = kv_blocks_for(model, gpu, tp, block_size, gpu_memory_utilization)
        except InputError as e:
            why.append(f"tp{tp}: {e.problem}")
            continue
        if blocks * block_size < max(min_kv_tokens, 1):
            why.append(f"tp{tp}: {blocks * block_size} KV tokens < {min_kv_tokens} needed")
            continue
        out.append(ReplicaConfig(tp))
    if not out:
        raise InputError(f"{model.name} fits no replica configuration of a {num_gpus}-GPU {gpu.name} pool "
                         f"({'; '.join(why)})", field="model", value=model.name)
    return out


def deployments(num_gpus: int, configs: Sequence[ReplicaConfig]) -> list[tuple[int, ...]]:
    """Every split of `num_gpus` GPUs into replicas of `configs`, as sorted tuples of TP degrees
    (largest first), using every GPU. Raises InputError (field `num_gpus`) when no split exists
    (the pool's size is not a sum of the feasible degrees, e.g. 6 GPUs when only tp4 fits)."""
    degrees = sorted({c.tp for c in configs}, reverse=True)
    out: list[tuple[int, ...]] = []

    def rec(left: int, i: int, acc: list[int]) -> None:
        if left == 0:
            out.append(tuple(acc))
            return
        for j in range(i, len(degrees)):
            if degrees[j] <= left:
                acc.append(degrees[j])
                rec(left - degrees[j], j, acc)
                acc.pop()

    rec(num_gpus, 0, [])
    if not out:
        raise InputError(f"{num_gpus} GPUs do not divide into replicas of the feasible TP degrees {degrees[::-1]}",
                         field="num_gpus", value=num_gpus)
    return out


def homogeneous(num_gpus: int, configs: Sequence[ReplicaConfig], tp: int | None = None) -> tuple[int, ...]:
    """`num_gpus // tp` replicas of one degree (default: the smallest feasible, vLLM-style data
    parallelism). InputError (field `num_gpus`) when the degree does not divide the pool."""
    tp = min(c.tp for c in configs) if tp is None else tp
    if tp not in {c.tp for c in configs}:
        raise InputError(f"tp{tp} is not a feasible configuration ({[c.name for c in configs]})", field="tp", value=tp)
    if num_gpus % tp:
        raise InputError(f"{num_gpus} GPUs do not divide into tp{tp} replicas", field="num_gpus", value=num_gpus)
    return (tp,) * (num_gpus // tp)


# ---------------------------------------------------------------- request types
@dataclass(frozen=True)
class RequestTypes:
    """Request types: bins of prompt length x output length (our design: edges are inner bin
    boundaries in tokens, a request with length `x` falls in bin `searchsorted(edges, x, 'right')`).
    Type index = prompt_bin * num_output_bins + output_bin. Invariant: edges strictly increasing."""

    prompt_edges: tuple[float, ...]
    output_edges: tuple[float, ...]

    def __post_init__(self) -> None:
        for name in ("prompt_edges", "output_edges"):
            e = tuple(float(x) for x in getattr(self, name))
            if any(not math.isfinite(x) or x <= 0 for x in e) or any(b <= a for a, b in zip(e, e[1:])):
                raise InputError("bin edges must be finite, > 0 and strictly increasing", field=name, value=list(e))
            object.__setattr__(self, name, e)

    @property
    def num_prompt_bins(self) -> int:
        return len(self.prompt_edges) + 1

    @property
    def num_output_bins(self) -> int:
        return len(self.output_edges) + 1

    def __len__(self) -> int:
        return self.num_prompt_bins * self.num_output_bins

    def prompt_bin(self, num_prompt_tokens) -> np.ndarray:
        return np.searchsorted(np.asarray(self.prompt_edges), num_prompt_tokens, side="right")

    def classify(self, num_prompt_tokens, num_output_tokens) -> np.ndarray:
        """Type index of each request (arrays of token counts in, int array out)."""
        ip = self.prompt_bin(num_prompt_tokens)
        io = np.searchsorted(np.asarray(self.output_edges), num_output_tokens, side="right")
        return np.asarray(ip * self.num_output_bins + io, dtype=np.int64)

    def label(self, t: int) -> str:
        ip, io = divmod(int(t), self.num_output_bins)
        pe, oe = (0.0, *self.prompt_edges, math.inf), (0.0, *self.output_edges, math.inf)
        return f"p[{pe[ip]:g},{pe[ip + 1]:g})xo[{oe[io]:g},{oe[io + 1]:g})"

    @classmethod
    def from_quantiles(cls, num_prompt_tokens, num_output_tokens, prompt_quantiles=(0.5, 0.9),
                       output_quantiles=(0.5,)) -> RequestTypes:
        """Edges at quantiles of a workload's lengths (default: prompt median and P90, output
        median: six types; duplicate edges are merged)."""
        p = np.asarray(num_prompt_tokens, dtype=float)
        o = np.asarray(num_output_tokens, dtype=float)
        if len(p) == 0:
            raise InputError("cannot derive request-type edges from an empty workload", field="workload", value=0)
        for name, q in (("prompt_quantiles", prompt_quantiles), ("output_quantiles", output_quantiles)):
            if any(not 0 < x < 1 for x in q):
                raise InputError("quantiles must lie in (0, 1)", field=name, value=list(q))

        def edges(x, q):
            return tuple(sorted({float(v) for v in np.quantile(x, sorted(q)) if v > 0}))

        return cls(edges(p, prompt_quantiles), edges(o, output_quantiles))


@dataclass(frozen=True)
class TypeStats:
    """What the planner knows of each type from a workload sample: per type (arrays of length
    num types) the request count, mean prompt and output tokens, and P90 prompt tokens."""

    count: np.ndarray
    mean_prompt: np.ndarray
    mean_output: np.ndarray
    p90_prompt: np.ndarray

    @classmethod
    def from_workload(cls, types: RequestTypes, num_prompt_tokens, num_output_tokens) -> TypeStats:
        p = np.asarray(num_prompt_tokens, dtype=float)
        o = np.asarray(num_output_tokens, dtype=float)
        k = types.classify(p, o)
        n = len(types)
        count = np.bincount(k, minlength=n).astype(float)
        mp, mo, pp = np.zeros(n), np.zeros(n), np.zeros(n)
        for t in range(n):
            sel = k == t
            if sel.any():
                mp[t], mo[t], pp[t] = p[sel].mean(), o[sel].mean(), np.quantile(p[sel], 0.9)
        return cls(count, mp, mo, pp)


# ---------------------------------------------------------------- sustainable rates
@dataclass(frozen=True)
class RateSettings:
    """The SLO and engine limits a sustainable rate must respect, and the planner's headroom."""

    ttft_s: float = 2.0
    """First-token objective (s)."""
    tpot_s: float = 0.1
    """Per-output-token objective (s); a steady step must not exceed it."""
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    utilization: float = 0.8
    """Share of the steady-state bound counted as sustainable (our design: room for queueing
    of random arrivals, which the bound ignores)."""

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise InputError("must be a finite number of seconds > 0", field=name, value=v)
        if not 0 < self.utilization <= 1:
            raise InputError("must be in (0, 1]", field="utilization", value=self.utilization)


def sustainable_rate(cm, num_kv_tokens: int, mean_prompt: float, mean_output: float, p90_prompt: float,
                     s: RateSettings) -> float:
    """Requests/s of one type that one replica sustains within the SLO: an analytic
    steady-state bound (our design), times `s.utilization`.

    With B requests decoding at once, each step decodes B tokens and, to keep B steady,
    prefills B * p / o prompt tokens (p, o: the type's mean prompt and output lengths), so
    requests finish at B / (o * t(B)) per second, t(B) the cost model's step time for that
    shape (decode context B * (p + o/2), the prefill chunk's attention amortised as
    context (p - chunk) / 2). B is feasible when B * (1 + p / o) <= max_num_batched_tokens,
    B <= max_num_seqs, the mean KV held, B * (p + o / 2),
    fits `num_kv_tokens`, t(B) <= tpot_s, and a P90 prompt of the type, prefilled in chunks of
    (budget - B) tokens beside B decodes, gets its first token within ttft_s. The rate is the
    best feasible B's; 0.0 if none is. Shapes: scalars in, requests/s out."""
    p, o, pf = float(mean_prompt), max(float(mean_output), 1.0), float(max(p90_prompt, mean_prompt))
    if p <= 0:
        return 0.0
    budget = s.max_num_batched_tokens
    b = np.arange(1, s.max_num_seqs + 1, dtype=float)
    chunk = b * p / o
    ok = (b + chunk <= budget) & (b * (p + o / 2.0) <= num_kv_tokens) & (p + o <= num_kv_tokens)
    n_chunks = np.maximum(np.ceil(chunk / p), 1.0)
    ctx = np.maximum((p - chunk) / 2.0, 0.0)
    t = cm.step_times_s(chunk, ctx * n_chunks, b, b * (p + o / 2.0), b + n_chunks)
    ok &= t <= s.tpot_s
    c = np.maximum(budget - b, 1.0)
    first = np.minimum(c, pf)
    t_first = cm.step_times_s(first, np.maximum(pf - first, 0.0) / 2.0, b, b * (p + o / 2.0), b + 1)
    ok &= np.ceil(pf / c) * t_first <= s.ttft_s
    if not ok.any():
        return 0.0
    rate = b / (o * t)
    return float(s.utilization * rate[ok].max())


def roofline_for(template: RooflineCostModel, tp: int) -> RooflineCostModel:
    """The template's roofline (model, GPU, efficiencies) at another TP degree."""
    return RooflineCostModel(template.model, template.gpu, tp=tp, compute_efficiency=template.compute_efficiency,
                             memory_efficiency=template.memory_efficiency,
                             step_overhead_s=template.step_overhead_s,
                             allreduce_latency_s=template.allreduce_latency_s,
                             gpu_memory_utilization=template.gpu_memory_utilization)


def rate_table(template: RooflineCostModel, configs: Sequence[ReplicaConfig], stats: TypeStats,
               settings: RateSettings, cache_dir: str | Path | None = None) -> dict[int, np.ndarray]:
    """TP degree -> requests/s per type (array of length num types), `sustainable_rate` per cell.
    With `cache_dir`, read from / write to `<cache_dir>/rates-<sha256[:16]>.json`, the hash over
    every input (cost-model dict, configs, type statistics, settings)."""
    key_obj = {"costmodel": template.to_dict(), "tp": [c.tp for c in configs],
               "stats": {k: np.round(getattr(stats, k), 6).tolist() for k in ("mean_prompt", "mean_output", "p90_prompt")},
               "settings": settings.__dict__, "method": "analytic-steady-state-v1"}
    key = hashlib.sha256(json.dumps(key_obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = None if cache_dir is None else Path(cache_dir) / f"rates-{key}.json"
    if path is not None and path.is_file():
        data = json.loads(path.read_text())
        if data.get("key") == key:
            return {int(k): np.asarray(v, dtype=float) for k, v in data["rates_per_s"].items()}
    out: dict[int, np.ndarray] = {}
    for c in configs:
        cm = roofline_for(template, c.tp)
        kv_tokens = cm.num_kv_blocks(settings.block_size) * settings.block_size
        out[c.tp] = np.array([
            sustainable_rate(cm, kv_tokens, stats.mean_prompt[t], stats.mean_output[t], stats.p90_prompt[t], settings)
            if stats.mean_prompt[t] > 0 else 0.0 for t in range(len(stats.count))])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "inputs": key_obj,
                                    "rates_per_s": {str(k): v.tolist() for k, v in out.items()}}, indent=1))
    return out
