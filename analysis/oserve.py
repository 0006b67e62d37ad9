"""Summaries of OServe reproduction runs: latency, throughput and SLO attainment per deployment
strategy from a request table, the switches a controller made, and the Markdown tables of
docs/reproduction_oserve.md. Pure functions over tables and dicts."""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import pandas as pd


def summarize(requests: pd.DataFrame, ttft_s: float, tpot_s: float) -> dict:
    """Per-run figures from a request table (sim.metrics columns): P50/P99 end-to-end latency and
    P99 TTFT of finished requests (s), throughput and goodput (finished / SLO-meeting requests per
    second over first arrival .. last finish), and SLO attainment (share of *all* requests that
    finished with TTFT <= ttft_s and TPOT <= tpot_s; a single-token request has no TPOT)."""
    r = requests
    fin = r[r["outcome"] == "finished"]
    e2e = (fin["finish_s"] - fin["arrival_s"]).to_numpy()
    ttft = (fin["first_token_s"] - fin["arrival_s"]).to_numpy()
    gaps = (fin["num_output_tokens"] - 1).to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        tpot = np.where(gaps > 0, (fin["finish_s"] - fin["first_token_s"]).to_numpy() / np.maximum(gaps, 1), 0.0)
    met = (ttft <= ttft_s) & (tpot <= tpot_s)
    span = float(fin["finish_s"].max() - r["arrival_s"].min()) if len(fin) else float("nan")

    def pct(x, q):
        return float(np.percentile(x, q)) if len(x) else float("nan")

    return {"num_requests": int(len(r)), "num_finished": int(len(fin)),
            "p50_e2e_s": pct(e2e, 50), "p99_e2e_s": pct(e2e, 99), "mean_e2e_s": float(e2e.mean()) if len(e2e) else math.nan,
            "p99_ttft_s": pct(ttft, 99), "throughput_rps": len(fin) / span if span > 0 else math.nan,
            "goodput_rps": float(met.sum()) / span if span > 0 else math.nan,
            "slo_attainment": float(met.sum()) / max(len(r), 1)}


def switches(decisions: list[dict], replicas: pd.DataFrame) -> dict:
    """Switches of an OServe controller: how many, and their cost: wall time from the decision to
    every new replica serving, and GPU-seconds out of service (GPUs of drained replicas from the
    decision until the new replicas serve)."""
    made = [d for d in decisions if d.get("switched")]
    done = [d for d in decisions if d.get("switch_done")]
    rows = []
    for m, d in zip(made, done):
        gpus = sum(m["current"]) - _kept_gpus(m["current"], m["best"])  # GPUs of the drained replicas
        rows.append({"time_s": m["time_s"], "from": m["current"], "to": m["best"], "took_s": d["took_s"],
                     "estimated_s": d["estimated_s"], "gpus_switched": gpus, "gpu_s_offline": gpus * d["took_s"],
                     "gain_requests": m["gain_requests"], "cost_requests": m["cost_requests"]})
    return {"num_switches": len(made), "num_completed": len(done),
            "total_switch_s": float(sum(r["took_s"] for r in rows)),
            "total_gpu_s_offline": float(sum(r["gpu_s_offline"] for r in rows)), "switches": rows,
            "num_replicas_started": int(len(replicas))}


def _kept_gpus(cur, new) -> int:
    left = list(new)
    kept = 0
    for k in cur:
        if k in left:
            left.remove(k)
            kept += k
    return kept


def ratios(results: Mapping[str, dict], base: str = "vllm_dp") -> dict:
    """Per strategy: P99 e2e speed-up over `base` (base P99 / its P99) and goodput ratio."""
    b = results.get(base)
    if b is None:
        return {}
    out = {}
    for name, r in results.items():
        out[name] = {"p99_e2e_speedup": b["p99_e2e_s"] / r["p99_e2e_s"] if r["p99_e2e_s"] > 0 else math.nan,
                     "goodput_ratio": r["goodput_rps"] / b["goodput_rps"] if b["goodput_rps"] > 0 else math.nan,
                     "throughput_ratio": r["throughput_rps"] / b["throughput_rps"] if b["throughput_rps"] > 0 else math.nan}
    return out


