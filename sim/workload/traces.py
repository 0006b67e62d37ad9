"""Trace loaders: Azure LLM inference (2023/2024), BurstGPT, Mooncake JSONL, plain CSV and ShareGPT lengths.

A reader parses the whole file with vectorised pandas, checks every column at once and
reports the earliest bad row as one `InputError` naming the file, its 1-based line (the
header is line 1), the field and the value. A trace's clock starts at its first row (plain
CSV: at `arrival_s = 0`). One rule for every format: a row with 0 prompt or 0 output tokens
(a failed or empty request) is left out and counted; `window_s`, `max_requests` and
`target_qps` then cut and rescale the rest, and every row left out is counted in
`Workload.num_filtered`, by reason.
"""

from __future__ import annotations

import io
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sim.errors import InputError
from sim.paths import project_path
from sim.workload.options import (
    assign_qos_classes,
    plain,
    positive_number,
    qos_probabilities,
    whole_number,
)
from sim.workload.table import Workload, make_requests

FORMATS: tuple[str, ...] = ("azure", "burstgpt", "mooncake", "csv", "sharegpt")
"""Trace formats `from_trace` reads; "auto" picks one from the extension and header."""

AZURE_COLUMNS = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
BURSTGPT_COLUMNS = ["Timestamp", "Model", "Request tokens", "Response tokens"]
MOONCAKE_KEYS = ["timestamp", "input_length", "output_length"]
CSV_COLUMNS = ["arrival_s", "num_prompt_tokens", "num_output_tokens"]
SHAREGPT_COLUMNS = ["num_prefill_tokens", "num_decode_tokens"]


@dataclass(frozen=True)
class _Rows:
    """What a reader found: requests on the trace's clock, before windowing."""

    lines: np.ndarray  # 1-based file line of each row
    arrival_s: np.ndarray
    num_prompt_tokens: np.ndarray
    num_output_tokens: np.ndarray
    model: np.ndarray | str = ""
    qos_class: np.ndarray | str = ""  # "" = the trace does not say
    num_filtered: dict[str, int] = field(default_factory=dict)

    def without_zero_tokens(self) -> _Rows:
        """The rows with at least one prompt and one output token; the others are counted in
        `num_filtered` as `zero_output_tokens` (failed or empty responses, whatever the prompt)
        or `zero_prompt_tokens`. The clock is not re-based: it still starts at the file's first row."""
        zero_output = self.num_output_tokens == 0
        zero_prompt = (self.num_prompt_tokens == 0) & ~zero_output
        keep = ~(zero_output | zero_prompt)
        if keep.all():
            return self
        counts = {"zero_output_tokens": int(zero_output.sum()), "zero_prompt_tokens": int(zero_prompt.sum())}
        return _Rows(
            lines=self.lines[keep],
            arrival_s=self.arrival_s[keep],
            num_prompt_tokens=self.num_prompt_tokens[keep],
            num_output_tokens=self.num_output_tokens[keep],
            model=_pick(self.model, keep),
            qos_class=_pick(self.qos_class, keep),
            num_filtered={**self.num_filtered, **{k: v for k, v in counts.items() if v}},
        )


class _Problems:
    """The first bad row of each check on a table; `raise_first` raises the earliest."""

    def __init__(self, path: Path, lines: np.ndarray) -> None:
        self.path = path
        self.lines = lines
        self.found: list[tuple[int, InputError]] = []

    def add(self, row: int, problem: str, field_name: str, value: object) -> None:
        line = int(self.lines[row])
        self.found.append((line, InputError(problem, path=self.path, line=line, field=field_name, value=_shown(value))))

    def raise_first(self) -> None:
        if self.found:
            raise min(self.found, key=lambda item: item[0])[1]


# ---------------------------------------------------------------- column checks


