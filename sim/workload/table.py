"""The workload table: what arrives at the cluster, one row per request in arrival order.

A `Workload` is the simulator's only view of traffic. Generators (`synthetic`) and trace
loaders (`from_trace`) both produce it; the table's schema is a contract other modules
code against, so it is checked on construction.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from sim.errors import InputError

COLUMNS: tuple[str, ...] = (
    "request_id",
    "arrival_s",
    "num_prompt_tokens",
    "num_output_tokens",
    "model",
    "qos_class",
)
"""Columns of `Workload.requests`, in order."""

DEFAULT_QOS_CLASS = "default"
"""QoS class of a request when neither the source nor `qos_shares` gives one."""


def make_requests(
    arrival_s: np.ndarray,
    num_prompt_tokens: np.ndarray,
    num_output_tokens: np.ndarray,
    model: np.ndarray | str,
    qos_class: np.ndarray | str,
) -> pd.DataFrame:
    """A request table with the contract's columns and dtypes (request_id numbered 0..n-1)."""
    n = len(arrival_s)
    text_model = np.full(n, model, dtype=object) if isinstance(model, str) else model
    text_qos = np.full(n, qos_class, dtype=object) if isinstance(qos_class, str) else qos_class
    return pd.DataFrame(
        {
            "request_id": np.arange(n, dtype=np.int64),
            "arrival_s": np.asarray(arrival_s, dtype=np.float64),
            "num_prompt_tokens": np.asarray(num_prompt_tokens, dtype=np.int64),
            "num_output_tokens": np.asarray(num_output_tokens, dtype=np.int64),
            "model": pd.Series(text_model, dtype=object).astype(str),
            "qos_class": pd.Series(text_qos, dtype=object).astype(str),
        }
    )


def _is_text(column: pd.Series) -> bool:
    return pd.api.types.is_string_dtype(column.dtype) and not column.isna().any()


@dataclass(frozen=True, eq=False)
class Workload:
    """Requests in arrival order.

    Invariant: `requests` has exactly `COLUMNS` (int64 ids 0..n-1, float64 non-decreasing
    `arrival_s` starting at >= 0, int64 token counts >= 1, text `model` and `qos_class`).
    """

    requests: pd.DataFrame
    """One row per request, in arrival order (see `COLUMNS`)."""
    source: str
    """Human-readable origin, e.g. "azure:/path/trace.csv" or "synthetic(poisson, 2.0 qps, seed=0)"."""
    num_filtered: dict[str, int] = field(default_factory=dict)
    """Rows of the source left out, by reason (e.g. {"after_window": 3}); empty if none."""
    num_adjusted: dict[str, int] = field(default_factory=dict)
    """Requests kept but changed, by reason (e.g. {"redrawn_over_max_total_tokens": 21}: lengths
    drawn again to fit the model's context); empty if none."""
    source_path: str | None = None
    """The file the requests were read from (None for generated ones)."""
    source_lines: np.ndarray | None = None
    """1-based line of `source_path` each request came from (None for generated ones)."""

    def __post_init__(self) -> None:
        df = self.requests
        if not isinstance(df, pd.DataFrame):
            raise InputError("must be a pandas DataFrame", field="requests", value=type(df).__name__)
        if tuple(df.columns) != COLUMNS:
            raise InputError(f"columns must be exactly {list(COLUMNS)}", field="requests", value=list(df.columns))
        for name in ("request_id", "num_prompt_tokens", "num_output_tokens"):
            if df[name].dtype != np.int64:
                raise InputError("must have dtype int64", field=name, value=str(df[name].dtype))
        if df["arrival_s"].dtype != np.float64:
            raise InputError("must have dtype float64", field="arrival_s", value=str(df["arrival_s"].dtype))
        for name in ("model", "qos_class"):
            if not _is_text(df[name]):
                raise InputError("must hold text with no missing values", field=name, value=str(df[name].dtype))
        ids = df["request_id"].to_numpy()
        if not np.array_equal(ids, np.arange(len(df))):
            raise InputError("must number the rows 0..n-1 in order", field="request_id")
        arrival = df["arrival_s"].to_numpy()
        if len(arrival):
            if not np.isfinite(arrival).all() or arrival[0] < 0:
                raise InputError("must be finite and start at >= 0", field="arrival_s", value=float(arrival[0]))
            if (np.diff(arrival) < 0).any():
                i = int(np.argmax(np.diff(arrival) < 0)) + 1
                raise InputError(f"must be non-decreasing (request {i})", field="arrival_s", value=float(arrival[i]))
        for name in ("num_prompt_tokens", "num_output_tokens"):
            values = df[name].to_numpy()
            if len(values) and values.min() < 1:
                raise InputError("must be >= 1", field=name, value=int(values.min()))
        for name in ("num_filtered", "num_adjusted"):
            for reason, count in getattr(self, name).items():
                if not isinstance(reason, str) or int(count) != count or count < 0:
                    raise InputError("must map reason -> non-negative count", field=name, value=(reason, count))
        if self.source_lines is not None and len(self.source_lines) != len(df):
            raise InputError("must give one line per request", field="source_lines", value=len(self.source_lines))

    def check_qos_classes(self, known: Collection[str]) -> None:
        """Raise `InputError` if a request's `qos_class` is not in `known` (the classes that have
        objectives), naming the class, how many requests have it, the known classes and, for a
        trace, the file and the first line with it. An empty `known` accepts every class."""
        if not known:
            return
        classes = self.requests["qos_class"].to_numpy()
        unknown = ~np.isin(classes, np.array(sorted(known), dtype=object))
        if not unknown.any():
            return
        row = int(np.argmax(unknown))
        name = str(classes[row])
        count = int((classes == name).sum())
        problem = (f"QoS class {name!r} ({count} request(s)) has no objectives in the slo config; known classes: "
                   f"{sorted(known)} (add it under slo.classes, or change the workload's classes)")
        if self.source_path is not None and self.source_lines is not None:
            raise InputError(problem, path=self.source_path, line=int(self.source_lines[row]), field="qos_class",
                             value=name)
        raise InputError(problem, field="workload.qos_shares", value=name)

    @property
    def num_requests(self) -> int:
        """Rows in the table."""
        return len(self.requests)

    def summary(self) -> dict:
        """Counts, duration, mean rate, length percentiles, filtered and adjusted counts (JSON-ready)."""
        df = self.requests
        n = len(df)
        arrival = df["arrival_s"].to_numpy()
        span_s = float(arrival[-1] - arrival[0]) if n else 0.0
        return {
            "source": self.source,
            "num_requests": n,
            "first_arrival_s": float(arrival[0]) if n else None,
            "duration_s": span_s,
            # same definition as from_trace(target_qps=...): (n - 1) gaps over the span
            "mean_qps": (n - 1) / span_s if span_s > 0 else None,
            "num_prompt_tokens": _percentiles(df["num_prompt_tokens"].to_numpy()),
            "num_output_tokens": _percentiles(df["num_output_tokens"].to_numpy()),
            "num_requests_by_qos_class": {str(k): int(v) for k, v in df["qos_class"].value_counts(sort=False).items()},
            "num_requests_by_model": {str(k): int(v) for k, v in df["model"].value_counts(sort=False).items()},
            "num_filtered": {str(k): int(v) for k, v in self.num_filtered.items()},
            "num_adjusted": {str(k): int(v) for k, v in self.num_adjusted.items()},
        }


def _percentiles(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "mean": float(values.mean()),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": int(values.max()),
    }
