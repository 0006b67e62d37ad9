"""Piecewise-linear step-time models: a few regimes of total tokens, each linear in named features.

A regime applies while `total_tokens <= max_total_tokens`; within it the step time is
`sum(coefficient[f] * FEATURES[f](shape))`. The published Niyama/QoServe Llama-3-8B/A100
model is two such regimes; `profiler.fit` produces models of the same class from measured
steps. KV capacity and load time come from explicit numbers or from model and GPU specs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from sim.costmodels._fields import check_keys, get_mapping, get_number, get_str
from sim.costmodels.specs import GpuSpec, ModelSpec, kv_blocks_for, spec_from_dict, spec_to_dict
from sim.errors import InputError

# Every feature takes the five shape arrays (P, Cp, D, Cd, B) = (num_prefill_tokens,
# prefill_context, num_decodes, decode_context_sum, batch_size) as float arrays.
FEATURES: dict[str, Callable[..., np.ndarray]] = {
    "const": lambda P, Cp, D, Cd, B: np.ones_like(P + D, dtype=float),
    "total_tokens": lambda P, Cp, D, Cd, B: P + D,
    "prefill_tokens": lambda P, Cp, D, Cd, B: P,
    "num_decodes": lambda P, Cp, D, Cd, B: D,
    "decode_context_sum": lambda P, Cp, D, Cd, B: Cd,
    "prefill_context": lambda P, Cp, D, Cd, B: Cp,
    "batch_size": lambda P, Cp, D, Cd, B: B,
    "prefill_tokens_sq": lambda P, Cp, D, Cd, B: P * P,
    "prefill_tokens_x_context": lambda P, Cp, D, Cd, B: P * Cp,
}
"""Named regression features, vectorised over numpy arrays of step shapes."""

FEATURE_ORDER = tuple(FEATURES)
"""The fixed order in which `LinearRegimesCostModel` stores coefficients (both code paths rely on it)."""

CLASS_PATH = "sim.costmodels.linear.LinearRegimesCostModel"


def feature_matrix(num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size,
                   names: Sequence[str] = FEATURE_ORDER) -> np.ndarray:
    """Design matrix, one column per feature in `names`, for fitting regimes to measured steps."""
    shape = [np.asarray(a, dtype=float) for a in
             (num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size)]
    shape = np.broadcast_arrays(*shape)
    return np.stack([np.broadcast_to(FEATURES[n](*shape), shape[0].shape) for n in names], axis=-1)


@dataclass(frozen=True)
class Regime:
    """One linear piece. Invariant: known feature names, finite coefficients, positive bound or None."""

    max_total_tokens: float | None
    """This regime applies while total tokens (P + D) <= this; None means no upper bound."""
    coefficients: dict[str, float]
    """Feature name -> seconds per unit of the feature; absent features count as 0."""

    def __post_init__(self) -> None:
        b = self.max_total_tokens
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0):
            raise InputError("must be a positive number or null", field="max_total_tokens", value=b)
        if not isinstance(self.coefficients, Mapping) or not self.coefficients:
            raise InputError("must be a non-empty mapping of feature -> seconds", field="coefficients",
                             value=self.coefficients)
        clean = {}
        for k, v in self.coefficients.items():
            if k not in FEATURES:
                raise InputError(f"unknown feature; known: {list(FEATURES)}", field="coefficients", value=k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InputError("coefficient must be a finite number", field=f"coefficients.{k}", value=v)
            clean[k] = float(v)
        object.__setattr__(self, "coefficients", clean)

    @classmethod
    def from_dict(cls, d: Mapping) -> Regime:
        check_keys(d, {"max_total_tokens", "coefficients"}, "regime")
        if "coefficients" not in d:
            raise InputError("missing required field", field="coefficients")
        return cls(get_number(d, "max_total_tokens", default=None, allow_none=True), dict(d["coefficients"]))

    def to_dict(self) -> dict:
        return {"max_total_tokens": self.max_total_tokens, "coefficients": dict(self.coefficients)}


def plain(obj):
    """Recursively turn mappings/sequences (e.g. OmegaConf containers) into dicts/lists; JSON-safe check."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or (isinstance(obj, Sequence) and not isinstance(obj, str)):
        return [plain(v) for v in obj]
    return obj


