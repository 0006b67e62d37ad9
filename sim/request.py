"""Request state as vLLM v1 models it: computed tokens catch up with known tokens.

A request knows `num_prompt_tokens` plus the output tokens emitted so far; each engine step
advances `num_computed_tokens` by a chunk (prefill) or by one (decode). Whenever the
computed tokens catch up with the known tokens, the step emits a new output token. There is
no separate prefill/decode phase. Preemption by recompute resets the computed tokens to 0
but keeps the emitted output (it is recomputed as part of the next prefill).
"""

from __future__ import annotations

import math

FINISHED = "finished"
REJECTED = "rejected"
UNFINISHED = "unfinished"
NOT_ARRIVED = "not_arrived"  # arrives after the simulation's horizon: never seen by the cluster
OUTCOMES = (FINISHED, REJECTED, UNFINISHED, NOT_ARRIVED)


class Request:
    """One request. Invariant: 0 <= num_computed_tokens <= num_tokens - 1 once started,
    and num_output_done <= num_output_tokens; `outcome` is set exactly once."""

    __slots__ = (
        "request_id", "arrival_s", "num_prompt_tokens", "num_output_tokens", "model",
        "qos_class", "num_computed_tokens", "num_output_done", "replica", "outcome",
        "reject_reason", "first_scheduled_s", "first_token_s", "finish_s",
        "num_preemptions", "num_blocks", "token_steps", "last_token_step", "admit_seq",
        "deadline_s", "relegated", "relegable", "priority",
        "num_evictions", "num_migrations", "ready_s", "run_replicas",
    )

    def __init__(
        self,
        request_id: int,
        arrival_s: float,
        num_prompt_tokens: int,
        num_output_tokens: int,
        model: str = "",
        qos_class: str = "default",
    ) -> None:
        self.request_id = request_id
        self.arrival_s = arrival_s
        self.num_prompt_tokens = num_prompt_tokens
        self.num_output_tokens = num_output_tokens
        self.model = model
        self.qos_class = qos_class
        self.num_computed_tokens = 0
        self.num_output_done = 0
        self.replica = -1
        self.outcome: str | None = None
        self.reject_reason = ""
        self.first_scheduled_s = math.nan
        self.first_token_s = math.nan
        self.finish_s = math.nan
        self.num_preemptions = 0
        self.num_blocks = 0
        # Output tokens are emitted at the end of engine steps; record them as runs of
        # consecutive replica step indices [a1, b1, a2, b2, ...] (inclusive), which with
        # the step table gives every token time at O(1) cost per run.
        self.token_steps: list[int] = []
        self.last_token_step = -2
        self.admit_seq = -1
        self.deadline_s = math.inf
        self.relegated = False
        self.relegable = True
        self.priority = 0.0
        # Cluster control (sim.controlplane): a request may be served by several replicas.
        self.num_evictions = 0
        self.num_migrations = 0
        self.ready_s = 0.0  # earliest time it may run again (a KV transfer in flight)
        # The replica of each run in `token_steps` once it has moved (None: all on `replica`).
        self.run_replicas: list[int] | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens known to the engine: the prompt plus the output emitted so far."""
        return self.num_prompt_tokens + self.num_output_done

    @property
    def num_tokens_to_compute(self) -> int:
        """Tokens still to compute before the next output token can be emitted."""
        return self.num_prompt_tokens + self.num_output_done - self.num_computed_tokens

    @property
    def max_tokens_needed(self) -> int:
        """KV tokens the request holds at its largest (the last output token is never computed)."""
        return self.num_prompt_tokens + self.num_output_tokens - 1

    @property
    def remaining_work_tokens(self) -> int:
        """Tokens still to be computed until the request finishes."""
        return self.num_prompt_tokens + self.num_output_tokens - 1 - self.num_computed_tokens

    def record_token(self, step_index: int, end_s: float) -> None:
        """Emit one output token at the end of replica step `step_index` (ending at `end_s`)."""
        if self.num_output_done == 0:
            self.first_token_s = end_s
        self.num_output_done += 1
        if step_index == self.last_token_step + 1:
            self.token_steps[-1] = step_index
        else:
            self.token_steps.append(step_index)
            self.token_steps.append(step_index)
            if self.run_replicas is not None:
                self.run_replicas.append(self.replica)
        self.last_token_step = step_index

    def leave_replica(self) -> None:
        """The request leaves its replica (evicted or migrated): later token runs belong to the
        next replica, so record whose the runs so far are."""
        if self.run_replicas is None:
            self.run_replicas = [self.replica] * (len(self.token_steps) // 2)
        self.last_token_step = -2
        self.replica = -1

    def __repr__(self) -> str:
        return (
            f"Request(id={self.request_id}, arrival_s={self.arrival_s:.3f}, "
            f"prompt={self.num_prompt_tokens}, output={self.num_output_done}/{self.num_output_tokens}, "
            f"computed={self.num_computed_tokens}, outcome={self.outcome})"
        )