def _numbers(
    problems: _Problems, table: pd.DataFrame, name: str, *, whole: bool, minimum: float | None
) -> np.ndarray:
    """Column `name` as floats; the first missing, non-numeric, fractional or too-small value is noted."""
    raw = table[name]
    try:
        values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    except (TypeError, ValueError):  # e.g. JSON lists or objects in a number field
        values = np.array([_to_float(item) for item in raw], dtype=float)
    bad = ~np.isfinite(values)
    with np.errstate(invalid="ignore"):
        if whole:
            bad |= values != np.floor(values)
        if minimum is not None:
            bad |= values < minimum
    if bad.any():
        row = int(np.argmax(bad))
        value, number = raw.iloc[row], values[row]
        if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
            problem = "missing value"
        elif not math.isfinite(number):
            problem = "not a number"
        elif whole and number != math.floor(number):
            problem = "not a whole number"
        else:
            problem = f"must be >= {minimum:g}"
        problems.add(row, problem, name, value)
    return values


def _shown(value: object) -> object:
    """A cell as the user wrote it: numpy scalars from JSON columns become plain Python values."""
    return value.item() if isinstance(value, np.generic) else value


def _to_float(item: object) -> float:
    try:
        return float(item)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _datetimes_s(problems: _Problems, table: pd.DataFrame, name: str) -> np.ndarray:
    """Column `name` of date-times as seconds after the first row; unparsable values are noted."""
    raw = table[name]
    stamps = pd.to_datetime(raw, format="ISO8601", utc=True, errors="coerce")
    unparsed = stamps.isna()
    # Fall back to pandas' per-value guessing only for values that carry a 4-digit year,
    # so that a stray "12" is an error rather than the 12th of this month.
    retry = unparsed & raw.astype(str).str.contains(r"\d{4}", regex=True)
    if retry.any():
        guessed = pd.to_datetime(raw[retry], format="mixed", utc=True, errors="coerce")
        stamps = stamps.astype("datetime64[ns, UTC]")
        stamps[retry] = guessed.astype("datetime64[ns, UTC]")
        unparsed = stamps.isna()
    if unparsed.any():
        row = int(np.argmax(unparsed.to_numpy()))
        problems.add(row, "cannot parse as a date and time", name, raw.iloc[row])
        return np.zeros(len(raw))
    return ((stamps - stamps.iloc[0]) / pd.Timedelta(seconds=1)).to_numpy(dtype=float)


def _check_non_decreasing(path: Path, lines: np.ndarray, times: np.ndarray, raw: pd.Series, name: str) -> None:
    """Timestamps must not go backwards: name both lines and both values when they do."""
    backwards = np.diff(times) < 0
    if backwards.any():
        row = int(np.argmax(backwards)) + 1
        value, previous = _shown(raw.iloc[row]), _shown(raw.iloc[row - 1])
        raise InputError(
            f"timestamp goes backwards: {value!r} comes after {previous!r} on line {int(lines[row - 1])}",
            path=path,
            line=int(lines[row]),
            field=name,
            value=value,
        )


def _text(table: pd.DataFrame, name: str) -> np.ndarray | str:
    return table[name].astype(str).str.strip().to_numpy(dtype=object) if name in table.columns else ""


# ---------------------------------------------------------------- file readers


def _read_csv(path: Path, required: list[str]) -> tuple[pd.DataFrame, np.ndarray, dict[str, int]]:
    """All cells as stripped text, the file line of each row, and counted blank lines."""
    _check_file(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise InputError("empty file (no header)", path=path, line=1) from None
    except pd.errors.ParserError as exc:
        found = re.search(r"line (\d+)", str(exc))
        reason = str(exc).split("C error: ")[-1].strip()
        raise InputError(f"malformed CSV row: {reason}", path=path, line=int(found.group(1)) if found else None) from None
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path=path) from None
    table.columns = [str(name).strip() for name in table.columns]
    missing = [name for name in required if name not in table.columns]
    if missing:
        raise InputError(
            f"missing column(s) {missing}; the header has {list(table.columns)}",
            path=path,
            line=1,
            field=", ".join(missing),
        )
    table = table.apply(lambda column: column.str.strip())
    lines = np.arange(2, len(table) + 2)  # the header is line 1
    blank = (table == "").all(axis=1).to_numpy()
    num_filtered = {}
    if blank.any():
        table, lines = table[~blank].reset_index(drop=True), lines[~blank]
        num_filtered["blank_lines"] = int(blank.sum())
    if table.empty:
        raise InputError("no data rows after the header", path=path, line=1)
    return table, lines, num_filtered


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputError("file not found", path=path)
    if not path.is_file():
        raise InputError("not a file", path=path)


