"""Reading and plotting QoS results: capacity searches, SLO attainment vs load, violations over time.

Pure functions over what `experiments.capacity` and `experiments.reproduce` write
(`capacity.json`, `requests_<label>.parquet`, `surge_timeseries.csv`); the notebook
`notebooks/slo_attainment.ipynb` only calls these. Each plot function takes an optional
path and returns the figure so notebooks can show it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from sim.errors import InputError  # noqa: E402
from sim.request import FINISHED  # noqa: E402


def load_capacity(path: str | Path) -> dict:
    """A capacity.json (the file, or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "capacity.json"
    if not path.exists():
        raise InputError("no capacity.json here: run `python -m experiments.capacity` first", path=path)
    return json.loads(path.read_text())


def attainment_table(capacity: Mapping) -> pd.DataFrame:
    """SLO attainment (1 - violation rate) per variant, rate and tier, long format:
    columns variant, qps, tier ('overall' or a tier name), attainment."""
    def attained(rate) -> float:  # capacity.json writes an undefined rate (no request judged) as null
        return float("nan") if rate is None else 1.0 - rate

    rows = []
    for label, res in capacity["variants"].items():
        for p in res["points"]:
            rows.append({"variant": label, "qps": p["qps"], "tier": "overall", "attainment": attained(p["overall"])})
            rows += [{"variant": label, "qps": p["qps"], "tier": t, "attainment": attained(r)}
                     for t, r in p["tiers"].items() if r is not None and r == r]
    return pd.DataFrame(rows).sort_values(["variant", "tier", "qps"]).reset_index(drop=True)


def capacity_table(capacity: Mapping) -> pd.DataFrame:
    """One row a variant: its capacity, status and the points evaluated."""
    return pd.DataFrame([{"variant": k, "capacity_qps": v["capacity_qps"], "status": v["status"],
                          "num_points": len(v["points"])} for k, v in capacity["variants"].items()])


def points_table(result: dict) -> pd.DataFrame:
    """Every evaluated point of a capacity.json as a tidy table (one row a variant and rate)."""
    rows = []
    for label, res in result["variants"].items():
        for p in res["points"]:
            row = {"variant": label, "qps": p["qps"], "violation": p["violation"], "score": p.get("score", p["violation"]),
                   "overall": p["overall"],
                   "max_tier": p["max_tier"], "num_requests": p["num_requests"], "num_relegated": p["num_relegated"],
                   "num_rejected": p.get("num_rejected", 0),
                   "drain_s": p["drain_s"], "wall_s": p["wall_s"]}
            row.update({f"violation_{t}": r for t, r in p["tiers"].items()})
            rows.append(row)
    return pd.DataFrame(rows).sort_values(["variant", "qps"]).reset_index(drop=True)


def plot_capacity(result: dict, path: str | Path) -> Path:
    """Violation rate (the search's rule) vs QPS, one line per variant, the threshold and each
    variant's capacity marked; with `max_drain_s`, a second panel shows the drain time."""
    table = points_table(result)
    max_drain = result["settings"].get("max_drain_s")
    fig, axes = plt.subplots(2 if max_drain else 1, 1, figsize=(8, 7 if max_drain else 4.5), sharex=True,
                             squeeze=False)
    ax = axes[0, 0]
    for i, label in enumerate(result["variants"]):
        g = table[table["variant"] == label]
        color = f"C{i % 10}"
        ax.plot(g["qps"], 100 * g["violation"], "o-", color=color, lw=1.2, ms=4,
                label=f"{label}: {result['capacity_qps'][label]:.2f} qps")
        for a in axes[:, 0]:
            a.axvline(result["capacity_qps"][label], color=color, ls=":", lw=0.8)
        if max_drain:
            axes[1, 0].plot(g["qps"], g["drain_s"], "o-", color=color, lw=1.2, ms=4)
    ax.axhline(100 * result["max_violation"], color="k", ls="--", lw=0.8, label=f"{100 * result['max_violation']:g}% threshold")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylim(0, 100)
    ax.set_ylabel(f"violating requests (%, {result['rule']})")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Capacity search: violation rate vs load")
    if max_drain:
        d = axes[1, 0]
        d.axhline(max_drain, color="k", ls="--", lw=0.8, label=f"sustainable: drain <= {max_drain:g} s")
        d.set_yscale("symlog", linthresh=10.0)
        d.set_ylim(bottom=0)
        d.set_ylabel("backlog drain after the last arrival (s)")
        d.legend(fontsize=8, loc="upper left")
    axes[-1, 0].set_xlabel("request rate (QPS)")
    for a in axes[:, 0]:
        a.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_attainment(table: pd.DataFrame, path: str | Path | None = None, target: float = 0.99):
    """SLO attainment vs QPS, one panel per tier (and overall), one line per variant."""
    tiers = ["overall"] + sorted(t for t in table["tier"].unique() if t != "overall")
    fig, axes = plt.subplots(1, len(tiers), figsize=(4.2 * len(tiers), 3.8), sharey=True, squeeze=False)
    for ax, tier in zip(axes[0], tiers):
        sel = table[table["tier"] == tier]
        for i, (label, g) in enumerate(sel.groupby("variant", sort=False)):
            ax.plot(g["qps"], 100 * g["attainment"], "o-", ms=3, lw=1.1, color=f"C{i % 10}", label=label)
        ax.axhline(100 * target, color="k", ls="--", lw=0.8)
        ax.set_title(tier)
        ax.set_xlabel("request rate (QPS)")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("requests meeting their SLO (%)")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    _save(fig, path)
    return fig


def plot_surge(series: pd.DataFrame, path: str | Path | None = None, schedule: Mapping | None = None,
               tiers: tuple[str, ...] = ("overall", "tier0")):
    """Rolling violation rate over time per variant (one panel per tier in `tiers` present),
    with the schedule's high-rate segments shaded."""
    tiers = tuple(t for t in tiers if t in set(series["tier"])) or ("overall",)
    fig, axes = plt.subplots(len(tiers), 1, figsize=(11, 3.2 * len(tiers)), sharex=True, squeeze=False)
    for ax, tier in zip(axes[:, 0], tiers):
        sel = series[series["tier"] == tier]
        for i, (label, g) in enumerate(sel.groupby("variant", sort=False)):
            ax.plot(g["time_s"] / 60.0, 100 * g["violation_rate"], lw=1.1, color=f"C{i % 10}", label=label)
        _shade_schedule(ax, schedule, float(series["time_s"].max()))
        ax.set_ylabel(f"{tier}: violating (%)")
        ax.set_ylim(-2, 102)
        ax.grid(True, alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="upper left", ncol=3)
    axes[-1, 0].set_xlabel("arrival time (min)")
    fig.suptitle("Violations over time (rolling window by arrival time; shaded: high-rate periods)")
    fig.tight_layout()
    _save(fig, path)
    return fig


def _shade_schedule(ax, schedule: Mapping | None, end_s: float) -> None:
    if not schedule or not schedule.get("schedule"):
        return
    segments = [(float(d), float(r)) for d, r in schedule["schedule"]]
    top = max(r for _, r in segments)
    t = 0.0
    while t < end_s:
        for d, r in segments:
            if r == top and len({r for _, r in segments}) > 1:
                ax.axvspan(t / 60.0, min(t + d, end_s) / 60.0, color="0.9", zorder=0)
            t += d
        if not schedule.get("repeat"):
            break


def load_requests(directory: str | Path) -> dict[str, pd.DataFrame]:
    """Every requests_<label>.parquet in `directory`, by label."""
    directory = Path(directory)
    return {p.stem[len("requests_"):]: pd.read_parquet(p) for p in sorted(directory.glob("requests_*.parquet"))}


def plot_tier_cdfs(tables: Mapping[str, pd.DataFrame], path: str | Path | None = None,
                   metrics: Mapping[str, str] | None = None):
    """Latency CDFs of finished requests per tier, one line per variant: by default TTFT for
    tier0 and end-to-end latency for the other tiers (the metric each tier is judged on)."""
    classes = sorted({c for t in tables.values() for c in t["qos_class"].unique()})
    metrics = dict(metrics or {})
    fig, axes = plt.subplots(1, len(classes), figsize=(4.2 * len(classes), 3.6), squeeze=False)
    for ax, cls in zip(axes[0], classes):
        metric = metrics.get(cls, "ttft_s" if cls in ("tier0", "interactive") else "e2e_s")
        for i, (label, table) in enumerate(tables.items()):
            sel = table[(table["qos_class"] == cls) & (table["outcome"] == FINISHED)]
            v = np.sort(sel[metric].to_numpy(dtype=float))
            v = v[~np.isnan(v)]
            if v.size:
                ax.plot(v, np.arange(1, v.size + 1) / v.size, drawstyle="steps-post", color=f"C{i % 10}", label=label)
        ax.set_xscale("log")
        ax.set_title(f"{cls}: {metric}")
        ax.set_xlabel("seconds")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("fraction of finished requests")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _save(fig, path)
    return fig


def _save(fig, path: str | Path | None) -> None:
    if path is not None:
        fig.savefig(Path(path), dpi=120)


def find_results(root: str | Path | None = None, env_var: str = "SLOSIM_RESULTS") -> Path:
    """The results directory to read: `root`, else $SLOSIM_RESULTS, else the newest folder
    under outputs/reproduce/ (relative to the project root)."""
    import os

    from sim.paths import PROJECT_ROOT

    candidate = root or os.environ.get(env_var)
    if candidate:
        path = Path(candidate)
        if not path.is_dir():
            raise InputError("not a directory", path=path, field=env_var)
        return path
    runs = sorted((PROJECT_ROOT / "outputs" / "reproduce").glob("*/"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise InputError("no results found: run `python -m experiments.reproduce` (or set $SLOSIM_RESULTS)",
                         path=PROJECT_ROOT / "outputs" / "reproduce")
    return runs[-1]


def find_parts(root: str | Path) -> dict[str, list[Path]]:
    """Folders under `root` (or `root` itself) holding capacity.json and surge_timeseries.csv."""
    root = Path(root)
    return {"capacity": sorted(p.parent for p in root.glob("**/capacity.json")),
            "surge": sorted(p.parent for p in root.glob("**/surge_timeseries.csv"))}


def load_surge(directory: str | Path) -> tuple[pd.DataFrame, dict]:
    """A surge run's rolling violation rates (long format) and its surge.json."""
    directory = Path(directory)
    return pd.read_csv(directory / "surge_timeseries.csv"), json.loads((directory / "surge.json").read_text())


def surge_table(surge: Mapping) -> pd.DataFrame:
    """Total violation rates per variant (overall, per tier) and relegations, in percent."""
    def percent(rate) -> float:  # surge.json writes an undefined rate (no request in a tier) as null
        return float("nan") if rate is None else 100 * rate

    rows = []
    for label, v in surge["variants"].items():
        row = {"variant": label, "overall_%": percent(v["overall"])}
        row.update({f"{t}_%": percent(r) for t, r in v["tiers"].items()})
        row["relegated"] = v["num_relegated"]
        rows.append(row)
    return pd.DataFrame(rows).set_index("variant").round(2)
