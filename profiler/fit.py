"""Fit cost models to a measured profile, estimate their error honestly, save the better one.

    python -m profiler.fit profiles/cpu-llama-small            # writes costmodel.json etc. beside the profile
    python -m profiler.fit my/profile.csv --out-dir fits/ --name my-model --folds 5

Two candidates, both scored by k-fold cross-validation (each row predicted by a model that
never saw it) as MAPE and worst-case error per step kind (prefill, decode, mixed):
1. piecewise-linear regimes of total tokens on physical features (prefill tokens, decodes,
   decode context, prefill context, batch size, prefill tokens squared and x context),
   weighted non-negative least squares on relative error; the split points are chosen
   among a few candidates by the same cross-validation;
2. those regimes times a scikit-learn gradient-boosted tree correction (on log time),
   exported as arrays (`sim.costmodels.fitted.TreeEnsembleCostModel`).
The tree model is kept only if it lowers the worst per-kind CV MAPE by more than
`--min-gain` (default 1 percentage point): the linear one extrapolates beyond the grid and
evaluates ~70x faster (about 1 us against 50 us a step), which matters to a simulator that
asks for step times many times per step. Both files are written either way.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import nnls

from profiler.shapes import STEP_KINDS
from profiler.table import SHAPE_COLUMNS, read_metadata, read_profile, resolve_profile_path
from sim.costmodels.files import save_cost_model
from sim.costmodels.fitted import Tree, TreeEnsembleCostModel, tree_feature_matrix
from sim.costmodels.linear import LinearRegimesCostModel, Regime, feature_matrix
from sim.errors import InputError
from sim.paths import PROJECT_ROOT

LINEAR_FEATURES = ("const", "prefill_tokens", "num_decodes", "decode_context_sum", "prefill_context", "batch_size",
                   "prefill_tokens_sq", "prefill_tokens_x_context")
"""Physical features of the linear regimes (total tokens is left out: it is prefill tokens + decodes)."""

TREE_FEATURES = ("prefill_tokens", "prefill_context", "num_decodes", "decode_context_sum", "batch_size",
                 "total_tokens", "mean_decode_context", "num_prefill_chunks")
"""Inputs of the tree correction."""

SPLIT_CANDIDATES = (32, 64, 128, 192, 256, 384)
"""Total-token bounds tried as regime splits (one or two splits, or none)."""

TREE_PARAMS = {"n_estimators": 150, "max_depth": 3, "learning_rate": 0.1, "subsample": 1.0, "init": "zero"}
"""Gradient boosting settings (fixed, not tuned on the data)."""


# ---- the two model families ------------------------------------------------------------


def shape_arrays(df: pd.DataFrame) -> list[np.ndarray]:
    return [df[c].to_numpy(dtype=float) for c in SHAPE_COLUMNS]


def fit_regimes(df: pd.DataFrame, splits: tuple[int, ...]) -> list[Regime] | None:
    """Non-negative least squares on relative error, one regime per total-token interval.

    Returns None when a regime has too few rows for the features that vary inside it.
    """
    y = df["median_s"].to_numpy(dtype=float)
    X = feature_matrix(*shape_arrays(df), LINEAR_FEATURES)
    n_tot = df["num_prefill_tokens"].to_numpy() + df["num_decodes"].to_numpy()
    bounds = list(splits) + [None]
    lo = -np.inf
    regimes = []
    for b in bounds:
        sel = (n_tot > lo) & (n_tot <= (np.inf if b is None else b))
        Xs, ys = X[sel], y[sel]
        used = np.flatnonzero(np.any(Xs != 0, axis=0))  # features that vary inside this regime
        if len(ys) < len(used) + 2:
            return None
        w = 1.0 / ys
        coef, _ = nnls(Xs[:, used] * w[:, None], ys * w)
        full = dict.fromkeys(LINEAR_FEATURES, 0.0)
        for j, c in zip(used, coef):
            full[LINEAR_FEATURES[j]] = float(c)
        nonzero = {f: c for f, c in full.items() if c != 0.0} or {"const": 0.0}
        regimes.append(Regime(None if b is None else float(b), nonzero))
        lo = b if b is not None else lo
    return regimes


def linear_model(regimes: list[Regime], name: str, **capacity) -> LinearRegimesCostModel:
    return LinearRegimesCostModel(regimes, name=name, **capacity)


def fit_trees(df: pd.DataFrame, base: LinearRegimesCostModel, seed: int) -> tuple[list[Tree], float]:
    """Gradient-boosted trees on log(measured / base); returns the exported trees and the learning rate."""
    from sklearn.ensemble import GradientBoostingRegressor  # only profiler.fit needs scikit-learn

    y = df["median_s"].to_numpy(dtype=float)
    target = np.log(y / base.step_times_s(*shape_arrays(df)))
    X = tree_feature_matrix(*shape_arrays(df), TREE_FEATURES).astype(np.float32)
    gbr = GradientBoostingRegressor(random_state=seed, **TREE_PARAMS).fit(X, target)
    trees = []
    for est in gbr.estimators_[:, 0]:
        t = est.tree_
        trees.append(Tree(t.feature, t.threshold, t.children_left, t.children_right, t.value[:, 0, 0]))
    return trees, float(gbr.learning_rate)


def tree_model(trees, lr, base, name, **capacity) -> TreeEnsembleCostModel:
    return TreeEnsembleCostModel(name=name, base=base, trees=trees, feature_names=TREE_FEATURES, learning_rate=lr,
                                 **capacity)


# ---- cross-validation --------------------------------------------------------------------


def folds(n: int, k: int, seed: int) -> np.ndarray:
    """Fold index of each of n rows: a seeded shuffle cut into k near-equal folds."""
    idx = np.random.default_rng(seed).permutation(n)
    f = np.empty(n, dtype=int)
    f[idx] = np.arange(n) % k
    return f


def cv_predict(df: pd.DataFrame, fit_predict, k: int, seed: int) -> np.ndarray:
    """Out-of-fold predictions: row i is predicted by a model fitted without its fold."""
    f = folds(len(df), k, seed)
    pred = np.full(len(df), np.nan)
    for j in range(k):
        test = f == j
        pred[test] = fit_predict(df[~test], df[test])
    return pred


def errors_by_kind(df: pd.DataFrame, pred: np.ndarray) -> dict[str, dict[str, float]]:
    """{kind: {mape, worst, p90, n}}: relative errors (fractions) of predictions against measured medians."""
    rel = np.abs(pred - df["median_s"].to_numpy()) / df["median_s"].to_numpy()
    out = {}
    for kind in STEP_KINDS:
        r = rel[(df["step_kind"] == kind).to_numpy()]
        if r.size:
            out[kind] = {"mape": float(r.mean()), "worst": float(r.max()), "p90": float(np.percentile(r, 90)),
                         "n": int(r.size)}
    return out


def worst_kind_mape(errs: dict) -> float:
    return max(e["mape"] for e in errs.values())


# ---- the whole fit -------------------------------------------------------------------------


@dataclass
class FitResult:
    """Both candidates, their CV errors, and which one was chosen."""

    linear: LinearRegimesCostModel
    trees: TreeEnsembleCostModel | None
    cv: dict[str, dict]
    """Model family -> per-kind errors."""
    cv_pred: dict[str, np.ndarray]
    """Model family -> out-of-fold predictions, row-aligned with `profile`."""
    splits_tried: dict[str, float]
    """Split tuple (as text) -> worst per-kind CV MAPE of the linear regimes."""
    chosen: str
    profile: pd.DataFrame

    @property
    def model(self):
        return self.linear if self.chosen == "linear" else self.trees


def min_rows_for_fit(k: int) -> int:
    return max(2 * len(LINEAR_FEATURES), 2 * k)


def fit_profile(path: str | Path, *, name: str | None = None, k: int = 5, seed: int = 0, min_gain: float = 0.01,
                with_trees: bool = True) -> FitResult:
    """Fit, cross-validate and choose; the models carry provenance (profile, CV errors) and engine capacity."""
    csv = resolve_profile_path(path)
    df = read_profile(csv, min_rows=min_rows_for_fit(k)).reset_index(drop=True)
    for kind in STEP_KINDS:
        n = int((df["step_kind"] == kind).sum())
        if n < 2:
            raise InputError(f"too few {kind} rows ({n}): a cost model is scored on every step kind "
                             f"{list(STEP_KINDS)}", path=csv, field="step_kind", value=kind)
    meta = read_metadata(csv)
    name = name or f"fitted-{csv.parent.name}"
    capacity = {"kv_blocks": meta.get("kv_blocks"), "block_size": meta.get("block_size"),
                "load_s": meta.get("model_load_s")}

    def linear_fp(splits):
        def fp(train, test):
            regimes = fit_regimes(train, splits)
            if regimes is None:
                return np.full(len(test), np.nan)
            return linear_model(regimes, "cv").step_times_s(*shape_arrays(test))
        return fp

    splits_tried: dict[str, float] = {}
    best, best_score = None, np.inf
    candidates = [()] + [(s,) for s in SPLIT_CANDIDATES] + list(itertools.combinations(SPLIT_CANDIDATES, 2))
    for splits in candidates:
        if fit_regimes(df, splits) is None:
            continue
        pred = cv_predict(df, linear_fp(splits), k, seed)
        if np.isnan(pred).any():
            continue
        score = worst_kind_mape(errors_by_kind(df, pred))
        splits_tried[",".join(map(str, splits)) or "none"] = score
        if score < best_score - 1e-4:  # a split must earn its place: ties go to fewer regimes
            best, best_score = splits, score
    if best is None:
        raise InputError("too few rows to fit even one linear regime", path=csv, field="rows", value=len(df))
    cv_pred = {"linear": cv_predict(df, linear_fp(best), k, seed)}
    cv = {"linear": errors_by_kind(df, cv_pred["linear"])}

    trees_model = None
    if with_trees:
        def trees_fp(train, test):
            regimes = fit_regimes(train, best)
            base = linear_model(regimes, "cv")
            trees, lr = fit_trees(train, base, seed)
            return tree_model(trees, lr, base, "cv").step_times_s(*shape_arrays(test))

        cv_pred["trees"] = cv_predict(df, trees_fp, k, seed)
        cv["trees"] = errors_by_kind(df, cv_pred["trees"])
    chosen = "linear"
    if with_trees and worst_kind_mape(cv["trees"]) < worst_kind_mape(cv["linear"]) - min_gain:
        chosen = "trees"

    def provenance(family: str) -> dict:
        return {
            "kind": "fitted",
            "measured_by_slosim": True,
            "profile": _display_path(csv),
            "profile_date_utc": (meta.get("host") or {}).get("date_utc"),
            "hardware": meta.get("hardware"), "engine": meta.get("engine"),
            "engine_version": meta.get("engine_version"), "engine_model": meta.get("model_config"),
            "dtype": meta.get("dtype"), "tp": meta.get("tp"),
            "engine_args": meta.get("engine_args"), "kv_source": meta.get("kv_source"),
            "model_load_source": meta.get("model_load_source"),
            "fit": family, "regime_splits_total_tokens": list(best), "cv_folds": k, "cv_seed": seed,
            "num_rows": {kind: e["n"] for kind, e in cv[family].items()},
            "cv_mape": {kind: e["mape"] for kind, e in cv[family].items()},
            "cv_worst_error": {kind: e["worst"] for kind, e in cv[family].items()},
            "chosen": family == chosen,
            "choice_rule": f"trees only if their worst per-kind CV MAPE is lower by more than {min_gain}",
            "cv_note": "k-fold cross-validated relative errors of medians; the split points were chosen by the same CV",
        }

    regimes = fit_regimes(df, best)
    linear = linear_model(regimes, name if chosen == "linear" else f"{name}-linear", provenance=provenance("linear"),
                          **capacity)
    if with_trees:
        trees, lr = fit_trees(df, linear_model(regimes, "base"), seed)
        trees_model = tree_model(trees, lr, linear_model(regimes, "base", **capacity),
                                 name if chosen == "trees" else f"{name}-trees", provenance=provenance("trees"),
                                 **capacity)
    return FitResult(linear, trees_model, cv, cv_pred, splits_tried, chosen, df)


def _display_path(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(p)


# ---- output ------------------------------------------------------------------------------


def error_table(res: FitResult) -> pd.DataFrame:
    rows = []
    for family, errs in res.cv.items():
        for kind, e in errs.items():
            rows.append({"model": family + (" (chosen)" if family == res.chosen else ""), "step_kind": kind,
                         "rows": e["n"], "cv_mape_pct": 100 * e["mape"], "cv_p90_err_pct": 100 * e["p90"],
                         "cv_worst_err_pct": 100 * e["worst"]})
    return pd.DataFrame(rows)


def plot_fit(res: FitResult, path: Path) -> Path:
    """Predicted (out-of-fold) vs measured per step kind, and residuals vs batch size and context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    plain_fmt = FuncFormatter(lambda v, _: f"{v:g}")

    df, pred = res.profile, res.cv_pred[res.chosen]
    y = df["median_s"].to_numpy()
    resid = 100 * (pred - y) / y
    colors = {"prefill": "tab:blue", "decode": "tab:orange", "mixed": "tab:green"}
    fig, axes = plt.subplots(2, 3, figsize=(15, 9))
    for ax, kind in zip(axes[0], STEP_KINDS):
        sel = (df["step_kind"] == kind).to_numpy()
        if not sel.any():
            ax.set_visible(False)
            continue
        ms, ps = 1e3 * y[sel], 1e3 * pred[sel]
        lo, hi = min(ms.min(), ps.min()) * 0.9, max(ms.max(), ps.max()) * 1.1
        ax.fill_between([lo, hi], [lo * 0.95, hi * 0.95], [lo * 1.05, hi * 1.05], color="0.9", label="±5%")
        ax.plot([lo, hi], [lo, hi], color="0.4", lw=1)
        ax.scatter(ms, ps, s=14, color=colors[kind], alpha=0.8)
        e = res.cv[res.chosen][kind]
        ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel="measured median step time (ms)",
               ylabel="predicted, out of fold (ms)",
               title=f"{kind}: {e['n']} shapes, CV MAPE {100 * e['mape']:.1f}%, worst {100 * e['worst']:.1f}%")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(plain_fmt)
            axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.legend(loc="upper left")
    panels = [("batch_size", "batch size (requests in the step)"),
              ("decode_context_sum", "decode context sum (tokens)"),
              ("prefill_context", "prefill context (tokens already in KV)")]
    for ax, (col, label) in zip(axes[1], panels):
        for kind in STEP_KINDS:
            sel = (df["step_kind"] == kind).to_numpy()
            if sel.any():
                ax.scatter(df[col].to_numpy()[sel], resid[sel], s=12, color=colors[kind], alpha=0.7, label=kind)
        ax.axhline(0, color="0.4", lw=1)
        ax.axhspan(-5, 5, color="0.9", zorder=0)
        ax.set(xlabel=label, ylabel="out-of-fold error (%)")
        if col != "batch_size":
            ax.set_xscale("symlog", linthresh=100)
            ax.xaxis.set_major_formatter(plain_fmt)
        ax.set_xlim(left=0)
        ax.legend(loc="best", fontsize=8)
    m = res.model
    fig.suptitle(f"{m.name}: {res.chosen} model (of {len(res.cv)} fitted), {len(df)} measured shapes, "
                 f"{m.provenance.get('cv_folds')}-fold CV, out-of-fold predictions  "
                 f"(profile {m.provenance.get('profile')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_fit(res: FitResult, out_dir: Path, *, plot: bool = True) -> dict[str, Path]:
    """costmodel.json (chosen), costmodel_linear.json, costmodel_trees.json, fit_report.json, fit.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"chosen": save_cost_model(res.model, out_dir / "costmodel.json"),
             "linear": save_cost_model(res.linear, out_dir / "costmodel_linear.json")}
    if res.trees is not None:
        paths["trees"] = save_cost_model(res.trees, out_dir / "costmodel_trees.json")
    report = {"chosen": res.chosen, "name": res.model.name, "cv": res.cv,
              "linear_splits_tried_worst_kind_cv_mape": res.splits_tried,
              "tree_params": {k: v for k, v in TREE_PARAMS.items()}, "profile": res.model.provenance["profile"]}
    paths["report"] = out_dir / "fit_report.json"
    paths["report"].write_text(json.dumps(report, indent=2) + "\n")
    if plot:
        paths["plot"] = plot_fit(res, out_dir / "fit.png")
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m profiler.fit", description=__doc__.split("\n\n")[0])
    ap.add_argument("profile", help="profile directory (holding profile.csv) or CSV file")
    ap.add_argument("--out-dir", help="where to write the cost models and plot (default: beside the profile)")
    ap.add_argument("--name", help="cost model name (default: fitted-<profile folder>)")
    ap.add_argument("--folds", type=int, default=5, help="k of k-fold cross-validation")
    ap.add_argument("--seed", type=int, default=0, help="seed of the fold split and the trees")
    ap.add_argument("--min-gain", type=float, default=0.01,
                    help="keep the tree model only if it lowers the worst per-kind CV MAPE by more than this")
    ap.add_argument("--no-trees", action="store_true", help="fit only the linear regimes")
    ap.add_argument("--no-plot", action="store_true")
    a = ap.parse_args(argv)
    try:
        if a.folds < 2:
            raise InputError("need at least 2 folds", field="--folds", value=a.folds)
        res = fit_profile(a.profile, name=a.name, k=a.folds, seed=a.seed, min_gain=a.min_gain,
                          with_trees=not a.no_trees)
        out = Path(a.out_dir) if a.out_dir else resolve_profile_path(a.profile).parent
        paths = write_fit(res, out, plot=not a.no_plot)
    except InputError as e:
        print(f"profiler.fit: {e}", file=sys.stderr)
        return 2
    print(error_table(res).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    splits = res.model.provenance["regime_splits_total_tokens"]
    print(f"chosen: {res.chosen} ({res.model.name}); regime splits at total tokens {splits}")
    for k, p in paths.items():
        print(f"  {k}: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
