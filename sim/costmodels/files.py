"""Cost models as files: JSON or YAML written from `to_dict`, read back through `from_dict`.

A file names its class (`"class": "sim.costmodels.linear.LinearRegimesCostModel"`); only
classes under `sim.costmodels.` may be named, so a file cannot make slosim import
arbitrary code. No pickle: a file is plain data a person can read and diff.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from pathlib import Path

import yaml

from sim.errors import InputError
from sim.paths import project_path

ALLOWED_PREFIX = "sim.costmodels."
_YAML_SUFFIXES = {".yaml", ".yml"}


def save_cost_model(model, path: str | Path) -> Path:
    """Write `model.to_dict()` to `path` as YAML (.yaml/.yml) or JSON (anything else); returns the path."""
    p = Path(path)
    d = model.to_dict()
    if p.suffix.lower() not in _YAML_SUFFIXES | {".json"}:
        raise InputError("cost model files end in .json, .yaml or .yml", path=p)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix.lower() in _YAML_SUFFIXES:
        p.write_text(yaml.safe_dump(d, sort_keys=False))
    else:
        p.write_text(json.dumps(d, indent=2, allow_nan=False) + "\n")
    return p


def _read(p: Path) -> dict:
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise InputError("cost model file not found", path=p) from None
    except OSError as e:
        raise InputError(f"cannot read cost model file ({e.strerror})", path=p) from None
    if p.suffix.lower() in _YAML_SUFFIXES:
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise InputError(f"invalid YAML: {getattr(e, 'problem', None) or e}", path=p,
                             line=None if mark is None else mark.line + 1) from None
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"invalid JSON: {e.msg} (column {e.colno})", path=p, line=e.lineno) from None
    if not isinstance(d, Mapping):
        raise InputError(f"a cost model file holds a mapping, got {type(d).__name__}", path=p)
    return dict(d)


def _resolve_class(class_path: object, p: Path):
    if not isinstance(class_path, str) or not class_path.startswith(ALLOWED_PREFIX):
        raise InputError(f"the class must be one under {ALLOWED_PREFIX}*", path=p, field="class", value=class_path)
    module_name, _, attr = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        raise InputError("unknown cost model class", path=p, field="class", value=class_path) from None
    if not isinstance(cls, type) or not hasattr(cls, "from_dict"):
        raise InputError("not a cost model class (no from_dict)", path=p, field="class", value=class_path)
    return cls


def load_cost_model(path: str | Path, **overrides):
    """Read a cost model file; `overrides` replace top-level fields (e.g. `tp`, `kv_blocks`) before building it."""
    p = project_path(path)
    d = _read(p)
    if "class" not in d:
        raise InputError("missing required field (the cost model's class)", path=p, field="class")
    cls = _resolve_class(d["class"], p)
    d.update(overrides)
    try:
        return cls.from_dict(d)
    except InputError as e:
        raise InputError(e.problem, path=p, line=e.line, field=e.field, value=e.value) from None
    except (TypeError, ValueError) as e:
        raise InputError(f"invalid cost model: {e}", path=p) from None