def markdown(summary: dict) -> str:
    """The result tables (one per scenario and workload) as Markdown."""
    lines = []
    for key, sc in summary["scenarios"].items():
        lines += [f"### {key}", "", f"offered load: {sc['offered_rps']:.2f} req/s (x{sc['speed']:.2f} the trace's "
                  f"rate); planner capacity factor of vLLM-DP {sc['planned']['vllm_dp']['load_factor']:.2f}", "",
                  "| strategy | deployment | P99 e2e (s) | P50 e2e (s) | P99 TTFT (s) | throughput (req/s) | "
                  "goodput (req/s) | SLO attainment | P99 speed-up vs vLLM | goodput vs vLLM | switches | "
                  "switch time (s) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in sc["results"].items():
            ra = sc["ratios"].get(name, {})
            sw = r.get("switches") or {}
            dep = "+".join(f"tp{k}" for k in sc["planned"][name]["deployment"])
            lines.append(f"| {name} | {dep} | {r['p99_e2e_s']:.2f} | {r['p50_e2e_s']:.2f} | {r['p99_ttft_s']:.2f} | "
                         f"{r['throughput_rps']:.2f} | {r['goodput_rps']:.2f} | {100 * r['slo_attainment']:.1f}% | "
                         f"{ra.get('p99_e2e_speedup', math.nan):.2f}x | {ra.get('goodput_ratio', math.nan):.2f}x | "
                         f"{sw.get('num_switches', 0)} | {sw.get('total_switch_s', 0.0):.1f} |")
        lines.append("")
    return "\n".join(lines)


def _geomean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x) and x > 0]
    return float(np.exp(np.mean(np.log(xs)))) if xs else math.nan


def claim(summary: dict, paper: dict) -> dict:
    """Each strategy vs vLLM-DP over every scenario: geometric mean and best of the P99 e2e
    speed-up and of the goodput ratio (scenarios where vLLM-DP's goodput is 0 have no finite
    ratio and are counted apart)."""
    out: dict = {"paper": dict(paper)}
    for name in ("best_homogeneous", "best_static_heterogeneous", "oserve"):
        sp = [sc["ratios"][name]["p99_e2e_speedup"] for sc in summary["scenarios"].values() if name in sc["ratios"]]
        gp = [sc["ratios"][name]["goodput_ratio"] for sc in summary["scenarios"].values() if name in sc["ratios"]]
        fin = [g for g in gp if g is not None and math.isfinite(g)]  # NaN is null in the JSON
        sp = [x for x in sp if x is not None]
        out[name] = {"p99_speedup_geomean": _geomean(sp), "p99_speedup_max": max(sp) if sp else math.nan,
                     "p99_speedup_min": min(sp) if sp else math.nan,
                     "goodput_ratio_geomean": _geomean(fin), "goodput_ratio_max": max(fin) if fin else math.nan,
                     "num_scenarios": len(sp), "num_without_finite_goodput_ratio": len(gp) - len(fin)}
    vs_homo = [sc["results"]["best_homogeneous"]["p99_e2e_s"] / sc["results"]["oserve"]["p99_e2e_s"]
               for sc in summary["scenarios"].values()
               if {"oserve", "best_homogeneous"} <= set(sc["results"]) and sc["results"]["oserve"]["p99_e2e_s"] > 0]
    out["oserve_vs_best_homogeneous_p99_speedup_geomean"] = _geomean(vs_homo)
    return out


def claim_text(c: dict) -> str:
    o = c["oserve"]
    return (f"OServe vs vLLM-DP over {o['num_scenarios']} scenario-workloads: P99 e2e speed-up "
            f"{o['p99_speedup_geomean']:.2f}x geometric mean ({o['p99_speedup_min']:.2f}x-{o['p99_speedup_max']:.2f}x); "
            f"goodput {o['goodput_ratio_geomean']:.2f}x geometric mean where finite ({o['num_without_finite_goodput_ratio']} "
            f"with vLLM-DP goodput 0). OServe vs the best homogeneous split: P99 speed-up "
            f"{c['oserve_vs_best_homogeneous_p99_speedup_geomean']:.2f}x geometric mean. "
            f"Paper: {c['paper']['average']}x average, up to {c['paper']['up_to']}x.\n")
