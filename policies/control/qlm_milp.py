"""QLM's global scheduler as a mixed-integer program: place request groups into the slots of
the replicas' virtual queues to minimise predicted SLO violations plus model swaps.

Our formulation (the paper states the problem, not a solvable model; the released LP requires
every slot filled and is infeasible with more than one worker, so it is not followed). For
groups g, replicas r and slots s = 0..S-1 of each virtual queue:

    x[g,r,s] in {0,1}   group g sits in slot s of replica r      sum_{r,s} x[g,r,s] = 1
                                                                  sum_g x[g,r,s] <= 1
    slots fill from the front (a slot may be empty, then so are the ones after it):
                         sum_g x[g,r,s] <= sum_g x[g,r,s-1]
    z[r,s] >= 0         a model swap before slot s: z[r,s] >= y[r,s,m] - y[r,s-1,m] for every
                         model m, where y[r,s,m] = sum_{g of model m} x[g,r,s] and y[r,-1,m] is
                         1 for the replica's current model
    t[r,s] >= 0         start of slot s: t[r,0] = base_r + sum_m L[r,m] w[r,0,m],
                         t[r,s] = t[r,s-1] + sum_g p[g,r] x[g,r,s-1] + sum_m L[r,m] w[r,s,m]
                         where w[r,s,m] >= y[r,s,m] - y[r,s-1,m] are the swaps *to* m
    v[g] in {0,1}       group g misses: t[r,s] - D_g <= M (1 - x[g,r,s]) + M v[g]

    minimise  sum_g n_g v[g] + swap_penalty sum_{r,s} z[r,s] + eps sum_{r,s} t[r,s]

with `p[g,r]` the predicted seconds replica r needs to serve group g, `base_r` the seconds
until it is free for queued work, `L[r,m]` the load time of model m on r, `D_g` the seconds
to g's deadline, `n_g` its requests and M a bound on every start time. Pairs that may not be
used (a model r cannot load, swapping or balancing switched off) are fixed to 0. Solved
with scipy's HiGHS (`scipy.optimize.milp`) under a time limit; `None` (the caller falls back
to EDF) when HiGHS returns no feasible point in time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

_EPS = 1e-4
"""Weight of the start times in the objective: among plans with the same violations and swaps,
the one that starts groups earliest (a tie-breaker, far below one violated request)."""


@dataclass(frozen=True)
class MilpInstance:
    """One placement problem (seconds relative to now; lists indexed by group g / replica r)."""

    deadline_s: list[float]
    """Seconds until each group's first-token deadline (inf: none)."""
    size: list[int]
    """Requests per group (the weight of its violation)."""
    model: list[str]
    service_s: list[list[float]]
    """[g][r]: seconds replica r needs to serve group g."""
    allowed: list[list[bool]]
    """[g][r]: may group g be placed on replica r."""
    base_s: list[float]
    """Per replica: seconds until it is free for queued work."""
    current_model: list[str]
    load_s: list[dict[str, float]]
    """Per replica: model -> seconds to load it there."""
    num_slots: int
    swap_penalty: float = 1.0


@dataclass(frozen=True)
class MilpPlan:
    """The solver's answer: each replica's groups in slot order, the plan's predicted
    violations and swaps, HiGHS's status and the solve's wall time."""

    queues: list[list[int]]
    num_violations: int
    num_swaps: int
    status: int
    solve_s: float


