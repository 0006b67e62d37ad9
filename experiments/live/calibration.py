"""Speed calibration of a cost model on the live engine, minutes before a replay.

`calibrate_speed` times a fixed set of reference steps (`ReferenceSteps`) on the very engine
instance that will serve the replay (the profiler's shape measurement: each step's composition
checked, steps that lost the core discarded), prices each with the cost model, and fits how far
the engine's speed now is from the profile's:

- `scale`, one number: measured over priced time of all reference steps;
- `scale_by_kind`: the same per step kind (prefill / decode / mixed);
- `scale_by_size`: per step kind, measured over priced time at each reference *size* (decode
  steps: requests in the batch; prefill and mixed steps: prefill tokens in the step), read
  between the sizes by linear interpolation in log(size), held at the end values outside them.

`ScaledCostModel` multiplies the profile's price of every step by its kind's scale, or by the
interpolated size scale. The engine's speed tracked over a replay: `experiments.live.speed_track`. Why sizes (our design, from measurement): on the project's 2-vCPU hosts
the engine's decode step moved against the shipped profile by different amounts at different batch
sizes (2026-11-30, one engine: measured / profile price 0.94 at 1 request, 0.75-0.80 at 4,
0.85-0.87 at 8-16, 0.92-0.99 at 32-64), so one decode scale overpriced the small batches a
lightly loaded replay runs by 15-20% (TBT P50 +14% in that replay). `step_price_errors` reports,
per kind and size, how far the calibrated prices of the steps the replay actually ran are from
their measured times, so a speed error is told apart from a scheduling one.
"""

from __future__ import annotations

import gc
import math
import time
from bisect import bisect_right
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from experiments.live.server import ServerError
from sim.errors import InputError

STEP_KINDS = ("prefill", "decode", "mixed")
"""Step kinds a speed scale may differ by: prefill chunks only, decodes only, both."""

SIZE_AXIS = {"prefill": "num_prefill_tokens", "decode": "num_decodes", "mixed": "num_prefill_tokens"}
"""The step feature a kind's speed scale is interpolated along (`scale_by_size`)."""

SIZE_BINS = {"prefill": (0, 64, 128, 256, 384, 512, math.inf), "decode": (0, 1, 2, 4, 8, 16, 32, 64, math.inf),
             "mixed": (0, 64, 128, 256, 384, 512, math.inf)}
"""Size bins (left-open) `step_price_errors` reports the price error in, per kind."""


def step_kind(num_prefill_tokens, num_decodes) -> np.ndarray:
    """'prefill' / 'decode' / 'mixed' per step (arrays of equal length; scalars give a 0-d array)."""
    p = np.asarray(num_prefill_tokens) > 0
    d = np.asarray(num_decodes) > 0
    return np.where(p & d, "mixed", np.where(p, "prefill", "decode"))


def kind_of(num_prefill_tokens: int, num_decodes: int) -> str:
    """`step_kind` of one step, for the per-step pricing path (no numpy)."""
    if num_prefill_tokens > 0:
        return "mixed" if num_decodes > 0 else "prefill"
    return "decode"


def priced_steps(steps: pd.DataFrame | None, cost_model) -> tuple[pd.DataFrame, np.ndarray]:
    """The steps of a replay's step table that ran something (vLLM runs a few empty engine steps: no
    step of any kind) and `cost_model`'s price of each, seconds."""
    if steps is None or steps.empty:
        return pd.DataFrame(), np.zeros(0)
    steps = steps[(steps["num_prefill_tokens"] + steps["num_decodes"]) > 0]
    price = np.asarray(cost_model.step_times_s(*(steps[c].to_numpy() for c in (
        "num_prefill_tokens", "prefill_context", "num_decodes", "decode_context_sum", "batch_size"))), dtype=float)
    return steps, price


