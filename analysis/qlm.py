"""QLM reproduction: tables and plots over what `experiments.reproduce_qlm` measures.

Pure functions over tidy tables: the points table (one row per policy and load: SLO
attainment per class, throughput, swaps), rolling attainment over time, and the waiting-time
estimator's predictions joined to the simulated truth (MAPE by queue position, quantile
calibration). Plot functions take an optional path and return the figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from sim.errors import InputError  # noqa: E402

POSITION_BINS: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32, 64)
"""Lower edges of the queue-position buckets MAPE is reported by (position 0 = head of the
virtual queue; the last bucket is open)."""

QUANTILES: tuple[str, ...] = ("p10_s", "p50_s", "p90_s")
"""Quantile columns a statistical estimator's predictions carry."""


# ---------------------------------------------------------------- the estimator against the truth


def wait_errors(predictions: pd.DataFrame, requests: pd.DataFrame) -> pd.DataFrame:
    """Each prediction with its actual wait: `actual_wait_s` = the request's `first_scheduled_s`
    (request table) - the prediction's `time_s`. Predictions of requests never scheduled (NaN
    first_scheduled_s) are dropped. `predictions` has columns request_id, time_s,
    queue_position, predicted_wait_s (+ p10_s, p50_s, p90_s); InputError when one is missing."""
    need = {"request_id", "time_s", "queue_position", "predicted_wait_s"}
    missing = sorted(need - set(predictions.columns))
    if missing:
        raise InputError(f"wait predictions lack column(s) {missing}", field="wait_predictions")
    first = requests.set_index("request_id")["first_scheduled_s"]
    out = predictions.copy()
    out["actual_wait_s"] = first.reindex(out["request_id"]).to_numpy() - out["time_s"].to_numpy()
    return out[np.isfinite(out["actual_wait_s"])].reset_index(drop=True)


def mape_by_position(errors: pd.DataFrame, bins: Sequence[int] = POSITION_BINS, *,
                     min_actual_s: float = 1.0) -> pd.DataFrame:
    """Mean absolute percentage error of `predicted_wait_s` per queue-position bucket:
    mean(|predicted - actual| / actual) over predictions whose actual wait is at least
    `min_actual_s` (a percentage of a near-zero wait is meaningless; the count left out is
    reported). Columns: position (e.g. "4-7", "64+"), num_predictions, num_short, mape,
    median_ape, mean_actual_s, mean_predicted_s."""
    pos = errors["queue_position"].to_numpy()
    rows = []
    for i, lo in enumerate(bins):
        hi = bins[i + 1] if i + 1 < len(bins) else None
        sel = (pos >= lo) & (pos < hi if hi is not None else True)
        g = errors[sel]
        long = g[g["actual_wait_s"] >= min_actual_s]
        ape = (long["predicted_wait_s"] - long["actual_wait_s"]).abs() / long["actual_wait_s"]
        label = f"{lo}+" if hi is None else (str(lo) if hi == lo + 1 else f"{lo}-{hi - 1}")
        rows.append({"position": label, "num_predictions": int(len(g)), "num_short": int(len(g) - len(long)),
                     "mape": float(ape.mean()) if len(ape) else float("nan"),
                     "median_ape": float(ape.median()) if len(ape) else float("nan"),
                     "mean_actual_s": float(long["actual_wait_s"].mean()) if len(long) else float("nan"),
                     "mean_predicted_s": float(long["predicted_wait_s"].mean()) if len(long) else float("nan")})
    return pd.DataFrame(rows)


def quantile_calibration(errors: pd.DataFrame) -> dict[str, float]:
    """For a statistical estimator: the share of actual waits at or below each predicted
    quantile (a calibrated p90 covers 90%). {} when the predictions carry no quantiles."""
    out = {}
    for q in QUANTILES:
        if q in errors and errors[q].notna().any():
            sel = errors[q].notna()
            out[q] = float((errors.loc[sel, "actual_wait_s"] <= errors.loc[sel, q]).mean())
    return out


# ---------------------------------------------------------------- plots


def plot_attainment_vs_load(points: pd.DataFrame, path: str | Path | None = None, *, title: str = ""):
    """SLO attainment per class (one panel each) against load, one line per policy. `points`
    has columns variant, load, and `attainment_<class>` for each class."""
    classes = [c.removeprefix("attainment_") for c in points.columns if c.startswith("attainment_")]
    fig, axes = plt.subplots(1, max(1, len(classes)), figsize=(5 * max(1, len(classes)), 3.8), squeeze=False)
    for ax, cls in zip(axes[0], classes):
        for variant, g in points.groupby("variant", sort=False):
            g = g.sort_values("load")
            ax.plot(g["load"], 100 * g[f"attainment_{cls}"], marker="o", label=variant)
        ax.set_title(f"{cls}")
        ax.set_xlabel("load (x base rate)")
        ax.set_ylabel("SLO attainment (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_attainment_over_time(series: pd.DataFrame, path: str | Path | None = None, *,
                              arrivals: Mapping[str, np.ndarray] | None = None, title: str = ""):
    """Rolling SLO attainment (1 - violation rate, by arrival time) per policy, one panel per
    tier ('overall' first). `series` is `sim.qos.violation_timeseries` output with a `variant`
    column. `arrivals` (optional, one array of arrival times) adds the arrival rate below."""
    tiers = list(dict.fromkeys(series["tier"]))
    rows = len(tiers) + (1 if arrivals else 0)
    fig, axes = plt.subplots(rows, 1, figsize=(9, 2.4 * rows), sharex=True, squeeze=False)
    for ax, tier in zip(axes[:, 0], tiers):
        for variant, g in series[series["tier"] == tier].groupby("variant", sort=False):
            ax.plot(g["time_s"] / 60, 100 * (1 - g["violation_rate"]), label=variant)
        ax.set_ylabel(f"{tier}\nattainment (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=3)
    if arrivals:
        ax = axes[-1, 0]
        for name, t in arrivals.items():
            edges = np.arange(0, float(np.max(t)) + 60, 60)
            counts, _ = np.histogram(t, bins=edges)
            ax.step(edges[:-1] / 60, counts / 60, where="post", label=name)
        ax.set_ylabel("arrivals (req/s)")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("arrival time (min)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_wait_estimates(errors: Mapping[str, pd.DataFrame], path: str | Path | None = None, *, title: str = ""):
    """Predicted vs actual wait (log-log scatter, one colour per estimator) and MAPE by queue
    position (right panel)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    top = 1.0
    for name, e in errors.items():
        if e.empty:
            continue
        sample = e.sample(min(len(e), 3000), random_state=0)
        left.scatter(sample["actual_wait_s"].clip(lower=0.01), sample["predicted_wait_s"].clip(lower=0.01),
                     s=4, alpha=0.4, label=name)
        top = max(top, float(e["actual_wait_s"].max()), float(e["predicted_wait_s"].max()))
        m = mape_by_position(e)
        right.plot(m["position"], 100 * m["mape"], marker="o", label=name)
    left.plot([0.01, top], [0.01, top], color="k", lw=0.8)
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("actual wait (s)")
    left.set_ylabel("predicted wait (s)")
    left.legend(fontsize=8)
    right.set_xlabel("queue position")
    right.set_ylabel("MAPE (%), actual wait >= 1 s")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
