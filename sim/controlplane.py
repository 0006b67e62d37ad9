"""The cluster's mechanism for cluster policies: replica lifecycle, the cluster queue, pulls,
and the controller hook (the protocol is in `sim.control`).

`Cluster` owns the replicas of a run once a controller or a catalog of replica
configurations is given: it places arrivals (the router pushes to serving replicas of the
request's model; with `dispatch='pull'`, or when no serving replica has the model yet,
arrivals wait in the cluster queue), offers queued requests to replicas with room (the
controller's `pull` picks), wakes the controller (ticks and events) and applies its actions:
evictions leave a replica at the end of its step in flight; drains, swaps and
reconfigurations empty a replica, then pay the new configuration's load time
(`CostModel.model_load_s`: weight bytes over the hardware's load bandwidth) before it serves.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

from sim.control import (ARRIVAL, COMPLETION, DRAINING, EVICT_MODES, RECOMPUTE, REPLICA_STATE, SERVING, START,
                         STARTING, STOPPED, TICK, TRANSFER, AddReplica, Assign, ClusterView, DrainReplica, Evict,
                         Migrate, Reconfigure, RemoveReplica, Reorder, ReplicaView, SwapModel)
from sim.errors import InputError
from sim.request import Request


class ActionError(Exception):
    """A controller asked for something the cluster cannot do (a policy bug, like PlanError;
    not a RuntimeError, so `simulate` does not mistake it for a stalled event queue)."""


DEFAULT_KV_TRANSFER_BW_BYTES_S = 25e9
"""Assumed bandwidth of moving a request's KV cache between GPU and host memory (PCIe 4.0 x16,
~25 GB/s effective of 32 GB/s nominal; our assumption, override per run)."""


@dataclass(frozen=True)
class ControlSettings:
    """Knobs of the cluster mechanism (not of any policy)."""

    kv_transfer_bw_bytes_s: float = DEFAULT_KV_TRANSFER_BW_BYTES_S
    """Bytes/s at which an evicted request's KV moves in `transfer` mode (the whole move)."""
    kv_bytes_per_token: int | None = None
    """KV bytes per token; None asks the replica's cost model (its ModelSpec at its tp)."""
    unknown_model: str = "error"
    """A request naming a model no replica or catalog configuration serves: 'error' (InputError
    at start-up), 'reject' (outcome rejected, reason no_replica_for_model) or 'any' (its model is
    cleared and any replica serves it, e.g. a BurstGPT trace's API model names; counted in
    `info['num_model_cleared']`)."""
    pull_cap: int | None = None
    """A replica has room to pull while running + waiting < this (None: its max_num_seqs)."""

    def __post_init__(self) -> None:
        if not self.kv_transfer_bw_bytes_s > 0:
            raise InputError("must be > 0", field="kv_transfer_bw_bytes_s", value=self.kv_transfer_bw_bytes_s)
        if self.kv_bytes_per_token is not None and self.kv_bytes_per_token < 1:
            raise InputError("must be >= 1 or null", field="kv_bytes_per_token", value=self.kv_bytes_per_token)
        if self.unknown_model not in ("error", "reject", "any"):
            raise InputError("must be 'error', 'reject' or 'any'", field="unknown_model", value=self.unknown_model)
        if self.pull_cap is not None and self.pull_cap < 1:
            raise InputError("must be >= 1 or null", field="pull_cap", value=self.pull_cap)


def _default_pull(replica: ReplicaView, view: ClusterView) -> int | None:
    """The oldest ready request of the replica's model."""
    now = view.now
    for q in view.queue:
        if (not q.model or not replica.model or q.model == replica.model) and q.ready_s <= now:
            return q.request_id
    return None


