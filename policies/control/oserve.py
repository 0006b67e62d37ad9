"""OServe's re-planning controller: each window, forecast every request type's arrivals, plan
the deployment of the GPU pool for the forecast (two-level: max-flow + merge/split search,
planner.oserve_plan), and switch to it when the predicted gain over the window exceeds the
switching cost; between switches, route each arrival by the flow's proportions.

From the paper (design/POLICIES.md, OServe): the two levels, forecasting per type, switching
when the predicted optimum beats the current deployment by more than the switching cost, the
cost being the weight transfer. **Our design**: everything concrete below.
- Dispatch: arrivals wait in the cluster queue and the controller, woken by each arrival,
  assigns them with a `policies.flow_router.FlowRouter` among serving replicas (a request
  evicted by a drain is pulled by any replica with room, oldest first).
- Types: bins of prompt x output length with the statistics the planner needs (mean lengths,
  P90 prompt) given at construction (the operator's history of the service). Arrivals are
  counted per prompt bin (the output length is unknown at arrival) and spread over output bins
  by the shares seen in completed requests (seeded by the given statistics).
- Gain: (served flow of the best deployment - of the current one) x window_s, both by the
  max-flow at the forecast x `headroom`, in demand-equivalent requests (planner.oserve_plan.FlowPlan).
  Cost: for each replica that changes, its served flow (same unit) x (estimated drain + weight
  transfer + `reinit_s`): the requests the pool does not serve while it switches. Switch when gain > cost, one switch at a time.
- Weight transfer (greedy reuse): a GPU whose previous replica had degree j <= the new degree
  k already holds its new (smaller) shard (TP shards of powers of two nest); for j > k it is missing
  weight_bytes(k) - weight_bytes(j) bytes (per-GPU shard sizes), copied from peers over the
  interconnect (NVLink; all GPUs of the replica in parallel); a fresh GPU loads
  its shard from host at the host load bandwidth. These times are the load times of catalog
  configurations `tp<k>` (fresh) and `tp<k>-from-tp<j>` (`switch_catalog` builds them).
- Lifecycle: the replicas that change are drained (running requests finish, waiting ones go
  back to the queue); once all of them have stopped, the new replicas are added and pay their
  load time; the rest serve throughout.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np

from planner.deployment import (DEFAULT_TP_DEGREES, RateSettings, ReplicaConfig, RequestTypes, TypeStats,
                                feasible_configs, rate_table, roofline_for)
from planner.oserve_plan import max_flow, refine, router_weights
from policies.estimators.forecast import ExponentialSmoothing, LSTMForecaster
from policies.flow_router import FlowRouter
from sim.control import (ARRIVAL, REPLICA_STATE, SERVING, START, STARTING, STOPPED, TICK, AddReplica,
                         Assign, ClusterView, DrainReplica, ReplicaView)
from sim.errors import InputError

DEFAULT_REINIT_S = 5.0
"""Seconds a replica takes to start once its weights are in place (our assumption: engine
start, CUDA graphs, NCCL groups); added to every switched replica's load time."""


def config_name(tp: int, from_tp: int | None = None) -> str:
    """Catalog name of degree `tp` loaded fresh from host, or reusing shards of degree `from_tp`."""
    return f"tp{tp}" if from_tp is None else f"tp{tp}-from-tp{from_tp}"


def transfer_s(template, tp: int, from_tp: int | None) -> float:
    """Weight-transfer seconds for a replica of degree `tp` on GPUs that held shards of degree
    `from_tp` (None: nothing; from host) of `template`'s model (a roofline: ModelSpec + GpuSpec)."""
    m, g = template.model, template.gpu
    if from_tp is None:
        return m.weight_bytes(tp) / g.host_load_bw_bytes_s
    missing = max(m.weight_bytes(tp) - m.weight_bytes(from_tp), 0) if from_tp > tp else 0
    return missing / g.interconnect_bw_bytes_s


