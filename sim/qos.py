"""QoS classes and the one SLO system: each class's objectives, the deadlines schedulers derive
from them, and the judgement of every request against its class.

A tier names a QoS class and gives any of: a first-token deadline (`ttft_s`), a per-token
decode target (`tbt_s`), a limit on the longest token gap (`tbt_max_s`), an end-to-end
deadline (`e2e_s`), a mean time per output token (`tpot_s`) and its share of traffic.
Schedulers read the *first-token deadline*: `ttft_s` when given, else derived from the
end-to-end deadline as `e2e_s - predicted_output_tokens * tbt_s`; decode token k (the first
output token is k = 0) is due at `arrival + max(first_token - arrival, first-token deadline)
+ tbt_s * k`. `violations` judges each request once (met or violated, and why); violation
rates (`rates_from_violations`) and SLO attainment (`attainment_from_violations`) are both
aggregations of that one table. All are pure functions over the request (and step) tables.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from sim.errors import InputError
from sim.request import FINISHED, NOT_ARRIVED, REJECTED

OBJECTIVES: tuple[str, ...] = ("ttft", "tpot", "tbt_max", "e2e", "tbt")
"""Objectives a tier may count, each judged against the tier's `<objective>_s` limit: time to
first token, mean time per output token, the longest gap between two tokens, end-to-end
latency, and every decode token by its per-token deadline (`tbt`; needs the step table)."""

DEFAULT_OBJECTIVES: tuple[str, ...] = ("ttft", "tpot", "tbt_max", "e2e")
"""Counted when a tier lists none (`violation` absent): every one of these whose limit is given."""

ANY_CLASS = "*"
"""A tier of this name judges requests whose class has no tier of its own (schedulers ignore it)."""

RULES: tuple[str, ...] = ("max_tier", "overall")
"""How one number summarises a run's violations: the worst tier's rate, or all requests pooled."""

_TIER_KEYS = {"ttft_s", "tpot_s", "e2e_s", "tbt_s", "tbt_max_s", "share", "violation"}


def _limit(value: object, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InputError("must be a positive number of seconds or null", field=where, value=value)
    return float(value)


@dataclass(frozen=True)
class Tier:
    """One QoS class. Invariant: limits are positive or None; `violation` lists known objectives
    whose limit is given (with an empty list a request violates only by not being served:
    rejected or unfinished)."""

    name: str
    """The `qos_class` this tier applies to."""
    ttft_s: float | None = None
    """First-token deadline after arrival."""
    tbt_s: float | None = None
    """Per-token decode target: decode token k is due `tbt_s * k` after the first-token deadline."""
    e2e_s: float | None = None
    """End-to-end deadline after arrival."""
    tpot_s: float | None = None
    """Mean time per output token (the simple interactive/batch objective)."""
    share: float | None = None
    """Share of traffic (normalised over the tiers that give one); None if the workload decides."""
    violation: tuple[str, ...] = ()
    """Objectives that count as a violation (see `OBJECTIVES`)."""
    tbt_max_s: float | None = None
    """Longest allowed gap between two consecutive tokens of a request (any tokens, any replica)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InputError("tier names must be non-empty text", field="classes", value=self.name)
        for key in ("ttft_s", "tbt_s", "e2e_s", "tpot_s", "tbt_max_s"):
            _limit(getattr(self, key), f"classes.{self.name}.{key}")
        if self.share is not None and not (isinstance(self.share, (int, float)) and self.share > 0):
            raise InputError("must be a positive number or null", field=f"classes.{self.name}.share", value=self.share)
        for objective in self.violation:
            if objective not in OBJECTIVES:
                raise InputError(f"unknown objective; use any of {list(OBJECTIVES)}",
                                 field=f"classes.{self.name}.violation", value=objective)
            needs = f"{objective}_s"
            if getattr(self, needs) is None:
                raise InputError(f"counts {objective!r} violations but gives no {needs}",
                                 field=f"classes.{self.name}.violation", value=list(self.violation))

    @property
    def decode_target_s(self) -> float | None:
        """Spacing of decode-token deadlines: `tbt_s`, else `tpot_s` (a mean-rate target), else None."""
        return self.tbt_s if self.tbt_s is not None else self.tpot_s

    def first_token_deadline_s(self, predicted_output_tokens: float) -> float:
        """First-token deadline after arrival (inf when the tier has none)."""
        if self.ttft_s is not None:
            return self.ttft_s
        if self.e2e_s is not None:
            return self.e2e_s - predicted_output_tokens * (self.decode_target_s or 0.0)
        return math.inf

    @classmethod
    def from_config(cls, name: str, config: Mapping | None) -> Tier:
        config = dict(config or {})
        unknown = sorted(set(config) - _TIER_KEYS)
        if unknown:
            raise InputError(f"unknown key(s) {unknown}; allowed: {sorted(_TIER_KEYS)}", field=f"classes.{name}",
                             value=config)
        violation = config.get("violation")
        if violation is None:  # default: every objective whose limit is given
            violation = [o for o in DEFAULT_OBJECTIVES if config.get(f"{o}_s") is not None]
        elif isinstance(violation, str):
            violation = [violation]
        return cls(name=name, ttft_s=config.get("ttft_s"), tbt_s=config.get("tbt_s"), e2e_s=config.get("e2e_s"),
                   tpot_s=config.get("tpot_s"), share=config.get("share"), violation=tuple(violation),
                   tbt_max_s=config.get("tbt_max_s"))


