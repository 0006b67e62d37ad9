"""OServe's flow-proportional router: each request type is split over replicas in the
proportions of the lower level's max-flow (planner.oserve_plan.router_weights).

(our design) A router sees a request's prompt length, not its output length, so types are
told apart here by their prompt bin only; the weights of a prompt bin sum its output bins'
flows. The split is a smooth weighted round robin per prompt bin (the nginx algorithm): fully
deterministic, and after n requests of a bin each replica's count is within one of
n x its weight share. A replica absent from the weights (or a bin without weights) falls back
to the fewest outstanding tokens among the replicas offered, so nothing is ever unroutable.
With `balance='least_loaded'` (our design) a request goes instead to the weighted replica with
the fewest outstanding tokens per unit of weight: the flow decides where a bin may go and how
much each replica should take, the replicas' queues decide the next request (load-aware under
bursts; the long-run split follows the weights only as far as the replicas drain alike).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from sim.errors import InputError
from sim.request import Request
from sim.scheduling import ReplicaLoad


class FlowRouter:
    """Invariant: weights are finite and >= 0; per prompt bin the round-robin credit sums to 0
    over the replicas it has weighed (the smooth-WRR invariant)."""

    def __init__(self, prompt_edges: Sequence[float] = (), weights: Sequence[Mapping[int, float]] | None = None,
                 balance: str = "wrr") -> None:
        if balance not in ("wrr", "least_loaded"):
            raise InputError("must be 'wrr' or 'least_loaded'", field="balance", value=balance)
        self.balance = balance
        edges = [float(e) for e in prompt_edges]
        if any(b <= a for a, b in zip(edges, edges[1:])):
            raise InputError("must be strictly increasing", field="prompt_edges", value=edges)
        self.prompt_edges = np.asarray(edges, dtype=float)
        self._weights: list[dict[int, float]] = []
        self._credit: list[dict[int, float]] = []
        self.set_weights(weights or [])

    def set_weights(self, weights: Sequence[Mapping[int, float]]) -> None:
        """Replace the split: per prompt bin, {replica id: weight} (any scale). Credits restart."""
        clean: list[dict[int, float]] = []
        for i, w in enumerate(weights):
            row = {}
            for rid, x in dict(w).items():
                x = float(x)
                if not np.isfinite(x) or x < 0:
                    raise InputError("router weights must be finite and >= 0", field=f"weights[{i}][{rid}]", value=x)
                if x > 0:
                    row[int(rid)] = x
            clean.append(row)
        if clean and len(clean) != len(self.prompt_edges) + 1:
            raise InputError(f"need one weight map per prompt bin ({len(self.prompt_edges) + 1})", field="weights",
                             value=len(clean))
        self._weights = clean
        self._credit = [dict.fromkeys(w, 0.0) for w in clean]

    @property
    def weights(self) -> list[dict[int, float]]:
        return [dict(w) for w in self._weights]

    def prompt_bin(self, num_prompt_tokens: int) -> int:
        return int(np.searchsorted(self.prompt_edges, num_prompt_tokens, side="right"))

    def route(self, request: Request, replicas: Sequence[ReplicaLoad], now: float) -> int:
        if self._weights:
            b = self.prompt_bin(request.num_prompt_tokens)
            weights, credit = self._weights[b], self._credit[b]
            offered = [(i, r.replica_id) for i, r in enumerate(replicas) if r.replica_id in weights]
            if offered and self.balance == "least_loaded":
                # fewest outstanding tokens per unit of weight (ties: list order)
                return min(offered, key=lambda x: (replicas[x[0]].num_outstanding_tokens + 1) / weights[x[1]])[0]
            if offered:
                total = 0.0
                best_i, best_id, best_c = -1, -1, -np.inf
                for i, rid in offered:
                    c = credit[rid] + weights[rid]
                    credit[rid] = c
                    total += weights[rid]
                    if c > best_c:
                        best_i, best_id, best_c = i, rid, c
                credit[best_id] -= total
                return best_i
        loads = [r.num_outstanding_tokens for r in replicas]
        return loads.index(min(loads))
