"""profiler.fit and the fitted cost-model files: recovery, round trips, numpy-only prediction, bad profiles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from profiler.fit import fit_profile, main as fit_main, write_fit
from profiler.table import read_profile
from sim.costmodel import CostModel
from sim.costmodels import LinearRegimesCostModel, Regime, load_cost_model, save_cost_model
from sim.errors import InputError

ROOT = Path(__file__).resolve().parent.parent

TRUE_REGIMES = [
    Regime(128.0, {"const": 0.012, "prefill_tokens": 1.5e-4, "num_decodes": 4e-4, "decode_context_sum": 3e-7,
                   "batch_size": 2e-4}),
    Regime(None, {"const": 0.006, "prefill_tokens": 2.5e-4, "num_decodes": 5e-4, "decode_context_sum": 2e-7,
                  "prefill_context": 1e-6, "prefill_tokens_x_context": 2e-8, "batch_size": 1e-4}),
]


def synthetic_rows(model, n: int = 240, seed: int = 0, noise: float = 0.0) -> pd.DataFrame:
    """Profile rows whose medians come from `model`; chunks and decodes vary independently of batch size."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        kind = ("prefill", "decode", "mixed")[i % 3]
        chunks = 0 if kind == "decode" else int(rng.integers(1, 5))
        P = 0 if kind == "decode" else chunks * int(rng.integers(1, 120))
        Cp = 0 if kind == "decode" else int(rng.choice([0, 128, 700, 2000]))
        D = 0 if kind == "prefill" else int(rng.integers(1, 64))
        Cd = D * int(rng.integers(8, 3000))
        B = D + chunks
        t = model.step_time_s(P, Cp, D, Cd, B) * (1 + noise * rng.standard_normal())
        rows.append({"hardware": "synthetic", "engine": "synthetic", "engine_version": "0", "model_config": "synthetic",
                     "dtype": "float32", "tp": 1, "step_kind": kind, "num_prefill_tokens": P, "prefill_context": Cp,
                     "num_decodes": D, "decode_context_sum": Cd, "batch_size": B, "num_prefill_chunks": chunks,
                     "repetitions": 5, "median_s": t, "p90_s": t * 1.01, "min_s": t, "mean_s": t,
                     "num_discarded_contended": 0, "num_discarded_mismatch": 0, "allreduce": "none"})
    return pd.DataFrame(rows)


def write_synthetic(tmp_path: Path, df: pd.DataFrame, **meta) -> Path:
    d = tmp_path / "synthetic-profile"
    d.mkdir(parents=True, exist_ok=True)
    df.to_csv(d / "profile.csv", index=False)
    (d / "metadata.json").write_text(json.dumps({"kv_blocks": 512, "block_size": 128, "model_load_s": 0.25,
                                                 "hardware": "synthetic", **meta}))
    return d


@pytest.fixture(scope="module")
def true_model():
    return LinearRegimesCostModel(TRUE_REGIMES, name="truth")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, true_model):
    d = write_synthetic(tmp_path_factory.mktemp("fit"), synthetic_rows(true_model))
    return d, fit_profile(d, k=5, seed=0)


def test_fit_recovers_known_coefficients(fitted):
    _, res = fitted
    assert res.linear.provenance["regime_splits_total_tokens"] == [128]
    for got, want in zip(res.linear.regimes, TRUE_REGIMES):
        assert got.max_total_tokens == want.max_total_tokens
        for feature in set(got.coefficients) | set(want.coefficients):
            assert got.coefficients.get(feature, 0.0) == pytest.approx(want.coefficients.get(feature, 0.0),
                                                                       rel=1e-6, abs=1e-12), feature
    assert all(e["mape"] < 1e-6 for e in res.cv["linear"].values())
    assert res.chosen == "linear"  # exact data: the trees cannot do better


def test_fit_with_noise_reports_honest_cv_error(tmp_path, true_model):
    d = write_synthetic(tmp_path, synthetic_rows(true_model, noise=0.03, seed=3))
    res = fit_profile(d, k=4, seed=1)
    for kind, e in res.cv["linear"].items():
        # 3% Gaussian noise -> mean absolute relative error about 0.8 * 3% = 2.4%; CV must neither hide it nor blow up
        assert 0.015 < e["mape"] < 0.04, (kind, e)
        assert e["worst"] >= e["mape"]


def test_saved_models_round_trip_and_carry_provenance(fitted, tmp_path):
    d, res = fitted
    paths = write_fit(res, tmp_path, plot=False)
    P = np.array([0, 1, 17, 128, 129, 300, 500, 64])
    Cp = np.array([0, 0, 700, 0, 2000, 128, 0, 4000])
    D = np.array([5, 0, 3, 0, 10, 0, 12, 64])
    Cd = D * 300
    B = D + (P > 0)
    for key in ("chosen", "linear", "trees"):
        loaded = load_cost_model(paths[key])
        original = {"chosen": res.model, "linear": res.linear, "trees": res.trees}[key]
        assert isinstance(loaded, CostModel)
        np.testing.assert_array_equal(loaded.step_times_s(P, Cp, D, Cd, B), original.step_times_s(P, Cp, D, Cd, B))
        cv = loaded.provenance["cv_mape"]
        assert set(cv) == {"prefill", "decode", "mixed"} and all(0 <= v < 1 for v in cv.values())
        assert loaded.provenance["profile"].endswith("profile.csv")
        assert loaded.num_kv_blocks(128) == 512 and loaded.num_kv_blocks(16) == 4096
        assert loaded.model_load_s() == 0.25
    tree_file = json.loads(paths["trees"].read_text())
    assert tree_file["class"] == "sim.costmodels.fitted.TreeEnsembleCostModel"