@dataclass(frozen=True)
class QoS:
    """The tiers of a deployment plus how schedulers predict output lengths.

    Invariant: `output_prediction` is "oracle" (a request's true output length, as the
    Niyama artifact uses when the trace gives it) or a whole number of tokens >= 0."""

    tiers: Mapping[str, Tier] = field(default_factory=dict)
    """Tier by QoS class name; requests of other classes have no objectives."""
    output_prediction: str | int = "oracle"
    """Output tokens assumed when deriving first-token deadlines from end-to-end ones."""
    relegated_is_violation: bool = False
    """Count every relegated request as violated, whether or not it met its objectives."""

    def __post_init__(self) -> None:
        op = self.output_prediction
        if not (op == "oracle" or (isinstance(op, int) and not isinstance(op, bool) and op >= 0)):
            raise InputError('must be "oracle" or a whole number of tokens >= 0', field="output_prediction", value=op)

    @classmethod
    def from_config(cls, slo: object) -> QoS:
        """From an slo config: `{classes: {name: {...}}, output_prediction, relegated_is_violation}`
        (None or a config without classes gives no tiers)."""
        from sim.workload.options import plain

        slo = plain(slo) if slo is not None else {}
        if isinstance(slo, QoS):
            return slo
        if not isinstance(slo, dict):
            raise InputError("an slo config must be a mapping with `classes`", field="slo", value=slo)
        classes = slo.get("classes") or {}
        if not isinstance(classes, dict):
            raise InputError("must map class name -> objectives", field="slo.classes", value=classes)
        tiers = {str(name): Tier.from_config(str(name), obj) for name, obj in classes.items()}
        return cls(tiers=tiers, output_prediction=slo.get("output_prediction", "oracle"),
                   relegated_is_violation=bool(slo.get("relegated_is_violation", False)))

    def tier(self, qos_class: str) -> Tier | None:
        return self.tiers.get(qos_class)

    def predicted_output_tokens(self, num_output_tokens: int) -> int:
        return num_output_tokens if self.output_prediction == "oracle" else int(self.output_prediction)

    def first_token_deadline_s(self, qos_class: str, num_output_tokens: int) -> float:
        """A request's first-token deadline after arrival (inf without a tier or a deadline)."""
        tier = self.tiers.get(qos_class)
        if tier is None:
            return math.inf
        return tier.first_token_deadline_s(self.predicted_output_tokens(num_output_tokens))

    def decode_target_s(self, qos_class: str) -> float | None:
        tier = self.tiers.get(qos_class)
        return None if tier is None else tier.decode_target_s

    def shares(self) -> dict[str, float] | None:
        """Traffic shares of the tiers that give one (None if none does)."""
        shares = {name: t.share for name, t in self.tiers.items() if t.share is not None}
        return shares or None


def needs_steps(qos: QoS) -> bool:
    """Whether judging requests against `qos` needs the step table (some tier counts `tbt`)."""
    return any("tbt" in t.violation for t in qos.tiers.values())


def first_token_deadlines_s(requests: pd.DataFrame, qos: QoS) -> np.ndarray:
    """Per request: the first-token deadline after arrival that schedulers use (inf without one)."""
    return np.array([qos.first_token_deadline_s(c, int(o)) for c, o in
                     zip(requests["qos_class"], requests["num_output_tokens"])], dtype=float)


