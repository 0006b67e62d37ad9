"""How sure a plan is: an ensemble of cost models, measured sim-vs-live errors, seed-to-seed variation.

A fleet is judged on samples: every (workload seed, cost-model member) pair is simulated, and
each result is judged once per draw of the measured sim-vs-live error. A sample is one value
of every class's SLO attainment; the plan reports each class's attainment as an interval over
the samples and the share of samples meeting every target (`p_meet`). Method and assumptions
are in docs/planning.md (our design: the tools compared in issue 16 return point estimates).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from sim.errors import InputError
from sim.qos import QoS, attainment_from_violations, needs_steps, violations


# ---------------------------------------------------------------- cost-model ensemble


class ScaledCostModel:
    """A cost model whose every step takes `factor` times as long as `base`'s (KV capacity and
    load time unchanged). Invariant: factor > 0. Used for a relative error band (our design)."""

    def __init__(self, base: Any, factor: float) -> None:
        if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
            raise InputError("a step-time factor must be a positive number", field="factor", value=factor)
        self.base, self.factor = base, float(factor)
        self.name = f"{getattr(base, 'name', 'cost model')} x{self.factor:.3g}"
        for attr in ("model", "gpu", "tp", "provenance"):  # what the wiring checks
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))
        if hasattr(base, "decode_step_time_fn"):
            self.decode_step_time_fn = self._decode_step_time_fn

    def step_time_s(self, num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size):
        return self.factor * self.base.step_time_s(num_prefill_tokens, prefill_context, num_decodes,
                                                   decode_context_sum, batch_size)

    def step_times_s(self, num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size):
        return self.factor * np.asarray(self.base.step_times_s(num_prefill_tokens, prefill_context, num_decodes,
                                                               decode_context_sum, batch_size))

    def _decode_step_time_fn(self, num_decodes: int) -> Callable[[int], float]:
        f, k = self.base.decode_step_time_fn(num_decodes), self.factor
        return lambda decode_context_sum: k * f(decode_context_sum)

    def num_kv_blocks(self, block_size: int) -> int | None:
        return self.base.num_kv_blocks(block_size)

    def model_load_s(self) -> float:
        return self.base.model_load_s()


def band_factors(low: float, high: float, num_members: int) -> list[float]:
    """`num_members` step-time factors at the midpoints of equal slices of [low, high] (a
    stratified sample of a uniform band; 1 member: the band's midpoint). InputError unless
    0 < low <= high and num_members >= 1."""
    if not (0 < low <= high) or num_members < 1:
        raise InputError("need 0 < low <= high and at least one member", field="uncertainty.band",
                         value=(low, high, num_members))
    return [low + (i + 0.5) / num_members * (high - low) for i in range(num_members)]


def bootstrap_linear_models(cost_model: Any, profile: pd.DataFrame, num_members: int, seed: int = 0) -> list:
    """Refit a fitted `LinearRegimesCostModel` on `num_members` bootstrap resamples of its profile
    rows (`profile`: the profiler's table, `median_s` and the shape columns), with the model's
    own regime splits and capacity facts; member 0 is the shipped model itself. The spread of
    the members is the cost model's own estimation error (Efron's nonparametric bootstrap).
    InputError when the model is not a fitted linear model or a resample cannot be fitted."""
    from profiler.fit import fit_regimes
    from sim.costmodels.linear import LinearRegimesCostModel

    if not isinstance(cost_model, LinearRegimesCostModel) or (cost_model.provenance or {}).get("kind") != "fitted":
        raise InputError("bootstrap refits need a fitted linear cost model (profiler.fit)", field="costmodel",
                         value=getattr(cost_model, "name", None))
    splits = tuple(int(r.max_total_tokens) for r in cost_model.regimes[:-1])
    base = cost_model.to_dict()
    rng = np.random.default_rng(seed)
    members = [cost_model]
    attempts = 0
    while len(members) < num_members:
        attempts += 1
        if attempts > 10 * num_members:
            raise InputError("bootstrap resamples of the profile cannot be fitted (too few rows per regime)",
                             field="uncertainty.num_members", value=num_members)
        rows = profile.iloc[rng.integers(0, len(profile), len(profile))]
        regimes = fit_regimes(rows, splits)
        if regimes is None:
            continue
        d = dict(base, name=f"{cost_model.name}-boot{len(members)}", regimes=[r.to_dict() for r in regimes])
        members.append(LinearRegimesCostModel.from_dict(d))
    return members


def profile_of(cost_model: Any) -> Path | None:
    """The profile table a fitted cost model was fitted on (its provenance), or None."""
    prov = getattr(cost_model, "provenance", None) or {}
    path = prov.get("profile") if isinstance(prov, dict) else None
    if not path:
        return None
    from sim.paths import project_path

    p = Path(path)
    return p if p.is_file() else project_path(path)


# ---------------------------------------------------------------- measured sim-vs-live error


@dataclass(frozen=True)
class LiveError:
    """Measured signed relative errors of the simulation against a live engine ((sim - live) /
    live, one value a compared condition) for TTFT and TPOT. Invariant: equal, non-empty
    lists of numbers > -1. `source` says where they were measured."""

    ttft: tuple[float, ...]
    tpot: tuple[float, ...]
    source: str = ""

    def __post_init__(self) -> None:
        if not self.ttft or len(self.ttft) != len(self.tpot) or min(self.ttft + self.tpot) <= -1:
            raise InputError("need equal, non-empty lists of relative errors > -1", field="uncertainty.live_error",
                             value=(len(self.ttft), len(self.tpot)))

    @classmethod
    def from_mapping(cls, node: Mapping | None) -> LiveError | None:
        """From `{ttft: [...], tpot: [...], source: "..."}` (None passes through)."""
        if node is None:
            return None
        unknown = sorted(set(node) - {"ttft", "tpot", "source"})
        if unknown:
            raise InputError(f"unknown key(s) {unknown}; known: ['source', 'tpot', 'ttft']",
                             field="uncertainty.live_error")
        try:
            return cls(tuple(float(x) for x in node.get("ttft") or ()), tuple(float(x) for x in node.get("tpot") or ()),
                       str(node.get("source", "")))
        except (TypeError, ValueError):
            raise InputError("must be lists of numbers", field="uncertainty.live_error", value=node) from None

    def draws(self, num_draws: int, seed: int) -> list[tuple[float, float]]:
        """`num_draws` (ttft, tpot) error pairs, each one compared condition drawn at random
        (the two metrics of a condition stay paired); the first is always (0, 0): the plain sim."""
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(self.ttft), max(num_draws - 1, 0))
        return [(0.0, 0.0)] + [(self.ttft[i], self.tpot[i]) for i in idx]


def as_live(requests: pd.DataFrame, ttft_error: float, tpot_error: float) -> pd.DataFrame:
    """The request table as a live engine would have shown it if the simulation was off by the
    given signed relative errors: TTFT / (1 + e_ttft), TPOT / (1 + e_tpot), and end-to-end
    rebuilt from them (TTFT + TPOT x (output tokens - 1)). Other columns are unchanged."""
    if ttft_error == 0 and tpot_error == 0:
        return requests
    out = requests.copy()
    out["ttft_s"] = requests["ttft_s"] / (1 + ttft_error)
    out["tpot_s"] = requests["tpot_s"] / (1 + tpot_error)
    gaps = np.maximum(requests["num_output_tokens"].to_numpy(dtype=float) - 1, 0)
    out["e2e_s"] = out["ttft_s"] + np.nan_to_num(out["tpot_s"].to_numpy(dtype=float)) * gaps
    return out


# ---------------------------------------------------------------- samples, intervals, confidence


def attainment(requests: pd.DataFrame, qos: QoS, steps: pd.DataFrame | None = None) -> dict[str, float]:
    """Each class's SLO attainment (share of judged requests that met every objective;
    `sim.qos.attainment_from_violations`), classes without a judged request left out."""
    v = violations(requests, qos, steps if needs_steps(qos) else None)
    return {k: a["attainment"] for k, a in attainment_from_violations(v, qos).items() if a["num_judged"]}


def samples_from_run(requests: pd.DataFrame, qos: QoS, live: Sequence[tuple[float, float]],
                     steps: pd.DataFrame | None = None, sustainable: bool = True) -> list[dict[str, float]]:
    """One attainment sample per live-error draw of one simulated run (`live` empty: the run as
    is); `sustainable=False` marks every sample of an overloaded run (see `SUSTAINABLE`)."""
    extra = {} if sustainable else {SUSTAINABLE: False}
    return [{**attainment(as_live(requests, e1, e2), qos, steps), **extra} for e1, e2 in (live or [(0.0, 0.0)])]


SUSTAINABLE = "_sustainable"
"""Sample key (not a class): False when the run's backlog took too long to clear after the last
arrival (an overloaded fleet whose finite run hides it, see planner.capacity); such a sample fails."""


def meets(sample: Mapping[str, float], targets: Mapping[str, float]) -> bool:
    """Whether every class with a target meets it in one sample (a class missing from the sample
    has no judged request and is not judged), and the run was sustainable."""
    return bool(sample.get(SUSTAINABLE, True)) and all(sample[k] >= t for k, t in targets.items() if k in sample)


def summarize_samples(samples: Sequence[Mapping[str, float]], targets: Mapping[str, float],
                      confidence: float) -> dict:
    """Per class: mean, and the central interval holding `confidence` of the samples (empirical
    quantiles); `p_meet`: the share of samples where every class meets its target; `meets`:
    p_meet >= confidence. InputError for no samples or a confidence outside (0, 1)."""
    if not samples:
        raise InputError("no samples to judge", field="uncertainty")
    if not 0 < confidence < 1:
        raise InputError("must be in (0, 1)", field="plan.confidence", value=confidence)
    classes = sorted({k for s in samples for k in s if k != SUSTAINABLE})
    lo_q, hi_q = (1 - confidence) / 2, 1 - (1 - confidence) / 2
    per_class = {}
    for k in classes:
        x = np.array([s[k] for s in samples if k in s], dtype=float)
        per_class[k] = {"mean": float(x.mean()), "low": float(np.quantile(x, lo_q)), "high": float(np.quantile(x, hi_q)),
                        "min": float(x.min()), "target": targets.get(k)}
    hits = sum(meets(s, targets) for s in samples)
    return {"num_samples": len(samples), "p_meet": hits / len(samples), "meets": hits / len(samples) >= confidence,
            "confidence": confidence, "num_unsustainable": sum(not s.get(SUSTAINABLE, True) for s in samples),
            "attainment": per_class}
