"""Routers: the cluster-level choice of replica for each arriving request.

Each router sees the replicas that serve the request's model and returns an index into
that list. Ties break by list position, so runs are deterministic.
"""

from __future__ import annotations

from typing import Sequence

from sim.request import Request
from sim.scheduling import ReplicaLoad


class RoundRobin:
    """Cycle through the replicas in order (per group of replicas, keyed by their ids: a key by
    the list's identity would depend on memory addresses once groups are rebuilt)."""

    def __init__(self) -> None:
        self._next: dict[tuple, int] = {}

    def route(self, request: Request, replicas: Sequence[ReplicaLoad], now: float) -> int:
        key = tuple(r.replica_id for r in replicas)
        i = self._next.get(key, 0) % len(replicas)
        self._next[key] = i + 1
        return i


def _argmin(loads: list) -> int:
    """Index of the smallest load (first on ties)."""
    return loads.index(min(loads))


class LeastOutstandingRequests:
    """The replica holding the fewest unfinished requests (waiting + running)."""

    def route(self, request: Request, replicas: Sequence[ReplicaLoad], now: float) -> int:
        return _argmin([r.num_outstanding_requests for r in replicas])


class LeastOutstandingTokens:
    """The replica with the fewest tokens still to compute (prompts left plus outputs left)."""

    def route(self, request: Request, replicas: Sequence[ReplicaLoad], now: float) -> int:
        return _argmin([r.num_outstanding_tokens for r in replicas])