def read_azure(path: Path) -> _Rows:
    """Azure LLM inference trace (2023 and 2024): TIMESTAMP,ContextTokens,GeneratedTokens."""
    table, lines, num_filtered = _read_csv(path, AZURE_COLUMNS)
    problems = _Problems(path, lines)
    arrival_s = _datetimes_s(problems, table, "TIMESTAMP")
    prompt = _numbers(problems, table, "ContextTokens", whole=True, minimum=0)
    output = _numbers(problems, table, "GeneratedTokens", whole=True, minimum=0)
    problems.raise_first()
    _check_non_decreasing(path, lines, arrival_s, table["TIMESTAMP"], "TIMESTAMP")
    return _Rows(lines, arrival_s, prompt, output, num_filtered=num_filtered)


def read_burstgpt(path: Path) -> _Rows:
    """BurstGPT: Timestamp (s), Model, Request tokens, Response tokens (0 response tokens = a failed request)."""
    table, lines, num_filtered = _read_csv(path, BURSTGPT_COLUMNS)
    problems = _Problems(path, lines)
    times = _numbers(problems, table, "Timestamp", whole=False, minimum=None)
    prompt = _numbers(problems, table, "Request tokens", whole=True, minimum=0)
    output = _numbers(problems, table, "Response tokens", whole=True, minimum=0)
    problems.raise_first()
    _check_non_decreasing(path, lines, times, table["Timestamp"], "Timestamp")
    return _Rows(lines, times - times[0], prompt, output, _text(table, "Model"), num_filtered=num_filtered)


def read_mooncake(path: Path) -> _Rows:
    """Mooncake JSONL: one object per line with timestamp (ms), input_length, output_length."""
    _check_file(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path=path) from None
    all_lines = text.splitlines()
    numbered = [(number, line) for number, line in enumerate(all_lines, start=1) if line.strip()]
    if not numbered:
        raise InputError("empty file (no JSON lines)", path=path, line=1)
    lines = np.array([number for number, _ in numbered])
    body = "\n".join(line for _, line in numbered)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pandas 3 deprecates convert_dates; pandas 2 needs it off
            table = pd.read_json(io.StringIO(body), lines=True, dtype=False, convert_dates=False)
    except (ValueError, TypeError) as exc:
        _raise_first_bad_json(path, numbered, str(exc))
    if len(table) != len(numbered):
        _raise_first_bad_json(path, numbered, "rows and lines do not match")
    missing = [key for key in MOONCAKE_KEYS if key not in table.columns]
    if missing:
        raise InputError(
            f"missing key(s) {missing}; the objects have {list(map(str, table.columns))}",
            path=path,
            line=int(lines[0]),
            field=", ".join(missing),
        )
    problems = _Problems(path, lines)
    times_ms = _numbers(problems, table, "timestamp", whole=False, minimum=None)
    prompt = _numbers(problems, table, "input_length", whole=True, minimum=0)
    output = _numbers(problems, table, "output_length", whole=True, minimum=0)
    problems.raise_first()
    _check_non_decreasing(path, lines, times_ms, table["timestamp"], "timestamp")
    num_filtered = {"blank_lines": len(all_lines) - len(numbered)} if len(all_lines) > len(numbered) else {}
    return _Rows(lines, (times_ms - times_ms[0]) / 1000.0, prompt, output, num_filtered=num_filtered)