def solve(inst: MilpInstance, time_limit_s: float | None, node_limit: int | None = None) -> MilpPlan | None:
    """The placement minimising violations + swaps (module docstring), or None when HiGHS finds
    no feasible point within its limits. `node_limit` (branch-and-bound nodes) bounds the work
    deterministically: the same instance gives the same plan on any machine and under any load;
    `time_limit_s` (wall clock, None = none) is a backstop only, and a solve it stops depends on
    the machine's speed (the returned plan's `status` is then 1, as for the node limit)."""
    G, R, S = len(inst.size), len(inst.base_s), inst.num_slots
    if G == 0:
        return MilpPlan([[] for _ in range(R)], 0, 0, 0, 0.0)
    models = sorted(set(inst.model) | set(inst.current_model))
    M_ = len(models)
    mi = {m: k for k, m in enumerate(models)}
    # variable layout
    nx = G * R * S
    ox, oz, ow, ot, ov = 0, nx, nx + R * S, nx + R * S + R * S * M_, nx + 2 * R * S + R * S * M_
    nvar = ov + G

    def X(g, r, s):
        return ox + (g * R + r) * S + s

    def Z(r, s):
        return oz + r * S + s

    def W(r, s, m):
        return ow + (r * S + s) * M_ + m

    def T(r, s):
        return ot + r * S + s

    def V(g):
        return ov + g

    finite_load = [max((v for v in d.values() if math.isfinite(v)), default=0.0) for d in inst.load_s]
    finite_p = [max((p for p, a in zip(inst.service_s[g], inst.allowed[g]) if a and math.isfinite(p)), default=0.0)
                for g in range(G)]
    big = max(inst.base_s, default=0.0) + sum(finite_p) + S * max(finite_load, default=0.0) + 1.0
    finite_d = [d for d in inst.deadline_s if math.isfinite(d)]
    big_m = big + (max(0.0, -min(finite_d)) if finite_d else 0.0) + 1.0

    rows, cols, vals, lo, hi = [], [], [], [], []
    k = [0]

    def row(entries, lb, ub):
        for c, v in entries:
            rows.append(k[0])
            cols.append(c)
            vals.append(v)
        lo.append(lb)
        hi.append(ub)
        k[0] += 1

    ub = np.ones(nvar)
    lb = np.zeros(nvar)
    ub[oz:ot] = 1.0
    ub[ot:ov] = np.inf
    for g in range(G):
        for r in range(R):
            if not inst.allowed[g][r] or not math.isfinite(inst.service_s[g][r]) or \
                    not math.isfinite(inst.load_s[r].get(inst.model[g], math.inf)):
                for s in range(S):
                    ub[X(g, r, s)] = 0.0
        row([(X(g, r, s), 1.0) for r in range(R) for s in range(S)], 1.0, 1.0)
    for r in range(R):
        cur = mi.get(inst.current_model[r])
        for s in range(S):
            row([(X(g, r, s), 1.0) for g in range(G)], -np.inf, 1.0)
            if s:
                row([(X(g, r, s), 1.0) for g in range(G)] + [(X(g, r, s - 1), -1.0) for g in range(G)], -np.inf, 0.0)
            for m in range(M_):
                ys = [(X(g, r, s), 1.0) for g in range(G) if mi[inst.model[g]] == m]
                if s:
                    prev = [(X(g, r, s - 1), -1.0) for g in range(G) if mi[inst.model[g]] == m]
                    const = 0.0
                else:
                    prev = []
                    const = 1.0 if cur == m else 0.0
                # w[r,s,m] >= y[r,s,m] - y[r,s-1,m];  z[r,s] >= the same
                row([(W(r, s, m), 1.0)] + [(c, -v) for c, v in ys] + [(c, -v) for c, v in prev], -const, np.inf)
                row([(Z(r, s), 1.0)] + [(c, -v) for c, v in ys] + [(c, -v) for c, v in prev], -const, np.inf)
            # start times
            load = [(W(r, s, m), -inst.load_s[r].get(models[m], 0.0)) for m in range(M_)
                    if math.isfinite(inst.load_s[r].get(models[m], math.inf))]
            if s == 0:
                row([(T(r, 0), 1.0)] + load, inst.base_s[r], inst.base_s[r])
            else:
                serve = [(X(g, r, s - 1), -inst.service_s[g][r]) for g in range(G)
                         if math.isfinite(inst.service_s[g][r])]
                row([(T(r, s), 1.0), (T(r, s - 1), -1.0)] + serve + load, 0.0, 0.0)
            for g in range(G):
                d = inst.deadline_s[g]
                if not math.isfinite(d) or ub[X(g, r, s)] == 0.0:
                    continue
                # t[r,s] - D_g <= M (1 - x) + M v  <=>  t + M x - M v <= D_g + M
                row([(T(r, s), 1.0), (X(g, r, s), big_m), (V(g), -big_m)], -np.inf, d + big_m)
    for m in range(M_):
        ub[[W(r, s, m) for r in range(R) for s in range(S)]] = 1.0
    c = np.zeros(nvar)
    c[ov:ov + G] = inst.size
    c[oz:ow] = inst.swap_penalty
    c[ot:ov] = _EPS
    integrality = np.zeros(nvar)
    integrality[ox:ox + nx] = 1
    integrality[ov:ov + G] = 1
    a = coo_matrix((vals, (rows, cols)), shape=(k[0], nvar)).tocsr()
    t0 = time.perf_counter()
    res = milp(c, constraints=LinearConstraint(a, lo, hi), integrality=integrality, bounds=Bounds(lb, ub),
               options={"presolve": True,
                        **({} if time_limit_s is None else {"time_limit": float(time_limit_s)}),
                        **({} if node_limit is None else {"node_limit": int(node_limit)})})
    solve_s = time.perf_counter() - t0
    if res.x is None:
        return None
    x = res.x
    queues: list[list[int]] = [[] for _ in range(R)]
    for r in range(R):
        for s in range(S):
            for g in range(G):
                if x[X(g, r, s)] > 0.5:
                    queues[r].append(g)
    if sorted(g for q in queues for g in q) != list(range(G)):
        return None
    viol = int(sum(inst.size[g] for g in range(G) if x[V(g)] > 0.5))
    swaps = int(round(sum(x[Z(r, s)] for r in range(R) for s in range(S)
                          if sum(x[X(g, r, s)] for g in range(G)) > 0.5)))
    return MilpPlan(queues, viol, swaps, int(res.status), solve_s)