def switch_catalog(template_spec, configs: Sequence[ReplicaConfig], reinit_s: float = DEFAULT_REINIT_S) -> dict:
    """Catalog of ReplicaSpecs for every degree, fresh and from every other degree, from a
    replica spec whose cost model is a roofline (the load time of each is `transfer_s` +
    `reinit_s`). Raises InputError for another cost model."""
    cm = template_spec.cost_model
    if not hasattr(cm, "model") or not hasattr(cm, "gpu") or not hasattr(cm, "compute_efficiency"):
        raise InputError("OServe's switching catalog needs a roofline cost model (costmodel=roofline)",
                         field="costmodel", value=getattr(cm, "name", type(cm).__name__))
    out = {}
    degrees = [c.tp for c in configs]
    for k in degrees:
        for j in (None, *degrees):
            if j == k:
                continue
            base = roofline_for(cm, k)
            load = transfer_s(cm, k, j) + reinit_s
            cost = type(base)(base.model, base.gpu, tp=k, compute_efficiency=base.compute_efficiency,
                              memory_efficiency=base.memory_efficiency, step_overhead_s=base.step_overhead_s,
                              allreduce_latency_s=base.allreduce_latency_s,
                              gpu_memory_utilization=base.gpu_memory_utilization, load_s=load)
            name = config_name(k, j)
            out[name] = replace(template_spec, cost_model=cost, tp=k, name=name, num_kv_blocks=None)
    return out


def _equivalent_per_replica(plan) -> np.ndarray:
    """Each replica's served flow in the plan's demand-equivalent req/s (the unit of `served`)."""
    w = np.where(np.isfinite(plan.work), plan.work, 0.0)
    total = plan.demand.sum()
    mean_w = float((plan.demand * w).sum()) / total if total > 0 else 0.0
    if mean_w <= 0:
        return np.zeros(plan.flow.shape[1])
    return (plan.flow * w[:, None]).sum(axis=0) / mean_w


