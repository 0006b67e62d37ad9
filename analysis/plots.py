"""Plots over the request and step tables (matplotlib, saved as PNG beside the data)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from sim.request import FINISHED  # noqa: E402


def _cdf(ax, values: np.ndarray, label: str) -> None:
    v = np.sort(values[~np.isnan(values)])
    if v.size:
        ax.plot(v, np.arange(1, v.size + 1) / v.size, label=label, drawstyle="steps-post")


def latency_cdfs(runs: Mapping[str, pd.DataFrame], path: str | Path, title: str = "") -> Path:
    """TTFT and end-to-end latency CDFs of finished requests, one line per run label."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, req in runs.items():
        fin = req[req["outcome"] == FINISHED]
        _cdf(axes[0], fin["ttft_s"].to_numpy(float), label)
        _cdf(axes[1], fin["e2e_s"].to_numpy(float), label)
    for ax, name in zip(axes, ("time to first token (s)", "end-to-end latency (s)")):
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of finished requests")
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title or "Latency CDFs")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def timeseries(steps: pd.DataFrame, replicas: pd.DataFrame, path: str | Path, bin_s: float | None = None,
               title: str = "") -> Path:
    """Queue length, batch size and KV-cache use over time per replica (binned means)."""
    fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    if len(steps):
        t_end = float((steps["start_s"] + steps["duration_s"]).max())
        bin_s = bin_s or max(t_end / 300.0, 1e-3)
        blocks = dict(zip(replicas["replica"], replicas["num_kv_blocks"]))
        for rep, g in steps.groupby("replica"):
            b = (g["start_s"] // bin_s).astype(np.int64)
            agg = g.groupby(b).agg(num_waiting=("num_waiting", "mean"), batch_size=("batch_size", "mean"),
                                   kv=("kv_blocks_used", "mean"))
            t = agg.index.to_numpy() * bin_s
            axes[0].plot(t, agg["num_waiting"], lw=0.8, label=f"replica {rep}")
            axes[1].plot(t, agg["batch_size"], lw=0.8)
            axes[2].plot(t, 100.0 * agg["kv"] / blocks[rep], lw=0.8)
    axes[0].set_ylabel("waiting requests")
    axes[1].set_ylabel("batch size")
    axes[2].set_ylabel("KV blocks used (%)")
    axes[2].set_xlabel("simulated time (s)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    if len(steps) and steps["replica"].nunique() <= 16:
        axes[0].legend(fontsize=7, ncol=4, loc="upper right")
    fig.suptitle(title or "Replica state over time")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
