"""Per-replica log of engine steps: one row a step, kept as numpy chunks.

Step-by-step execution appends Python scalars; fast-forward appends whole arrays. Rows stay
in time order, and a step's index in the log is what requests record for their tokens.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

COLUMNS = ("start_s", "duration_s", "num_prefill_tokens", "prefill_context", "num_decodes",
           "decode_context_sum", "batch_size", "kv_blocks_used", "num_waiting")
_FLOAT = {"start_s", "duration_s"}


class StepLog:
    """Append-only step table. Invariant: `num_steps` equals the rows appended so far."""

    __slots__ = ("_rows", "_chunks", "num_steps")

    def __init__(self) -> None:
        self._rows: list[tuple] = []
        self._chunks: list[dict[str, np.ndarray]] = []
        self.num_steps = 0

    def append(self, start_s, duration_s, num_prefill_tokens, prefill_context, num_decodes,
               decode_context_sum, batch_size, kv_blocks_used, num_waiting) -> None:
        self._rows.append((start_s, duration_s, num_prefill_tokens, prefill_context, num_decodes,
                           decode_context_sum, batch_size, kv_blocks_used, num_waiting))
        self.num_steps += 1

    def _flush_rows(self) -> None:
        if self._rows:
            table = np.array(self._rows, dtype=np.float64)  # exact for counts below 2**53
            self._chunks.append({
                name: table[:, i] if name in _FLOAT else table[:, i].astype(np.int64)
                for i, name in enumerate(COLUMNS)
            })
            self._rows = []

    def extend_decodes(self, starts: list, durations: list, num_decodes: int, decode_context_sum: list,
                       kv_blocks_used: list, num_waiting: int) -> None:
        """Append a run of decode-only steps (fast-forward)."""
        self._rows.extend(zip(starts, durations, [0] * len(starts), [0] * len(starts), [num_decodes] * len(starts),
                              decode_context_sum, [num_decodes] * len(starts), kv_blocks_used,
                              [num_waiting] * len(starts)))
        self.num_steps += len(starts)

    def extend(self, starts: np.ndarray, durations: np.ndarray, num_decodes: int,
               decode_context_sum: np.ndarray, kv_blocks_used: np.ndarray, num_waiting: int) -> None:
        """Append a run of decode-only steps (fast-forward)."""
        self._flush_rows()
        m = len(starts)
        zeros = np.zeros(m, dtype=np.int64)
        full = np.full(m, num_decodes, dtype=np.int64)
        self._chunks.append({
            "start_s": np.asarray(starts, dtype=np.float64),
            "duration_s": np.asarray(durations, dtype=np.float64),
            "num_prefill_tokens": zeros,
            "prefill_context": zeros,
            "num_decodes": full,
            "decode_context_sum": np.asarray(decode_context_sum, dtype=np.int64),
            "batch_size": full,
            "kv_blocks_used": np.asarray(kv_blocks_used, dtype=np.int64),
            "num_waiting": np.full(m, num_waiting, dtype=np.int64),
        })
        self.num_steps += m

    def columns(self) -> dict[str, np.ndarray]:
        """All steps as column arrays."""
        self._flush_rows()
        if not self._chunks:
            return {name: np.empty(0, dtype=np.float64 if name in _FLOAT else np.int64) for name in COLUMNS}
        if len(self._chunks) > 1:
            self._chunks = [{name: np.concatenate([c[name] for c in self._chunks]) for name in COLUMNS}]
        return self._chunks[0]

    def end_times(self) -> np.ndarray:
        """End time of every step, by step index."""
        cols = self.columns()
        return cols["start_s"] + cols["duration_s"]

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.columns())