@dataclass(frozen=True)
class ReferenceSteps:
    """The fixed reference steps timed before each replay (our design: the step kinds and sizes a
    replay of these workloads spends its time in, cheap to set up). Chunks are (tokens, tokens
    already in KV)."""

    prefill_chunks: tuple[tuple[int, int], ...] = ((64, 0), (256, 0), (512, 0), (256, 512))
    """Pure-prefill steps (one chunk each)."""
    decode_batches: tuple[int, ...] = (1, 16, 48)
    """Decode-only steps of this many requests."""
    decode_context: int = 256
    """Tokens in KV of each decoding request when its batch is set up."""
    mixed_chunks: tuple[int, ...] = (128, 384)
    """Prefill chunks added to decode batches for mixed steps."""
    repetitions: int = 5
    """Clean timed steps per reference step (the median is used)."""
    mixed_batches: tuple[int, ...] | None = None
    """The decode batches the mixed chunks are added to; None: every one but the first."""

    def __post_init__(self) -> None:
        f = "calibration.reference"
        if self.repetitions < 1:
            raise InputError("must be >= 1", field=f"{f}.repetitions", value=self.repetitions)
        if self.decode_context < 1:
            raise InputError("must be >= 1 token", field=f"{f}.decode_context", value=self.decode_context)
        if not self.decode_batches or min(self.decode_batches) < 1:
            raise InputError("give at least one decode batch, each of >= 1 request", field=f"{f}.decode_batches",
                             value=list(self.decode_batches))
        if any(n < 1 or c < 0 for n, c in self.prefill_chunks):
            raise InputError("each chunk is [tokens >= 1, tokens already in KV >= 0]", field=f"{f}.prefill_chunks",
                             value=[list(c) for c in self.prefill_chunks])
        if any(m < 1 for m in self.mixed_chunks):
            raise InputError("each mixed chunk must be >= 1 token", field=f"{f}.mixed_chunks",
                             value=list(self.mixed_chunks))
        if self.mixed_batches is not None and not set(self.mixed_batches) <= set(self.decode_batches):
            raise InputError("every mixed batch must be one of decode_batches (give mixed_batches with them, "
                             "or null for all but the first)", field="calibration.reference.mixed_batches",
                             value=list(self.mixed_batches))

    def check_budget(self, max_tokens: int) -> None:
        """InputError naming the first reference step that cannot be one engine step under a token
        budget of `max_tokens` (it would otherwise be silently left out)."""
        f = "calibration.reference"
        for n, c in self.prefill_chunks:
            if n > max_tokens:
                raise InputError(f"a prefill chunk over the engine's token budget ({max_tokens})",
                                 field=f"{f}.prefill_chunks", value=[n, c])
        for b in self.decode_batches:
            if b > max_tokens:
                raise InputError(f"a decode batch over the engine's token budget ({max_tokens})",
                                 field=f"{f}.decode_batches", value=b)
        mixed_at = self.decode_batches[1:] if self.mixed_batches is None else self.mixed_batches
        for m in self.mixed_chunks:
            if mixed_at and m + min(mixed_at) > max_tokens:
                raise InputError(f"a mixed chunk that with its decodes exceeds the engine's token budget "
                                 f"({max_tokens})", field=f"{f}.mixed_chunks", value=m)

    def shapes(self, max_tokens: int):
        from profiler.shapes import DecodeGroup, StepShape

        prefill = [StepShape(((n, c),)) for n, c in self.prefill_chunks if n <= max_tokens]
        mixed_at = set(self.decode_batches[1:] if self.mixed_batches is None else self.mixed_batches)
        groups = []
        for b in self.decode_batches:
            shapes = [StepShape((), b, self.decode_context)]
            if b in mixed_at:
                shapes += [StepShape(((m, 0),), b, self.decode_context) for m in self.mixed_chunks
                           if m + b <= max_tokens]
            groups.append(DecodeGroup(b, self.decode_context, tuple(shapes)))
        return prefill, groups


@dataclass
class SpeedCalibration:
    """Measured / priced time of the reference steps, and the scales fitted to them."""

    scale: float
    """Overall: measured over priced time of the reference steps (`fit_speed_scale`)."""
    scale_by_kind: dict[str, float]
    """The same per step kind ('prefill', 'decode', 'mixed'); kinds without a step take `scale`."""
    points: list[dict] = field(default_factory=list)
    """Per reference step: kind, features, measured median / p90 wall s, price s, ratio, repetitions."""
    wall_s: float = math.nan
    """How long the calibration took."""
    num_discarded: int = 0
    """Timed steps discarded (composition not as intended, or the core was taken away)."""
    skipped_decode_batches: list[int] = field(default_factory=list)
    """Reference decode batches left out because they would not fit the engine's KV blocks."""
    scale_by_size: dict[str, list[list[float]]] = field(default_factory=dict)
    """Per kind, [size, scale] knots sorted by size (`fit_size_scales`)."""

    def to_dict(self) -> dict:
        return {"scale": self.scale, "scale_by_kind": dict(self.scale_by_kind),
                "scale_by_size": {k: [list(p) for p in v] for k, v in self.scale_by_size.items()},
                "points": self.points, "wall_s": self.wall_s, "num_discarded": self.num_discarded,
                "skipped_decode_batches": list(self.skipped_decode_batches)}


