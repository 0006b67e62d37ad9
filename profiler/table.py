"""The profile table: one row per measured step shape, in long format, plus its metadata.

`profiler.run` writes `profile.csv` (the rows), `steps.csv` (every timed step, kept or
discarded) and `metadata.json` (where, when, with what) into one directory; `profiler.fit`
reads them back through `read_profile`, which checks every column a fit needs and raises
`InputError` naming the file, line and field of the first bad value.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from profiler.shapes import STEP_KINDS
from sim.errors import InputError
from sim.paths import project_path

PROFILE_FILE = "profile.csv"
STEPS_FILE = "steps.csv"
METADATA_FILE = "metadata.json"

SHAPE_COLUMNS = ("num_prefill_tokens", "prefill_context", "num_decodes", "decode_context_sum", "batch_size")
"""The five shape numbers a cost model takes (see `sim.costmodel.CostModel`)."""

PROFILE_COLUMNS = (
    "hardware", "engine", "engine_version", "model_config", "dtype", "tp", "step_kind",
    *SHAPE_COLUMNS, "num_prefill_chunks", "repetitions", "median_s", "p90_s", "min_s", "mean_s",
    "num_discarded_contended", "num_discarded_mismatch", "allreduce",
)
"""Columns of `profile.csv`, in order."""

REQUIRED_FOR_FIT = ("step_kind", *SHAPE_COLUMNS, "repetitions", "median_s")
"""Columns `read_profile` insists on; the others are descriptive."""


def summarize_times(times_s) -> dict[str, float]:
    """Median, p90, min and mean of a non-empty sequence of step times."""
    a = np.asarray(times_s, dtype=float)
    return {"median_s": float(np.median(a)), "p90_s": float(np.percentile(a, 90)),
            "min_s": float(a.min()), "mean_s": float(a.mean())}


def write_profile(out_dir: str | Path, rows: pd.DataFrame, steps: pd.DataFrame, metadata: dict) -> Path:
    """Write the three files into `out_dir` (created if needed); returns the profile CSV path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    missing = [c for c in PROFILE_COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(f"profile rows lack columns {missing}")
    rows.loc[:, list(PROFILE_COLUMNS)].to_csv(out / PROFILE_FILE, index=False, float_format="%.9g")
    steps.to_csv(out / STEPS_FILE, index=False, float_format="%.9g")
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=False, default=str) + "\n")
    return out / PROFILE_FILE


def resolve_profile_path(path: str | Path) -> Path:
    """A profile directory or CSV file -> the CSV file."""
    p = project_path(path)
    if p.is_dir():
        p = p / PROFILE_FILE
    if not p.exists():
        raise InputError("profile file not found", path=p)
    return p


def read_metadata(profile_csv: Path) -> dict:
    """The metadata.json beside a profile CSV ({} if absent)."""
    m = profile_csv.parent / METADATA_FILE
    if not m.exists():
        return {}
    try:
        d = json.loads(m.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON: {e.msg}", path=m, line=e.lineno) from None
    if not isinstance(d, dict):
        raise InputError("metadata must be a JSON object", path=m)
    return d


def read_profile(path: str | Path, *, min_rows: int = 1) -> pd.DataFrame:
    """Read and check a profile CSV (or a directory holding `profile.csv`).

    Every row must have a known `step_kind`, non-negative integer shape numbers consistent
    with its kind, at least one repetition and a positive finite `median_s`; the table
    must hold at least `min_rows` rows. Errors name the CSV line (header = line 1).
    """
    p = resolve_profile_path(path)
    try:
        df = pd.read_csv(p)
    except pd.errors.EmptyDataError:
        raise InputError("profile file is empty", path=p) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise InputError(f"not a readable CSV ({e})", path=p) from None
    for col in REQUIRED_FOR_FIT:
        if col not in df.columns:
            raise InputError(f"missing required column; a profile has {list(REQUIRED_FOR_FIT)}", path=p, field=col)
    if len(df) < min_rows:
        raise InputError(f"too few rows: {len(df)} measured shapes, need at least {min_rows}", path=p,
                         field="rows", value=len(df))

    def bad(i: int, col: str, problem: str):
        raise InputError(problem, path=p, line=int(i) + 2, field=col, value=df[col].iloc[i])

    kinds = df["step_kind"].astype(str)
    not_kind = ~kinds.isin(STEP_KINDS)
    if not_kind.any():
        bad(int(np.flatnonzero(not_kind)[0]), "step_kind", f"must be one of {list(STEP_KINDS)}")
    for col in (*SHAPE_COLUMNS, "repetitions"):
        v = pd.to_numeric(df[col], errors="coerce")
        wrong = v.isna() | (v < 0) | (v != np.floor(v)) | ~np.isfinite(v)
        if wrong.any():
            bad(int(np.flatnonzero(wrong.to_numpy())[0]), col, "must be a non-negative integer")
        df[col] = v.astype(np.int64)
    for col in ("median_s", "p90_s"):
        if col not in df.columns:
            continue
        v = pd.to_numeric(df[col], errors="coerce")
        wrong = v.isna() | ~np.isfinite(v) | (v <= 0)
        if wrong.any():
            bad(int(np.flatnonzero(wrong.to_numpy())[0]), col, "step time must be a positive finite number of seconds")
        df[col] = v.astype(float)
    reps0 = df["repetitions"] < 1
    if reps0.any():
        bad(int(np.flatnonzero(reps0.to_numpy())[0]), "repetitions", "must be >= 1")
    P, D = df["num_prefill_tokens"], df["num_decodes"]
    expected = np.where(P == 0, "decode", np.where(D == 0, "prefill", "mixed"))
    inconsistent = (kinds.to_numpy() != expected) | ((P == 0) & (D == 0)).to_numpy()
    if inconsistent.any():
        bad(int(np.flatnonzero(inconsistent)[0]), "step_kind",
            "does not match the shape (prefill: tokens and no decodes; decode: decodes only; mixed: both)")
    small_batch = (df["batch_size"] < D + (P > 0)).to_numpy()
    if small_batch.any():
        bad(int(np.flatnonzero(small_batch)[0]), "batch_size", "smaller than the requests the shape computes")
    return df