def judging_tiers(classes: np.ndarray, qos: QoS) -> np.ndarray:
    """Per request class: the name of the tier it is judged by: its own, else the `ANY_CLASS`
    tier if there is one, else "" (no tier: never violates, counted apart)."""
    fallback = ANY_CLASS if ANY_CLASS in qos.tiers else ""
    names = {c: (c if c in qos.tiers else fallback) for c in set(classes.tolist())}
    return np.array([names[c] for c in classes], dtype=object)


def _judged_deadlines_s(requests: pd.DataFrame, tiers: np.ndarray, qos: QoS) -> np.ndarray:
    """Per request: the first-token deadline of the tier judging it (inf without one)."""
    return np.array([qos.tiers[t].first_token_deadline_s(qos.predicted_output_tokens(int(o))) if t else math.inf
                     for t, o in zip(tiers, requests["num_output_tokens"])], dtype=float)


def decode_deadline_misses(requests: pd.DataFrame, steps: pd.DataFrame, qos: QoS) -> np.ndarray:
    """Per request: True if some decode token came after its per-token deadline
    `arrival + max(ttft, first-token deadline) + tbt_s * k` (False without a tbt target or tokens)."""
    tiers = judging_tiers(requests["qos_class"].astype(str).to_numpy(), qos)
    return _decode_deadline_misses(requests, steps, qos, tiers, _judged_deadlines_s(requests, tiers, qos))


def _decode_deadline_misses(requests: pd.DataFrame, steps: pd.DataFrame, qos: QoS, tiers: np.ndarray,
                            deadlines_s: np.ndarray) -> np.ndarray:
    miss = np.zeros(len(requests), dtype=bool)
    if not len(requests) or not len(steps):
        return miss
    ends_by_rep = {int(rep): (g["start_s"] + g["duration_s"]).to_numpy()
                   for rep, g in steps.sort_values(["replica", "step"]).groupby("replica", sort=True)}
    t0 = requests["arrival_s"].to_numpy() + np.maximum(requests["ttft_s"].to_numpy(dtype=float), deadlines_s)
    moved = requests["token_replicas"] if "token_replicas" in requests else None
    for name, tier in qos.tiers.items():
        if tier.tbt_s is None:
            continue
        tbt = tier.tbt_s
        rows = np.flatnonzero((tiers == name) & (requests["num_output_tokens_done"] > 1).to_numpy())
        for i in rows:
            runs = np.asarray(requests["token_steps"].iat[i], dtype=np.int64)
            if len(runs) == 0:
                continue
            a, b = runs[0::2], runs[1::2]
            # the replica of each run: the request's, or per run when it moved between replicas
            reps = moved.iat[i] if moved is not None and moved.iat[i] is not None else None
            reps = [int(requests["replica"].iat[i])] * len(a) if reps is None else [int(r) for r in reps]
            if any(r not in ends_by_rep for r in reps):
                continue
            lengths = b - a + 1
            k_start = np.concatenate(([0], np.cumsum(lengths)[:-1]))
            # token times minus their offsets tbt*k; the first token (k = 0) is the ttft objective's
            times = np.concatenate([ends_by_rep[r][x: y + 1] for x, y, r in zip(a, b, reps)])
            k = np.concatenate([ks + np.arange(n) for ks, n in zip(k_start, lengths)])
            late = times[1:] - tbt * k[1:] > t0[i] + 1e-9
            miss[i] = bool(late.any())
    return miss


def _misses(requests: pd.DataFrame, tier: Tier, objective: str) -> np.ndarray:
    """Per request: whether it missed `objective` of `tier` (finished requests; not `tbt`)."""
    if objective == "ttft":
        return requests["ttft_s"].to_numpy(dtype=float) > tier.ttft_s
    if objective == "e2e":
        return requests["e2e_s"].to_numpy(dtype=float) > tier.e2e_s
    # a request with one output token has no token gap: tpot / tbt_max undefined, met
    column = "tpot_s" if objective == "tpot" else "tbt_max_s"
    return np.nan_to_num(requests[column].to_numpy(dtype=float), nan=0.0) > getattr(tier, f"{objective}_s")


