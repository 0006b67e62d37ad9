"""Request waiting time (RWT) estimators for QLM's virtual queues: how long until a request
(or a group's first request) starts, given what is ahead of it on its replica.

`Ahead` summarises the work in front: requests per QoS class (their output lengths are
unknown), their prompt tokens still to compute (known), output tokens already emitted by the
requests held on the replica, and the model-swap seconds on the way. `Rates` is what the
replica computes per second. Both estimators return an `Estimate` (seconds).

- `ReleasedRWT` (QLM's released code, QLM-project/QLM): wait = (requests in the groups ahead)
  x `tokens_per_request` (100) / decode token throughput, plus the swap times. It ignores the
  requests the replica already holds and the prompts (as the released code does).
- `StatisticalRWT` (our design; the paper speaks of a probabilistic estimator but gives no
  formula). Output lengths of class c are learned online from completions: their empirical
  mean mu_c and variance s2_c (Welford). Before `min_samples` completions of a class its prior
  is an exponential distribution of mean `prior_mean_tokens` (mu = that, s2 = mu^2). For `N`
  requests ahead (held ones included) on a replica whose pulling cap is `C`, the first slot
  frees once `N - C + 1` of them have finished, so the wait covers the share
  `f = max(0, N - C + 1) / N` of the work ahead (the replica works on all of it at once):

      W_dec ~ Normal(sum_c n_c mu_c - done_tokens, sum_c n_c s2_c)      (central limit theorem)
      wait  = f (W_dec / T_dec(B) + P / T_pre) + swap_s,   B = min(N, C)

  with `T_dec(B)` the decode tokens per second of a batch of B decodes at the mean context
  and `T_pre` the prefill tokens per second of a full token budget, both from the replica's
  cost model (`rates_from_cost_model`), and `P` the prompt tokens ahead. Quantiles are those
  of the normal, floored at `swap_s` (a wait is never shorter than the swaps on the way);
  the violation probability of a request with `slack_s` seconds to its first-token deadline
  is `P(wait > slack_s) = 1 - Phi((slack_s - mean) / sd)`.
  Calibration (our design): the controller reports, for every request it dispatches, the
  realised wait (dispatch time - placement time) against the modelled mean `m` it predicted
  at placement (`observe_wait`; only with `calibrate`, off by default). Once `min_samples`
  ratios realised / m are known (the last 1,000; modelled waits under `MIN_CALIBRATED_S` are
  left out), a wait is `m x R` with R drawn from them: point prediction `m x median(R)`
  (`mean_s`), quantiles `m x quantile(R)`, violation probability `P(R > slack_s / m)`. The
  ratios are censored (a long wait is only learned once it ends), so during a build-up of the
  queue they lag. This absorbs what the model leaves out (prefill interference, KV
  limits, swaps in progress, the cap's granularity).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from sim.errors import InputError

_Z10 = -1.2815515655446004
"""The standard normal's 10% quantile (scipy.stats.norm.ppf(0.1))."""


@dataclass
class Ahead:
    """What is ahead of a request on its replica (counts are numbers of requests)."""

    by_class: dict[str, int] = field(default_factory=dict)
    """Requests ahead per QoS class (queued groups ahead, plus the held ones if counted)."""
    num_in_groups: int = 0
    """Of those, requests in virtual-queue groups ahead (what the released estimator counts)."""
    prompt_tokens: int = 0
    """Prompt tokens still to compute for them (known)."""
    done_tokens: int = 0
    """Output tokens already emitted by the held requests among them."""
    swap_s: float = 0.0
    """Seconds of model swaps on the way (model load times)."""

    @property
    def num_requests(self) -> int:
        return sum(self.by_class.values())


@dataclass(frozen=True)
class Rates:
    """A replica's speed: decode tokens/s at a batch size, prefill tokens/s, and its pulling cap."""

    decode_tok_s: object
    """Callable batch size -> decode tokens per second (or a number: the same at every size)."""
    prefill_tok_s: float
    cap: int
    """Running + waiting requests the replica may hold (the pulling cap)."""

    def decode_at(self, batch: int) -> float:
        f = self.decode_tok_s
        return float(f(max(1, batch)) if callable(f) else f)