def _raise_first_bad_json(path: Path, numbered: list[tuple[int, str]], reason: str) -> None:
    """Error path only: find the first line that is not a JSON object."""
    for number, line in numbered:
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"invalid JSON: {exc.msg} at column {exc.colno}", path=path, line=number, value=line[:80]) from None
        if not isinstance(item, dict):
            raise InputError("not a JSON object", path=path, line=number, value=line[:80])
    raise InputError(f"cannot read as JSON lines: {reason}", path=path)


def read_csv(path: Path) -> _Rows:
    """Plain CSV: arrival_s,num_prompt_tokens,num_output_tokens[,model,qos_class]; times kept as written."""
    table, lines, num_filtered = _read_csv(path, CSV_COLUMNS)
    problems = _Problems(path, lines)
    arrival_s = _numbers(problems, table, "arrival_s", whole=False, minimum=0)
    prompt = _numbers(problems, table, "num_prompt_tokens", whole=True, minimum=0)
    output = _numbers(problems, table, "num_output_tokens", whole=True, minimum=0)
    problems.raise_first()
    _check_non_decreasing(path, lines, arrival_s, table["arrival_s"], "arrival_s")
    return _Rows(lines, arrival_s, prompt, output, _text(table, "model"), _text(table, "qos_class"), num_filtered)


def read_sharegpt(path: Path) -> _Rows:
    """ShareGPT length statistics (Sarathi-Serve's processed traces, e.g.
    sharegpt_8k_filtered_stats_llama2_tokenizer.csv): num_prefill_tokens, num_decode_tokens.
    The file has no clock: every row is at 0 s; `trace_workload` puts its length pairs on an
    arrival process."""
    table, lines, num_filtered = _read_csv(path, SHAREGPT_COLUMNS)
    problems = _Problems(path, lines)
    prompt = _numbers(problems, table, "num_prefill_tokens", whole=True, minimum=0)
    output = _numbers(problems, table, "num_decode_tokens", whole=True, minimum=0)
    problems.raise_first()
    return _Rows(lines, np.zeros(len(lines)), prompt, output, num_filtered=num_filtered)


_READERS = {"azure": read_azure, "burstgpt": read_burstgpt, "mooncake": read_mooncake, "csv": read_csv,
            "sharegpt": read_sharegpt}