def violations(requests: pd.DataFrame, qos: QoS, steps: pd.DataFrame | None = None) -> pd.DataFrame:
    """The judgement: one row per request with the tier judging it (`tier`; "" none), its
    outcome, whether it violated (`violated`) and why (`reason`: the first counted objective
    missed, in the tier's order, or rejected / unfinished / relegated), and whether it was
    relegated. A request with a tier violates when it was rejected, unfinished, missed a
    counted objective, or was relegated under `relegated_is_violation`. A request that arrived
    after the horizon (`not_arrived`) never violates and is left out of every rate; a request
    without a tier never violates and is counted apart. `steps` is needed when a tier counts
    `tbt` (InputError otherwise)."""
    n = len(requests)
    outcome = requests["outcome"].astype(str).to_numpy()
    finished = outcome == FINISHED
    classes = requests["qos_class"].astype(str).to_numpy()
    tiers = judging_tiers(classes, qos)
    has_tier = tiers != ""
    relegated = requests["relegated"].to_numpy(dtype=bool) if "relegated" in requests else np.zeros(n, dtype=bool)
    violated = has_tier & ~finished & (outcome != NOT_ARRIVED)
    reason = np.full(n, "", dtype=object)
    reason[violated] = outcome[violated]
    deadlines = _judged_deadlines_s(requests, tiers, qos)
    if steps is None and needs_steps(qos):
        name = next(t for t, tier in qos.tiers.items() if "tbt" in tier.violation)
        raise InputError(f"tier {name!r} counts tbt violations: pass the step table", field="steps")
    tbt_miss = None
    for name, tier in qos.tiers.items():
        sel = (tiers == name) & finished
        if not sel.any():
            continue
        for objective in tier.violation:
            if objective == "tbt":  # every decode token by its deadline
                if tbt_miss is None:
                    tbt_miss = _decode_deadline_misses(requests, steps, qos, tiers, deadlines)
                miss = tbt_miss
            else:
                miss = _misses(requests, tier, objective)
            reason[sel & miss & ~violated] = objective
            violated |= sel & miss
    if qos.relegated_is_violation:
        new = has_tier & relegated & ~violated
        reason[new] = "relegated"
        violated |= new
    return pd.DataFrame({
        "request_id": requests["request_id"].to_numpy(),
        "arrival_s": requests["arrival_s"].to_numpy(),
        "qos_class": classes,
        "tier": tiers,
        "outcome": outcome,
        "has_tier": has_tier,
        "first_token_deadline_s": deadlines,
        "relegated": relegated,
        "violated": violated,
        "reason": reason,
    })


def violation_rates(requests: pd.DataFrame, qos: QoS, steps: pd.DataFrame | None = None, *,
                    count_rejected: bool = True) -> dict:
    """Per-tier and overall violation rates (JSON-ready) of `violations`; see
    `rates_from_violations`."""
    return rates_from_violations(violations(requests, qos, steps), qos, count_rejected=count_rejected)


def rates_from_violations(v: pd.DataFrame, qos: QoS, *, count_rejected: bool = True) -> dict:
    """Violation rates from a `violations` table (e.g. several runs' tables concatenated):
    per tier (its judged requests, violations, rate, rejected, not arrived, relegated, the
    violations by reason), `overall` (every judged request with a tier pooled) and `max_tier`
    (the worst tier's rate); a rate with no request judged is NaN.

    Requests that arrived after the horizon (`not_arrived`) are left out of every rate and
    counted in `num_not_arrived`. Rejected requests (the cluster can never serve them, e.g.
    longer than max_model_len) are counted in `num_rejected` and, with `count_rejected`
    (default), also as violations; without it they are left out of the rates too. Requests
    without a tier are counted in `num_without_tier` and never violate."""
    outcome = v["outcome"].to_numpy() if "outcome" in v else np.full(len(v), "", dtype=object)
    rejected = outcome == REJECTED
    left_out = (outcome == NOT_ARRIVED) | (rejected & (not count_rejected))
    judged = v[~left_out]
    tiers = {}
    for name in qos.tiers:
        in_tier = (v["tier"] == name).to_numpy()
        sel = judged[judged["tier"] == name]
        num = int(len(sel))
        bad = int(sel["violated"].sum())
        tiers[name] = {
            "num_requests": num,
            "num_violations": bad,
            "violation_rate": bad / num if num else float("nan"),
            "num_rejected": int((in_tier & rejected).sum()),
            "num_not_arrived": int((in_tier & (outcome == NOT_ARRIVED)).sum()),
            "num_relegated": int(sel["relegated"].sum()),
            "num_relegated_violations": int((sel["relegated"] & sel["violated"]).sum()),
            "reasons": {str(k): int(c) for k, c in sel.loc[sel["violated"], "reason"].value_counts().items()},
        }
    tiered = judged[judged["has_tier"]]
    rates = [t["violation_rate"] for t in tiers.values() if t["num_requests"]]
    return {
        "overall": float(tiered["violated"].mean()) if len(tiered) else float("nan"),
        "max_tier": float(max(rates)) if rates else float("nan"),
        "count_rejected": bool(count_rejected),
        "num_requests": int(len(v)),
        "num_judged": int(len(tiered)),
        "num_violations": int(tiered["violated"].sum()),
        "num_rejected": int(rejected.sum()),
        "num_not_arrived": int((outcome == NOT_ARRIVED).sum()),
        "num_relegated": int(v["relegated"].sum()),
        "num_without_tier": int((~v["has_tier"]).sum()),
        "tiers": tiers,
    }


