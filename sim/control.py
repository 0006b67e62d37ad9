"""Cluster control: what a controller sees and what it may ask the cluster to do.

A controller (QLM's global scheduler, OServe's re-planner, an autoscaler, siloed pools) is
a cluster policy woken periodically (`tick_s`) and/or by events (`wake_on`: arrival,
completion, replica state change). It reads `ClusterView` (read-only views of replicas,
their queues and the cluster queue) and returns `Action`s; `sim.cluster` applies them.
Controllers never touch SimPy. Replicas may also pull from the cluster queue: when a
serving replica has room, the cluster asks the controller's `pull` which queued request it
takes (default: the oldest for its model). The protocol is our design (ARCHITECTURE.md,
"The cluster layer"); QLM's four operations (pull, evict, balance, swap) map onto it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:
    from sim.request import Request

# Replica lifecycle: starting (paying the model load) -> serving -> draining -> stopped.
STARTING = "starting"
SERVING = "serving"
DRAINING = "draining"
STOPPED = "stopped"
REPLICA_STATES = (STARTING, SERVING, DRAINING, STOPPED)

# What wakes a controller besides its tick.
ARRIVAL = "arrival"
COMPLETION = "completion"
REPLICA_STATE = "replica_state"
TICK = "tick"
START = "start"
EVENTS = (ARRIVAL, COMPLETION, REPLICA_STATE)

RECOMPUTE = "recompute"
TRANSFER = "transfer"
EVICT_MODES = (RECOMPUTE, TRANSFER)
"""How an evicted running request keeps its work: `recompute` drops its KV (its prompt and
the output so far are computed again, as a vLLM preemption), `transfer` copies its KV to
host memory and back (the request may resume, anywhere, after `KV bytes / bandwidth`)."""


# ------------------------------------------------------------------------- actions
@dataclass(frozen=True, slots=True)
class Assign:
    """Move a request from the cluster queue to a serving replica's waiting queue."""

    request_id: int
    replica: int


@dataclass(frozen=True, slots=True)
class Reorder:
    """Put these waiting requests of a replica at the front of its queue, in this order."""

    replica: int
    request_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Evict:
    """Take a queued or running request off its replica and put it back in the cluster queue.
    A running request leaves at the end of the step in flight (its tokens of that step count)."""

    request_id: int
    mode: str = RECOMPUTE


@dataclass(frozen=True, slots=True)
class Migrate:
    """Evict a request and assign it to `replica` (which must serve its model)."""

    request_id: int
    replica: int
    mode: str = RECOMPUTE


@dataclass(frozen=True, slots=True)
class SwapModel:
    """Make a replica serve another model: it admits nothing new, empties (drains what it
    holds, or evicts it to the cluster queue with `evict=True`), then pays the new model's
    load time (weights over the hardware's load bandwidth) before serving again."""

    replica: int
    model: str
    evict: bool = False


@dataclass(frozen=True, slots=True)
class AddReplica:
    """Start a new replica of a named configuration of the cluster's catalog (pays its load time)."""

    config: str


@dataclass(frozen=True, slots=True)
class DrainReplica:
    """Admit nothing new; finish what the replica holds (or evict it with `evict=True`); then stop."""

    replica: int
    evict: bool = False


@dataclass(frozen=True, slots=True)
class RemoveReplica:
    """Stop a replica now; what it holds goes back to the cluster queue (recompute)."""

    replica: int


@dataclass(frozen=True, slots=True)
class Reconfigure:
    """Empty a replica (drain, or evict with `evict=True`), then load a named configuration of
    the catalog (another model, parallelism or limits) and serve again."""

    replica: int
    config: str
    evict: bool = False


Action = Assign | Reorder | Evict | Migrate | SwapModel | AddReplica | DrainReplica | RemoveReplica | Reconfigure


# --------------------------------------------------------------------------- views
class RequestView:
    """A request as a controller sees it (read-only; counters as of the last step boundary).
    The true output length is not shown: a controller estimates it, as a real one must."""

    __slots__ = ("_r",)

    def __init__(self, request: Request) -> None:
        self._r = request

    request_id = property(lambda self: self._r.request_id)
    model = property(lambda self: self._r.model, doc="Model the request names ('' = any).")
    qos_class = property(lambda self: self._r.qos_class)
    arrival_s = property(lambda self: self._r.arrival_s)
    deadline_s = property(lambda self: self._r.deadline_s, doc="First-token deadline set by a QoS policy (inf if none).")
    num_prompt_tokens = property(lambda self: self._r.num_prompt_tokens)
    num_output_tokens_done = property(lambda self: self._r.num_output_done)
    num_computed_tokens = property(lambda self: self._r.num_computed_tokens)
    replica = property(lambda self: self._r.replica, doc="Replica holding it, -1 in the cluster queue.")
    num_evictions = property(lambda self: self._r.num_evictions)
    first_token_s = property(lambda self: self._r.first_token_s)
    ready_s = property(lambda self: self._r.ready_s, doc="Earliest time it may run again (KV transfer in flight).")

    def __repr__(self) -> str:
        return f"RequestView({self._r!r})"


