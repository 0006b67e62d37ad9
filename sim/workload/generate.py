"""Synthetic workloads: arrivals from a renewal process, lengths from simple distributions.

Arrivals are a unit-rate renewal process (exponential gaps for Poisson, gamma gaps with a
given coefficient of variation for bursty traffic) mapped through the inverse of the
cumulative rate function of a piecewise-constant rate schedule. Time-rescaling is exact
for Poisson and keeps the gamma gaps' CV within each constant-rate segment, unlike
thinning. Prompt and output lengths are drawn independently per request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sim.errors import InputError
from sim.workload.options import (
    as_dict,
    assign_qos_classes,
    plain,
    positive_number,
    qos_probabilities,
    whole_number,
)
from sim.workload.table import Workload, make_requests
from sim.workload.traces import read_token_column

ARRIVAL_KINDS = ("poisson", "gamma")
LENGTH_KINDS = ("lognormal", "constant", "empirical")
TOO_LONG_MODES = ("redraw", "truncate")
"""How `synthetic` makes a request longer than `max_total_tokens` fit (see `fit_to_context`)."""
MAX_REDRAWS = 100
"""Redraw rounds before `fit_to_context` gives up (each round redraws only the requests still too long)."""


@dataclass(frozen=True)
class ArrivalProcess:
    """A renewal process on a rate schedule.

    Invariant: exactly one of `rate_qps` (constant) and `schedule` ((duration_s, rate_qps)
    segments, all > 0) is set; `cv` > 0 is the inter-arrival CV (1 for Poisson).
    """

    kind: str
    """"poisson" or "gamma"."""
    rate_qps: float | None = None
    """Constant mean arrival rate, requests per second."""
    schedule: tuple[tuple[float, float], ...] | None = None
    """Piecewise-constant rate: consecutive (duration_s, rate_qps) segments."""
    repeat: bool = False
    """Whether the schedule repeats forever (else it ends after its total duration)."""
    cv: float = 1.0
    """Coefficient of variation of the gaps between arrivals at a constant rate."""

    def __post_init__(self) -> None:
        if self.kind not in ARRIVAL_KINDS:
            raise InputError(f"unknown arrival kind; use one of {list(ARRIVAL_KINDS)}", field="arrival.kind", value=self.kind)
        if (self.rate_qps is None) == (self.schedule is None):
            raise InputError("give exactly one of rate_qps and schedule", field="arrival", value=self.rate_qps)
        if self.rate_qps is not None:
            positive_number(self.rate_qps, "arrival.rate_qps")
            if self.repeat:
                raise InputError("repeat applies to a schedule only", field="arrival.repeat", value=self.repeat)
        if self.schedule is not None:
            if not self.schedule:
                raise InputError("must hold at least one [duration_s, rate_qps] segment", field="arrival.schedule", value=[])
            for i, (duration_s, rate_qps) in enumerate(self.schedule):
                positive_number(duration_s, f"arrival.schedule[{i}].duration_s")
                positive_number(rate_qps, f"arrival.schedule[{i}].rate_qps")
        positive_number(self.cv, "arrival.cv")
        if self.kind == "poisson" and self.cv != 1.0:
            raise InputError("cv applies to kind 'gamma' only (Poisson gaps have cv 1)", field="arrival.cv", value=self.cv)

    @classmethod
    def from_config(cls, arrival: object) -> ArrivalProcess:
        """Build from the `arrival` dict of `synthetic` (kind, rate_qps | schedule, repeat, cv)."""
        config = as_dict(arrival, "arrival", {"kind", "rate_qps", "schedule", "repeat", "cv"})
        kind = config.get("kind")
        if kind == "gamma" and "cv" not in config:
            raise InputError("kind 'gamma' needs cv (the inter-arrival coefficient of variation)", field="arrival.cv")
        schedule = config.get("schedule")
        if schedule is not None:
            if not isinstance(schedule, list) or not all(isinstance(s, list) and len(s) == 2 for s in schedule):
                raise InputError("must be a list of [duration_s, rate_qps] pairs", field="arrival.schedule", value=schedule)
            schedule = tuple((d, r) for d, r in schedule)
        repeat = config.get("repeat", False)
        if not isinstance(repeat, bool):
            raise InputError("must be true or false", field="arrival.repeat", value=repeat)
        cv = config.get("cv", 1.0)
        if kind == "poisson" and "cv" in config:
            raise InputError("cv applies to kind 'gamma' only (Poisson gaps have cv 1)", field="arrival.cv", value=cv)
        return cls(kind=kind, rate_qps=config.get("rate_qps"), schedule=schedule, repeat=repeat, cv=cv)

    @property
    def ends(self) -> bool:
        """Whether the process stops by itself (a schedule without repeat)."""
        return self.schedule is not None and not self.repeat

    def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Segment boundaries in seconds and in expected arrivals (cumulative rate)."""
        durations = np.array([d for d, _ in self.schedule], dtype=float)
        rates = np.array([r for _, r in self.schedule], dtype=float)
        return np.concatenate([[0.0], np.cumsum(durations)]), np.concatenate([[0.0], np.cumsum(durations * rates)])

    def expected_arrivals(self, t_s: float) -> float:
        """Cumulative rate: expected number of arrivals in [0, t_s]."""
        if self.rate_qps is not None:
            return self.rate_qps * t_s
        bounds_s, bounds_n = self._bounds()
        if not self.repeat:
            return float(np.interp(min(t_s, bounds_s[-1]), bounds_s, bounds_n))
        periods = math.floor(t_s / bounds_s[-1])
        return periods * bounds_n[-1] + float(np.interp(t_s - periods * bounds_s[-1], bounds_s, bounds_n))

    def time_at(self, expected: np.ndarray) -> np.ndarray:
        """Inverse of the cumulative rate: the time by which `expected` arrivals are due."""
        if self.rate_qps is not None:
            return expected / self.rate_qps
        bounds_s, bounds_n = self._bounds()
        if not self.repeat:
            return np.interp(expected, bounds_n, bounds_s)
        periods = np.floor(expected / bounds_n[-1])
        times = periods * bounds_s[-1] + np.interp(expected - periods * bounds_n[-1], bounds_n, bounds_s)
        return np.maximum.accumulate(times)  # guards against rounding at period edges

    def unit_gaps(self, rng: np.random.Generator, num: int) -> np.ndarray:
        """Gaps of the unit-rate renewal process (mean 1, CV `cv`)."""
        if self.kind == "poisson":
            return rng.exponential(1.0, num)
        shape = 1.0 / self.cv**2
        return rng.gamma(shape, 1.0 / shape, num)

    def sample(self, rng: np.random.Generator, *, num_requests: int | None, duration_s: float | None) -> np.ndarray:
        """Arrival times: the first `num_requests` arrivals, or all arrivals before `duration_s`."""
        if num_requests is not None:
            return self.time_at(np.cumsum(self.unit_gaps(rng, num_requests)))
        horizon = self.expected_arrivals(duration_s)
        chunk = int(horizon + 6.0 * max(self.cv, 1.0) * math.sqrt(horizon) + 32)
        parts, total = [], 0.0
        while total < horizon:  # one pass almost always
            cumulative = total + np.cumsum(self.unit_gaps(rng, chunk))
            parts.append(cumulative)
            total = float(cumulative[-1])
        expected = np.concatenate(parts)
        times = self.time_at(expected[expected < horizon])
        return times[times < duration_s]

    def total_duration_s(self) -> float:
        """Length of a schedule without repeat."""
        return float(sum(d for d, _ in self.schedule))

    def describe(self) -> str:
        kind = self.kind if self.kind == "poisson" else f"gamma cv={self.cv:g}"
        if self.rate_qps is not None:
            return f"{kind}, {self.rate_qps:g} qps"
        segments = "/".join(f"{r:g} qps for {d:g} s" for d, r in self.schedule)
        return f"{kind}, schedule {segments}" + (" repeating" if self.repeat else "")