def _usable(points: list[dict]) -> list[dict]:
    return [p for p in points if p.get("price_s", 0) > 0 and math.isfinite(p.get("measured_s", math.nan))
            and p["measured_s"] > 0]


def fit_speed_scale(points: list[dict]) -> tuple[float, dict[str, float]]:
    """(overall scale, per-kind scales) from reference points (`kind`, `measured_s`, `price_s`; each
    point's measured time is already a median over repetitions): sum of measured / sum of priced
    time, over all points and within each kind (our design: the least-squares-in-total-time
    choice, so the long steps a replay spends its time in weigh most). Kinds without a point take
    the overall scale. InputError without a usable point."""
    pts = [(p["kind"], float(p["measured_s"]), float(p["price_s"])) for p in _usable(points)]
    if not pts:
        raise InputError("speed calibration: no reference step was timed cleanly", field="calibration")
    overall = sum(m for _, m, _ in pts) / sum(q for _, _, q in pts)
    by_kind = {}
    for kind in STEP_KINDS:
        ms = [(m, q) for k, m, q in pts if k == kind]
        by_kind[kind] = sum(m for m, _ in ms) / sum(q for _, q in ms) if ms else overall
    return float(overall), {k: float(v) for k, v in by_kind.items()}


def fit_size_scales(points: list[dict]) -> dict[str, list[list[float]]]:
    """Per step kind, [size, scale] knots sorted by size: at each size (`SIZE_AXIS`: requests for a
    decode step, prefill tokens for a prefill or mixed one), measured over priced time of the
    reference points of that kind and size (points of equal size, e.g. a mixed chunk beside several
    decode batches, pooled as sums). Kinds without a usable point are left out."""
    sums: dict[tuple[str, int], list[float]] = {}
    for p in _usable(points):
        key = (p["kind"], int(p[SIZE_AXIS[p["kind"]]]))
        acc = sums.setdefault(key, [0.0, 0.0])
        acc[0] += float(p["measured_s"])
        acc[1] += float(p["price_s"])
    out: dict[str, list[list[float]]] = {}
    for (kind, size), (m, q) in sorted(sums.items()):
        out.setdefault(kind, []).append([float(size), m / q])
    return out


class _Knots:
    """Piecewise-linear in log(size) between knots, constant outside them (scalar and vector forms)."""

    def __init__(self, knots: list[list[float]]) -> None:
        pts = sorted((float(s), float(v)) for s, v in knots)
        if not pts or any(s < 1 or not (math.isfinite(v) and v > 0) for s, v in pts) \
                or len({s for s, _ in pts}) != len(pts):
            raise InputError("size scales need distinct sizes >= 1 and positive finite scales", field="scale_by_size",
                             value=knots)
        self.log_sizes = [math.log(s) for s, _ in pts]
        self.values = [v for _, v in pts]

    def at(self, size: float) -> float:
        xs, ys = self.log_sizes, self.values
        x = math.log(max(size, 1.0))
        i = bisect_right(xs, x)
        if i == 0:
            return ys[0]
        if i == len(xs):
            return ys[-1]
        w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
        return ys[i - 1] + w * (ys[i] - ys[i - 1])

    def at_many(self, sizes: np.ndarray) -> np.ndarray:
        return np.interp(np.log(np.maximum(np.asarray(sizes, dtype=float), 1.0)), self.log_sizes, self.values)