class ReplicaView:
    """A replica as a controller sees it (read-only)."""

    __slots__ = ("_rep", "_now")

    def __init__(self, replica, now: float) -> None:
        self._rep = replica
        self._now = now

    replica_id = property(lambda self: self._rep.replica_id)
    name = property(lambda self: self._rep.name)
    model = property(lambda self: self._rep.model, doc="Model loaded (or being loaded).")
    config = property(lambda self: self._rep.config_name, doc="Catalog configuration it runs.")
    state = property(lambda self: self._rep.state)
    hardware = property(lambda self: self._rep.hardware)
    tp = property(lambda self: self._rep.tp)
    cost_model = property(lambda self: self._rep.cost_model)
    limits = property(lambda self: self._rep.limits)
    num_waiting = property(lambda self: len(self._rep.waiting))
    num_running = property(lambda self: self._rep.num_running)
    num_kv_blocks = property(lambda self: self._rep.kv.num_blocks)
    kv_blocks_used = property(lambda self: self._rep.kv.num_used_blocks)
    num_outstanding_tokens = property(lambda self: self._rep.num_outstanding_tokens)

    @property
    def waiting(self) -> tuple[RequestView, ...]:
        """Queued requests in queue order."""
        return tuple(RequestView(r) for r in self._rep.waiting)

    @property
    def running(self) -> tuple[RequestView, ...]:
        """Running requests, in admission order."""
        return tuple(RequestView(r) for r in self._rep.running_requests())

    tokens_computed = property(lambda self: self._rep.tokens_computed, doc="Tokens computed since it started.")

    @property
    def recent_tokens_per_s(self) -> float:
        """Tokens computed per second since the controller was last woken (NaN at the first wake)."""
        t0, n0 = self._rep.rate_mark
        return (self._rep.tokens_computed - n0) / (self._now - t0) if self._now > t0 else float("nan")

    def __repr__(self) -> str:
        return f"ReplicaView({self.name}, model={self.model!r}, state={self.state})"


class ClusterView:
    """The cluster at `now` as a controller sees it."""

    __slots__ = ("now", "replicas", "_queue", "catalog", "_cluster")

    def __init__(self, cluster, now: float) -> None:
        self._cluster = cluster
        self.now = now
        self.replicas: tuple[ReplicaView, ...] = tuple(ReplicaView(r, now) for r in cluster.replicas)
        """Every replica ever started, by id (stopped ones included)."""
        self.catalog = cluster.catalog_view()
        """Configuration name -> (model, hardware, tp, load_s) of what AddReplica / Reconfigure may start."""
        self._queue: tuple[RequestView, ...] | None = None

    @property
    def queue(self) -> tuple[RequestView, ...]:
        """The cluster queue (arrivals not yet placed, evicted requests), oldest first."""
        if self._queue is None:
            self._queue = tuple(RequestView(r) for r in self._cluster.queue)
        return self._queue

    @property
    def num_queued(self) -> int:
        return len(self._cluster.queue)

    def queue_tail(self, n: int) -> tuple[RequestView, ...]:
        """The last `n` requests of the cluster queue, oldest first (the queue is ordered by
        arrival, so new arrivals are its tail): O(n), where `queue` is O(queue length)."""
        q = self._cluster.queue
        return tuple(RequestView(r) for r in q[max(0, len(q) - n):]) if n > 0 else ()

    def recent_completions(self) -> tuple[RequestView, ...]:
        """Requests finished since the controller was last woken (to learn output lengths)."""
        return tuple(RequestView(r) for r in self._cluster.completed_since_last_wake)


class Controller(Protocol):
    """A cluster policy. `tick_s`: wake every this many simulated seconds (None: never);
    `wake_on`: events that wake it (subset of `EVENTS`); `dispatch`: 'push' (the router
    places arrivals) or 'pull' (arrivals wait in the cluster queue; replicas pull)."""

    tick_s: float | None
    wake_on: frozenset[str]
    dispatch: str

    def control(self, event: str, view: ClusterView) -> Sequence[Action]:
        """Actions to apply now (may be empty). `event` is one of EVENTS, TICK or START."""
        ...

    def pull(self, replica: ReplicaView, view: ClusterView) -> int | None:
        """Which queued request (id) `replica` takes now that it has room, or None."""
        ...