def attainment_from_violations(v: pd.DataFrame, qos: QoS) -> dict:
    """SLO attainment per tier from a `violations` table: the share of judged requests (those
    neither rejected nor arrived after the horizon) that did not violate, i.e. finished and
    met every counted objective; `attainment_counting_rejected` also counts rejected requests
    as misses. NaN without a judged request. With rejected requests left out this is
    1 - `rates_from_violations(v, qos, count_rejected=False)` for every tier. `objectives`
    lists the limits the tier counts."""
    outcome = v["outcome"].to_numpy()
    rejected, not_arrived = outcome == REJECTED, outcome == NOT_ARRIVED
    violated = v["violated"].to_numpy(dtype=bool)
    out: dict[str, dict] = {}
    for name, tier in qos.tiers.items():
        in_tier = (v["tier"] == name).to_numpy()
        judged = in_tier & ~rejected & ~not_arrived
        num_judged, num_rejected = int(judged.sum()), int((in_tier & rejected).sum())
        num_met = int((judged & ~violated).sum())
        out[name] = {
            "num_requests": int(in_tier.sum()),
            "num_judged": num_judged,
            "num_violations": num_judged - num_met,
            "num_rejected": num_rejected,
            "num_not_arrived": int((in_tier & not_arrived).sum()),
            "attainment": num_met / num_judged if num_judged else float("nan"),
            "attainment_counting_rejected": (num_met / (num_judged + num_rejected) if num_judged + num_rejected
                                             else float("nan")),
            "objectives": {f"{o}_s": getattr(tier, f"{o}_s") for o in tier.violation},
        }
    return out


def rule_value(rates: Mapping, rule: str) -> float:
    """The one number a capacity rule reads from `violation_rates`: "max_tier" or "overall"."""
    if rule not in RULES:
        raise InputError(f"unknown violation rule; use one of {list(RULES)}", field="rule", value=rule)
    return float(rates[rule])


def violation_timeseries(requests: pd.DataFrame, qos: QoS, *, window_s: float = 300.0, step_s: float = 60.0,
                         steps: pd.DataFrame | None = None) -> pd.DataFrame:
    """Rolling violation rate by arrival time: at each `t` on a `step_s` grid, the share of
    requests arriving in (t - window_s, t] that violated, overall and per tier (long format:
    columns time_s, tier ('overall' or a tier name), num_requests, violation_rate)."""
    v = violations(requests, qos, steps)
    v = v[v["has_tier"] & (v["outcome"] != NOT_ARRIVED)].sort_values("arrival_s", kind="stable")
    if v.empty:
        return pd.DataFrame(columns=["time_s", "tier", "num_requests", "violation_rate"])
    grid = np.arange(step_s, float(v["arrival_s"].max()) + step_s, step_s)
    frames = []
    groups = [("overall", v)] + [(name, v[v["tier"] == name]) for name in qos.tiers]
    for name, g in groups:
        t = g["arrival_s"].to_numpy()
        bad = np.concatenate(([0], np.cumsum(g["violated"].to_numpy(dtype=np.int64))))
        hi = np.searchsorted(t, grid, side="right")
        lo = np.searchsorted(t, grid - window_s, side="right")
        num = hi - lo
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = np.where(num > 0, (bad[hi] - bad[lo]) / np.maximum(num, 1), np.nan)
        frames.append(pd.DataFrame({"time_s": grid, "tier": name, "num_requests": num, "violation_rate": rate}))
    return pd.concat(frames, ignore_index=True)