@dataclass(frozen=True)
class LengthDistribution:
    """Token counts per request.

    Invariant: "lognormal" has median > 0 and sigma > 0; "constant" a value >= 1;
    "empirical" a CSV path and column. Draws are whole numbers clipped to [min, max].
    """

    kind: str
    """"lognormal", "constant" or "empirical"."""
    median: float | None = None
    """Lognormal median (tokens)."""
    sigma: float | None = None
    """Lognormal shape: standard deviation of log(tokens)."""
    value: int | None = None
    """Constant token count."""
    path: str | None = None
    """Empirical: CSV file to resample from (relative paths via `sim.paths.project_path`)."""
    column: str | None = None
    """Empirical: column of that file."""
    min_tokens: int = 1
    """Smallest draw (config key "min")."""
    max_tokens: int | None = None
    """Largest draw (config key "max"); None for no cap."""
    name: str = "tokens"
    """Config field this came from, for error messages."""

    def __post_init__(self) -> None:
        name = self.name
        if self.kind not in LENGTH_KINDS:
            raise InputError(f"unknown length kind; use one of {list(LENGTH_KINDS)}", field=f"{name}.kind", value=self.kind)
        needed = {"lognormal": ("median", "sigma"), "constant": ("value",), "empirical": ("path", "column")}[self.kind]
        for key in needed:
            if getattr(self, key) is None:
                raise InputError(f"kind {self.kind!r} needs {key}", field=f"{name}.{key}")
        if self.kind == "lognormal":
            positive_number(self.median, f"{name}.median")
            positive_number(self.sigma, f"{name}.sigma")
        if self.kind == "constant":
            whole_number(self.value, f"{name}.value", minimum=1)
        if self.kind == "empirical" and not (isinstance(self.path, str) and isinstance(self.column, str)):
            raise InputError("path and column must be text", field=f"{name}.path", value=self.path)
        whole_number(self.min_tokens, f"{name}.min", minimum=1)
        if self.max_tokens is not None:
            whole_number(self.max_tokens, f"{name}.max", minimum=self.min_tokens)

    @classmethod
    def from_config(cls, config: object, name: str) -> LengthDistribution:
        """Build from a length dict of `synthetic` (kind plus its keys, optional min/max)."""
        allowed = {"kind", "median", "sigma", "value", "path", "column", "min", "max"}
        config = dict(as_dict(config, name, allowed))
        kind = config.pop("kind", None)
        own = {"lognormal": {"median", "sigma", "min", "max"}, "constant": {"value"}, "empirical": {"path", "column", "min", "max"}}
        extra = sorted(set(config) - own.get(kind, set(config)))
        if extra:
            raise InputError(f"key(s) {extra} do not apply to kind {kind!r}", field=name, value=config)
        return cls(
            kind=kind,
            min_tokens=config.pop("min", 1),
            max_tokens=config.pop("max", None),
            name=name,
            **config,
        )

    def sample(self, rng: np.random.Generator, num: int) -> np.ndarray:
        """`num` whole token counts (reads the CSV file for "empirical")."""
        if self.kind == "constant":
            return np.full(num, int(self.value), dtype=np.int64)
        if self.kind == "lognormal":
            draws = np.rint(rng.lognormal(math.log(self.median), self.sigma, num))
        else:
            draws = rng.choice(read_token_column(self.path, self.column), size=num, replace=True)
        high = np.inf if self.max_tokens is None else self.max_tokens
        return np.clip(draws, self.min_tokens, high).astype(np.int64)

    def describe(self) -> str:
        if self.kind == "lognormal":
            return f"lognormal median={self.median:g} sigma={self.sigma:g}"
        if self.kind == "constant":
            return f"constant {self.value}"
        return f"empirical {self.path}:{self.column}"


