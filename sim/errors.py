"""Errors for bad user input: one clear message naming the file, line, field and value.

Every loader (traces, cost-model files, profiles, configs) raises `InputError` instead of
letting a pandas/numpy traceback escape, so a user sees *what* is wrong and *where*.
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
