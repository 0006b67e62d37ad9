"""Siloed deployment: the cluster split into pools of replicas, one per group of QoS classes.

"Today's practice" that Niyama is compared with: interactive traffic goes to one pool,
batch-like traffic to another, and pools never share replicas. A replica belongs to the pool
its name starts with (`experiments.wiring.replica_specs` names pool replicas `<pool><index>`;
the longest matching pool name wins). Inside a pool the router picks the replica with the
fewest outstanding requests. Searching the ways to divide N replicas between the pools is
`planner.capacity.best_split`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from sim.errors import InputError
from sim.request import Request
from sim.scheduling import ReplicaLoad


class SiloedRouter:
    """Route each request to its class's pool. Invariant: a request only ever goes to a
    replica of its own pool (an unknown class or an empty pool is an `InputError`)."""

    def __init__(self, pools: Mapping[str, Sequence[str]], default_pool: str | None = None,
                 balance: str = "requests") -> None:
        from sim.workload.options import plain

        pools = plain(pools)
        if not isinstance(pools, dict) or not pools:
            raise InputError("must map pool name -> list of QoS classes", field="router.pools", value=pools)
        self.pool_of_class: dict[str, str] = {}
        """QoS class -> pool name."""
        for pool, classes in pools.items():
            if not isinstance(pool, str) or not pool:
                raise InputError("pool names must be non-empty text", field="router.pools", value=pool)
            if isinstance(classes, str) or not isinstance(classes, list):
                raise InputError("must be a list of QoS classes", field=f"router.pools.{pool}", value=classes)
            for cls in classes:
                if cls in self.pool_of_class:
                    raise InputError(f"class is in two pools ({self.pool_of_class[cls]!r} and {pool!r})",
                                     field=f"router.pools.{pool}", value=cls)
                self.pool_of_class[str(cls)] = pool
        self.pools = tuple(pools)
        if default_pool is not None and default_pool not in pools:
            raise InputError(f"not one of the pools {list(pools)}", field="router.default_pool", value=default_pool)
        self.default_pool = default_pool
        """Pool for classes listed nowhere (None: such a request is an error)."""
        if balance not in ("requests", "tokens"):
            raise InputError('must be "requests" or "tokens"', field="router.balance", value=balance)
        self.balance = balance
        """Within a pool: fewest outstanding requests or fewest outstanding tokens."""
        self._pool_by_name: dict[str, str | None] = {}

    def pool_of_replica(self, name: str) -> str | None:
        """The pool a replica belongs to, from its name (None if no pool name prefixes it)."""
        pool = self._pool_by_name.get(name, "")
        if pool == "":
            matches = [p for p in self.pools if name.startswith(p) and name[len(p):].isdigit()]
            pool = max(matches, key=len) if matches else None
            self._pool_by_name[name] = pool
        return pool

    def route(self, request: Request, replicas: Sequence[ReplicaLoad], now: float) -> int:
        pool = self.pool_of_class.get(request.qos_class, self.default_pool)
        if pool is None:
            raise InputError(f"QoS class has no pool (pools: {dict((p, [c for c, q in self.pool_of_class.items() if q == p]) for p in self.pools)})",
                             field="qos_class", value=request.qos_class)
        best, best_load = -1, None
        for i, r in enumerate(replicas):
            if self.pool_of_replica(getattr(r, "name", "")) != pool:
                continue
            load = r.num_outstanding_requests if self.balance == "requests" else r.num_outstanding_tokens
            if best_load is None or load < best_load:
                best, best_load = i, load
        if best < 0:
            names = [getattr(r, "name", "?") for r in replicas]
            raise InputError(f"pool {pool!r} has no replica among {names}; name pool replicas '<pool><index>'",
                             field="cluster.pools", value=pool)
        return best
