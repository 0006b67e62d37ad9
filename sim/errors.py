"""Errors for bad user input: one clear message naming the file, line, field and value.

Every loader (traces, cost-model files, profiles, configs) raises `InputError` instead of
letting a pandas/numpy traceback escape, so a user sees *what* is wrong and *where*;
`explain` turns such an error, or a config library's (Hydra, OmegaConf), into one line.
"""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad input from a user: a trace, a config or a file the project reads."""

    def __init__(
        self,
        problem: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
        value: object = None,
    ) -> None:
        self.problem = problem
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        self.value = value
        where = ""
        if self.path is not None:
            where = self.path if line is None else f"{self.path}:{line}"
        what = ""
        if field is not None:
            what = f"field {field!r}" + ("" if value is None else f" = {value!r}")
        parts = [p for p in (where, what, problem) if p]
        super().__init__(": ".join(parts))


_NOISE = ("full_key:", "object_type=", "reference_type=", "Set the environment variable HYDRA_FULL_ERROR")
_CONFIG_LIBRARIES = ("hydra", "omegaconf")


def explain(exc: BaseException) -> str:
    """One line for a bad-input error: the `InputError` behind a config library's wrappers (with
    the config key Hydra names in a `full_key:` line), else every message of the exception
    chain, with Hydra's extra lines (full_key, the config search path) left out and option
    lists joined by commas. Exceptions from outside `InputError` and the config libraries are
    shown with their type name."""
    chain, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    key = next((line.split(":", 1)[1].strip() for e in chain for line in str(e).splitlines()
                if line.strip().startswith("full_key:")), "")
    cause = next((e for e in chain if isinstance(e, InputError)), None)
    if cause is not None:
        return f"bad input in config '{key}': {cause}" if key else f"bad input: {cause}"
    parts: list[str] = []
    for e in chain:
        text = _one_line(str(e)) or type(e).__name__
        if type(e).__module__.split(".")[0] not in _CONFIG_LIBRARIES:
            text = f"{type(e).__name__}: {text}"
        if not any(text in p for p in parts):
            parts.append(text)
    message = ": ".join(parts)
    return f"bad input in config '{key}': {message}" if key and key not in message else f"bad input: {message}"


def _one_line(text: str) -> str:
    pieces: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(_NOISE):
            continue
        if line.startswith("Config search path"):
            break
        if pieces and pieces[-1].endswith(":"):
            pieces[-1] += " " + line
        elif raw.startswith("\t") and pieces:  # Hydra lists options one per tab-indented line
            pieces[-1] += ", " + line
        else:
            pieces.append(line.rstrip("."))
    return "; ".join(pieces)
