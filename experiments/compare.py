"""Live versus simulated: the same requests measured on a real engine and predicted by slosim.

Both sides are request tables in `sim.metrics`' schema. For TTFT, TBT (every gap between
consecutive tokens, pooled over requests), TPOT and end-to-end latency we take P50/P90/P99
of finished requests on each side and the signed relative error `(sim - live) / live`;
then throughput, the time-averaged number of running requests (mean batch size), engine
steps, and the per-request correlation of end-to-end latency. Plots overlay the CDFs and
show latency and queue state over time.
"""

from __future__ import annotations

import math
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

from sim.metrics import tbt_samples, weighted_percentiles  # noqa: E402
from sim.request import FINISHED  # noqa: E402

METRICS = ("ttft", "tbt", "tpot", "e2e")
PERCENTILES = (50, 90, 99)


def live_tbt_samples(requests: pd.DataFrame) -> np.ndarray:
    """Every gap between consecutive client token times of finished live requests."""
    fin = requests[requests["outcome"] == FINISHED]
    gaps = [np.diff(np.asarray(t, dtype=float)) for t in fin["token_times_s"] if len(t) > 1]
    return np.concatenate(gaps) if gaps else np.empty(0)


def metric_samples(requests: pd.DataFrame, metric: str, steps: pd.DataFrame | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(values, weights) of a latency metric over finished requests. TBT comes from per-token
    client times (live, `token_times_s`) or from the step table (simulated, `steps`)."""
    if metric == "tbt":
        if "token_times_s" in requests.columns:
            v = live_tbt_samples(requests)
            return v, np.ones_like(v)
        if steps is None:
            raise ValueError("simulated TBT needs the step table")
        return tbt_samples(requests, steps)
    v = requests.loc[requests["outcome"] == FINISHED, f"{metric}_s"].to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    return v, np.ones_like(v)


def percentiles(requests: pd.DataFrame, metric: str, steps: pd.DataFrame | None = None) -> dict[int, float]:
    """P50/P90/P99 with one definition on both sides (inverted CDF over the weighted sample)."""
    v, w = metric_samples(requests, metric, steps)
    return dict(zip(PERCENTILES, weighted_percentiles(v, w, PERCENTILES)))


def rel_error(live: float, sim: float) -> float:
    """Signed relative error of the simulation, (sim - live) / live."""
    if not (math.isfinite(live) and math.isfinite(sim)) or live == 0:
        return math.nan
    return (sim - live) / live


def throughput(requests: pd.DataFrame) -> dict[str, float]:
    """Finished requests and output tokens per second, first arrival to last finish."""
    fin = requests[requests["outcome"] == FINISHED]
    if fin.empty:
        return {"makespan_s": math.nan, "requests_per_s": math.nan, "output_tokens_per_s": math.nan}
    span = float(fin["finish_s"].max() - requests["arrival_s"].min())
    return {"makespan_s": span, "requests_per_s": len(fin) / span,
            "output_tokens_per_s": float(fin["num_output_tokens"].sum()) / span}


def sim_running_at(steps: pd.DataFrame, times_s: np.ndarray) -> np.ndarray:
    """Batch size of the simulated step in progress at each time (0 when idle)."""
    s = steps.sort_values("start_s")
    start = s["start_s"].to_numpy()
    end = start + s["duration_s"].to_numpy()
    batch = s["batch_size"].to_numpy(dtype=float)
    i = np.searchsorted(start, times_s, side="right") - 1
    ok = (i >= 0) & (times_s < end[np.clip(i, 0, None)])
    return np.where(ok, batch[np.clip(i, 0, None)], 0.0)


def sim_waiting_at(steps: pd.DataFrame, times_s: np.ndarray) -> np.ndarray:
    """Waiting requests at the start of the simulated step in progress (or last started) at each time."""
    s = steps.sort_values("start_s")
    start = s["start_s"].to_numpy()
    i = np.searchsorted(start, times_s, side="right") - 1
    return np.where(i >= 0, s["num_waiting"].to_numpy(dtype=float)[np.clip(i, 0, None)], 0.0)


def mean_batch(sim_steps: pd.DataFrame, gauges: pd.DataFrame, t_end_s: float) -> dict[str, float]:
    """Time-averaged running requests over [0, t_end_s]: live from the engine's gauge samples,
    simulated from the step table evaluated at the same instants and exactly (duration-weighted)."""
    g = gauges[(gauges["t_s"] >= 0) & (gauges["t_s"] <= t_end_s)]
    t = g["t_s"].to_numpy(dtype=float)
    live = float(g["num_running"].mean()) if len(g) else math.nan
    at_samples = float(sim_running_at(sim_steps, t).mean()) if len(t) else math.nan
    s = sim_steps
    start = s["start_s"].to_numpy()
    end = np.minimum(start + s["duration_s"].to_numpy(), t_end_s)
    dur = np.clip(end - start, 0, None)
    exact = float((s["batch_size"].to_numpy() * dur).sum() / t_end_s) if t_end_s > 0 else math.nan
    return {"live_s_avg": live, "sim_at_live_samples": at_samples, "sim_time_avg": exact,
            "rel_error": rel_error(live, at_samples), "num_samples": int(len(t))}


def e2e_correlation(live: pd.DataFrame, sim: pd.DataFrame) -> dict[str, float]:
    """Pearson and Spearman correlation of per-request end-to-end latency (requests finished on both sides),
    plus the median absolute and mean signed per-request relative error."""
    a = live.loc[live["outcome"] == FINISHED, ["request_id", "e2e_s"]]
    b = sim.loc[sim["outcome"] == FINISHED, ["request_id", "e2e_s"]]
    m = a.merge(b, on="request_id", suffixes=("_live", "_sim"))
    x, y = m["e2e_s_live"].to_numpy(float), m["e2e_s_sim"].to_numpy(float)
    if len(m) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return {"num_requests": int(len(m)), "pearson": math.nan, "spearman": math.nan,
                "median_abs_rel_error": math.nan, "mean_rel_error": math.nan}
    rel = (y - x) / x
    return {"num_requests": int(len(m)), "pearson": float(stats.pearsonr(x, y)[0]),
            "spearman": float(stats.spearmanr(x, y)[0]), "median_abs_rel_error": float(np.median(np.abs(rel))),
            "mean_rel_error": float(np.mean(rel))}


def compare_run(live: pd.DataFrame, sim: pd.DataFrame, sim_steps: pd.DataFrame, gauges: pd.DataFrame | None, *,
                workload: str, load: float | str, extra: Mapping | None = None) -> dict:
    """Every comparison figure of one (workload, load) run; `errors` holds one record per metric and percentile."""
    errors = []
    for metric in METRICS:
        lp, sp = percentiles(live, metric), percentiles(sim, metric, sim_steps)
        for q in PERCENTILES:
            errors.append({"workload": workload, "load": load, "metric": metric, "percentile": q,
                           "live_s": lp[q], "sim_s": sp[q], "rel_error": rel_error(lp[q], sp[q]), **(extra or {})})
    tl, ts = throughput(live), throughput(sim)
    out = {
        "workload": workload, "load": load, **(extra or {}),
        "num_requests": int(len(live)),
        "outcomes_live": {str(k): int(v) for k, v in live["outcome"].value_counts().items()},
        "outcomes_sim": {str(k): int(v) for k, v in sim["outcome"].value_counts().items()},
        "errors": errors,
        "throughput": {"live": tl, "sim": ts,
                       "rel_error_requests_per_s": rel_error(tl["requests_per_s"], ts["requests_per_s"]),
                       "rel_error_output_tokens_per_s": rel_error(tl["output_tokens_per_s"],
                                                                  ts["output_tokens_per_s"])},
        "e2e_correlation": e2e_correlation(live, sim),
        "sim_num_steps": int(len(sim_steps)),
        "sim_num_preemptions": int(sim["num_preemptions"].sum()),
    }
    if gauges is not None and len(gauges):
        t_end = float(np.nanmax([live["finish_s"].max(), sim["finish_s"].max()]))
        out["mean_batch_size"] = mean_batch(sim_steps, gauges, t_end)
    return out


# ------------------------------------------------------------------------------------------ plots

def _cdf(ax, v: np.ndarray, w: np.ndarray, label: str, **kw) -> None:
    if v.size == 0:
        return
    order = np.argsort(v, kind="stable")
    cw = np.cumsum(w[order])
    ax.plot(v[order], cw / cw[-1], label=label, drawstyle="steps-post", **kw)


def plot_cdfs(live: pd.DataFrame, sim: pd.DataFrame, sim_steps: pd.DataFrame, path, title: str = ""):
    """CDF overlays, live vs simulated, for TTFT, TBT, TPOT and end-to-end latency. Log x-axes start at the
    0.5th percentile of both samples together (a few client-side token gaps of microseconds, tokens read
    together, would otherwise squeeze the rest into the right edge); ticks at 2 and 5 are labelled on axes
    spanning under two decades."""
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for ax, metric in zip(axes, METRICS):
        lv, lw = metric_samples(live, metric)
        sv, sw = metric_samples(sim, metric, sim_steps)
        _cdf(ax, lv, lw, "live vLLM", color="tab:blue")
        _cdf(ax, sv, sw, "slosim", color="tab:orange", ls="--")
        ax.set_xlabel(f"{metric.upper()} (s)")
        ax.set_xscale("log")
        both = np.concatenate([lv, sv])
        both = both[np.isfinite(both) & (both > 0)]
        span = 3.0
        if both.size:
            lo, hi = np.percentile(both, 0.5), both.max()
            if hi > lo:
                ax.set_xlim(lo / 1.1, hi * 1.1)
                span = float(np.log10(hi / lo))
        plain = matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_locator(matplotlib.ticker.LogLocator(base=10, subs=(2, 3, 5, 7)))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
            lambda x, _: f"{x:g}" if span < 2 and f"{x:.0e}"[0] in "25" else ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_ylabel("fraction")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_over_time(live: pd.DataFrame, sim: pd.DataFrame, sim_steps: pd.DataFrame, gauges: pd.DataFrame | None,
                   path, title: str = "", gauge_source: str = "live /metrics"):
    """TTFT and end-to-end latency by arrival time, and running / waiting requests over time, both sides;
    `gauge_source` names where the live gauges came from in the legend."""
    fig, axes = plt.subplots(3, 1, figsize=(12, 9), sharex=True)
    for df, label, kw in ((live, "live vLLM", dict(color="tab:blue", marker=".")),
                          (sim, "slosim", dict(color="tab:orange", marker="x"))):
        fin = df[df["outcome"] == FINISHED]
        axes[0].scatter(fin["arrival_s"], fin["ttft_s"], s=8, label=label, alpha=0.6, **kw)
        axes[1].scatter(fin["arrival_s"], fin["e2e_s"], s=8, label=label, alpha=0.6, **kw)
    if gauges is not None and len(gauges):
        t = gauges["t_s"].to_numpy(float)
        axes[2].plot(t, gauges["num_running"], color="tab:blue", lw=1, label=f"running ({gauge_source})")
        axes[2].plot(t, gauges["num_waiting"], color="tab:blue", lw=1, ls=":", label=f"waiting ({gauge_source})")
        axes[2].plot(t, sim_running_at(sim_steps, t), color="tab:orange", lw=1, ls="--", label="batch size (slosim)")
        axes[2].plot(t, sim_waiting_at(sim_steps, t), color="tab:orange", lw=1, ls="-.", label="waiting (slosim)")
    axes[0].set_ylabel("TTFT (s)")
    axes[1].set_ylabel("end-to-end (s)")
    axes[2].set_ylabel("requests")
    axes[2].set_xlabel("time since replay start (s); requests at their arrival")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def error_table(errors: list[dict]) -> pd.DataFrame:
    """The errors list as a wide table: one row per (workload, load, metric), P50/P90/P99 errors in %."""
    df = pd.DataFrame(errors)
    if df.empty:
        return df
    keys = [k for k in ("workload", "load", "repeat") if k in df.columns]
    df["cell"] = df.apply(lambda r: f"{r['live_s'] * 1e3:8.1f} {r['sim_s'] * 1e3:8.1f} {100 * r['rel_error']:+6.1f}%",
                          axis=1)
    wide = df.pivot_table(index=keys + ["metric"], columns="percentile", values="cell", aggfunc="first", sort=False)
    wide.columns = [f"P{q} live/sim ms, err" for q in wide.columns]
    return wide
