"""Per-replica log of engine steps: one row a step, kept as Python lists until the end.

Step-by-step execution appends one value per column. Fast-forward appends a run of decode
steps: their start times, durations and KV use (which vary step to step) go into those
columns, and the rest of the run (no prefill, `num_decodes` decodes, a context sum growing
by `num_decodes` a step, the queue length) is one record, expanded with numpy when the
table is built. Rows stay in time order, and a step's index in the log is what requests
record for their tokens. `concat_columns` builds the arrays.
"""

from __future__ import annotations

import numpy as np

COLUMNS = ("start_s", "duration_s", "num_prefill_tokens", "prefill_context", "num_decodes",
           "decode_context_sum", "batch_size", "kv_blocks_used", "num_waiting")
_FLOAT = {"start_s", "duration_s"}
_EVERY_STEP = (0, 1, 7)  # columns with one list entry per step; the others skip decode runs
_SHAPE = (2, 3, 4, 5, 6, 8)


class StepLog:
    """Append-only step table. Invariant: columns 0, 1 and 7 have `num_steps` entries; the
    others have one per step outside the decode runs, which `_runs` holds as five integers
    each (first row, length, num_decodes, first context sum, num_waiting; a flat list of
    ints, so the garbage collector has no object per run to visit)."""

    __slots__ = ("_cols", "_runs", "num_steps")

    def __init__(self) -> None:
        self._cols: tuple[list, ...] = tuple([] for _ in COLUMNS)
        self._runs: list[int] = []
        self.num_steps = 0

    def append(self, start_s, duration_s, num_prefill_tokens, prefill_context, num_decodes,
               decode_context_sum, batch_size, kv_blocks_used, num_waiting) -> None:
        c = self._cols
        c[0].append(start_s)
        c[1].append(duration_s)
        c[2].append(num_prefill_tokens)
        c[3].append(prefill_context)
        c[4].append(num_decodes)
        c[5].append(decode_context_sum)
        c[6].append(batch_size)
        c[7].append(kv_blocks_used)
        c[8].append(num_waiting)
        self.num_steps += 1

    def extend_decodes(self, starts: list, durations: list, num_decodes: int, first_context_sum: int,
                       kv_blocks_used: list, num_waiting: int) -> None:
        """Append a run of decode-only steps (fast-forward): `num_decodes` requests each step,
        whose context sum starts at `first_context_sum` and grows by `num_decodes` a step."""
        c = self._cols
        c[0].extend(starts)
        c[1].extend(durations)
        c[7].extend(kv_blocks_used)
        m = len(starts)
        self._runs.extend((self.num_steps, m, num_decodes, first_context_sum, num_waiting))
        self.num_steps += m

    def _arrays(self) -> list[np.ndarray]:
        """This log's columns as arrays, decode runs expanded."""
        n = self.num_steps
        out = [np.fromiter(self._cols[j], dtype=np.float64 if COLUMNS[j] in _FLOAT else np.int64, count=n)
               if j in _EVERY_STEP else None for j in range(len(COLUMNS))]
        runs = np.array(self._runs, dtype=np.int64).reshape(-1, 5)
        first, length, decodes, ctx0, waiting = runs.T
        total = int(length.sum())
        rows = np.repeat(first, length) + (np.arange(total) - np.repeat(np.cumsum(length) - length, length))
        single = np.ones(n, dtype=bool)
        single[rows] = False
        per_run = {2: 0, 3: 0, 4: np.repeat(decodes, length), 6: np.repeat(decodes, length),
                   8: np.repeat(waiting, length)}
        per_run[5] = np.repeat(ctx0, length) + per_run[4] * (rows - np.repeat(first, length))
        for j in _SHAPE:
            col = np.empty(n, dtype=np.int64)
            col[single] = np.fromiter(self._cols[j], dtype=np.int64, count=n - total)
            col[rows] = per_run[j]
            out[j] = col
        return out


def concat_columns(logs: list[StepLog]) -> dict[str, np.ndarray]:
    """The steps of several logs, one after another, as column arrays."""
    per_log = [log._arrays() for log in logs]
    return {name: np.concatenate([a[j] for a in per_log]) if per_log else
            np.empty(0, dtype=np.float64 if name in _FLOAT else np.int64)
            for j, name in enumerate(COLUMNS)}
