"""Reading the plain fields of a cost-model dict (from JSON/YAML) with errors that name the field."""

from __future__ import annotations

import math
from collections.abc import Mapping

from sim.errors import InputError

_MISSING = object()


def check_keys(d: Mapping, known: set[str], owner: str) -> None:
    """InputError if `d` is not a mapping or has keys outside `known` (a typo must not pass silently)."""
    if not isinstance(d, Mapping):
        raise InputError(f"{owner}: expected a mapping, got {type(d).__name__}", value=d)
    extra = sorted(set(d) - known)
    if extra:
        raise InputError(f"{owner}: unknown field(s) {extra}; known: {sorted(known)}", field=extra[0])


def get_number(d: Mapping, key: str, *, default=_MISSING, allow_none: bool = False, integer: bool = False):
    """`d[key]` as a finite number (int if `integer`), or `default` when absent."""
    if key not in d:
        if default is _MISSING:
            raise InputError("missing required field", field=key)
        return default
    v = d[key]
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise InputError("must be a finite number" + (" or null" if allow_none else ""), field=key, value=v)
    if integer:
        if v != int(v):
            raise InputError("must be an integer", field=key, value=v)
        return int(v)
    return v


def get_str(d: Mapping, key: str, *, default=_MISSING) -> str:
    """`d[key]` as a non-empty string, or `default` when absent."""
    if key not in d:
        if default is _MISSING:
            raise InputError("missing required field", field=key)
        return default
    v = d[key]
    if not isinstance(v, str) or not v:
        raise InputError("must be a non-empty string", field=key, value=v)
    return v


def get_mapping(d: Mapping, key: str) -> dict:
    """`d[key]` as a plain dict ({} when absent or null)."""
    v = d.get(key)
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise InputError("must be a mapping", field=key, value=v)
    return dict(v)
