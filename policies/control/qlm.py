"""QLM (Queue Management for SLO-oriented LLM serving, SoCC 2024, arXiv 2407.00047): request
groups in per-replica virtual queues, a waiting-time estimator, and a global scheduler acting
through request pulling, eviction, load balancing and model swapping.

Arrivals wait in the cluster queue (`dispatch = "pull"`). A request joins the open group of
its (model, QoS class), opened at most `group_window_s` ago and holding fewer than
`max_group_size` requests; else it opens a new group (`group_window_s: null` is the released
code: one FIFO group per (model, class) while it has requests). A new group goes to the
virtual queue, among replicas serving or loading its model, with the least predicted wait
(any replica if none does; uniformly at random among them with load balancing off, as the
released code places every group) (our design). Every `tick_s` the controller:
1. learns output lengths from completions (the statistical estimator);
2. predicts each group's wait (`policies.estimators.waiting`) and, when some group is
   predicted to miss its first-token deadline, reorders: EDF over group deadlines per
   virtual queue (the released default), or the MILP over all queues (`qlm_milp`, at most
   `milp_max_groups` most urgent groups, at most once every `milp_interval_s` simulated
   seconds; EDF on time-out / infeasibility, counted, and between solves);
3. load balancing: a group whose replica does not serve its model moves to the replica of its
   model with the least predicted wait; then, per model, the tail group of the longest queue
   moves to the shortest when that shortens its own predicted wait (one move per model a tick);
4. model swapping: a serving replica whose head group needs another model swaps to it exactly
   when the estimator predicts that group misses otherwise (served after the queue's groups
   of the loaded model, by the best replica already holding its model, or never if none
   does); it drains first (no eviction). A group predicted late on its model's replica moves
   to an idle replica of another model that swaps to it, when that predicts an earlier start;
5. eviction: when a replica at its cap has a group predicted to miss, requests of laxer
   classes (a later relative first-token deadline: batch before interactive) leave it
   (`evict_mode`), at most as many as the group has requests, each at most once; they
   rejoin groups.
The late-group swap and the evictions are considered only at ticks where step 2 predicted a miss.
A replica with room pulls (`pull`) the next request of the first group of its model in its
queue while running + waiting < `pull_cap` (the released cap is 10); arrivals join groups at
the next tick, or at once when a replica with room has nothing of its model queued; with load balancing on,
a replica with nothing of its model queued takes the most urgent group of its model from a
queue whose replica cannot serve it now. With `pulling` off, requests are assigned to their
queue's replica as soon as it serves their model (vLLM's own queue holds them).
Steps 2-5 are the paper's operations; their exact triggers are our design.
"""

from __future__ import annotations

import math
import time
from collections import deque

import numpy as np

from policies.control.qlm_milp import MilpInstance, solve
from policies.estimators.waiting import Ahead, make_estimator, rates_from_cost_model
from sim.control import ARRIVAL, EVICT_MODES, RECOMPUTE, SERVING, STARTING, STOPPED, TICK, Assign, Evict, SwapModel
from sim.errors import InputError
from sim.qos import QoS

_INF = math.inf


class Group:
    """Requests of one (model, class) in one virtual queue. Invariant: every member waits in the
    cluster queue; `deadline_s` is the earliest absolute first-token deadline of any member."""

    __slots__ = ("gid", "model", "qos_class", "created_s", "deadline_s", "requests", "replica", "num_added",
                 "prompt_tokens")

    def __init__(self, gid: int, model: str, qos_class: str, now: float, replica: int) -> None:
        self.gid = gid
        self.model = model
        self.qos_class = qos_class
        self.created_s = now
        self.deadline_s = _INF
        self.requests: deque = deque()
        self.replica = replica
        self.num_added = 0
        self.prompt_tokens = 0
        """Prompt tokens of its members."""

    def __repr__(self) -> str:
        return f"Group({self.gid}, {self.model!r}/{self.qos_class}, n={len(self.requests)}, r={self.replica})"



def _is_num(value) -> bool:
    """A finite or infinite real number; not a bool, not a string."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    """A whole number (an int, or a float with no fraction); not a bool, not a string."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()