def check_provenance(provenance, model: ModelSpec | None, gpu: GpuSpec | None, owner: str) -> dict:
    """Plain, JSON-safe provenance; InputError if it names a model/GPU other than the ones given."""
    prov = plain(provenance or {})
    if not isinstance(prov, dict):
        raise InputError(f"{owner}: provenance must be a mapping", field="provenance", value=provenance)
    try:
        json.dumps(prov, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InputError(f"{owner}: provenance must be JSON-safe ({e})", field="provenance") from None
    for key, spec in (("model", model), ("gpu", gpu)):
        if spec is not None and isinstance(prov.get(key), str) and prov[key] != spec.name:
            raise InputError(
                f"{owner}: step times were obtained for {key} {prov[key]!r} but the configured {key} is "
                f"{spec.name!r}; select the matching {key} or a cost model made for {spec.name!r}",
                field=key, value=spec.name)
    return prov


def check_capacity_fields(*, kv_blocks, block_size, model, gpu, tp, gpu_memory_utilization, load_s, owner):
    """Validate the KV-capacity / load-time fields both cost-model classes share."""
    if (kv_blocks is None) != (block_size is None):
        raise InputError(f"{owner}: kv_blocks and block_size go together (give both or neither)",
                         field="block_size", value=block_size)
    for name, v in (("kv_blocks", kv_blocks), ("block_size", block_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise InputError(f"{owner}: must be a positive integer", field=name, value=v)
    if model is not None and not isinstance(model, ModelSpec):
        raise InputError(f"{owner}: model must be a ModelSpec", field="model", value=model)
    if gpu is not None and not isinstance(gpu, GpuSpec):
        raise InputError(f"{owner}: gpu must be a GpuSpec", field="gpu", value=gpu)
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise InputError(f"{owner}: tp must be a positive integer", field="tp", value=tp)
    if model is not None:
        model.check_tp(tp)
    if not (isinstance(gpu_memory_utilization, (int, float)) and 0 < gpu_memory_utilization <= 1):
        raise InputError(f"{owner}: must be in (0, 1]", field="gpu_memory_utilization", value=gpu_memory_utilization)
    if load_s is not None and not (isinstance(load_s, (int, float)) and math.isfinite(load_s) and load_s >= 0):
        raise InputError(f"{owner}: must be a number >= 0 or null", field="load_s", value=load_s)


def capacity_kv_blocks(cm, block_size: int) -> int | None:
    """Explicit blocks (converted by tokens if the block size differs), else from specs, else None."""
    if cm.kv_blocks is not None:
        if block_size == cm.block_size:
            return cm.kv_blocks
        return cm.kv_blocks * cm.block_size // block_size
    if cm.model is not None and cm.gpu is not None:
        return kv_blocks_for(cm.model, cm.gpu, cm.tp, block_size, cm.gpu_memory_utilization)
    return None


def capacity_load_s(cm) -> float:
    """Explicit load time, else per-GPU weight bytes over the host load bandwidth, else 0."""
    if cm.load_s is not None:
        return float(cm.load_s)
    if cm.model is not None and cm.gpu is not None:
        return cm.model.weight_bytes(cm.tp) / cm.gpu.host_load_bw_bytes_s
    return 0.0


class LinearRegimesCostModel:
    """Step time = the first regime whose bound covers P + D, applied to the step's features.

    Invariant: regimes sorted by strictly increasing `max_total_tokens`, only the last may be
    None; totals above the last finite bound use the last regime (extrapolation). Every step
    takes at least `min_step_s`.
    """

    def __init__(
        self,
        regimes: list[Regime] | list[dict],
        *,
        name: str,
        kv_blocks: int | None = None,
        block_size: int | None = None,
        model: ModelSpec | None = None,
        gpu: GpuSpec | None = None,
        tp: int = 1,
        gpu_memory_utilization: float = 0.9,
        load_s: float | None = None,
        min_step_s: float = 1e-6,
        provenance: dict | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise InputError("LinearRegimesCostModel: name must be a non-empty string", field="name", value=name)
        owner = f"cost model {name!r}"
        if isinstance(regimes, (str, bytes)) or not isinstance(regimes, Sequence) or not regimes:
            raise InputError(f"{owner}: regimes must be a non-empty list", field="regimes", value=regimes)
        parsed = []
        for i, r in enumerate(regimes):
            try:
                parsed.append(r if isinstance(r, Regime) else Regime.from_dict(r))
            except InputError as e:
                raise InputError(f"{owner}: {e.problem}", field=f"regimes[{i}].{e.field}", value=e.value) from None
        bounds = [r.max_total_tokens for r in parsed]
        for i, b in enumerate(bounds[:-1]):
            if b is None:
                raise InputError(f"{owner}: only the last regime may have max_total_tokens = null",
                                 field=f"regimes[{i}].max_total_tokens", value=b)
            if bounds[i + 1] is not None and bounds[i + 1] <= b:
                raise InputError(f"{owner}: regimes must be sorted by strictly increasing max_total_tokens",
                                 field=f"regimes[{i + 1}].max_total_tokens", value=bounds[i + 1])
        if not (isinstance(min_step_s, (int, float)) and math.isfinite(min_step_s) and min_step_s > 0):
            raise InputError(f"{owner}: must be a positive number", field="min_step_s", value=min_step_s)
        check_capacity_fields(kv_blocks=kv_blocks, block_size=block_size, model=model, gpu=gpu, tp=tp,
                              gpu_memory_utilization=gpu_memory_utilization, load_s=load_s, owner=owner)
        self.name = name
        self.regimes: tuple[Regime, ...] = tuple(parsed)
        self.kv_blocks = kv_blocks
        self.block_size = block_size
        self.model = model
        self.gpu = gpu
        self.tp = tp
        self.gpu_memory_utilization = gpu_memory_utilization
        self.load_s = load_s
        self.min_step_s = float(min_step_s)
        self.provenance = check_provenance(provenance, model, gpu, owner)

        # Precomputed for speed: the scalar path walks (bound, c_0 ... c_8) tuples, the
        # vectorised path indexes a coefficient matrix; both use FEATURE_ORDER and the same
        # left-to-right sum, so they agree bit for bit.
        coef = [tuple(r.coefficients.get(f, 0.0) for f in FEATURE_ORDER) for r in self.regimes]
        self._scalar_regimes = tuple(
            ((math.inf if i == len(coef) - 1 else float(r.max_total_tokens)),) + c
            for i, (r, c) in enumerate(zip(self.regimes, coef))
        )
        self._bounds = np.array([float(r.max_total_tokens) for r in self.regimes[:-1]], dtype=float)
        self._coef = np.array(coef, dtype=float)

    def step_time_s(self, num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size):
        n = num_prefill_tokens + num_decodes
        for regime in self._scalar_regimes:
            if n <= regime[0]:
                break
        _, c0, cn, cp, cd, ccd, ccp, cb, cp2, cpc = regime
        t = (c0 + cn * n + cp * num_prefill_tokens + cd * num_decodes + ccd * decode_context_sum
             + ccp * prefill_context + cb * batch_size + cp2 * num_prefill_tokens * num_prefill_tokens
             + cpc * num_prefill_tokens * prefill_context)
        m = self.min_step_s
        return t if t > m else m

    def decode_step_time_fn(self, num_decodes: int):
        """`step_time_s(0, 0, num_decodes, c, num_decodes)` as a function of the context sum
        `c`, with the terms that do not depend on `c` folded once: the same floating-point
        operations in the same order (the folded terms are exact zeros), so the same values
        bit for bit. The simulator's fast-forward prices long decode runs with it."""
        n = num_decodes
        for regime in self._scalar_regimes:
            if n <= regime[0]:
                break
        _, c0, cn, cp, cd, ccd, ccp, cb, cp2, cpc = regime
        head = c0 + cn * n + cp * 0 + cd * n
        tail = cb * n
        m = self.min_step_s

        def step_time(decode_context_sum: int) -> float:
            t = head + ccd * decode_context_sum + tail
            return t if t > m else m

        return step_time

    def step_times_s(self, num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size):
        P, Cp, D, Cd, B = np.broadcast_arrays(*(np.asarray(a, dtype=float) for a in (
            num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size)))
        n = P + D
        c = self._coef[np.searchsorted(self._bounds, n, side="left")]
        t = (c[..., 0] + c[..., 1] * n + c[..., 2] * P + c[..., 3] * D + c[..., 4] * Cd
             + c[..., 5] * Cp + c[..., 6] * B + c[..., 7] * P * P
             + c[..., 8] * P * Cp)
        return np.maximum(t, self.min_step_s)

    def num_kv_blocks(self, block_size: int) -> int | None:
        return capacity_kv_blocks(self, block_size)

    def model_load_s(self) -> float:
        return capacity_load_s(self)

    def to_dict(self) -> dict:
        return {
            "class": CLASS_PATH,
            "name": self.name,
            "regimes": [r.to_dict() for r in self.regimes],
            "kv_blocks": self.kv_blocks,
            "block_size": self.block_size,
            "model": spec_to_dict(self.model),
            "gpu": spec_to_dict(self.gpu),
            "tp": self.tp,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "load_s": self.load_s,
            "min_step_s": self.min_step_s,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> LinearRegimesCostModel:
        check_keys(d, {"class", "name", "regimes", "kv_blocks", "block_size", "model", "gpu", "tp",
                       "gpu_memory_utilization", "load_s", "min_step_s", "provenance"}, "LinearRegimesCostModel")
        if d.get("class", CLASS_PATH) != CLASS_PATH:
            raise InputError(f"expected class {CLASS_PATH}", field="class", value=d.get("class"))
        if "regimes" not in d:
            raise InputError("missing required field", field="regimes")
        return cls(
            d["regimes"],
            name=get_str(d, "name"),
            kv_blocks=get_number(d, "kv_blocks", default=None, allow_none=True, integer=True),
            block_size=get_number(d, "block_size", default=None, allow_none=True, integer=True),
            model=spec_from_dict(ModelSpec, d.get("model"), "model"),
            gpu=spec_from_dict(GpuSpec, d.get("gpu"), "gpu"),
            tp=get_number(d, "tp", default=1, integer=True),
            gpu_memory_utilization=get_number(d, "gpu_memory_utilization", default=0.9),
            load_s=get_number(d, "load_s", default=None, allow_none=True),
            min_step_s=get_number(d, "min_step_s", default=1e-6),
            provenance=get_mapping(d, "provenance"),
        )

    def __repr__(self) -> str:
        return f"LinearRegimesCostModel(name={self.name!r}, regimes={len(self.regimes)}, tp={self.tp})"