@dataclass(frozen=True)
class Estimate:
    """A predicted wait in seconds (mean; quantiles equal the mean for a point estimate). With
    `ratios` (sorted realised/modelled waits), the wait is `raw_s` x a ratio drawn from them."""

    mean_s: float
    sd_s: float = 0.0
    floor_s: float = 0.0
    raw_s: float | None = None
    """The model's mean before calibration (what realised waits are compared with)."""
    ratios: object = None

    def quantile_s(self, q: float) -> float:
        if self.ratios is not None:
            return float(self.raw_s * np.quantile(self.ratios, q))
        if self.sd_s == 0.0:
            return self.mean_s
        return max(self.floor_s, self.mean_s + _norm_ppf(q) * self.sd_s)

    def violation_probability(self, slack_s: float) -> float:
        """P(wait > slack_s): 0/1 for a point estimate."""
        if slack_s == math.inf:
            return 0.0
        if self.ratios is not None:
            k = np.searchsorted(self.ratios, slack_s / self.raw_s, side="right")
            return float(1.0 - k / len(self.ratios))
        if self.sd_s == 0.0:
            return 1.0 if self.mean_s > slack_s else 0.0
        if slack_s < self.floor_s:
            return 1.0
        return 0.5 * math.erfc((slack_s - self.mean_s) / (self.sd_s * math.sqrt(2.0)))


def _norm_ppf(q: float) -> float:
    if q == 0.5:
        return 0.0
    if q == 0.1:
        return _Z10
    if q == 0.9:
        return -_Z10
    from scipy.stats import norm

    return float(norm.ppf(q))


def rates_from_cost_model(cost_model, cap: int, token_budget: int, context_tokens: float) -> Rates:
    """Rates of a replica from its cost model: decode tokens/s of B decodes at `context_tokens`
    each (`B / step_time_s(0, 0, B, B x context, B)`, cached per B) and prefill tokens/s of one
    `token_budget`-token chunk with no context. Raises InputError if a step costs <= 0 s."""
    ctx = max(1, int(context_tokens))
    cache: dict[int, float] = {}

    def decode(batch: int) -> float:
        b = min(int(batch), cap)
        v = cache.get(b)
        if v is None:
            t = float(cost_model.step_time_s(0, 0, b, b * ctx, b))
            if not t > 0:
                raise InputError("the cost model prices a decode step at <= 0 s", field="cost_model", value=t)
            v = cache[b] = b / t
        return v

    t_pre = float(cost_model.step_time_s(token_budget, 0, 0, 0, 1))
    if not t_pre > 0:
        raise InputError("the cost model prices a prefill step at <= 0 s", field="cost_model", value=t_pre)
    return Rates(decode, token_budget / t_pre, cap)


class ReleasedRWT:
    """The released code's estimator: requests in the groups ahead x a fixed token count / throughput."""

    name = "released"

    def __init__(self, tokens_per_request: int = 100) -> None:
        if isinstance(tokens_per_request, bool) or not isinstance(tokens_per_request, int) or tokens_per_request < 1:
            raise InputError("must be a whole number of tokens >= 1", field="released_tokens_per_request",
                             value=tokens_per_request)
        self.tokens_per_request = tokens_per_request
        self.counts_held = False

    def observe(self, qos_class: str, num_output_tokens: int) -> None:
        """The released estimator does not learn."""

    def mean_output_tokens(self, qos_class: str) -> float:
        return float(self.tokens_per_request)

    def estimate(self, ahead: Ahead, rates: Rates) -> Estimate:
        """`num_in_groups x tokens_per_request / T_dec(cap) + swap_s` (released: 700 tok/s fixed for 8B)."""
        t = rates.decode_at(rates.cap)
        return Estimate(ahead.num_in_groups * self.tokens_per_request / t + ahead.swap_s, floor_s=ahead.swap_s)