def detect_format(path: Path) -> str:
    """The trace format of `path`, from its extension (.jsonl) or its header line."""
    _check_file(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        return "mooncake"
    with path.open(encoding="utf-8-sig", errors="replace") as handle:
        header = handle.readline().strip()
    if not header:
        raise InputError("empty first line: cannot tell the trace format", path=path, line=1)
    if header.startswith("{"):
        return "mooncake"
    columns = {name.strip() for name in header.split(",")}
    if "TIMESTAMP" in columns and ("ContextTokens" in columns or "GeneratedTokens" in columns):
        return "azure"
    if "Request tokens" in columns or "Response tokens" in columns:
        return "burstgpt"
    if "arrival_s" in columns:
        return "csv"
    if "num_prefill_tokens" in columns and "num_decode_tokens" in columns:
        return "sharegpt"
    raise InputError(
        f"cannot tell the trace format from the header {header[:120]!r}; pass format= one of {list(FORMATS)}",
        path=path,
        line=1,
    )


# ---------------------------------------------------------------- the public loader


def from_trace(
    path: str,
    *,
    format: str = "auto",  # noqa: A002 - the contract's keyword
    window_s: tuple[float, float] | list | None = None,
    target_qps: float | None = None,
    max_requests: int | None = None,
    qos_shares: dict[str, float] | None = None,
    seed: int = 0,
) -> Workload:
    """Load a trace file as a `Workload`.

    Rows with 0 prompt or 0 output tokens are left out first (counted as `zero_prompt_tokens`
    / `zero_output_tokens`). `window_s=(start, end)` keeps requests with start <= t < end on the trace's clock and
    shifts `start` to 0 (`end` may be None for "to the end"); `max_requests` then keeps the
    first N; `target_qps` last stretches time so that (n - 1) / (last - first) equals it.
    `qos_shares` draws a class for rows whose trace gives none (seeded by `seed`).
    Raises `InputError` naming the file, line, field and value for malformed input, and
    when no request is left.
    """
    window = _window(window_s)
    target = None if target_qps is None else positive_number(target_qps, "target_qps")
    limit = None if max_requests is None else whole_number(max_requests, "max_requests", minimum=1)
    qos_probabilities(qos_shares)
    seed = whole_number(seed, "seed", minimum=0)
    if format not in (*FORMATS, "auto"):
        raise InputError(f"unknown trace format; use one of {['auto', *FORMATS]}", field="format", value=format)
    file = project_path(path).resolve()
    kind = detect_format(file) if format == "auto" else format
    rows = _READERS[kind](file).without_zero_tokens()

    num_total = len(rows.arrival_s)
    num_filtered = dict(rows.num_filtered)
    keep = np.ones(num_total, dtype=bool)
    arrival_s = rows.arrival_s
    if window is not None:
        start, end = window
        before, after = arrival_s < start, arrival_s >= end
        keep &= ~before & ~after
        num_filtered.update({k: int(v.sum()) for k, v in (("before_window", before), ("after_window", after)) if v.any()})
        arrival_s = arrival_s - start
    kept = np.flatnonzero(keep)
    if limit is not None and len(kept) > limit:
        num_filtered["max_requests"] = len(kept) - limit
        kept = kept[:limit]
    if len(kept) == 0:
        if num_total == 0:
            raise InputError(f"no servable request: every row was left out ({num_filtered})", path=file)
        span = f"{rows.arrival_s[0]:g}..{rows.arrival_s[-1]:g} s"
        raise InputError(f"no requests left after filtering (the trace spans {span}; left out: {num_filtered})",
                         path=file, field="window_s", value=window_s)
    arrival_s = arrival_s[kept]
    if target is not None:
        span_s = arrival_s[-1] - arrival_s[0]
        if len(kept) < 2 or span_s <= 0:
            raise InputError("needs at least two requests at different times", path=file, field="target_qps", value=target_qps)
        arrival_s = arrival_s * ((len(kept) - 1) / span_s / target)

    qos_class = _pick(rows.qos_class, kept)
    drawn = assign_qos_classes(len(kept), qos_shares, np.random.default_rng(seed))
    qos_class = np.where(qos_class == "", drawn, qos_class) if isinstance(qos_class, np.ndarray) else drawn
    requests = make_requests(
        arrival_s,
        rows.num_prompt_tokens[kept],
        rows.num_output_tokens[kept],
        _pick(rows.model, kept),
        qos_class,
    )
    options = [f"{name}={value!r}" for name, value in (("window_s", window), ("max_requests", limit), ("target_qps", target)) if value is not None]
    source = f"{kind}:{file}" + (f" [{', '.join(options)}]" if options else "")
    return Workload(requests=requests, source=source, num_filtered=num_filtered, source_path=str(file),
                    source_lines=rows.lines[kept])


def _pick(values: np.ndarray | str, rows: np.ndarray) -> np.ndarray | str:
    return values if isinstance(values, str) else values[rows]


def _window(window_s: object) -> tuple[float, float] | None:
    if window_s is None:
        return None
    window = plain(window_s)
    if not isinstance(window, list) or len(window) != 2:
        raise InputError("must be [start_s, end_s]", field="window_s", value=window_s)
    start = positive_number(window[0], "window_s[0]", allow_zero=True)
    end = math.inf if window[1] is None else positive_number(window[1], "window_s[1]")
    if end <= start:
        raise InputError("end must be after start", field="window_s", value=window_s)
    return start, end


def read_token_column(path: str | Path, column: str) -> np.ndarray:
    """Whole numbers >= 1 from one column of a CSV file (for empirical length distributions)."""
    file = project_path(path).resolve()
    table, lines, _ = _read_csv(file, [column])
    problems = _Problems(file, lines)
    values = _numbers(problems, table, column, whole=True, minimum=1)
    problems.raise_first()
    return values.astype(np.int64)
