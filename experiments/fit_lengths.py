"""Fit lognormal prompt and output lengths to a trace and say how well they fit.

    python -m experiments.fit_lengths ../shared/traces/AzureLLMInferenceTrace_conv.csv

For each length column: the maximum-likelihood lognormal (scipy.stats.lognorm, loc fixed
at 0, i.e. median = exp(mean log), sigma = std log) and, for comparison, a quantile match
(median = sample median, sigma from the interquartile range of log lengths). Each fit is
judged as `synthetic` would draw it (rounded to whole tokens, clipped to [1, trace max]):
the exact Kolmogorov-Smirnov distance between the trace's empirical CDF and that discrete
distribution, plus its mean, median and p99 beside the trace's. Also prints the trace's
mean arrival rate and inter-arrival CV, and a YAML snippet (the MLE fit) for conf/workload/.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from scipy import stats

from sim.workload import from_trace

IQR_OF_STANDARD_NORMAL = stats.norm.ppf(0.75) - stats.norm.ppf(0.25)


def discrete_cdf(median: float, sigma: float, max_tokens: int) -> np.ndarray:
    """P(draw <= k) for k = 0..max_tokens, for a lognormal rounded to whole tokens and clipped to [1, max]."""
    k = np.arange(max_tokens + 1, dtype=float)
    cdf = stats.lognorm.cdf(k + 0.5, sigma, scale=median)
    cdf[0] = 0.0  # draws below 1 are clipped up to 1
    cdf[-1] = 1.0  # draws above max are clipped down to max
    return cdf


def ks_distance(values: np.ndarray, cdf: np.ndarray) -> float:
    """Exact sup |ECDF - CDF| for integer data against an integer-supported CDF (both step at integers)."""
    ecdf = np.searchsorted(np.sort(values), np.arange(len(cdf)), side="right") / len(values)
    return float(np.max(np.abs(ecdf - cdf)))


def moments(cdf: np.ndarray) -> dict[str, float]:
    """Mean, median and p99 of an integer distribution given by its CDF on 0..max."""
    pmf = np.diff(cdf, prepend=0.0)
    k = np.arange(len(cdf))
    return {
        "mean": float((k * pmf).sum()),
        "median": float(np.searchsorted(cdf, 0.5)),
        "p99": float(np.searchsorted(cdf, 0.99)),
    }


def fit_column(values: np.ndarray) -> dict:
    """Both fits of one length column, with their quality against the data."""
    values = values.astype(np.int64)
    sigma_mle, _, median_mle = stats.lognorm.fit(values, floc=0)
    logs = np.log(values)
    q25, q75 = np.percentile(logs, [25, 75])
    fits = {
        "mle": (float(median_mle), float(sigma_mle)),
        "quantile": (float(np.median(values)), float((q75 - q25) / IQR_OF_STANDARD_NORMAL)),
    }
    max_tokens = int(values.max())
    result = {
        "num": len(values),
        "trace": {
            "mean": float(values.mean()),
            "median": float(np.median(values)),
            "p99": float(np.percentile(values, 99)),
            "min": int(values.min()),
            "max": max_tokens,
        },
    }
    for name, (median, sigma) in fits.items():
        cdf = discrete_cdf(median, sigma, max_tokens)
        result[name] = {
            "median": median,
            "sigma": sigma,
            "ks": ks_distance(values, cdf),
            "ks_continuous": float(stats.kstest(values, stats.lognorm(sigma, scale=median).cdf).statistic),
            **{f"fitted_{key}": value for key, value in moments(cdf).items()},
        }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trace", help="trace file (any format from_trace reads)")
    parser.add_argument("--format", default="auto")
    args = parser.parse_args(argv)

    workload = from_trace(args.trace, format=args.format)
    df = workload.requests
    arrival = df["arrival_s"].to_numpy()
    gaps = np.diff(arrival)
    print(f"trace: {workload.source}  requests: {len(df)}  span: {arrival[-1] - arrival[0]:.1f} s")
    print(f"arrivals: mean rate {(len(df) - 1) / (arrival[-1] - arrival[0]):.4f} qps, inter-arrival CV {gaps.std() / gaps.mean():.3f}")
    snippet = []
    for column, key in (("num_prompt_tokens", "prompt_tokens"), ("num_output_tokens", "output_tokens")):
        fit = fit_column(df[column].to_numpy())
        trace = fit["trace"]
        print(f"\n{column}: n={fit['num']} mean={trace['mean']:.1f} median={trace['median']:.0f} "
              f"p99={trace['p99']:.0f} min={trace['min']} max={trace['max']}")
        for name in ("mle", "quantile"):
            f = fit[name]
            print(f"  {name:8s} median={f['median']:.1f} sigma={f['sigma']:.4f}  KS(rounded,clipped)={f['ks']:.4f} "
                  f"KS(continuous)={f['ks_continuous']:.4f}  fitted mean={f['fitted_mean']:.1f} "
                  f"median={f['fitted_median']:.0f} p99={f['fitted_p99']:.0f}")
        f = fit["mle"]
        snippet.append(f"{key}:  # MLE fit, KS {f['ks']:.3f}, mean {f['fitted_mean']:.0f} vs trace {trace['mean']:.0f}")
        snippet.append(f"  {{kind: lognormal, median: {math.floor(f['median'] + 0.5)}, sigma: {f['sigma']:.3f}, min: 1, max: {trace['max']}}}")
    # The MLE fit goes into configs: it keeps the mean (the load a replica sees) closer to
    # the trace than the quantile match, even where its KS distance is larger.
    print("\nYAML (MLE fit):")
    print("\n".join(snippet))


if __name__ == "__main__":
    main()