def test_tree_model_scalar_and_vector_paths_agree_bit_for_bit(fitted):
    _, res = fitted
    m = res.trees
    rng = np.random.default_rng(7)
    P = rng.integers(0, 512, 200)
    D = rng.integers(0, 64, 200)
    D[P == 0] += 1
    Cp = rng.integers(0, 3000, 200) * (P > 0)
    Cd = D * rng.integers(1, 4000, 200)
    B = D + (P > 0)
    vec = m.step_times_s(P, Cp, D, Cd, B)
    scalar = np.array([m.step_time_s(*map(int, a)) for a in zip(P, Cp, D, Cd, B)])
    np.testing.assert_array_equal(vec, scalar)


def test_tree_model_corrects_a_nonlinearity_the_lines_miss(tmp_path):
    """Decode cost that jumps when contexts pass 1500 tokens each (a kernel switching tiles): lines miss it."""

    class Stepped:
        def step_time_s(self, P, Cp, D, Cd, B):
            return 0.01 + 2e-4 * P + 3e-7 * Cd + 1e-4 * D + (0.008 if D and Cd / D > 1500 else 0.0)

    res = fit_profile(write_synthetic(tmp_path, synthetic_rows(Stepped(), n=300, seed=5)), k=5, seed=0)
    assert res.cv["trees"]["decode"]["mape"] < 0.5 * res.cv["linear"]["decode"]["mape"]
    assert res.chosen == "trees"


def test_fit_cli_writes_files_and_table(fitted, tmp_path, capsys):
    d, _ = fitted
    assert fit_main([str(d), "--out-dir", str(tmp_path), "--folds", "3"]) == 0
    out = capsys.readouterr().out
    assert "cv_mape_pct" in out and "chosen:" in out
    for f in ("costmodel.json", "costmodel_linear.json", "costmodel_trees.json", "fit_report.json", "fit.png"):
        assert (tmp_path / f).stat().st_size > 0
    report = json.loads((tmp_path / "fit_report.json").read_text())
    assert set(report["cv"]) == {"linear", "trees"}


# ---- bad profiles ---------------------------------------------------------------------


def test_missing_column_names_file_and_field(tmp_path, true_model):
    df = synthetic_rows(true_model, n=30).drop(columns=["decode_context_sum"])
    d = write_synthetic(tmp_path, df)
    with pytest.raises(InputError) as e:
        read_profile(d)
    assert e.value.field == "decode_context_sum" and e.value.path.endswith("profile.csv")


@pytest.mark.parametrize("bad", [0.0, -0.01, float("nan"), "fast"])
def test_non_positive_time_names_line_and_value(tmp_path, true_model, bad):
    df = synthetic_rows(true_model, n=30).astype({"median_s": object})
    df.loc[7, "median_s"] = bad
    d = write_synthetic(tmp_path, df)
    with pytest.raises(InputError) as e:
        read_profile(d)
    assert e.value.field == "median_s" and e.value.line == 9  # header is line 1, row 0 is line 2


def test_too_few_rows_for_the_model(tmp_path, true_model):
    d = write_synthetic(tmp_path, synthetic_rows(true_model, n=9))
    with pytest.raises(InputError, match="too few rows"):
        fit_profile(d)
    assert fit_main([str(d), "--no-plot"]) == 2


def test_every_step_kind_is_needed(tmp_path, true_model):
    df = synthetic_rows(true_model, n=60)
    d = write_synthetic(tmp_path, df[df.step_kind != "mixed"])
    with pytest.raises(InputError, match="too few mixed rows") as e:
        fit_profile(d)
    assert e.value.field == "step_kind"


def test_kind_must_match_shape(tmp_path, true_model):
    df = synthetic_rows(true_model, n=30)
    df.loc[1, "step_kind"] = "prefill"  # row 1 is a decode
    with pytest.raises(InputError, match="does not match the shape") as e:
        read_profile(write_synthetic(tmp_path, df))
    assert e.value.line == 3


def test_missing_profile_and_broken_tree_file(tmp_path, fitted):
    with pytest.raises(InputError, match="not found"):
        read_profile(tmp_path / "nowhere")
    _, res = fitted
    p = save_cost_model(res.trees, tmp_path / "t.json")
    d = json.loads(p.read_text())
    # a root whose left child is itself would walk forever
    d["trees"][0] = {"feature": [0, -2, -2], "threshold": [10.0, -2.0, -2.0], "left": [0, -1, -1],
                     "right": [2, -1, -1], "value": [0.0, 0.1, -0.1]}
    p.write_text(json.dumps(d))
    with pytest.raises(InputError, match="point forward") as e:
        load_cost_model(p)
    assert e.value.path == str(p)


def test_fit_does_not_import_torch_for_the_simulator():
    code = ("import sys; from sim.costmodels import load_cost_model; import sim.costmodels.fitted; "
            "assert 'torch' not in sys.modules and 'sklearn' not in sys.modules and 'vllm' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