class Cluster:
    """Invariant: every request not yet ended is pending arrival, in the cluster queue, or held
    (waiting or running) by exactly one replica; a replica in `starting` or `stopped` holds none."""

    def __init__(self, env, replicas: list, specs: list, router, controller, catalog: Mapping[str, object],
                 settings: ControlSettings, make_replica: Callable, reject: Callable[[Request, str], None]) -> None:
        self.env = env
        self.replicas = replicas
        self.specs = specs
        self.router = router
        self.controller = controller
        self.catalog = dict(catalog)
        self.settings = settings
        self.make_replica = make_replica
        self.reject = reject
        self.queue: list[Request] = []
        self.completed_since_last_wake: list[Request] = []
        self.dispatch = getattr(controller, "dispatch", "push") if controller is not None else "push"
        if self.dispatch not in ("push", "pull"):
            raise InputError("controller dispatch must be 'push' or 'pull'", field="dispatch", value=self.dispatch)
        self.wake_on = frozenset(getattr(controller, "wake_on", ()) or ())
        self._pull = getattr(controller, "pull", None) or _default_pull
        self._eligible: dict[str, list] = {}
        self._catalog_view: Mapping[str, dict] | None = None
        self._by_id: dict[int, Request] | None = None
        self._requests: Sequence[Request] = ()
        self.counts = {"num_model_swaps": 0, "num_reconfigurations": 0, "num_evictions": 0, "num_migrations": 0,
                       "num_replicas_added": 0, "num_replicas_removed": 0, "num_controller_wakes": 0}
        self._ticking = False
        self._last_tokens: dict[int, tuple[float, int]] = {}
        for rep, spec in zip(replicas, specs):
            self._attach(rep, spec, serving_now=True)

    # ------------------------------------------------------------------ set-up
    def start(self) -> None:
        """Wake the controller once at t=0 and start its ticks."""
        if self.controller is None:
            return
        self._wake(START)
        tick = getattr(self.controller, "tick_s", None)
        if tick is not None:
            if not tick > 0:
                raise InputError("controller tick_s must be > 0 or None", field="tick_s", value=tick)
            self._ticking = True
            self.env.timeout(tick).callbacks.append(self._on_tick)

    def pending_arrivals(self) -> bool:  # replaced by simulate
        return False

    def _attach(self, rep, spec, serving_now: bool) -> None:
        rep.on_finish = self._on_finish
        rep.on_idle = self._on_idle
        rep.config_name = next((k for k, v in self.catalog.items() if v is spec), getattr(spec, "name", ""))
        rep.hardware = getattr(spec, "hardware", "")
        rep.tp = getattr(spec, "tp", 1)
        rep.state = SERVING if serving_now else STARTING
        rep.started_s = self.env.now
        rep.serving_s = self.env.now if serving_now else float("nan")
        rep.stopped_s = float("nan")
        rep.pending = None

    # -------------------------------------------------------------- dispatch
    def eligible(self, model: str) -> list:
        group = self._eligible.get(model)
        if group is None:
            group = [r for r in self.replicas if r.state == SERVING and (not r.model or not model or r.model == model)]
            self._eligible[model] = group
        return group

    def _changed(self) -> None:
        self._eligible.clear()

    def deliver(self, req: Request, now: float) -> None:
        """An arrival: reject what can never run, push to a serving replica, or queue it."""
        if req.reject_reason:  # marked at start-up (no replica may serve its model)
            self.reject(req, req.reject_reason)
            return
        if self.dispatch == "push":
            group = self.eligible(req.model)
            if group:
                target, why = route(self.router, req, group, now)
                if target is None:
                    self.reject(req, why)
                else:
                    target.submit(req)
                if ARRIVAL in self.wake_on:
                    self._wake(ARRIVAL)
                return
        self._enqueue(req)
        if ARRIVAL in self.wake_on:
            self._wake(ARRIVAL)
        self._offer()

    def _enqueue(self, req: Request) -> None:
        req.replica = -1
        insort(self.queue, req, key=_queue_key)
        if req.ready_s > self.env.now:
            self.env.timeout(req.ready_s - self.env.now).callbacks.append(lambda _e: self._offer())

    def _room(self, rep) -> bool:
        cap = self.settings.pull_cap or rep.limits.max_num_seqs
        return rep.state == SERVING and rep.num_running + len(rep.waiting) < cap

    def _offer(self, only=None) -> None:
        """Let replicas with room pull from the cluster queue (fewest outstanding requests first)."""
        while self.queue:
            reps = sorted((r for r in ([only] if only is not None else self.replicas) if self._room(r)),
                          key=lambda r: (r.num_outstanding_requests, r.replica_id))
            took = False
            view = ClusterView(self, self.env.now)
            for rep in reps:
                rid = self._pull(ReplicaView(rep, view.now), view)
                if rid is None:
                    continue
                req = self._take_from_queue(rid)
                self._place(req, rep)
                took = True
                break
            if not took:
                return

    def _take_from_queue(self, rid: int) -> Request:
        req = self._lookup(rid)
        if req is not None and req.replica == -1:  # the queue is sorted by _queue_key: bisect for it
            i = bisect_left(self.queue, _queue_key(req), key=_queue_key)
            if i < len(self.queue) and self.queue[i] is req:
                if req.ready_s > self.env.now:
                    raise ActionError(f"request {rid} is not ready before t={req.ready_s:.6f}s (KV transfer in flight)")
                return self.queue.pop(i)
        for i, r in enumerate(self.queue):
            if r.request_id == rid:
                if r.ready_s > self.env.now:
                    raise ActionError(f"request {rid} is not ready before t={r.ready_s:.6f}s (KV transfer in flight)")
                return self.queue.pop(i)
        raise ActionError(f"request {rid} is not in the cluster queue")

    def _place(self, req: Request, rep) -> None:
        if req.model and rep.model and req.model != rep.model:
            raise ActionError(f"request {req.request_id} (model {req.model!r}) cannot run on replica "
                              f"{rep.replica_id} serving {rep.model!r}")
        if rep.state != SERVING:
            raise ActionError(f"replica {rep.replica_id} is {rep.state}, not serving")
        why = rep.can_ever_fit(req)
        if why:
            self.reject(req, why)
            return
        rep.submit(req)

    # ---------------------------------------------------------------- events
    def _on_finish(self, req: Request) -> None:
        self.completed_since_last_wake.append(req)
        self.on_outcome(req)
        rep = self.replicas[req.replica]
        if self.queue:
            self.env.timeout(0).callbacks.append(lambda _e, rep=rep: self._offer(rep) if self._room(rep) else None)
        if COMPLETION in self.wake_on:
            self.env.timeout(0).callbacks.append(lambda _e: self._wake(COMPLETION))

    def on_outcome(self, req: Request) -> None:  # replaced by simulate
        pass

    def _on_idle(self, rep) -> None:
        """The replica holds nothing: finish a drain, a removal or a reconfiguration."""
        if rep.state != DRAINING or rep.has_leaving():
            return
        pending = rep.pending
        rep.pending = None
        if pending is None:
            self._set_state(rep, STOPPED)
            rep.stopped_s = self.env.now
            return
        spec = self.catalog[pending]
        rep.reconfigure(spec)
        rep.config_name = pending
        rep.hardware = getattr(spec, "hardware", "")
        rep.tp = getattr(spec, "tp", 1)
        self.specs[rep.replica_id] = spec
        self._load(rep, spec)

    def _load(self, rep, spec) -> None:
        self._set_state(rep, STARTING)
        rep.started_s = self.env.now
        load_s = float(spec.cost_model.model_load_s())

        def ready(_e, rep=rep) -> None:
            rep.serving_s = self.env.now
            self._set_state(rep, SERVING)
            self._offer(rep)

        self.env.timeout(load_s).callbacks.append(ready)

    def _set_state(self, rep, state: str) -> None:
        rep.state = state
        self._changed()
        if REPLICA_STATE in self.wake_on and self.controller is not None:
            self._wake(REPLICA_STATE)

    def _on_tick(self, _event) -> None:
        acted = self._wake(TICK)
        # Keep ticking while anything may still happen; a quiet cluster with nothing to do
        # (requests stranded in the queue, no arrivals left) stops, and the run ends.
        busy = (self.pending_arrivals() or acted or any(
            r.state == STARTING or r.num_running or r.waiting or r.has_leaving() for r in self.replicas)
            or any(q.ready_s > self.env.now for q in self.queue))
        if busy and not self.done():
            self.env.timeout(self.controller.tick_s).callbacks.append(self._on_tick)
        else:
            self._ticking = False

    def done(self) -> bool:  # replaced by simulate
        return False

    def _wake(self, event: str) -> bool:
        """Ask the controller; apply its actions; True if it asked for any."""
        self.counts["num_controller_wakes"] += 1
        now = self.env.now
        view = ClusterView(self, now)
        self._note_token_rates(now)
        actions = self.controller.control(event, view) or ()
        self.completed_since_last_wake = []
        for action in actions:
            self.apply(action)
        return bool(actions)

    def _note_token_rates(self, now: float) -> None:
        for rep in self.replicas:
            rep.rate_mark = self._last_tokens.get(rep.replica_id, (0.0, 0))
            self._last_tokens[rep.replica_id] = (now, rep.tokens_computed)

    # --------------------------------------------------------------- actions
    def _replica(self, rid: int):
        if not isinstance(rid, int) or not 0 <= rid < len(self.replicas):
            raise ActionError(f"no replica {rid} (the cluster has {len(self.replicas)})")
        return self.replicas[rid]

    def _lookup(self, rid: int) -> Request | None:
        if self._by_id is None:
            self._by_id = {r.request_id: r for r in self._requests}
        return self._by_id.get(rid)

    def _request(self, rid: int) -> Request:
        req = self._lookup(rid)
        if req is None or req.outcome is not None or req.arrival_s > self.env.now:
            raise ActionError(f"no request {rid} in the system at t={self.env.now:.6f}s")
        return req

    def apply(self, action) -> None:
        """Apply one controller action now (see sim.control for each action's meaning)."""
        if isinstance(action, Assign):
            rep = self._replica(action.replica)
            req = self._request(action.request_id)
            if req.replica != -1:
                raise ActionError(f"request {action.request_id} is on replica {req.replica}, not in the cluster queue")
            self._place(self._take_from_queue(req.request_id), rep)
        elif isinstance(action, Evict):
            self._evict(self._request(action.request_id), action.mode, None)
        elif isinstance(action, Migrate):
            target = self._replica(action.replica)
            req = self._request(action.request_id)
            if req.model and target.model and req.model != target.model:
                raise ActionError(f"request {req.request_id} (model {req.model!r}) cannot migrate to replica "
                                  f"{target.replica_id} serving {target.model!r}")
            self._evict(req, action.mode, target)
        elif isinstance(action, Reorder):
            self._replica(action.replica).reorder(action.request_ids)
        elif isinstance(action, SwapModel):
            rep = self._replica(action.replica)
            config = self._config_for(rep, action.model)
            self.counts["num_model_swaps"] += 1
            self._empty(rep, config, action.evict)
        elif isinstance(action, Reconfigure):
            rep = self._replica(action.replica)
            if action.config not in self.catalog:
                raise ActionError(f"no configuration {action.config!r} in the catalog {sorted(self.catalog)}")
            self.counts["num_reconfigurations"] += 1
            self._empty(rep, action.config, action.evict)
        elif isinstance(action, DrainReplica):
            self._empty(self._replica(action.replica), None, action.evict)
        elif isinstance(action, RemoveReplica):
            self.counts["num_replicas_removed"] += 1
            self._empty(self._replica(action.replica), None, True)
        elif isinstance(action, AddReplica):
            if action.config not in self.catalog:
                raise ActionError(f"no configuration {action.config!r} in the catalog {sorted(self.catalog)}")
            spec = self.catalog[action.config]
            rep = self.make_replica(len(self.replicas), spec)
            self.replicas.append(rep)
            self.specs.append(spec)
            self._attach(rep, spec, serving_now=False)
            rep.config_name = action.config
            self.counts["num_replicas_added"] += 1
            self._load(rep, spec)
        else:
            raise ActionError(f"not an action: {action!r}")

    def _config_for(self, rep, model: str) -> str:
        """The catalog configuration serving `model` on this replica's hardware and tp."""
        for name, spec in self.catalog.items():
            if spec.model == model and spec.hardware == rep.hardware and spec.tp == rep.tp:
                return name
        raise ActionError(f"no configuration in the catalog serves model {model!r} on {rep.hardware or 'this'} "
                          f"hardware at tp={rep.tp} (catalog: {sorted(self.catalog)})")

    def _empty(self, rep, config: str | None, evict: bool) -> None:
        """Stop admitting; evict what the replica holds if asked; then stop or load `config` once empty."""
        if rep.state == STOPPED:
            raise ActionError(f"replica {rep.replica_id} is stopped")
        if rep.state == STARTING:
            raise ActionError(f"replica {rep.replica_id} is still starting (loading its model)")
        rep.pending = config
        self._set_state(rep, DRAINING)
        if evict:
            for req in rep.held_requests():
                self._evict(req, RECOMPUTE, None)
        else:
            # running requests finish here; waiting ones (holding no KV) go back to the cluster queue
            for req in list(rep.waiting):
                self._evict(req, RECOMPUTE, None, count=False)
        rep.kick()

    def _evict(self, req: Request, mode: str, target, count: bool = True) -> None:
        if mode not in EVICT_MODES:
            raise ActionError(f"evict mode must be one of {EVICT_MODES}, got {mode!r}")
        if req.replica == -1:
            if target is None:
                return  # already in the cluster queue
            self._take_from_queue(req.request_id)
            self._deliver_to(req, target)
            return
        rep = self.replicas[req.replica]
        if count:
            self.counts["num_migrations" if target is not None else "num_evictions"] += 1
            if target is not None:
                req.num_migrations += 1
            else:
                req.num_evictions += 1

        def released(r: Request, rep=rep) -> None:
            if mode == TRANSFER and r.num_computed_tokens:
                per_token = self.settings.kv_bytes_per_token or _kv_bytes_per_token(rep)
                r.ready_s = self.env.now + r.num_computed_tokens * per_token / self.settings.kv_transfer_bw_bytes_s
            elif r.num_computed_tokens:
                r.num_computed_tokens = 0  # recomputed wherever it resumes (counted as an eviction, not a preemption)
            if target is None:
                self._enqueue(r)
                self.env.timeout(0).callbacks.append(lambda _e: self._offer())
            else:
                self._deliver_to(r, target)

        rep.release(req, released)

    def _deliver_to(self, req: Request, target) -> None:
        """Place a migrating request on `target` once it may run (after its KV transfer). If the
        target no longer serves its model by then (drained, swapped, removed meanwhile), the
        request goes to the cluster queue instead: the action was valid when it was taken."""
        delay = req.ready_s - self.env.now
        if delay > 0:
            req.replica = -1
            self.env.timeout(delay).callbacks.append(lambda _e: self._deliver_to(req, target))
            return
        if target.state != SERVING or (req.model and target.model and req.model != target.model):
            self._enqueue(req)
            self._offer()
            return
        self._place(req, target)

    # -------------------------------------------------------------- read-only
    def catalog_view(self) -> Mapping[str, dict]:
        """Configuration name -> model, hardware, tp and load time (the catalog never changes)."""
        if self._catalog_view is None:
            self._catalog_view = MappingProxyType({
                name: {"model": s.model, "hardware": s.hardware, "tp": s.tp,
                       "load_s": float(s.cost_model.model_load_s())} for name, s in self.catalog.items()})
        return self._catalog_view


def route(router, req: Request, group: list, now: float):
    """The router's replica among `group` for `req`, re-routed among the replicas it fits when
    it cannot ever run on the first choice: (replica, '') or (None, why it fits none)."""
    target = group[router.route(req, group, now)]
    why = target.can_ever_fit(req)
    if why:
        fits = [r for r in group if not r.can_ever_fit(req)]
        target = fits[router.route(req, fits, now)] if fits else None
    return target, why


def _queue_key(req: Request) -> tuple:
    return (req.arrival_s, req.request_id)


def _kv_bytes_per_token(rep) -> int:
    spec = getattr(rep.cost_model, "model", None)
    if spec is None or not hasattr(spec, "kv_bytes_per_token"):
        raise ActionError(f"replica {rep.replica_id}: its cost model has no ModelSpec to size a KV transfer; "
                          "set kv_bytes_per_token")
    return spec.kv_bytes_per_token(getattr(rep.cost_model, "tp", 1))
