"""Metrics: pure functions over the request and step tables.

Latency definitions (all in seconds, finished requests only unless stated):
- TTFT: first output token time - arrival; E2E: finish - arrival;
- TPOT: (finish - first token) / (output tokens - 1), a request's mean time per output token;
- TBT: every gap between consecutive output tokens of a request (pooled over requests for
  the percentiles; per request via `request_tbt_s`).
`deadline_s` is the first-token deadline a QoS-aware policy used, written when it first
admitted the request (inf if it never did or the class has no tier), and `relegated` whether
it was relegated (served best effort, see sim.qos). Token times come from the step table: a
request records the runs of step indices at whose end it emitted a token (`token_steps` =
[a1, b1, a2, b2, ...]), so no per-token list is kept; a request served by several replicas
(cluster control) also records the replica of each run (`token_replicas`).
Whether a request met its objectives is judged in one place, `sim.qos.violations`;
`summarize` reports that judgement as SLO attainment and as violation rates.
"""

from __future__ import annotations

from itertools import chain
from operator import attrgetter
from typing import Sequence

import numpy as np
import pandas as pd

from sim.qos import QoS, attainment_from_violations, needs_steps, rates_from_violations, violations
from sim.request import FINISHED, OUTCOMES, REJECTED, Request

PERCENTILES = (50, 90, 99)


