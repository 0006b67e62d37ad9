"""Model swaps on demand: a baseline multi-model controller (our design, not a paper's).

Every `tick_s` simulated seconds it compares, per model, the demand (tokens still to
compute for its requests on replicas and in the cluster queue) per replica serving or
loading it. A model with requests and no replica gets one at once; otherwise, when the most
loaded model's demand per replica exceeds `imbalance` x the least loaded one's, one replica
of the least loaded model (if it has more than `min_replicas_per_model`) is swapped to the
most loaded model: it drains (or evicts, `evict=True`) and pays the new model's load time.
A replica swapped less than `cooldown_s` ago is not swapped again, so a swap that costs
seconds of load is not undone by the next tick's noise. Replicas pull the oldest ready
request of their model from the cluster queue.
"""

from __future__ import annotations

from collections import defaultdict

from sim.control import SERVING, STARTING, TICK, ClusterView, ReplicaView, SwapModel
from sim.errors import InputError


class SwapOnDemand:
    """Invariant: at most one swap per tick, never of a model's last `min_replicas_per_model` replicas."""

    dispatch = "push"
    wake_on = frozenset()

    def __init__(self, tick_s: float = 1.0, imbalance: float = 2.0, cooldown_s: float = 60.0, evict: bool = False,
                 min_replicas_per_model: int = 1) -> None:
        if not tick_s > 0:
            raise InputError("must be > 0 seconds", field="tick_s", value=tick_s)
        if not imbalance >= 1:
            raise InputError("must be >= 1", field="imbalance", value=imbalance)
        if cooldown_s < 0:
            raise InputError("must be >= 0 seconds", field="cooldown_s", value=cooldown_s)
        if min_replicas_per_model < 0:
            raise InputError("must be >= 0", field="min_replicas_per_model", value=min_replicas_per_model)
        self.tick_s = float(tick_s)
        self.imbalance = float(imbalance)
        self.cooldown_s = float(cooldown_s)
        self.evict = bool(evict)
        self.min_replicas_per_model = int(min_replicas_per_model)
        self._last_swap: dict[int, float] = {}

    def control(self, event: str, view: ClusterView) -> list:
        if event != TICK:
            return []
        models = {c["model"] for c in view.catalog.values()}
        live: dict[str, list[ReplicaView]] = defaultdict(list)
        for r in view.replicas:
            if r.state in (SERVING, STARTING):
                live[r.model].append(r)
        demand: dict[str, int] = defaultdict(int)
        for r in view.replicas:
            if r.state != "stopped":
                demand[r.model] += r.num_outstanding_tokens
        for q in view.queue:
            demand[q.model] += q.num_prompt_tokens  # what is known of a queued request's work
        now = view.now
        movable = [r for r in view.replicas if r.state == SERVING
                   and now - self._last_swap.get(r.replica_id, -float("inf")) >= self.cooldown_s
                   and len(live[r.model]) > self.min_replicas_per_model]
        if not movable:
            return []
        starved = sorted(m for m in models if demand[m] > 0 and not live[m])
        if starved:
            target = starved[0]
        else:
            per_replica = {m: demand[m] / len(live[m]) for m in models if live[m]}
            if len(per_replica) < 2:
                return []
            target = max(per_replica, key=lambda m: (per_replica[m], m))
            donor_load = min(per_replica[r.model] for r in movable)
            if per_replica[target] <= self.imbalance * max(donor_load, 1.0):
                return []
        donors = [r for r in movable if r.model != target]
        if not donors:
            return []
        # the least loaded model's least busy replica gives way
        donor = min(donors, key=lambda r: (demand[r.model] / len(live[r.model]), r.num_outstanding_tokens,
                                           r.replica_id))
        self._last_swap[donor.replica_id] = now
        return [SwapModel(donor.replica_id, target, evict=self.evict)]

    def pull(self, replica: ReplicaView, view: ClusterView) -> int | None:
        now = view.now
        for q in view.queue:
            if q.model == replica.model and q.ready_s <= now:
                return q.request_id
        return None
