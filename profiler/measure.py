"""Timed steps -> profile rows: keep the clean repetitions of each shape, summarise them.

Every backend reports each timed step with the composition it *observed* (for vLLM, read
from the scheduler's output) and whether that matches the shape asked for. A step is kept
if it matched and was not contended: its process CPU time stayed close to its wall time,
i.e. the OS did not take the core away mid-step (the machine is shared). A shape with no
clean step falls back to its matched steps (counted as contended); a shape with no matched
step is left out of the profile and counted in the metadata.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import pandas as pd

from profiler.shapes import StepShape
from profiler.table import SHAPE_COLUMNS, summarize_times


@dataclass(frozen=True)
class TimedStep:
    """One timed engine step. Invariant: times positive; shape numbers as observed."""

    shape_id: int
    """Index of the intended shape in the run's shape list."""
    shape_label: str
    """Human-readable intended shape (see `StepShape.label`)."""
    wall_s: float
    """Wall-clock duration of the step."""
    cpu_s: float
    """Process CPU time spent during the step (all threads)."""
    num_prefill_tokens: int
    prefill_context: int
    num_decodes: int
    decode_context_sum: int
    batch_size: int
    num_prefill_chunks: int
    matched: bool
    """The observed composition equals the intended one."""
    contended: bool
    """cpu_s / wall_s fell below the configured threshold (the core was taken away)."""


def is_contended(wall_s: float, cpu_s: float, min_cpu_fraction: float) -> bool:
    """True when the step got less than `min_cpu_fraction` of a core over its wall time."""
    return min_cpu_fraction > 0 and cpu_s < min_cpu_fraction * wall_s


def observed_numbers(chunks, decode_contexts) -> dict[str, int]:
    """The five shape numbers (plus chunk count) of an observed step."""
    return {
        "num_prefill_tokens": int(sum(n for n, _ in chunks)),
        "prefill_context": int(sum(c for _, c in chunks)),
        "num_decodes": len(decode_contexts),
        "decode_context_sum": int(sum(decode_contexts)),
        "batch_size": len(chunks) + len(decode_contexts),
        "num_prefill_chunks": len(chunks),
    }


def measure_shape(
    shape_id: int,
    shape: StepShape,
    attempt: Callable[[], tuple[float, float, dict[str, int], bool]],
    *,
    repetitions: int,
    max_attempts: int,
    min_cpu_fraction: float,
    warmup_attempts: int = 0,
) -> list[TimedStep]:
    """Call `attempt()` (-> wall_s, cpu_s, observed numbers, matched) until `repetitions` clean steps or `max_attempts`.

    The first `warmup_attempts` calls are untimed: the first step of a new shape is often
    slower (kernels and compiled graphs specialise to it), and a live engine sees each shape often.
    """
    for _ in range(warmup_attempts):
        attempt()
    out: list[TimedStep] = []
    clean = 0
    for _ in range(max_attempts):
        wall_s, cpu_s, numbers, matched = attempt()
        contended = is_contended(wall_s, cpu_s, min_cpu_fraction)
        out.append(TimedStep(shape_id, shape.label(), wall_s, cpu_s, matched=matched, contended=contended, **numbers))
        clean += matched and not contended
        if clean >= repetitions:
            break
    return out


def steps_table(steps: list[TimedStep]) -> pd.DataFrame:
    """All timed steps as a table (one row a step, kept or not)."""
    df = pd.DataFrame([asdict(s) for s in steps])
    if df.empty:
        return pd.DataFrame(columns=list(TimedStep.__dataclass_fields__) + ["kept"])
    df["kept"] = df["matched"] & ~df["contended"]
    return df


def rows_from_steps(steps: pd.DataFrame, shapes: list[StepShape], common: dict) -> tuple[pd.DataFrame, dict]:
    """One profile row per shape from its kept steps; plus counts of what was discarded."""
    rows = []
    counts = {"shapes": len(shapes), "shapes_without_matching_step": 0, "shapes_fallback_contended": 0,
              "steps_timed": int(len(steps)), "steps_mismatched": int((~steps["matched"]).sum()) if len(steps) else 0,
              "steps_contended": int((steps["matched"] & steps["contended"]).sum()) if len(steps) else 0}
    for shape_id, g in steps.groupby("shape_id", sort=True):
        matched = g[g["matched"]]
        kept = matched[~matched["contended"]]
        if matched.empty:
            counts["shapes_without_matching_step"] += 1
            continue
        if kept.empty:
            counts["shapes_fallback_contended"] += 1
            kept = matched
        shape = shapes[int(shape_id)]
        row = dict(common)
        row["step_kind"] = shape.kind
        for col in SHAPE_COLUMNS:
            # decode contexts grow by one token per step: record the mean over the kept steps
            row[col] = int(round(float(kept[col].mean())))
        row["num_prefill_chunks"] = int(kept["num_prefill_chunks"].iloc[0])
        row["repetitions"] = int(len(kept))
        row.update(summarize_times(kept["wall_s"].to_numpy()))
        row["num_discarded_contended"] = int((matched["contended"]).sum()) if len(kept) != len(matched) else 0
        row["num_discarded_mismatch"] = int((~g["matched"]).sum())
        rows.append(row)
    timed = {int(i) for i in steps["shape_id"].unique()} if len(steps) else set()
    counts["shapes_without_matching_step"] += len(set(range(len(shapes))) - timed)
    return pd.DataFrame(rows), counts

