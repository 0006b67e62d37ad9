"""Argument checks shared by the workload generators and trace loaders.

Hydra hands nested config nodes (DictConfig/ListConfig) to `_target_` functions; `plain`
turns them into dicts and lists so every check below sees ordinary Python values. Each
check raises `InputError` naming the field and the value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from sim.errors import InputError
from sim.workload.table import DEFAULT_QOS_CLASS


def plain(value: object) -> object:
    """`value` with every mapping turned into a dict and every non-text sequence into a list."""
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [plain(item) for item in value]
    return value


def as_dict(value: object, field: str, allowed: set[str]) -> dict:
    """`value` as a dict whose keys are all in `allowed` (a typo'd key is an error, not ignored)."""
    value = plain(value)
    if not isinstance(value, dict):
        raise InputError("must be a mapping", field=field, value=value)
    unknown = sorted(set(map(str, value)) - allowed)
    if unknown:
        raise InputError(f"unknown key(s) {unknown}; allowed: {sorted(allowed)}", field=field, value=value)
    return value


def positive_number(value: object, field: str, *, allow_zero: bool = False) -> float:
    """`value` as a finite float > 0 (or >= 0 with `allow_zero`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError("must be a number", field=field, value=value)
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise InputError("must be a finite number " + (">= 0" if allow_zero else "> 0"), field=field, value=value)
    return number


def whole_number(value: object, field: str, *, minimum: int) -> int:
    """`value` as an int >= `minimum` (floats with a fractional part are rejected)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError("must be a whole number", field=field, value=value)
    if not math.isfinite(float(value)) or float(value) != int(value):
        raise InputError("must be a whole number", field=field, value=value)
    if int(value) < minimum:
        raise InputError(f"must be >= {minimum}", field=field, value=value)
    return int(value)


def qos_probabilities(qos_shares: object, field: str = "qos_shares") -> tuple[list[str], np.ndarray] | None:
    """Names and normalised probabilities from a share mapping (QoS classes, or models with
    `field='model_shares'`), or None when not given."""
    if qos_shares is None:
        return None
    shares = plain(qos_shares)
    if not isinstance(shares, dict) or not shares:
        raise InputError("must be a non-empty mapping name -> share", field=field, value=shares)
    names = []
    for name, share in shares.items():
        if not isinstance(name, str) or not name.strip():
            raise InputError("names must be non-empty text", field=field, value=name)
        positive_number(share, f"{field}.{name}")
        names.append(name)
    weights = np.array([float(shares[name]) for name in names])
    return names, weights / weights.sum()


def assign_qos_classes(num_requests: int, qos_shares: object, rng: np.random.Generator) -> np.ndarray:
    """One QoS class per request, drawn with the `qos_shares` probabilities ("default" without shares)."""
    classes = qos_probabilities(qos_shares)
    if classes is None:
        return np.full(num_requests, DEFAULT_QOS_CLASS, dtype=object)
    names, probabilities = classes
    picks = rng.choice(len(names), size=num_requests, p=probabilities)
    return np.array(names, dtype=object)[picks]