def fit_to_context(
    prompt: np.ndarray,
    output: np.ndarray,
    prompt_dist: LengthDistribution,
    output_dist: LengthDistribution,
    prompt_rng: np.random.Generator,
    output_rng: np.random.Generator,
    *,
    max_total_tokens: int,
    too_long: str,
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Make every request's prompt + output tokens <= `max_total_tokens` (a model's context,
    vLLM's max_model_len: a longer request is rejected by the engine).

    `too_long="redraw"` draws both lengths of each request that does not fit again, from
    their own streams, until it fits: the lengths then follow the two distributions
    conditioned on fitting. `"truncate"` cuts the prompt to leave room for the smallest output,
    then the output to what the context leaves (as an engine stops generating at the limit).
    Returns the lengths and the number of requests changed, by reason. Raises InputError when
    the smallest draws cannot fit, or when requests still do not fit after `MAX_REDRAWS` rounds.
    """
    over = prompt + output > max_total_tokens
    if not over.any():
        return prompt, output, {}
    if prompt_dist.min_tokens + output_dist.min_tokens > max_total_tokens:
        raise InputError(f"shorter than prompt_tokens.min + output_tokens.min "
                         f"({prompt_dist.min_tokens} + {output_dist.min_tokens})",
                         field="max_total_tokens", value=max_total_tokens)
    num_over = int(over.sum())
    if too_long == "truncate":
        prompt = np.minimum(prompt, max_total_tokens - output_dist.min_tokens)
        output = np.minimum(output, max_total_tokens - prompt)
        return prompt, output, {"truncated_over_max_total_tokens": num_over}
    prompt, output = prompt.copy(), output.copy()
    todo = np.flatnonzero(over)
    for _ in range(MAX_REDRAWS):
        p, o = prompt_dist.sample(prompt_rng, len(todo)), output_dist.sample(output_rng, len(todo))
        fits = p + o <= max_total_tokens
        prompt[todo[fits]], output[todo[fits]] = p[fits], o[fits]
        todo = todo[~fits]
        if len(todo) == 0:
            return prompt, output, {"redrawn_over_max_total_tokens": num_over}
    raise InputError(f"{len(todo)} request(s) still longer after {MAX_REDRAWS} redraws: the length "
                     "distributions rarely fit; lower their max or set too_long: truncate",
                     field="max_total_tokens", value=max_total_tokens)


def synthetic(
    *,
    num_requests: int | None = None,
    duration_s: float | None = None,
    arrival: dict,
    prompt_tokens: dict,
    output_tokens: dict,
    qos_shares: dict[str, float] | None = None,
    seed: int = 0,
    model: str = "",
    model_shares: dict[str, float] | None = None,
    max_total_tokens: int | None = None,
    too_long: str = "redraw",
) -> Workload:
    """A generated workload: give exactly one of `num_requests` and `duration_s`.

    A schedule without repeat sets the duration itself (give neither). Arrivals, prompt
    lengths, output lengths and QoS classes use independent streams spawned from
    `numpy.random.default_rng(seed)`, so changing one leaves the others' draws unchanged.
    `max_total_tokens` (None: no limit) caps prompt + output tokens per request, e.g. at the
    model's max_model_len; requests drawn longer are redrawn or truncated (`too_long`, see
    `fit_to_context`) and counted in `Workload.num_adjusted`. `model_shares` (model name ->
    share) draws each request's model from its own stream (a multi-model cluster); `model`
    names one model for all. Bad arguments raise InputError.
    """
    process = ArrivalProcess.from_config(arrival)
    prompt = LengthDistribution.from_config(prompt_tokens, "prompt_tokens")
    output = LengthDistribution.from_config(output_tokens, "output_tokens")
    qos_probabilities(qos_shares)
    seed = whole_number(seed, "seed", minimum=0)
    if max_total_tokens is not None:
        max_total_tokens = whole_number(max_total_tokens, "max_total_tokens", minimum=2)
    if too_long not in TOO_LONG_MODES:
        raise InputError(f"use one of {list(TOO_LONG_MODES)}", field="too_long", value=too_long)
    if not isinstance(model, str):
        raise InputError("must be text", field="model", value=model)
    models = qos_probabilities(model_shares, "model_shares")
    if models is not None and model:
        raise InputError("give model or model_shares, not both", field="model_shares", value=plain(model_shares))
    if process.ends:
        if num_requests is not None or duration_s is not None:
            given = "num_requests" if num_requests is not None else "duration_s"
            raise InputError(
                "a schedule without repeat sets the duration itself; drop this or set arrival.repeat: true",
                field=given,
                value=num_requests if num_requests is not None else duration_s,
            )
        duration_s = process.total_duration_s()
    elif (num_requests is None) == (duration_s is None):
        raise InputError(
            "give exactly one of num_requests and duration_s",
            field="num_requests/duration_s",
            value=(num_requests, duration_s),
        )
    if num_requests is not None:
        num_requests = whole_number(num_requests, "num_requests", minimum=1)
    else:
        duration_s = positive_number(duration_s, "duration_s")

    arrival_rng, prompt_rng, output_rng, qos_rng = np.random.default_rng(seed).spawn(4)
    arrival_s = process.sample(arrival_rng, num_requests=num_requests, duration_s=duration_s)
    num = len(arrival_s)
    if num == 0:
        raise InputError(f"no request arrives within {duration_s:g} s at this rate", field="duration_s", value=duration_s)
    prompt_lengths, output_lengths = prompt.sample(prompt_rng, num), output.sample(output_rng, num)
    num_adjusted: dict[str, int] = {}
    if max_total_tokens is not None:
        prompt_lengths, output_lengths, num_adjusted = fit_to_context(
            prompt_lengths, output_lengths, prompt, output, prompt_rng, output_rng,
            max_total_tokens=max_total_tokens, too_long=too_long)
    if models is not None:  # a fifth stream: the other four draw as without it
        names, probabilities = models
        model_rng = np.random.default_rng(seed).spawn(5)[4]
        model = np.array(names, dtype=object)[model_rng.choice(len(names), size=num, p=probabilities)]
    requests = make_requests(
        arrival_s,
        prompt_lengths,
        output_lengths,
        model,
        assign_qos_classes(num, plain(qos_shares), qos_rng),
    )
    source = f"synthetic({process.describe()}, seed={seed})"
    return Workload(requests=requests, source=source, num_adjusted=num_adjusted)
