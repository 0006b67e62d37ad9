"""Reading and plotting fleet plans: the ranked table, every candidate's fate, the Pareto plot.

Pure functions over what `experiments.plan` writes (`plan.json`, `winner_requests.parquet`);
`notebooks/fleet_planning.ipynb` only calls these. Plot functions take an optional path and
return the figure.
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


def load_plan(path: str | Path) -> dict:
    """A plan.json (the file, or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "plan.json"
    if not path.exists():
        raise InputError("no plan.json here: run `python -m experiments.plan` first", path=path)
    return json.loads(path.read_text())


def find_plan(env: str = "SLOSIM_PLAN") -> Path:
    """The plan folder: `$SLOSIM_PLAN`, else the newest `outputs/**/plan.json`'s folder."""
    import os

    from sim.paths import PROJECT_ROOT

    if os.environ.get(env):
        return Path(os.environ[env])
    found = sorted(PROJECT_ROOT.glob("outputs/**/plan.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise InputError(f"no plan found: run `python -m experiments.plan` or set {env}", field=env)
    return found[-1].parent


def interval_table(plan: Mapping) -> pd.DataFrame:
    """Long format, one row per verified fleet and class: cost, mean attainment, the interval
    (low, high) at the plan's confidence, the target, P(meet) and whether it qualifies."""
    rows = []
    for r in plan.get("ranked", []):
        for cls, a in sorted(r["attainment"].items()):
            rows.append({"configuration": r["label"], "replicas": "+".join(map(str, r["replicas"])), "class": cls,
                         "usd_per_hour": r["cost_per_hour"], "attainment": a["mean"], "low": a["low"],
                         "high": a["high"], "target": a.get("target"), "p_meet": r["p_meet"], "meets": r["meets"]})
    return pd.DataFrame(rows)


def ranked_table(plan: Mapping) -> pd.DataFrame:
    """One row per verified candidate, cheapest qualifying first: configuration, replicas, GPUs,
    USD/hour, USD per million output tokens, P(meet), each class's attainment (mean and the
    interval at the plan's confidence), P50/P99 TTFT, P50 TPOT, P50/P99 end-to-end (s)."""
    rows = []
    for r in plan.get("ranked", []):
        row = {"configuration": r["label"], "meets": r["meets"], "replicas": "+".join(map(str, r["replicas"])),
               "gpus": r["gpus"], "usd_per_hour": r["cost_per_hour"],
               "usd_per_m_output_tokens": r["usd_per_million_output_tokens"], "p_meet": r["p_meet"]}
        for cls, a in sorted(r["attainment"].items()):
            row[f"{cls}_attainment"] = a["mean"]
            row[f"{cls}_attainment_low"] = a["low"]
            row[f"{cls}_attainment_high"] = a["high"]
        for cls, s in sorted(r["stats"].get("classes", {}).items()):
            for key in ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "e2e_p50_s", "e2e_p99_s"):
                row[f"{cls}_{key}"] = s.get(key)
        rows.append(row)
    return pd.DataFrame(rows)


def candidates_table(plan: Mapping) -> pd.DataFrame:
    """Every candidate: its status (verified, infeasible, pruned_bound, pruned_dominated,
    not_verified, no_capacity), why, per-pool capacity (req/s per replica) and the estimate."""
    rows = [{"configuration": c["label"], "status": c["status"], "reason": c["reason"],
             "capacity_qps": ";".join(f"{x:.3f}" for x in c["capacity_qps"]),
             "estimate": "+".join(map(str, c["estimate"])) if c["estimate"] else "",
             "usd_per_hour_estimate": c["cost_per_hour_estimate"], "headroom": c["headroom"]}
            for c in plan.get("candidates", [])]
    return pd.DataFrame(rows)


def plot_pareto(plan: Mapping, path: str | Path | None = None):
    """Cost (USD/hour) vs the worst class's attainment (mean, with the interval as error bars)
    and vs the worst class's P99 TTFT, one point per verified fleet evaluated (every replica
    count tried), the winner circled; the target drawn as a line."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    targets = plan.get("settings", {}).get("targets", {})
    prices = plan.get("prices_per_gpu_hour", {})
    for r in plan.get("ranked", []):
        att = r["attainment"]
        worst = min(att, key=lambda k: att[k]["mean"] - (targets.get(k) or 0)) if att else None
        if worst is None:
            continue
        a = att[worst]
        pools = r["candidate"]["pools"]
        cost = r["cost_per_hour"]
        ax1.errorbar([cost], [a["mean"]], yerr=[[a["mean"] - a["low"]], [a["high"] - a["mean"]]], fmt="o",
                     capsize=3, label=f"{r['label']} x{'+'.join(map(str, r['replicas']))}")
        for e in r.get("evaluated", []):
            c = sum(n * p["tp"] * prices.get(p["hardware"], np.nan) for n, p in zip(e["replicas"], pools))
            ax1.scatter([c], [e["p_meet"]], marker="x", color="gray", s=20)
        p99 = [s.get("ttft_p99_s") for s in r["stats"].get("classes", {}).values() if s.get("ttft_p99_s") is not None]
        if p99:
            ax2.scatter([cost], [max(p99)], s=40)
            ax2.annotate(r["label"].split("/", 1)[-1], (cost, max(p99)), fontsize=7)
    w = plan.get("winner")
    if w:
        worst = min(w["attainment"].values(), key=lambda a: a["mean"])
        ax1.scatter([w["cost_per_hour"]], [worst["mean"]], s=250, facecolors="none", edgecolors="red", label="winner")
    for t in set(targets.values()):
        ax1.axhline(t, color="red", lw=0.8, ls="--")
    ax1.set_xlabel("USD per hour")
    ax1.set_ylabel("worst class attainment (o, interval) / P(meet) (x)")
    ax1.legend(fontsize=7, loc="lower right")
    ax2.set_xlabel("USD per hour")
    ax2.set_ylabel("P99 TTFT of the slowest class (s)")
    fig.suptitle(f"Fleet plan at {plan.get('rate_qps', float('nan')):g} req/s: cost vs attainment")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def plot_class_cdfs(requests: pd.DataFrame, path: str | Path | None = None, title: str = ""):
    """CDFs of TTFT, TPOT and end-to-end latency per QoS class (finished requests)."""
    fin = requests[requests["outcome"] == "finished"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, metric in zip(axes, ("ttft_s", "tpot_s", "e2e_s")):
        for cls, g in fin.groupby("qos_class"):
            x = np.sort(g[metric].dropna().to_numpy())
            if len(x):
                ax.plot(x, np.arange(1, len(x) + 1) / len(x), label=str(cls))
        ax.set_xscale("log")
        ax.set_xlabel(metric)
        ax.set_ylabel("CDF")
        ax.legend(fontsize=8)
    fig.suptitle(title or "Winner's latency CDFs per class")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