def request_table(requests: Sequence[Request], step_end_times: Sequence[np.ndarray]) -> pd.DataFrame:
    """One row a request, with derived latencies and each request's longest token gap."""
    n = len(requests)

    def column(name: str, dtype) -> np.ndarray:
        return np.fromiter(map(attrgetter(name), requests), dtype=dtype, count=n)

    df = pd.DataFrame({
        "request_id": column("request_id", np.int64),
        "arrival_s": column("arrival_s", np.float64),
        "model": [r.model for r in requests],
        "qos_class": [r.qos_class for r in requests],
        "num_prompt_tokens": column("num_prompt_tokens", np.int64),
        "num_output_tokens": column("num_output_tokens", np.int64),
        "num_output_tokens_done": column("num_output_done", np.int64),
        "replica": column("replica", np.int64),
        "outcome": pd.Categorical([r.outcome for r in requests], categories=list(OUTCOMES)),
        "reject_reason": [r.reject_reason for r in requests],
        "first_scheduled_s": column("first_scheduled_s", np.float64),
        "first_token_s": column("first_token_s", np.float64),
        "finish_s": column("finish_s", np.float64),
        "num_preemptions": column("num_preemptions", np.int64),
        # Set by QoS-aware batch policies (sim.qos, policies.edf/niyama); inf / False otherwise.
        "deadline_s": column("deadline_s", np.float64),
        "relegated": column("relegated", np.bool_),
    })
    df["ttft_s"] = df["first_token_s"] - df["arrival_s"]
    df["e2e_s"] = df["finish_s"] - df["arrival_s"]
    gaps = (df["num_output_tokens_done"] - 1).where(df["num_output_tokens_done"] > 1)
    df["tpot_s"] = (df["finish_s"] - df["first_token_s"]) / gaps
    token_steps = [r.token_steps for r in requests]
    lens, flat = _flatten(token_steps)
    moved = [r.run_replicas for r in requests]
    df["tbt_max_s"] = _max_gap(_runs_of(flat, lens // 2, df["replica"].to_numpy(), moved), n, step_end_times)
    # numpy arrays (views of one buffer) rather than the lists: the cyclic collector does not
    # track them, so the run leaves no object per request for it to visit later
    ends = np.cumsum(lens).tolist()
    flat32 = flat.astype(np.int32)
    df["token_steps"] = [flat32[a:b] for a, b in zip([0] + ends[:-1], ends)]
    # A request served by several replicas (cluster control): the replica of each token run
    # (None: every run on `replica`); evictions and migrations it went through.
    df["token_replicas"] = [None if m is None else np.asarray(m, dtype=np.int32) for m in moved]
    df["num_evictions"] = column("num_evictions", np.int64)
    df["num_migrations"] = column("num_migrations", np.int64)
    return df


def _segments(token_steps: Sequence, replicas: np.ndarray, run_replicas: Sequence | None = None):
    """Flatten per-request runs into arrays (request index, replica, first step, last step)."""
    lens, flat = _flatten(token_steps)
    return _runs_of(flat, lens // 2, replicas, run_replicas)


def _flatten(token_steps: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Each request's number of run bounds, and all bounds concatenated."""
    lens = np.fromiter(map(len, token_steps), dtype=np.int64, count=len(token_steps))
    return lens, np.fromiter(chain.from_iterable(token_steps), dtype=np.int64, count=int(lens.sum()))


def _runs_of(flat: np.ndarray, runs_per_request: np.ndarray, replicas: np.ndarray,
            run_replicas: Sequence | None = None):
    """(request index, replica, first step, last step) of every run in `flat` = [a1, b1, a2, ...];
    a run's replica is its request's, or the request's `run_replicas` entry when it moved."""
    idx = np.repeat(np.arange(len(runs_per_request)), runs_per_request)
    rep = replicas[idx]
    if run_replicas is not None:
        starts = np.cumsum(runs_per_request) - runs_per_request
        for i, m in enumerate(run_replicas):
            if m is not None and len(m):
                rep[starts[i]: starts[i] + len(m)] = m
    return idx, rep, flat[0::2], flat[1::2]


def _gap_arrays(step_end_times: Sequence[np.ndarray]):
    """Per-step gap to the previous step's end, all replicas concatenated, plus offsets."""
    offsets = np.cumsum([0] + [len(e) for e in step_end_times])
    gaps = np.concatenate([np.diff(e, prepend=np.nan) for e in step_end_times] + [np.array([np.nan])])
    ends = np.concatenate(list(step_end_times) + [np.array([np.nan])])
    return gaps, ends, offsets


def _max_gap(segments, num_requests: int, step_end_times: Sequence[np.ndarray]) -> np.ndarray:
    """Each request's longest gap between consecutive tokens (NaN with fewer than two)."""
    out = np.full(num_requests, np.nan)
    idx, rep, a, b = segments
    if idx.size == 0:
        return out
    gaps, ends, offsets = _gap_arrays(step_end_times)
    base = offsets[rep]
    inner = b > a
    if inner.any():
        starts = base[inner] + a[inner] + 1
        stops = base[inner] + b[inner] + 1
        # reduceat also reduces the spans between consecutive runs; sorted by start those
        # spans are disjoint or empty, so the whole call is O(steps + tokens).
        order = np.argsort(starts, kind="stable")
        bounds = np.empty(2 * starts.size, dtype=np.int64)
        bounds[0::2], bounds[1::2] = starts[order], stops[order]
        seg_max = np.empty(starts.size)
        seg_max[order] = np.maximum.reduceat(gaps, bounds)[0::2]
        np.fmax.at(out, idx[inner], seg_max)
    # Gaps across a preemption: from the last token of one run to the first of the next.
    same = idx[1:] == idx[:-1]
    if same.any():
        cross = ends[base[1:][same] + a[1:][same]] - ends[base[:-1][same] + b[:-1][same]]
        np.fmax.at(out, idx[1:][same], cross)
    return out


def tbt_samples(requests: pd.DataFrame, steps: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """All token gaps of finished requests as (values, weights): distinct step gaps and how
    many requests saw each; exact, without materialising one row per token."""
    fin = requests[requests["outcome"] == FINISHED]
    step_ends = [g["start_s"].to_numpy() + g["duration_s"].to_numpy()
                 for _, g in steps.sort_values(["replica", "step"]).groupby("replica", sort=True)]
    rep_ids = sorted(steps["replica"].unique())
    pos = {r: i for i, r in enumerate(rep_ids)}
    if fin.empty or not step_ends:
        return np.empty(0), np.empty(0)
    replicas = np.array([pos[r] for r in fin["replica"].to_numpy()], dtype=np.int64)
    moved = None
    if "token_replicas" in fin.columns:
        moved = [None if m is None else [pos[int(x)] for x in m] for m in fin["token_replicas"]]
    idx, rep, a, b = _segments(list(fin["token_steps"]), replicas, moved)
    gaps, ends, offsets = _gap_arrays(step_ends)
    base = offsets[rep]
    weights = np.zeros(len(gaps) + 1)
    np.add.at(weights, base + a + 1, 1.0)
    np.add.at(weights, base + b + 1, -1.0)
    weights = np.cumsum(weights)[:-1]
    keep = weights > 0.5
    values, w = gaps[keep], weights[keep]
    same = idx[1:] == idx[:-1]
    if same.any():
        cross = ends[base[1:][same] + a[1:][same]] - ends[base[:-1][same] + b[:-1][same]]
        values = np.concatenate([values, cross])
        w = np.concatenate([w, np.ones(cross.size)])
    return values, w


def weighted_percentiles(values: np.ndarray, weights: np.ndarray, qs: Sequence[float]) -> list[float]:
    """Percentiles (0-100) of a weighted sample, inverted-CDF definition (NaN if empty)."""
    if len(values) == 0 or weights.sum() <= 0:
        return [float("nan")] * len(qs)
    order = np.argsort(values, kind="stable")
    v, cw = values[order], np.cumsum(weights[order])
    total = cw[-1]
    return [float(v[min(np.searchsorted(cw, q / 100.0 * total, side="left"), len(v) - 1)]) for q in qs]


def request_token_times_s(row: pd.Series, steps: pd.DataFrame) -> np.ndarray:
    """Every output token time of one request (seconds), from its `token_steps` runs and, if
    it moved between replicas, the replica of each run (`token_replicas`)."""
    runs = np.asarray(row["token_steps"], dtype=np.int64)
    moved = row.get("token_replicas")
    reps = [row["replica"]] * (len(runs) // 2) if moved is None else [int(x) for x in moved]
    ends = {}
    times = []
    for (a, b), rep in zip(zip(runs[0::2], runs[1::2]), reps):
        if rep not in ends:
            s = steps[steps["replica"] == rep].sort_values("step")
            ends[rep] = (s["start_s"] + s["duration_s"]).to_numpy()
        times.append(ends[rep][a: b + 1])
    return np.concatenate(times) if times else np.empty(0)


def request_tbt_s(row: pd.Series, steps: pd.DataFrame) -> np.ndarray:
    """Every token gap of one request (seconds)."""
    return np.diff(request_token_times_s(row, steps))


def _pcts(x: pd.Series | np.ndarray) -> dict[str, float]:
    x = np.asarray(x, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return {f"p{q}": float("nan") for q in PERCENTILES} | {"mean": float("nan")}
    vals = np.percentile(x, PERCENTILES)
    return {f"p{q}": float(v) for q, v in zip(PERCENTILES, vals)} | {"mean": float(x.mean())}


def summarize(requests: pd.DataFrame, steps: pd.DataFrame, qos: QoS | None = None) -> dict:
    """The run's headline numbers: outcomes, latency percentiles, throughput and, with `qos`
    (`sim.qos.QoS.from_config(slo)`), the one SLO judgement aggregated two ways: SLO
    attainment per tier (`slo_attainment`) and violation rates (`violations`), rejected
    requests counted apart from SLO misses in both. Percentiles of an empty set are NaN."""
    if qos is not None and not isinstance(qos, QoS):
        raise TypeError(f"summarize takes a sim.qos.QoS (QoS.from_config(slo)), not {type(qos).__name__}")
    fin = requests[requests["outcome"] == FINISHED]
    counts = requests["outcome"].value_counts().reindex(list(OUTCOMES), fill_value=0)
    reasons = requests.loc[requests["outcome"] == REJECTED, "reject_reason"].value_counts().to_dict()
    if len(fin):
        t0 = float(requests["arrival_s"].min())
        makespan = float(fin["finish_s"].max()) - t0
    else:
        makespan = float("nan")
    values, weights = tbt_samples(requests, steps)
    tbt = dict(zip((f"p{q}" for q in PERCENTILES), weighted_percentiles(values, weights, PERCENTILES)))
    tbt["mean"] = float(np.average(values, weights=weights)) if len(values) else float("nan")
    busy = float(steps["duration_s"].sum()) if len(steps) else 0.0
    return {
        "num_requests": int(len(requests)),
        "outcomes": {k: int(v) for k, v in counts.items()},
        "reject_reasons": {str(k): int(v) for k, v in reasons.items()},
        "ttft_s": _pcts(fin["ttft_s"]),
        "tbt_s": tbt,
        "tpot_s": _pcts(fin["tpot_s"]),
        "e2e_s": _pcts(fin["e2e_s"]),
        "throughput": {
            "makespan_s": makespan,
            "requests_per_s": len(fin) / makespan if makespan > 0 else float("nan"),
            "output_tokens_per_s": float(fin["num_output_tokens"].sum()) / makespan if makespan > 0 else float("nan"),
            "prompt_tokens_per_s": float(fin["num_prompt_tokens"].sum()) / makespan if makespan > 0 else float("nan"),
        },
        "steps": {
            "num_steps": int(len(steps)),
            "mean_batch_size": float(np.average(steps["batch_size"], weights=steps["duration_s"])) if busy > 0 else float("nan"),
            "busy_s": busy,
        },
        "num_preemptions": int(requests["num_preemptions"].sum()),
        **_slo(requests, steps, qos),
    }


def _slo(requests: pd.DataFrame, steps: pd.DataFrame, qos: QoS | None) -> dict:
    """`slo_attainment` and `violations` (rejected requests apart) from one `sim.qos.violations`."""
    if qos is None or not qos.tiers:
        return {"slo_attainment": {}, "violations": {}}
    v = violations(requests, qos, steps if needs_steps(qos) else None)
    return {"slo_attainment": attainment_from_violations(v, qos),
            "violations": rates_from_violations(v, qos, count_rejected=False)}
