"""Cost models: the shape of one engine step -> its duration in seconds.

A step's *shape* is what the simulator knows about a batch: how many prefill tokens it
computes and how much context those chunks attend to, how many requests decode one token
and the sum of their contexts, and the batch size. Every implementation (published linear
regimes, analytic roofline, models fitted by `profiler.fit`) satisfies `CostModel`; the
simulator reads them as files and never imports torch or vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class CostModel(Protocol):
    """Step shape -> seconds, plus the capacity facts a replica needs.

    Shape arguments (all non-negative integers):
    - `num_prefill_tokens`: tokens computed this step for requests still catching up on
      their prompt (the sum of all prefill chunk sizes);
    - `prefill_context`: tokens already in the KV cache for those chunks (sum over chunks
      of `num_computed_tokens` at the start of the step; 0 for a first chunk);
    - `num_decodes`: requests that compute exactly one new token this step;
    - `decode_context_sum`: sum over those requests of `num_computed_tokens` at step start;
    - `batch_size`: requests in the step (prefill chunks + decodes).

    `step_times_s` is the vectorised form: numpy arrays in, an array out, and it must give
    the same values as `step_time_s` element by element (fitting and calibration use it).

    Optional: `decode_step_time_fn(num_decodes)` returns a one-argument function of the
    decode context sum equal to `step_time_s(0, 0, num_decodes, c, num_decodes)`; the
    simulator's fast-forward prices decode runs with it when a model has it (the linear
    models do), else it calls `step_time_s`.

    Optional: `bind_clock(now)`, for a model whose price depends on the time (e.g. a host speed
    measured over a live replay, `experiments.live.speed_track.SpeedTrackedCostModel`): `simulate`
    calls it once with a function returning the simulation clock in seconds, before any step is
    priced; a step is priced at its start time.
    """

    name: str

    def step_time_s(
        self,
        num_prefill_tokens: int,
        prefill_context: int,
        num_decodes: int,
        decode_context_sum: int,
        batch_size: int,
    ) -> float: ...

    def step_times_s(
        self,
        num_prefill_tokens: np.ndarray,
        prefill_context: np.ndarray,
        num_decodes: np.ndarray,
        decode_context_sum: np.ndarray,
        batch_size: np.ndarray,
    ) -> np.ndarray: ...

    def num_kv_blocks(self, block_size: int) -> int | None:
        """KV-cache blocks of `block_size` tokens that fit beside the weights; None if unknown."""
        ...

    def model_load_s(self) -> float:
        """Seconds to load the model's weights onto the replica (for model swaps)."""
        ...


@dataclass(frozen=True)
class ConstantCostModel:
    """Every step costs `base_s + per_token_s * tokens`; for hand-computable tests and toys."""

    base_s: float = 1.0
    """Fixed cost of any step, in seconds."""
    per_token_s: float = 0.0
    """Extra seconds per token computed in the step (prefill tokens + decodes)."""
    kv_blocks: int | None = None
    """KV-cache capacity in blocks, or None to require an explicit replica setting."""
    load_s: float = 0.0
    """Model load time in seconds."""
    name: str = "constant"

    def __post_init__(self) -> None:
        if self.base_s < 0 or self.per_token_s < 0:
            raise ValueError(
                f"ConstantCostModel: base_s and per_token_s must be >= 0, got "
                f"base_s={self.base_s}, per_token_s={self.per_token_s}"
            )
        if self.base_s == 0 and self.per_token_s == 0:
            raise ValueError("ConstantCostModel: a step must take time (base_s or per_token_s > 0)")

    def step_time_s(self, num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size):
        return self.base_s + self.per_token_s * (num_prefill_tokens + num_decodes)

    def step_times_s(self, num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size):
        return self.base_s + self.per_token_s * (np.asarray(num_prefill_tokens) + np.asarray(num_decodes))

    def num_kv_blocks(self, block_size: int) -> int | None:
        return self.kv_blocks

    def model_load_s(self) -> float:
        return self.load_s
