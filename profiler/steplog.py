"""A vLLM general plugin that logs every engine-core step of a served engine (our design).

`vllm serve` runs its engine core in a process of its own, out of the client's reach. With the
environment variable `SLOSIM_STEP_LOG` set to a file path, this plugin (registered in pyproject.toml
under vLLM's `vllm.general_plugins` entry-point group, which vLLM loads in every process it starts,
the engine core's included) wraps `EngineCore.step` there and appends one CSV row per step that ran
the model: when it started and ended (`time.monotonic()`, the system-wide clock the client also reads,
so the two align), the CPU time the engine core's process used in it, and the step's composition as
the scheduler returned it (the same numbers the profiler and the in-process replay record; see
`profiler.vllm_backend.observe_schedule`). `experiments.validate mode=server` reads the log back to
price the served engine's own steps and to track its speed, as the in-process replay does. Without the
variable the plugin does nothing. Rows are written unbuffered by line so that a crash keeps them.
"""

from __future__ import annotations

import os
import time

ENV = "SLOSIM_STEP_LOG"
COLUMNS = ("start_mono_s", "end_mono_s", "cpu_s", "num_prefill_tokens", "prefill_context", "num_decodes",
           "decode_context_sum", "batch_size", "num_prefill_chunks", "num_outputs")
"""The log's columns, in order (a header row names them). `num_outputs`: the per-request outputs the step
sent to the front end; vLLM's own iteration counter (`vllm:iteration_tokens_total`) counts only steps
with some, so a prefill chunk that completes no prompt is a logged step it does not count."""


def register() -> None:
    """vLLM's plugin hook: wrap `EngineCore.step` when `SLOSIM_STEP_LOG` names a file (idempotent)."""
    path = os.environ.get(ENV)
    if not path:
        return
    from vllm.v1.engine.core import EngineCore

    if getattr(EngineCore.step, "_slosim_step_log", False):
        return
    original = EngineCore.step
    state: dict = {}

    def step(self):
        sched = self.scheduler
        if state.get("scheduler") is not sched:  # first step of this engine core: observe its scheduler
            _observe_scheduler(sched, state)
            state["file"] = _open(path)
        if state["file"] is None:  # the log could not be opened or written: the engine runs on, unlogged
            return original(self)
        state["last"] = None
        c0, t0 = time.process_time(), time.monotonic()
        out = original(self)
        t1, c1 = time.monotonic(), time.process_time()
        obs = state.get("last")
        if obs is not None and (obs.chunks or obs.decodes):
            from profiler.measure import observed_numbers

            f = observed_numbers(obs.chunks, list(obs.decodes.values()))
            f["num_outputs"] = sum(len(o.outputs) for o in (out[0] or {}).values())
            try:
                state["file"].write(",".join(map(str, (f"{t0:.6f}", f"{t1:.6f}", f"{c1 - c0:.6f}",
                                                       *(f[c] for c in COLUMNS[3:])))) + "\n")
            except OSError as e:
                _warn(f"cannot write the step log {path} ({e}); steps are no longer logged")
                state["file"] = None
        return out

    step._slosim_step_log = True
    EngineCore.step = step


def _observe_scheduler(sched, state: dict) -> None:
    from profiler.vllm_backend import observe_schedule

    original = sched.schedule

    def schedule(*args, **kwargs):
        out = original(*args, **kwargs)
        state["last"] = observe_schedule(out, sched.requests)
        return out

    sched.schedule = schedule
    state["scheduler"] = sched


def _open(path: str):
    """The log opened for appending (a header first if it is new), or None with a warning on stderr (the
    server's log) when it cannot be: a log that cannot be written must not stop the engine."""
    try:
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        f = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - open for the engine core's life
        if new:
            f.write(",".join(COLUMNS) + "\n")
        return f
    except OSError as e:
        _warn(f"cannot open the step log {ENV}={path} ({e}); steps are not logged")
        return None


def _warn(msg: str) -> None:
    import sys

    print(f"slosim step log: {msg}", file=sys.stderr, flush=True)


def read_steps(path, t0_monotonic: float, wall_s: float):
    """The steps of the log at `path` that started within a replay that began at `t0_monotonic` and ran
    `wall_s` seconds, as a step table on the replay's clock (the in-process replay's columns:
    start_s, end_s, the five cost-model features, num_prefill_chunks, cpu_s, wall_s; output_ts_s is
    the step's end; plus num_outputs). An empty table when the log is missing or holds none (the caller says so);
    ValueError naming the file (and the line) for a log that cannot be read or holds a row that is not
    numbers."""
    import pandas as pd

    cols = ["start_s", "end_s", "output_ts_s", "num_prefill_tokens", "prefill_context", "num_decodes",
            "decode_context_sum", "batch_size", "num_prefill_chunks", "cpu_s", "wall_s", "num_outputs"]
    try:
        df = pd.read_csv(path, dtype=str)
    except FileNotFoundError:
        return pd.DataFrame(columns=cols)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the engine's step log ({e})") from None
    if list(df.columns) != list(COLUMNS):
        raise ValueError(f"{path}: the engine's step log has columns {list(df.columns)}, expected {list(COLUMNS)}")
    num = df.apply(pd.to_numeric, errors="coerce")
    bad = num.isna().any(axis=1).to_numpy()
    if bad.any():  # a row that is not numbers (a second header, a row cut short, anything else)
        i = int(bad.argmax())
        raise ValueError(f"{path}: line {i + 2} of the engine's step log is not {len(COLUMNS)} numbers: "
                         f"{','.join(str(v) for v in df.iloc[i].tolist())}")
    df = num
    df = df[(df["start_mono_s"] >= t0_monotonic) & (df["start_mono_s"] <= t0_monotonic + wall_s)]
    out = df.drop(columns=["start_mono_s", "end_mono_s"]).copy()
    out.insert(0, "start_s", df["start_mono_s"] - t0_monotonic)
    out.insert(1, "end_s", df["end_mono_s"] - t0_monotonic)
    out.insert(2, "output_ts_s", out["end_s"])
    out["wall_s"] = out["end_s"] - out["start_s"]
    return out[cols].reset_index(drop=True)
