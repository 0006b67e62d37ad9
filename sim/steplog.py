"""Per-replica log of engine steps: one row a step, kept as one Python list per column.

Step-by-step execution appends one value per column; fast-forward extends every column with
a run of decode steps. Rows stay in time order, and a step's index in the log is what
requests record for their tokens. Columns become numpy arrays at the end (`concat_columns`).
(Lists, not `array.array` buffers: appending to those costs 4-15x more per value in CPython
3.11, more than the one conversion at the end saves; measured.)
"""

from __future__ import annotations

from itertools import chain

import numpy as np

COLUMNS = ("start_s", "duration_s", "num_prefill_tokens", "prefill_context", "num_decodes",
           "decode_context_sum", "batch_size", "kv_blocks_used", "num_waiting")
_FLOAT = {"start_s", "duration_s"}


class StepLog:
    """Append-only step table. Invariant: every column has `num_steps` entries."""

    __slots__ = ("_cols", "num_steps")

    def __init__(self) -> None:
        self._cols: tuple[list, ...] = tuple([] for _ in COLUMNS)
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
        m = len(starts)
        c = self._cols
        zeros = [0] * m
        decodes = [num_decodes] * m
        c[0].extend(starts)
        c[1].extend(durations)
        c[2].extend(zeros)
        c[3].extend(zeros)
        c[4].extend(decodes)
        c[5].extend(range(first_context_sum, first_context_sum + num_decodes * m, num_decodes))
        c[6].extend(decodes)
        c[7].extend(kv_blocks_used)
        c[8].extend([num_waiting] * m)
        self.num_steps += m


def concat_columns(logs: list[StepLog]) -> dict[str, np.ndarray]:
    """The steps of several logs, one after another, as column arrays (one pass per column)."""
    n = sum(log.num_steps for log in logs)
    return {name: np.fromiter(chain.from_iterable(log._cols[j] for log in logs),
                              dtype=np.float64 if name in _FLOAT else np.int64, count=n)
            for j, name in enumerate(COLUMNS)}