class OutputLengths:
    """Online mean and variance of output lengths per class (Welford), with an exponential prior."""

    __slots__ = ("prior_mean", "min_samples", "_n", "_mean", "_m2")

    def __init__(self, prior_mean: float, min_samples: int) -> None:
        self.prior_mean = float(prior_mean)
        self.min_samples = int(min_samples)
        self._n: dict[str, int] = {}
        self._mean: dict[str, float] = {}
        self._m2: dict[str, float] = {}

    def add(self, qos_class: str, x: float) -> None:
        n = self._n.get(qos_class, 0) + 1
        mean = self._mean.get(qos_class, 0.0)
        d = x - mean
        mean += d / n
        self._n[qos_class] = n
        self._mean[qos_class] = mean
        self._m2[qos_class] = self._m2.get(qos_class, 0.0) + d * (x - mean)

    def num_samples(self, qos_class: str) -> int:
        return self._n.get(qos_class, 0)

    def moments(self, qos_class: str) -> tuple[float, float]:
        """(mean, variance) in tokens: the empirical ones after `min_samples`, else the prior's."""
        n = self._n.get(qos_class, 0)
        if n < max(1, self.min_samples):
            return self.prior_mean, self.prior_mean ** 2
        return self._mean[qos_class], (self._m2[qos_class] / (n - 1) if n > 1 else 0.0)


class StatisticalRWT:
    """The wait as a normal distribution over the learned output lengths (module docstring)."""

    name = "statistical"

    def __init__(self, prior_mean_tokens: float = 100.0, min_samples: int = 20, calibrate: bool = False,
                 window: int = 1000) -> None:
        if not prior_mean_tokens > 0:
            raise InputError("must be > 0 tokens", field="released_tokens_per_request", value=prior_mean_tokens)
        self.lengths = OutputLengths(prior_mean_tokens, min_samples)
        self.counts_held = True
        self.calibrate = calibrate
        self.min_samples = int(min_samples)
        self._ratios: deque = deque(maxlen=int(window))
        """The latest realised / modelled waits."""
        self._sorted = None

    def observe_wait(self, raw_s: float, realised_s: float) -> None:
        """A placed request started `realised_s` after placement; the model had said `raw_s`."""
        if self.calibrate and raw_s >= MIN_CALIBRATED_S:
            self._ratios.append(realised_s / raw_s)
            self._sorted = None

    def _calibration(self):
        """The sorted ratios (None while fewer than `min_samples`)."""
        if self._sorted is None and len(self._ratios) >= max(1, self.min_samples):
            self._sorted = np.sort(np.fromiter(self._ratios, float, len(self._ratios)))
        return self._sorted

    def observe(self, qos_class: str, num_output_tokens: int) -> None:
        self.lengths.add(qos_class, float(num_output_tokens))

    def mean_output_tokens(self, qos_class: str) -> float:
        return self.lengths.moments(qos_class)[0]

    def estimate(self, ahead: Ahead, rates: Rates) -> Estimate:
        n = ahead.num_requests
        if n == 0:
            return Estimate(ahead.swap_s, 0.0, ahead.swap_s, ahead.swap_s)
        mean_tok = 0.0
        var_tok = 0.0
        for c, k in ahead.by_class.items():
            mu, s2 = self.lengths.moments(c)
            mean_tok += k * mu
            var_tok += k * s2
        mean_tok = max(0.0, mean_tok - ahead.done_tokens)
        share = max(0, n - rates.cap + 1) / n
        t_dec = rates.decode_at(min(n, rates.cap))
        mean = share * (mean_tok / t_dec + ahead.prompt_tokens / rates.prefill_tok_s) + ahead.swap_s
        sd = share * math.sqrt(var_tok) / t_dec
        if mean >= MIN_CALIBRATED_S and self._ratios:
            ratios = self._calibration()
            if ratios is not None:
                return Estimate(mean * float(ratios[len(ratios) // 2]), 0.0, ahead.swap_s, mean, ratios)
        return Estimate(mean, sd, ahead.swap_s, mean)


MIN_CALIBRATED_S = 0.25
"""Modelled waits shorter than this (a slot is about to free) are neither calibrated nor used
to calibrate: their ratio to the realised wait is dominated by step granularity."""


def make_estimator(kind: str, tokens_per_request: int, min_samples: int = 20, calibrate: bool = False):
    """`released` or `statistical` (InputError naming `estimator` otherwise)."""
    if kind == "released":
        return ReleasedRWT(tokens_per_request)
    if kind == "statistical":
        return StatisticalRWT(float(tokens_per_request), min_samples, calibrate=bool(calibrate))
    raise InputError("must be 'released' or 'statistical'", field="estimator", value=kind)