def calibrate_speed(engine, cost_model, ref: ReferenceSteps, *, min_cpu_fraction: float = 0.8) -> SpeedCalibration:
    """Time `ref`'s steps on `engine` (an `InProcessEngine`; the profiler's measurement: each step's
    composition is checked against the intended one, steps that got less than `min_cpu_fraction` of a
    core are discarded unless none is left; each timed as the engine core's step alone, the replay's
    step, `VllmStepDriver.timing='core'`), price each with `cost_model`, fit the scales. Decode
    batches that would not fit the engine's KV blocks are skipped (recorded). ServerError if the
    engine fails."""
    from profiler.measure import rows_from_steps, steps_table
    from profiler.shapes import ShapeGrid

    d = engine.driver
    grid = ShapeGrid(name="speed-calibration", prefill_chunk_sizes=[1], prefill_contexts=[0],
                     prefill_context_chunk_sizes=[1], multi_prefill=[], decode_batch_sizes=[1], decode_contexts=[1],
                     mixed_chunk_sizes=[1], repetitions=ref.repetitions, warmup_steps=2, max_attempts_factor=3,
                     shape_warmup_attempts=1)
    prefill, groups = ref.shapes(d.max_budget)
    # a decode batch (plus its mixed chunk and the steps it grows by) must fit the engine's KV blocks,
    # else setting it up would preempt (a KV-starved engine, e.g. the priority check's): skipped, recorded
    bs, blocks = engine.block_size, engine.num_kv_blocks
    fits = [g for g in groups if g.num_decodes * -(-(g.decode_context + len(g.shapes) * (1 + 3 * ref.repetitions) + 3)
                                                     // bs)
            + max((-(-n // bs) for sh in g.shapes for n, _ in sh.prefill_chunks), default=0) <= blocks]
    skipped = [g.num_decodes for g in groups if g not in fits]
    groups = fits
    t0 = time.perf_counter()
    gc.collect()
    gc.disable()
    timing, d.timing = d.timing, "core"  # the engine core's step alone: what the replay steps
    try:
        shapes, timed = d.measure(prefill, groups, grid, min_cpu_fraction=min_cpu_fraction)
    except Exception as e:  # noqa: BLE001
        raise ServerError(f"the engine failed during the speed calibration: {type(e).__name__}: {e}") from e
    finally:
        d.timing = timing
        gc.enable()
    wall = time.perf_counter() - t0
    st = steps_table(timed)
    rows, counts = rows_from_steps(st, shapes, {})
    points = []
    for _, r in rows.iterrows():
        price = float(cost_model.step_time_s(int(r["num_prefill_tokens"]), int(r["prefill_context"]),
                                             int(r["num_decodes"]), int(r["decode_context_sum"]),
                                             int(r["batch_size"])))
        kind = str(step_kind(r["num_prefill_tokens"], r["num_decodes"]))
        measured = float(r["median_s"]) if "median_s" in r else float(r["wall_median_s"])
        points.append({"kind": kind, **{c: int(r[c]) for c in ("num_prefill_tokens", "prefill_context",
                                                                "num_decodes", "decode_context_sum", "batch_size")},
                       "measured_s": measured, "price_s": price, "ratio": measured / price if price > 0 else math.nan,
                       "repetitions": int(r["repetitions"])})
    scale, by_kind = fit_speed_scale(points)
    discarded = int(counts.get("steps_mismatched", 0)) + int(counts.get("steps_contended", 0))
    return SpeedCalibration(scale, by_kind, points, wall, discarded, skipped, fit_size_scales(points))


class ScaledCostModel:
    """A cost model whose step times are multiplied by a measured speed scale: one per step kind
    ('prefill', 'decode', 'mixed'), or, for the kinds `scale_by_size` has knots for, the scale
    interpolated at the step's size (`SIZE_AXIS`; linear in log(size), constant beyond the knots).
    Our design: the shipped profile gives the shape of the step-time function; the scales, timed on
    the live engine minutes before, give this host's speed at the moment of the replay.

    InputError (field `scale_by_kind.<kind>` / `scale_by_size`) for a scale that is not a positive
    finite number."""

    def __init__(self, base, scale_by_kind: dict[str, float],
                 scale_by_size: dict[str, list[list[float]]] | None = None) -> None:
        for k in STEP_KINDS:
            v = scale_by_kind.get(k)
            if v is None or not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise InputError("a speed scale must be a positive number", field=f"scale_by_kind.{k}", value=v)
        self.base = base
        self.scale_by_kind = {k: float(scale_by_kind[k]) for k in STEP_KINDS}
        self.knots = {k: _Knots(v) for k, v in (scale_by_size or {}).items() if k in STEP_KINDS and v}
        s = self.scale_by_kind
        sized = f", by size for {'/'.join(self.knots)}" if self.knots else ""
        self.name = (f"{getattr(base, 'name', 'cost model')} x speed(prefill {s['prefill']:.3f}, "
                     f"decode {s['decode']:.3f}, mixed {s['mixed']:.3f}{sized})")

    def _scale(self, num_prefill_tokens, num_decodes):
        kind = kind_of(num_prefill_tokens, num_decodes)
        size = num_decodes if kind == "decode" else num_prefill_tokens
        kn = self.knots.get(kind)
        return kn.at(size) if kn is not None else self.scale_by_kind[kind]

    def step_time_s(self, num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size) -> float:
        t = self.base.step_time_s(num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size)
        return t * self._scale(num_prefill_tokens, num_decodes)

    def step_times_s(self, num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size):
        t = np.asarray(self.base.step_times_s(num_prefill_tokens, prefill_context, num_decodes, decode_context_sum,
                                              batch_size), dtype=float)
        pf = np.broadcast_to(np.asarray(num_prefill_tokens), t.shape)
        nd = np.broadcast_to(np.asarray(num_decodes), t.shape)
        kinds = step_kind(pf, nd)
        scale = np.empty(t.shape, dtype=float)
        for kind in STEP_KINDS:
            m = kinds == kind
            kn = self.knots.get(kind)
            if kn is None:
                scale[m] = self.scale_by_kind[kind]
            elif m.any():
                scale[m] = kn.at_many((nd if kind == "decode" else pf)[m])
        return t * scale

    def num_kv_blocks(self, block_size: int):
        return self.base.num_kv_blocks(block_size)

    def model_load_s(self) -> float:
        return self.base.model_load_s()


def step_price_errors(steps: pd.DataFrame, cost_model) -> dict:
    """How far `cost_model`'s price of each step the engine ran is from its measured time, per step
    kind: median and mean of (price - measured) / measured, the measured / priced time sums, and
    the same per size bin (`SIZE_BINS`, key `by_size`: bin label -> steps, median error, sum error).
    Separates a speed error (this) from a scheduling error (the request-level comparison)."""
    steps, price = priced_steps(steps, cost_model)
    if steps.empty:
        return {}
    wall = steps["wall_s"].to_numpy(dtype=float)
    kinds = step_kind(steps["num_prefill_tokens"].to_numpy(), steps["num_decodes"].to_numpy())
    out = {}
    for kind in ("all",) + STEP_KINDS:
        m = np.ones(len(wall), bool) if kind == "all" else kinds == kind
        if not m.any():
            continue
        rel = (price[m] - wall[m]) / wall[m]
        out[kind] = {"num_steps": int(m.sum()), "median_rel_error": float(np.median(rel)),
                     "mean_rel_error": float(np.mean(rel)), "measured_sum_s": float(wall[m].sum()),
                     "price_sum_s": float(price[m].sum()),
                     "sum_rel_error": float(price[m].sum() / wall[m].sum() - 1)}
        if kind == "all":
            continue
        size = steps[SIZE_AXIS[kind]].to_numpy()[m]
        edges = SIZE_BINS[kind]
        by_size = {}
        for lo, hi in zip(edges[:-1], edges[1:]):
            b = (size > lo) & (size <= hi)
            if b.any():
                label = f"({lo}, {hi:g}]"
                by_size[label] = {"num_steps": int(b.sum()), "median_rel_error": float(np.median(rel[b])),
                                  "sum_rel_error": float(price[m][b].sum() / wall[m][b].sum() - 1)}
        out[kind]["by_size"] = by_size
    return out


def pooled(before: SpeedCalibration, after: SpeedCalibration | None) -> SpeedCalibration:
    """One calibration from the reference steps timed before and after a replay: every scale refitted
    on both sets of points (sums of measured over priced time, so each knot averages the two
    timings). Our design: the engine's speed on these hosts wanders by a few percent within a minute
    (the drift `experiments.validate` reports), so the speed during the replay is better estimated by
    timings on both sides of it than by the one before. `after` None: `before` as it is."""
    if after is None:
        return before
    points = list(before.points) + list(after.points)
    scale, by_kind = fit_speed_scale(points)
    return SpeedCalibration(scale, by_kind, points, before.wall_s + after.wall_s,
                            before.num_discarded + after.num_discarded,
                            sorted(set(before.skipped_decode_batches) | set(after.skipped_decode_batches)),
                            fit_size_scales(points))