class OServeController:
    """Invariant: at most one switch in flight; the replicas it plans for (serving, starting, or
    draining for its switch) never use more GPUs than the pool had at start."""

    dispatch = "pull"
    wake_on = frozenset({ARRIVAL, REPLICA_STATE})

    def __init__(self, prompt_edges: Sequence[float] | None = None, output_edges: Sequence[float] | None = None,
                 mean_prompt: Sequence[float] | None = None, mean_output: Sequence[float] | None = None,
                 p90_prompt: Sequence[float] | None = None,
                 type_counts: Sequence[float] | None = None, initial_rate_per_s: Sequence[float] | None = None,
                 window_s: float = 300.0, replan: bool = True,
                 forecaster: str = "exp_smoothing", alpha: float = 0.5, lstm: Mapping | None = None,
                 history: Sequence[Sequence[float]] | None = None, headroom: float = 1.2,
                 tp_degrees: Sequence[int] = DEFAULT_TP_DEGREES, ttft_s: float = 2.0, tpot_s: float = 0.1,
                 utilization: float = 0.8, max_iters: int = 8, reinit_s: float = DEFAULT_REINIT_S,
                 initial_weights: bool = True, router_balance: str = "wrr", seed: int = 0) -> None:
        given = {"prompt_edges": prompt_edges, "output_edges": output_edges, "mean_prompt": mean_prompt,
                 "mean_output": mean_output, "p90_prompt": p90_prompt}
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise InputError(f"OServe needs the request types and their length statistics ({', '.join(missing)} "
                             "missing): experiments.reproduce_oserve derives them from the workload "
                             "(planner.deployment.RequestTypes / TypeStats)", field=missing[0])
        self.types = RequestTypes(prompt_edges, output_edges)
        n = len(self.types)
        arrays = [np.asarray(x, dtype=float) for x in (mean_prompt, mean_output, p90_prompt)]
        for name, a in zip(("mean_prompt", "mean_output", "p90_prompt"), arrays):
            if a.shape != (n,) or np.any(a < 0) or not np.all(np.isfinite(a)):
                raise InputError(f"needs {n} lengths >= 0 (one per type)", field=name, value=list(a))
        counts = np.ones(n) if type_counts is None else np.asarray(type_counts, dtype=float)
        if counts.shape != (n,) or np.any(counts < 0):
            raise InputError(f"needs {n} counts >= 0", field="type_counts", value=list(counts))
        self.stats = TypeStats(counts, *arrays)
        self.initial_rate = None if initial_rate_per_s is None else np.asarray(initial_rate_per_s, dtype=float)
        if self.initial_rate is not None and (self.initial_rate.shape != (n,) or np.any(self.initial_rate < 0)):
            raise InputError(f"needs {n} rates >= 0", field="initial_rate_per_s", value=list(self.initial_rate))
        if not window_s > 0:
            raise InputError("must be > 0 seconds", field="window_s", value=window_s)
        if not headroom > 0:
            raise InputError("must be > 0", field="headroom", value=headroom)
        self.window_s = float(window_s)
        self.tick_s = self.window_s
        self.replan = bool(replan)
        self.headroom = float(headroom)
        self.tp_degrees = tuple(tp_degrees)
        self.settings = RateSettings(ttft_s=ttft_s, tpot_s=tpot_s, utilization=utilization)
        self.max_iters = int(max_iters)
        self.reinit_s = float(reinit_s)
        self.initial_weights = bool(initial_weights)
        if forecaster == "exp_smoothing":
            self.forecaster = ExponentialSmoothing(alpha)
        elif forecaster == "lstm":
            self.forecaster = LSTMForecaster(seed=seed, **dict(lstm or {}))
        else:
            raise InputError("must be 'exp_smoothing' or 'lstm'", field="forecaster", value=forecaster)
        self.history: list[np.ndarray] = [np.asarray(h, dtype=float) for h in (history or [])]
        if any(h.shape != (n,) for h in self.history):
            raise InputError(f"each window of history needs {n} counts", field="history")
        if self.history:
            self.forecaster.fit(np.stack(self.history))
        nb_o = self.types.num_output_bins
        self._out_share = (counts.reshape(-1, nb_o) + 1e-9) / (counts.reshape(-1, nb_o) + 1e-9).sum(axis=1,
                                                                                                   keepdims=True)
        self._out_seen = np.zeros_like(self._out_share)
        self._window_counts = np.zeros(self.types.num_prompt_bins)
        self._seen: set[int] = set()
        self.router = FlowRouter(self.types.prompt_edges, balance=router_balance)
        self.rates: dict[int, np.ndarray] = {}
        self.configs: list[ReplicaConfig] = []
        self.num_gpus = 0
        self._template = None
        self._active: dict[int, int] = {}     # replica id -> degree, for replicas serving/starting in the plan
        self._switch: dict | None = None     # {'drain': [ids], 'add': [(tp, from_tp)], ...}
        self.decisions: list[dict] = []
        """One row per window: time, forecast, current/best deployment, served flows, gain, cost, switched."""

    # ------------------------------------------------------------------ planning
    def _setup(self, view: ClusterView) -> None:
        live = [r for r in view.replicas if r.state in (SERVING, STARTING)]
        if not live:
            raise InputError("OServe needs at least one replica at start", field="cluster")
        self._template = live[0].cost_model
        if not hasattr(self._template, "gpu") or not hasattr(self._template, "compute_efficiency"):
            raise InputError("OServe plans with a roofline cost model (costmodel=roofline)", field="costmodel",
                             value=getattr(self._template, "name", "?"))
        self.num_gpus = sum(r.tp for r in live)
        lim = live[0].limits  # the rate table respects the replicas' engine limits
        self.settings = replace(self.settings, max_num_seqs=lim.max_num_seqs,
                                max_num_batched_tokens=lim.max_num_batched_tokens)
        self.configs = feasible_configs(self._template.model, self._template.gpu, self.num_gpus, self.tp_degrees)
        self.rates = rate_table(self._template, self.configs, self.stats, self.settings)
        self._active = {r.replica_id: r.tp for r in live}
        demand = (self.initial_rate if self.initial_rate is not None
                  else self.stats.count / max(self.stats.count.sum(), 1e-9))  # the mix, until a window is seen
        if self.initial_weights:
            self._set_router(demand)

    def _set_router(self, demand: np.ndarray) -> None:
        ids = sorted(self._active)
        if not ids:
            return
        plan = max_flow([self._active[i] for i in ids], self.rates, demand)
        w = router_weights(plan, self.rates, self.types.num_output_bins)
        self.router.set_weights([{ids[r]: x for r, x in row.items()} for row in w])

    def _forecast(self) -> np.ndarray:
        """Next window's req/s per type."""
        h = np.stack(self.history)
        if isinstance(self.forecaster, LSTMForecaster) and len(h) % 6 == 0:
            self.forecaster.fit(h)
        return np.maximum(self.forecaster.predict(h), 0.0) / self.window_s

    def _drain_estimate_s(self, rep: ReplicaView) -> float:
        running = rep.running
        if not running:
            return 0.0
        mo = self.stats.mean_output.reshape(-1, self.types.num_output_bins)
        left, ctx = [], 0
        for q in running:
            b = min(int(self.router.prompt_bin(q.num_prompt_tokens)), mo.shape[0] - 1)
            expect = float((mo[b] * self._out_share[b]).sum())
            left.append(max(expect - q.num_output_tokens_done, 1.0))
            ctx += q.num_computed_tokens
        step = rep.cost_model.step_time_s(0, 0, len(running), ctx, len(running))
        return max(left) * step

    def _plan(self, view: ClusterView) -> None:
        counts = np.outer(self._window_counts, np.ones(self.types.num_output_bins)) * self._out_share
        self.history.append(counts.reshape(-1))
        self._window_counts[:] = 0
        if not self.replan:  # static: the starting deployment and its routing stay
            self.decisions.append({"time_s": view.now, "observed_per_s": (counts.reshape(-1) / self.window_s).tolist(),
                                   "switched": False})
            return
        demand = self._forecast()
        ids = sorted(self._active)
        cur = tuple(self._active[i] for i in ids)
        target = demand * self.headroom
        cur_plan = max_flow(cur, self.rates, target)
        row = {"time_s": view.now, "forecast_per_s": demand.round(4).tolist(), "current": sorted(cur, reverse=True),
               "served_current": cur_plan.served, "switched": False}
        if self._switch is None:
            best = refine(cur, self.configs, self.rates, target, max_iters=self.max_iters)
            gain = (best.served - cur_plan.served) * self.window_s
            keep, drain, add = self._diff(ids, cur, best.deployment)
            per_replica = _equivalent_per_replica(cur_plan)
            reps = {r.replica_id: r for r in view.replicas}
            cost, down = 0.0, 0.0
            freed = sorted((self._active[i] for i in drain), reverse=True)
            for i in drain:
                down = max(down, self._drain_estimate_s(reps[i]))
            load = max((transfer_s(self._template, k, j) for k, j in self._pair(add, freed)), default=0.0)
            down += load + self.reinit_s
            for i in drain:
                cost += per_replica[ids.index(i)] * down
            row.update(best=list(best.deployment), served_best=best.served, gain_requests=gain,
                       cost_requests=cost, switch_down_s=down)
            if drain and gain > cost:
                row["switched"] = True
                self._switch = {"drain": drain, "add": self._pair(add, freed), "started_s": view.now,
                                "down_est_s": down}
                for i in drain:
                    del self._active[i]
                self._set_router(demand)
                self.decisions.append(row)
                return
        self.decisions.append(row)
        self._set_router(demand if demand.sum() > 0 else self.stats.count)

    @staticmethod
    def _diff(ids: list[int], cur: Sequence[int], new: Sequence[int]):
        """Greedy reuse: replicas whose degree the new deployment keeps stay; the rest drain."""
        need = Counter(new)
        keep, drain = [], []
        for i, tp in zip(ids, cur):
            if need[tp] > 0:
                need[tp] -= 1
                keep.append(i)
            else:
                drain.append(i)
        add = sorted(need.elements(), reverse=True)
        return keep, drain, add

    @staticmethod
    def _pair(add: Sequence[int], freed: Sequence[int]) -> list[tuple[int, int | None]]:
        """(new degree, degree its GPUs last held) per added replica: the freed GPUs, largest
        degrees first, go to the added replicas, largest first (each GPU keeps the shard it had)."""
        gpus = [j for j in freed for _ in range(j)]  # one entry per freed GPU: the degree it held
        out, pos = [], 0
        for k in add:
            held = gpus[pos:pos + k]
            pos += k
            out.append((k, min(held) if held else None))  # the GPU missing the most bounds the transfer
        return out

    # --------------------------------------------------------------- protocol
    def control(self, event: str, view: ClusterView) -> list:
        self._learn_outputs(view, event == TICK)
        if event == START:
            self._setup(view)
        elif event == TICK:
            self._plan(view)
            if self._switch is not None and not self._switch.get("issued"):
                self._switch["issued"] = True
                # only the drains: applying them wakes this controller again (replica state), and
                # that nested wake may assign queued requests itself
                return [DrainReplica(i) for i in self._switch["drain"]]
        sw = self._switch
        if sw is not None and sw.get("issued") and not sw.get("added"):
            states = {r.replica_id: r.state for r in view.replicas}
            if all(states.get(i) == STOPPED for i in sw["drain"]):
                first = len(view.replicas)
                actions = []
                for n, (k, j) in enumerate(sw["add"]):
                    actions.append(AddReplica(config_name(k, j)))
                    self._active[first + n] = k
                sw["added"] = True
                return actions  # the new replicas' state changes wake it again
        elif sw is not None and sw.get("added"):
            states = {r.replica_id: r.state for r in view.replicas}
            if all(states.get(i) == SERVING for i in self._active):
                self.decisions.append({"time_s": view.now, "switch_done": True,
                                       "took_s": view.now - sw["started_s"], "estimated_s": sw["down_est_s"]})
                self._switch = None
                self._set_router(self.history[-1] / self.window_s if self.history else self.stats.count)
        return self._assign(view)

    def _learn_outputs(self, view: ClusterView, update: bool) -> None:
        """Count completed requests per (prompt bin, output bin); at a tick, a prompt bin with
        more than 20 completions takes their output-bin shares."""
        edges = np.asarray(self.types.output_edges)
        for r in view.recent_completions():
            b = min(int(self.router.prompt_bin(r.num_prompt_tokens)), self._out_share.shape[0] - 1)
            self._out_seen[b, int(np.searchsorted(edges, r.num_output_tokens_done, side="right"))] += 1
        if update:
            seen = self._out_seen + 1e-9
            total = self._out_seen.sum(axis=1, keepdims=True)
            self._out_share = np.where(total > 20, seen / seen.sum(axis=1, keepdims=True), self._out_share)

    def _assign(self, view: ClusterView) -> list:
        if not view.num_queued:
            return []
        serving = [r for r in view.replicas if r.state == SERVING and r.replica_id in self._active]
        out = []
        for q in view.queue:
            if q.request_id not in self._seen:
                self._seen.add(q.request_id)
                self._window_counts[min(self.router.prompt_bin(q.num_prompt_tokens),
                                        len(self._window_counts) - 1)] += 1
            if serving and q.ready_s <= view.now:
                out.append(Assign(q.request_id, serving[self.router.route(q, serving, view.now)].replica_id))
        return out

    def pull(self, replica: ReplicaView, view: ClusterView) -> int | None:
        for q in view.queue:
            if q.ready_s <= view.now and q.request_id in self._seen:
                return q.request_id
        return None