class QLM:
    """Invariant: a request is in exactly one group of exactly one virtual queue iff it waits in
    the cluster queue and the controller has seen it (`_where`); groups are never empty."""

    dispatch = "pull"

    def __init__(self, slo=None, tick_s: float = 1.0, group_window_s: float | None = 1.0,
                 max_group_size: int | None = 64, estimator: str = "released", released_tokens_per_request: int = 100,
                 scheduler: str = "edf", milp_time_limit_s: float | None = 2.0, milp_node_limit: int | None = 200,
                 milp_max_groups: int = 8,
                 milp_swap_penalty: float = 1.0, milp_interval_s: float = 10.0, pull_cap: int | None = 64,
                 pulling: bool = True,
                 eviction: bool = True, load_balancing: bool = True, model_swapping: bool = True,
                 evict_mode: str = RECOMPUTE, seed: int = 0, min_samples: int = 20,
                 calibrate_waits: bool = False) -> None:
        if not (_is_num(tick_s) and tick_s > 0):
            raise InputError("must be > 0 seconds", field="tick_s", value=tick_s)
        if group_window_s is not None and not (_is_num(group_window_s) and group_window_s >= 0):
            raise InputError("must be >= 0 seconds or null", field="group_window_s", value=group_window_s)
        if max_group_size is not None and (not _is_int(max_group_size)
                                           or max_group_size < 1):
            raise InputError("must be an integer >= 1 or null", field="max_group_size", value=max_group_size)
        if scheduler not in ("edf", "milp"):
            raise InputError("must be 'edf' or 'milp'", field="scheduler", value=scheduler)
        if milp_time_limit_s is not None and not (_is_num(milp_time_limit_s) and milp_time_limit_s > 0):
            raise InputError("must be > 0 seconds or null", field="milp_time_limit_s", value=milp_time_limit_s)
        if milp_node_limit is not None and (not _is_int(milp_node_limit)
                                            or milp_node_limit < 1):
            raise InputError("must be an integer >= 1 or null", field="milp_node_limit", value=milp_node_limit)
        if not _is_int(milp_max_groups) or milp_max_groups < 1:
            raise InputError("must be an integer >= 1", field="milp_max_groups", value=milp_max_groups)
        if pull_cap is not None and (not _is_int(pull_cap) or pull_cap < 1):
            raise InputError("must be an integer >= 1 or null", field="pull_cap", value=pull_cap)
        if evict_mode not in EVICT_MODES:
            raise InputError(f"must be one of {list(EVICT_MODES)}", field="evict_mode", value=evict_mode)
        self.qos = QoS.from_config(slo)
        self.tick_s = float(tick_s)
        self.group_window_s = None if group_window_s is None else float(group_window_s)
        self.max_group_size = None if max_group_size is None else int(max_group_size)
        self.estimator = make_estimator(estimator, released_tokens_per_request, min_samples, calibrate_waits)
        self.scheduler = scheduler
        self.milp_time_limit_s = None if milp_time_limit_s is None else float(milp_time_limit_s)
        self.milp_node_limit = None if milp_node_limit is None else int(milp_node_limit)
        self.milp_max_groups = int(milp_max_groups)
        self.milp_swap_penalty = float(milp_swap_penalty)
        if not (_is_num(milp_interval_s) and milp_interval_s >= 0):
            raise InputError("must be >= 0 seconds", field="milp_interval_s", value=milp_interval_s)
        self.milp_interval_s = float(milp_interval_s)
        self.pull_cap = None if pull_cap is None else int(pull_cap)
        self.pulling, self.eviction = bool(pulling), bool(eviction)
        self.load_balancing, self.model_swapping = bool(load_balancing), bool(model_swapping)
        self.evict_mode = evict_mode
        self.wake_on = frozenset() if self.pulling else frozenset({ARRIVAL})
        self._rng = np.random.default_rng(seed)
        self._vq: list[list[Group]] = []
        self._where: dict[int, Group] = {}
        self._open: dict[tuple[str, str], Group] = {}
        self._by_model: dict[str, list[Group]] = {}
        self._deadline: dict[int, float] = {}
        self._next_gid = 0
        self._rates: dict[int, object] = {}
        self._held: dict[int, Ahead] = {}
        self._target: dict[int, str] = {}
        self._prompt_mean = [0.0, 0]
        self._predictions: list[tuple] = []
        self._milp_sig: tuple | None = None
        self._placed: dict[int, tuple[float, float]] = {}
        """Requests placed for the first time and not yet dispatched: (time, modelled wait)."""
        self._end: dict[int, tuple[Ahead, str]] = {}
        """Per replica: what is ahead of a group appended to its queue, and the model there (a cache)."""
        self._milp_last_s = -_INF
        self._counts = {"num_evictions": 0, "num_swaps": 0, "num_rebalances": 0, "num_steals": 0, "num_reorders": 0,
                        "milp_calls": 0, "milp_time_s": 0.0, "milp_fallbacks": 0, "milp_wall_limit_hits": 0,
                        "num_predicted_misses": 0,
                        "num_groups": 0, "num_ticks": 0, "control_time_s": 0.0}

    # ------------------------------------------------------------------ reports
    def stats(self) -> dict:
        """Counters of a run: evictions, swaps, rebalances (group moves), reorders, MILP calls,
        MILP wall seconds, MILP fallbacks to EDF, groups formed, ticks, wall seconds in control()."""
        return dict(self._counts)

    @property
    def wait_predictions(self) -> list[dict]:
        """One row per request placed into a virtual queue for the first time: request_id,
        time_s (placement), replica, queue_position (groups ahead), predicted_wait_s (+ p10_s,
        p50_s, p90_s with the statistical estimator). Compare with the request table's
        `first_scheduled_s - time_s`."""
        keys = ("request_id", "time_s", "replica", "queue_position", "predicted_wait_s")
        if self.estimator.name == "statistical":
            keys += ("p10_s", "p50_s", "p90_s")
        return [dict(zip(keys, row)) for row in self._predictions]

    # ------------------------------------------------------------- the protocol
    def control(self, event: str, view) -> list:
        t0 = time.perf_counter()
        for q in view.recent_completions():
            self.estimator.observe(q.qos_class, q.num_output_tokens_done)
        self._sync(view)
        actions: list = []
        if event == TICK:
            self._counts["num_ticks"] += 1
            actions = self._plan(view)
        if not self.pulling:
            actions += self._push(view)
        self._counts["control_time_s"] += time.perf_counter() - t0
        return actions

    def pull(self, replica, view) -> int | None:
        if not self.pulling:
            return None
        if self.pull_cap is not None and replica.num_running + replica.num_waiting >= self.pull_cap:
            return None
        rid = replica.replica_id
        model = replica.model
        now = view.now
        self._ensure(rid)
        # arrivals are grouped at the next tick, or now when nothing of the model is queued here
        for attempt in (0, 1):
            if attempt:
                if view.num_queued <= len(self._where):
                    break
                self._sync(view)
            for g in self._vq[rid]:
                if g.model == model:
                    q = self._take(g, now)
                    if q is not None:
                        return q
        if self.load_balancing:
            g = self._steal(rid, model, view)
            if g is not None:
                return self._take(g, now)
        return None

    # ---------------------------------------------------------------- grouping
    def _ensure(self, rid: int) -> None:
        while len(self._vq) <= rid:
            self._vq.append([])

    def _sync(self, view) -> None:
        """Place requests of the cluster queue the controller has not seen (arrivals, evictions)."""
        if view.num_queued <= len(self._where):
            return
        self._ensure(len(view.replicas) - 1)
        now = view.now
        new = view.num_queued - len(self._where)
        tail = getattr(view, "queue_tail", None)
        if tail is not None:  # usually the new ones are the latest arrivals: the tail of the queue
            last = tail(new)
            if not any(q.request_id in self._where for q in last):
                for q in last:
                    self._place(q, view, now)
                return
        for q in view.queue:  # evicted requests rejoin by arrival time, inside the queue
            if q.request_id not in self._where:
                self._place(q, view, now)

    def _rel_deadline(self, qos_class: str) -> float:
        tier = self.qos.tier(qos_class)
        return _INF if tier is None else tier.first_token_deadline_s(self.estimator.mean_output_tokens(qos_class))

    def _place(self, q, view, now: float) -> None:
        rid = q.request_id
        first = rid not in self._deadline
        d = q.arrival_s + self._rel_deadline(q.qos_class)
        self._deadline[rid] = d
        model, home = q.model, None
        if not model:
            # a request naming no model ('' = any) joins the groups of the model its chosen
            # replica holds (or is loading), so it never waits for, or causes, a swap (our design)
            home = self._choose_queue("", view)
            model = self._target.get(home, view.replicas[home].model)
        key = (model, q.qos_class)
        g = self._open.get(key)
        window, cap = self.group_window_s, self.max_group_size
        if g is None or not g.requests or (window is not None and now - g.created_s > window) \
                or (cap is not None and g.num_added >= cap):
            g = Group(self._next_gid, model, q.qos_class, now,
                      home if home is not None and not model else self._choose_queue(model, view))
            self._next_gid += 1
            self._counts["num_groups"] += 1
            self._open[key] = g
            self._vq[g.replica].append(g)
            self._end.pop(g.replica, None)
            self._by_model.setdefault(model, []).append(g)
        g.requests.append(q)
        end = self._end.get(g.replica)
        if end is not None:  # the tail group grew (else the cached end of the queue is stale)
            if self._vq[g.replica][-1] is g:
                _add(end[0], q, 1)
            else:
                del self._end[g.replica]
        g.num_added += 1
        g.prompt_tokens += q.num_prompt_tokens
        if d < g.deadline_s:
            g.deadline_s = d
        self._where[rid] = g
        n = self._prompt_mean
        n[1] += 1
        n[0] += (q.num_prompt_tokens - n[0]) / n[1]
        if first:
            self._record_prediction(q, g, view, now)

    def _serves(self, r, model: str) -> bool:
        """Replica r (a view) serves or is loading `model` (or will, after a swap we asked for)."""
        if r.state == STOPPED:
            return False
        target = self._target.get(r.replica_id)
        if target is not None:
            return target == model
        return r.state in (SERVING, STARTING) and (r.model == model or not r.model or not model)

    def _choose_queue(self, model: str, view) -> int:
        live = [r for r in view.replicas if r.state != STOPPED]
        cands = [r for r in live if self._serves(r, model)] or live
        if not self.load_balancing:
            return int(cands[int(self._rng.integers(len(cands)))].replica_id)
        # ties (e.g. empty queues) go to the replica holding the fewest requests, as the cluster offers
        return min(cands, key=lambda r: (self._queue_end_s(r, view), r.num_running + r.num_waiting,
                                         r.replica_id)).replica_id

    def _take(self, g: Group, now: float) -> int | None:
        for i, q in enumerate(g.requests):
            if q.ready_s <= now:
                del g.requests[i]
                g.prompt_tokens -= q.num_prompt_tokens
                del self._where[q.request_id]
                self._dispatched(q.request_id, now)
                if not g.requests:
                    self._drop_group(g)
                elif g.replica in self._end:
                    _add(self._end[g.replica][0], q, -1)
                return q.request_id
        return None

    def _dispatched(self, rid: int, now: float) -> None:
        """Tell a learning estimator the realised wait of a request's first placement."""
        placed = self._placed.pop(rid, None)
        if placed is not None:
            self.estimator.observe_wait(placed[1], now - placed[0])

    def _drop_group(self, g: Group) -> None:
        self._vq[g.replica].remove(g)
        self._end.pop(g.replica, None)
        self._by_model[g.model].remove(g)
        if self._open.get((g.model, g.qos_class)) is g:
            del self._open[(g.model, g.qos_class)]

    def _move(self, g: Group, to: int, count: str = "num_rebalances") -> None:
        self._vq[g.replica].remove(g)
        self._end.pop(g.replica, None)
        self._end.pop(to, None)
        g.replica = to
        self._vq[to].append(g)
        self._counts[count] += 1

    def _steal(self, rid: int, model: str, view):
        """The most urgent group of `model` in a queue whose replica cannot serve it now."""
        best = None
        for g in self._by_model.get(model, ()):
            if g.replica == rid:
                continue
            r = view.replicas[g.replica]
            if r.state == SERVING and r.model == model and g.replica not in self._target and not self._full(r):
                continue
            if best is None or (g.deadline_s, g.gid) < (best.deadline_s, best.gid):
                best = g
        if best is not None:
            self._move(best, rid, count="num_steals")
            self._vq[rid].remove(best)
            self._vq[rid].insert(0, best)
        return best

    def _full(self, r) -> bool:
        cap = self.pull_cap or r.limits.max_num_seqs
        return r.num_running + r.num_waiting >= cap

    # --------------------------------------------------------------- estimating
    def _cap(self, r) -> int:
        return self.pull_cap or r.limits.max_num_seqs

    def _rates_of(self, r):
        rates = self._rates.get(r.replica_id)
        if rates is None:
            ctx = self._prompt_mean[0] + self.estimator.mean_output_tokens("") / 2.0
            rates = rates_from_cost_model(r.cost_model, self._cap(r), r.limits.max_num_batched_tokens, ctx)
            self._rates[r.replica_id] = rates
        return rates

    def _load_s(self, view, r, model: str) -> float:
        for c in view.catalog.values():
            if c["model"] == model and c["hardware"] == r.hardware and c["tp"] == r.tp:
                return float(c["load_s"])
        return _INF

    def _start(self, r, view) -> tuple[Ahead, str]:
        """What is ahead of the replica's queue: its held requests (statistical estimator) and
        any load in progress; and the model the queue starts from."""
        held = self._held.get(r.replica_id) if self.estimator.counts_held else None
        ahead = Ahead(dict(held.by_class), 0, held.prompt_tokens, held.done_tokens, 0.0) if held else Ahead()
        model = self._target.get(r.replica_id, r.model)
        if r.state == STARTING or r.replica_id in self._target:
            load = self._load_s(view, r, model)
            ahead.swap_s += load if math.isfinite(load) else 0.0
        return ahead, model

    def _walk(self, r, groups, view, upto=None):
        """Per group of `groups` (in order) on replica r: its predicted wait (Estimate)."""
        rates = self._rates_of(r)
        ahead, model = self._start(r, view)
        out = []
        for g in groups:
            if g is upto:
                break
            if g.model != model:
                ahead.swap_s += self._load_s(view, r, g.model)
                model = g.model
            out.append(self.estimator.estimate(ahead, rates))
            n = len(g.requests)
            ahead.by_class[g.qos_class] = ahead.by_class.get(g.qos_class, 0) + n
            ahead.num_in_groups += n
            ahead.prompt_tokens += g.prompt_tokens
        return out, ahead, model

    def _service_s(self, g: Group, r) -> float:
        """Predicted seconds replica r needs for all of g: its output tokens (the estimator's
        mean) at the batch size min(n, cap), plus its prompts at the prefill rate."""
        rates = self._rates_of(r)
        n = len(g.requests)
        return (n * self.estimator.mean_output_tokens(g.qos_class) / rates.decode_at(min(n, rates.cap))
                + g.prompt_tokens / rates.prefill_tok_s)

    def _queue_end(self, r, view) -> tuple[Ahead, str]:
        end = self._end.get(r.replica_id)
        if end is None:
            _, ahead, model = self._walk(r, self._vq[r.replica_id], view)
            end = self._end[r.replica_id] = (ahead, model)
        return end

    def _queue_end_s(self, r, view) -> float:
        return self.estimator.estimate(self._queue_end(r, view)[0], self._rates_of(r)).mean_s

    def _record_prediction(self, q, g: Group, view, now: float) -> None:
        r = view.replicas[g.replica]
        vq = self._vq[g.replica]
        if vq[-1] is g:  # the tail group: the end of the queue without this request
            end = self._queue_end(r, view)[0]
            ahead = Ahead(dict(end.by_class), end.num_in_groups, end.prompt_tokens, end.done_tokens, end.swap_s)
            _add(ahead, q, -1)
        else:
            _, ahead, model = self._walk(r, vq, view, upto=g)
            if g.model != model:
                ahead.swap_s += self._load_s(view, r, g.model)
            k = len(g.requests) - 1  # members ahead of it in its group
            ahead.by_class[g.qos_class] = ahead.by_class.get(g.qos_class, 0) + k
            ahead.num_in_groups += k
            ahead.prompt_tokens += g.prompt_tokens - q.num_prompt_tokens
        est = self.estimator.estimate(ahead, self._rates_of(r))
        if getattr(self.estimator, "calibrate", False):
            self._placed[q.request_id] = (now, est.raw_s)
        row = (q.request_id, now, g.replica, vq.index(g), est.mean_s)
        if self.estimator.name == "statistical":
            row += (est.quantile_s(0.1), est.quantile_s(0.5), est.quantile_s(0.9))
        self._predictions.append(row)

    def _snapshot(self, view) -> None:
        self._rates.clear()
        self._end.clear()
        self._held.clear()
        for r in view.replicas:
            if r.state == SERVING and self._target.get(r.replica_id) == r.model:
                del self._target[r.replica_id]  # the swap we asked for is done
            if r.state == STOPPED or not self.estimator.counts_held:
                continue
            a = Ahead()
            for q in r.running + r.waiting:
                a.by_class[q.qos_class] = a.by_class.get(q.qos_class, 0) + 1
                a.prompt_tokens += max(0, q.num_prompt_tokens - q.num_computed_tokens)
                a.done_tokens += q.num_output_tokens_done
            self._held[r.replica_id] = a

    # ------------------------------------------------------------------ planning
    def _plan(self, view) -> list:
        self._snapshot(view)
        now = view.now
        for rid in range(len(self._vq)):  # a stopped replica's queue empties into the others
            if rid < len(view.replicas) and view.replicas[rid].state == STOPPED:
                for g in list(self._vq[rid]):
                    self._move(g, self._choose_queue(g.model, view))
        misses = self._misses(view, now)
        self._counts["num_predicted_misses"] += sum(len(m) for m in misses.values())
        if any(misses.values()):
            self._reorder(view, now)
        if self.load_balancing:
            self._balance(view, now)
        actions: list = []
        if self.model_swapping:
            actions += self._swaps(view, now)
        if any(misses.values()) and (self.model_swapping or self.eviction):
            late = self._misses(view, now)  # after the reorder, the moves and the swaps
            if self.model_swapping:
                actions += self._swap_for_late(view, now, late)
            if self.eviction:
                actions += self._evictions(view, now, late)
        return actions

    def _misses(self, view, now: float) -> dict[int, list[Group]]:
        """Per replica: its groups predicted to miss their deadline (mean wait past the slack)."""
        out = {}
        for rid, vq in enumerate(self._vq):
            if not vq:
                continue
            ests, _, _ = self._walk(view.replicas[rid], vq, view)
            out[rid] = [g for g, e in zip(vq, ests) if now + e.mean_s > g.deadline_s]
        return out

    def _reorder(self, view, now: float) -> None:
        if self.scheduler == "milp" and self._milp(view, now):
            return
        for vq in self._vq:
            order = sorted(vq, key=lambda g: (g.deadline_s, g.gid))
            if order != vq:
                vq[:] = order
                self._end.clear()
                self._counts["num_reorders"] += 1

    def _milp(self, view, now: float) -> bool:
        """Place the most urgent groups by the MILP; False (EDF instead) on no answer or within
        `milp_interval_s` of the last solve."""
        if now - self._milp_last_s < self.milp_interval_s:
            return False
        self._milp_last_s = now
        reps = [r for r in view.replicas if r.state != STOPPED]
        groups = sorted((g for vq in self._vq for g in vq), key=lambda g: (g.deadline_s, g.gid))
        chosen = groups[:self.milp_max_groups]
        if not chosen:
            return True
        rest = {id(g) for g in chosen}
        service, allowed = [], []
        base, current, loads = [], [], []
        for r in reps:
            ahead, model = self._start(r, view)
            base.append(self.estimator.estimate(ahead, self._rates_of(r)).mean_s if ahead.num_requests or
                        ahead.swap_s else 0.0)
            current.append(model)
            loads.append({m: (0.0 if m == model else self._load_s(view, r, m)) for m in {g.model for g in chosen}})
        for g in chosen:
            row, ok = [], []
            for r in reps:
                row.append(self._service_s(g, r))
                ok.append((self.load_balancing or r.replica_id == g.replica)
                          and (self.model_swapping or self._serves(r, g.model)))
            service.append(row)
            allowed.append(ok)
        sig = (tuple((g.gid, len(g.requests), g.replica) for g in chosen),
               tuple((r.replica_id, r.state, r.model, r.num_running + r.num_waiting) for r in reps))
        if sig == self._milp_sig:
            return True  # nothing changed since the last plan: keep it
        self._milp_sig = None
        inst = MilpInstance([g.deadline_s - now for g in chosen], [len(g.requests) for g in chosen],
                            [g.model for g in chosen], service, allowed, base, current, loads,
                            num_slots=min(len(chosen), max(1, -(-len(chosen) // len(reps)) + 2)) if self.load_balancing
                            else max(sum(1 for g in chosen if g.replica == r.replica_id) for r in reps),
                            swap_penalty=self.milp_swap_penalty)
        self._counts["milp_calls"] += 1
        t0 = time.perf_counter()
        plan = solve(inst, self.milp_time_limit_s, self.milp_node_limit)
        elapsed = time.perf_counter() - t0
        self._counts["milp_time_s"] += elapsed
        if self.milp_time_limit_s is not None and elapsed >= self.milp_time_limit_s:
            self._counts["milp_wall_limit_hits"] += 1  # this solve's result depended on the machine's speed
        if plan is None:
            self._counts["milp_fallbacks"] += 1
            return False
        self._milp_sig = sig
        changed = False
        for k, r in enumerate(reps):
            rid = r.replica_id
            old = self._vq[rid]
            planned = [chosen[g] for g in plan.queues[k]]
            others = sorted((g for g in old if id(g) not in rest), key=lambda g: (g.deadline_s, g.gid))
            new = planned + others
            for g in planned:
                if g.replica != rid:
                    g.replica = rid
                    self._counts["num_rebalances"] += 1
            if new != old:
                changed = True
            self._vq[rid] = new
            self._end.pop(rid, None)
        if changed:
            self._counts["num_reorders"] += 1
        return True

    def _balance(self, view, now: float) -> None:
        # groups on a replica that cannot serve their model go to one that does
        for rid, vq in enumerate(self._vq):
            r = view.replicas[rid]
            for g in list(vq):
                if not self._serves(r, g.model):
                    homes = [x for x in view.replicas if self._serves(x, g.model)]
                    if homes:
                        best = min(homes, key=lambda x: (self._queue_end_s(x, view), x.replica_id))
                        self._move(g, best.replica_id)
        # per model, the tail group of the longest queue to the shortest when it gains
        for model, groups in self._by_model.items():
            reps = [r for r in view.replicas if r.state == SERVING and self._serves(r, model)]
            if len(reps) < 2 or not groups:
                continue
            ends = {r.replica_id: self._queue_end_s(r, view) for r in reps}
            src = max(reps, key=lambda r: (ends[r.replica_id], -r.replica_id))
            dst = min(reps, key=lambda r: (ends[r.replica_id], r.replica_id))
            tail = next((g for g in reversed(self._vq[src.replica_id]) if g.model == model), None)
            if tail is None or src is dst:
                continue
            ests, _, _ = self._walk(src, self._vq[src.replica_id], view)
            here = ests[self._vq[src.replica_id].index(tail)].mean_s
            if ends[dst.replica_id] < here:
                self._move(tail, dst.replica_id)

    def _swaps(self, view, now: float) -> list:
        out = []
        for r in view.replicas:
            rid = r.replica_id
            vq = self._vq[rid] if rid < len(self._vq) else []
            if r.state != SERVING or rid in self._target or not vq or vq[0].model == r.model or not r.model:
                continue
            g = vq[0]
            if r.num_waiting:
                # progress before a swap (our design): a swap drains the replica and sends what waits
                # there back to the cluster queue, so swapping while requests of the loaded model wait
                # lets two models' groups swap a replica back and forth forever without serving
                # anything (a livelock the property test found: one replica, loads 0 / 7 / 8 s).
                # Once they run, the drain finishes them: every swap cycle completes a request.
                continue
            if not self._swap_needed(g, r, view, now):
                # deferred: the loaded model's groups go first (the queue states the plan)
                vq[:] = [x for x in vq if x.model == r.model] + [x for x in vq if x.model != r.model]
                self._end.pop(rid, None)
                continue
            load = self._load_s(view, r, g.model)
            if not math.isfinite(load):
                continue
            self._target[rid] = g.model
            self._end.pop(rid, None)
            self._counts["num_swaps"] += 1
            out.append(SwapModel(rid, g.model))
            # what the queue holds of the old model goes where that model is served
            if self.load_balancing:
                for x in list(vq):
                    if x.model == r.model:
                        homes = [h for h in view.replicas if h.replica_id != rid and self._serves(h, x.model)]
                        if homes:
                            self._move(x, min(homes, key=lambda h: (self._queue_end_s(h, view), h.replica_id))
                                       .replica_id)
        return out

    def _swap_for_late(self, view, now: float, misses: dict[int, list[Group]]) -> list:
        """A group predicted late where it is moves to the head of an idle replica of another
        model (nothing queued, not its model's last replica while that model has groups) that
        swaps to its model, when the swap predicts an earlier start (our design)."""
        out = []
        for rid, late in misses.items():
            for g in sorted(late, key=lambda x: (x.deadline_s, x.gid))[:1]:
                if g.replica != rid or not self._serves(view.replicas[rid], g.model):
                    continue
                ests, _, _ = self._walk(view.replicas[rid], self._vq[rid], view)
                stay = ests[self._vq[rid].index(g)].mean_s
                best, best_wait = None, stay
                for r in view.replicas:
                    if r.state != SERVING or r.replica_id in self._target or not r.model or r.model == g.model \
                            or self._vq[r.replica_id] or r.num_waiting:
                        continue
                    others = [x for x in view.replicas if x is not r and self._serves(x, r.model)]
                    if not others and self._by_model.get(r.model):
                        continue
                    ahead, _ = self._start(r, view)
                    ahead.swap_s += self._load_s(view, r, g.model)
                    wait = self.estimator.estimate(ahead, self._rates_of(r)).mean_s
                    if wait < best_wait:
                        best, best_wait = r, wait
                if best is not None:
                    self._move(g, best.replica_id)
                    self._target[best.replica_id] = g.model
                    self._end.pop(best.replica_id, None)
                    self._counts["num_swaps"] += 1
                    out.append(SwapModel(best.replica_id, g.model))
        return out

    def _swap_needed(self, g: Group, r, view, now: float) -> bool:
        """Would head group `g` miss its deadline without swapping r: served after the groups
        of r's current model in r's queue if any, else by the best replica serving its model
        (with load balancing on; never otherwise)? (The estimator decides; no swap is made that
        the estimate does not call for.)"""
        vq = self._vq[r.replica_id]
        same = [x for x in vq if x.model == r.model]
        if same:  # keep the model: serve those first, then swap for g
            ests, _, _ = self._walk(r, same + [g], view)
            wait = ests[-1].mean_s
        else:
            # elsewhere only if groups may move (load balancing); else never
            homes = [h for h in view.replicas if h.replica_id != r.replica_id and self._serves(h, g.model)]
            wait = min((self._queue_end_s(h, view) for h in homes), default=_INF) if self.load_balancing else _INF
        return wait == _INF or now + wait > g.deadline_s  # never served otherwise, or late

    def _evictions(self, view, now: float, misses: dict[int, list[Group]]) -> list:
        out = []
        for rid, late in misses.items():
            r = view.replicas[rid]
            late = [g for g in late if g.model == r.model and g.replica == rid]
            if not late or r.state != SERVING or not self._full(r):
                continue
            g = min(late, key=lambda x: (x.deadline_s, x.gid))
            rel = self._rel_deadline(g.qos_class)
            # never a request evicted before (no eviction storms; our design)
            victims = [q for q in r.waiting + r.running if q.num_evictions == 0
                       and self._rel_deadline(q.qos_class) > rel
                       and self._deadline.get(q.request_id, _INF) > g.deadline_s]
            # the laxest first; among equals the latest arrival (the least work lost)
            victims.sort(key=lambda q: (-self._rel_deadline(q.qos_class), -q.arrival_s, -q.request_id))
            for q in victims[:len(g.requests)]:
                out.append(Evict(q.request_id, self.evict_mode))
                self._counts["num_evictions"] += 1
        return out

    # ------------------------------------------------------------ pulling off
    def _push(self, view) -> list:
        """Without pulling: assign every grouped request to its queue's replica once it serves the model."""
        out = []
        for rid, vq in enumerate(self._vq):
            if rid >= len(view.replicas):
                break
            r = view.replicas[rid]
            if r.state != SERVING or rid in self._target:
                continue
            for g in list(vq):
                if g.model != r.model and r.model and g.model:
                    continue
                while g.requests and g.requests[0].ready_s <= view.now:
                    q = g.requests.popleft()
                    self._end.pop(rid, None)
                    self._dispatched(q.request_id, view.now)
                    del self._where[q.request_id]
                    out.append(Assign(q.request_id, rid))
                if not g.requests:
                    self._drop_group(g)
        return out


def _add(ahead: Ahead, q, sign: int) -> None:
    """Count request `q` into (sign 1) or out of (sign -1) a queue's `Ahead`."""
    ahead.by_class[q.qos_class] = ahead.by_class.get(q.qos_class, 0) + sign
    ahead.num_in_groups += sign
    ahead.prompt_tokens += sign * q.num_prompt_tokens
