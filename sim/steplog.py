"""Per-replica log of engine steps: one row a step, kept as one Python list per column.

Step-by-step execution appends one value per column; fast-forward extends every column with
a run of decode steps. Rows stay in time order, and a step's index in the log is what
requests record for their tokens. Columns become numpy arrays on demand.
"""

from __future__ import annotations

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

    def extend_decodes(self, starts: list, durations: list, num_decodes: int, decode_context_sum: list,
                       kv_blocks_used: list, num_waiting: int) -> None:
        """Append a run of decode-only steps (fast-forward)."""
        m = len(starts)
        c = self._cols
        zeros = [0] * m
        decodes = [num_decodes] * m
        c[0].extend(starts)
        c[1].extend(durations)
        c[2].extend(zeros)
        c[3].extend(zeros)
        c[4].extend(decodes)
        c[5].extend(decode_context_sum)
        c[6].extend(decodes)
        c[7].extend(kv_blocks_used)
        c[8].extend([num_waiting] * m)
        self.num_steps += m

    def columns(self) -> dict[str, np.ndarray]:
        """All steps as column arrays."""
        n = self.num_steps
        return {name: np.fromiter(col, dtype=np.float64 if name in _FLOAT else np.int64, count=n)
                for name, col in zip(COLUMNS, self._cols)}

    def end_times(self) -> np.ndarray:
        """End time of every step, by step index."""
        n = self.num_steps
        return np.fromiter(self._cols[0], np.float64, n) + np.fromiter(self._cols[1], np.float64, n)
