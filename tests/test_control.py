"""The cluster control plane, hand-computed: model swaps, eviction and resume on another
replica, drains, replicas added and removed mid-run, pulling from the cluster queue.

Every step costs exactly 1 s (ConstantCostModel), so token times are integers plus the
offsets stated in each test; a prompt of p tokens is one prefill step (budget 2048) that
emits the first token, each further output token one decode step.
"""

from __future__ import annotations

import pandas as pd
import pytest

from policies.fcfs import FCFS
from policies.routing import LeastOutstandingRequests
from sim.cluster import ReplicaSpec, simulate
from sim.control import (SERVING, AddReplica, Assign, DrainReplica, Evict, Migrate, RemoveReplica,
                         SwapModel, TICK)
from sim.controlplane import ControlSettings
from sim.costmodel import ConstantCostModel
from sim.metrics import request_token_times_s
from sim.scheduling import EngineLimits


def spec(model: str, load_s: float = 0.0, **kw) -> ReplicaSpec:
    return ReplicaSpec(ConstantCostModel(1.0, load_s=load_s), FCFS, EngineLimits(), num_kv_blocks=1000,
                       block_size=16, model=model, **kw)


def wl(rows) -> pd.DataFrame:
    """rows: (arrival_s, prompt, output, model)."""
    return pd.DataFrame(rows, columns=["arrival_s", "num_prompt_tokens", "num_output_tokens", "model"])


class Scripted:
    """Applies the given actions at the given ticks; optionally swaps on demand."""

    def __init__(self, script=None, tick_s=0.5, swap_on_arrival=None, dispatch="push"):
        self.script = dict(script or {})
        self.tick_s = tick_s
        self.wake_on = frozenset({"arrival"}) if swap_on_arrival is not None else frozenset()
        self.swap_on_arrival = swap_on_arrival
        self.dispatch = dispatch
        self.log = []

    def control(self, event, view):
        self.log.append((event, view.now))
        if event == TICK:
            return self.script.pop(round(view.now, 6), [])
        if event == "arrival" and self.swap_on_arrival is not None:
            serving = {r.model for r in view.replicas if r.state == SERVING}
            wanted = {q.model for q in view.queue} - serving
            return [SwapModel(0, m, evict=self.swap_on_arrival) for m in sorted(wanted)][:1]
        return []

    def pull(self, replica, view):
        for q in view.queue:
            if q.model == replica.model and q.ready_s <= view.now:
                return q.request_id
        return None


def by_id(res):
    return res.requests.set_index("request_id")


def token_times(res, rid):
    row = by_id(res).loc[rid]
    return request_token_times_s(row, res.steps)


def test_a_request_for_another_model_waits_for_the_drain_then_the_load():
    # replica 0 serves A: request 0 (A) steps [0,1] [1,2] [2,3] -> tokens at 1, 2, 3; finished at 3.
    # request 1 (B) arrives at 0.5: no replica serves B, it waits in the cluster queue; the
    # controller swaps replica 0 to B by draining: empty at 3, loads B for 5 s -> serving at 8,
    # pulls request 1: prefill [8,9] -> first token at 9, decode [9,10] -> finished at 10.
    catalog = {"A": spec("A", load_s=2.0), "B": spec("B", load_s=5.0)}
    res = simulate(wl([(0.0, 4, 3, "A"), (0.5, 4, 2, "B")]), [catalog["A"]], LeastOutstandingRequests(),
                   controller=Scripted(swap_on_arrival=False), catalog=catalog, check_plans=True)
    r = by_id(res)
    assert r.loc[0, "finish_s"] == 3.0 and r.loc[0, "outcome"] == "finished"
    assert r.loc[1, "first_token_s"] == 9.0 and r.loc[1, "ttft_s"] == 8.5 and r.loc[1, "finish_s"] == 10.0
    assert r.loc[1, "replica"] == 0 and r.loc[1, "num_evictions"] == 0
    assert res.replicas.loc[0, "model"] == "B"
    assert res.info["num_model_swaps"] == 1


def test_a_swap_that_evicts_resumes_the_evicted_request_on_another_replica_with_exact_token_times():
    # replicas 0 and 1 serve A. Request 0 (A, prompt 4, output 3) lands on replica 0: token 1 at 1.
    # Request 1 (B) arrives at 0.5; the controller swaps replica 0 to B evicting what it holds:
    # request 0 leaves at the end of the step in flight (t=1, one token done) and goes back to
    # the cluster queue; replica 1 (A, idle) pulls it at 1 and recomputes 4 + 1 tokens in one
    # step [1,2] -> token 2 at 2, token 3 at 3 on replica 1. Replica 0 loads B from 1 to 6:
    # request 1 prefills [6,7] -> first token 7, finishes at 8.
    catalog = {"A": spec("A", load_s=2.0), "B": spec("B", load_s=5.0)}
    res = simulate(wl([(0.0, 4, 3, "A"), (0.5, 4, 2, "B")]), [catalog["A"], catalog["A"]],
                   LeastOutstandingRequests(), controller=Scripted(swap_on_arrival=True), catalog=catalog,
                   check_plans=True)
    r = by_id(res)
    assert r.loc[0, "replica"] == 1 and r.loc[0, "num_evictions"] == 1 and r.loc[0, "outcome"] == "finished"
    assert r.loc[0, "first_token_s"] == 1.0 and r.loc[0, "finish_s"] == 3.0
    assert list(token_times(res, 0)) == [1.0, 2.0, 3.0]
    assert r.loc[0, "tbt_max_s"] == 1.0 and r.loc[0, "tpot_s"] == 1.0
    assert r.loc[1, "first_token_s"] == 7.0 and r.loc[1, "finish_s"] == 8.0


def test_migrate_with_kv_transfer_keeps_the_computed_tokens_and_pays_the_transfer():
    # request 0 (prompt 32, output 4) on replica 0: prefill [0,1] token 1, decode [1,2] token 2.
    # At 1.5 it is migrated to replica 1 with KV transfer: it leaves at the end of the step in
    # flight (t=2, 33 computed tokens: 33 x 1000 bytes of KV over 11,000 B/s
    # = 3 s, the whole move), may run again at 5: replica 1 decodes [5,6] token 3, [6,7] token 4.
    res = simulate(wl([(0.0, 32, 4, "A")]), [spec("A"), spec("A")], LeastOutstandingRequests(),
                   controller=Scripted({1.5: [Migrate(0, 1, mode="transfer")]}), check_plans=True,
                   control=ControlSettings(kv_bytes_per_token=1000, kv_transfer_bw_bytes_s=11_000.0))
    r = by_id(res)
    assert list(token_times(res, 0)) == [1.0, 2.0, 6.0, 7.0]
    assert r.loc[0, "replica"] == 1 and r.loc[0, "num_migrations"] == 1 and r.loc[0, "num_preemptions"] == 0
    assert r.loc[0, "tbt_max_s"] == 4.0


def test_a_draining_replica_admits_nothing_new_and_stops_when_empty():
    # replica 0 drains at 0.5 while it runs request 0 (tokens 1, 2, 3; finished at 3): requests 1
    # and 2 (arriving at 1 and 2) go to replica 1 though it is busier. Replica 0 stops at 3.
    res = simulate(wl([(0.0, 4, 3, "A"), (1.0, 4, 1, "A"), (2.0, 4, 1, "A")]), [spec("A"), spec("A")],
                   LeastOutstandingRequests(), controller=Scripted({0.5: [DrainReplica(0)]}), check_plans=True)
    r = by_id(res)
    assert r.loc[0, "replica"] == 0 and r.loc[0, "finish_s"] == 3.0
    assert r.loc[1, "replica"] == 1 and r.loc[2, "replica"] == 1
    assert res.replicas.loc[0, "state"] == "stopped" and res.replicas.loc[0, "stopped_s"] == 3.0


def test_replicas_added_and_removed_mid_run():
    # A replica added at 0.5 (config "A", load 1.5 s) serves from 2. Requests 0 and 1 arrive at 0
    # and 2.5 on a one-replica cluster whose replica 0 is removed at 1.5: request 0 (4 prompt, 4
    # output; tokens at 1 and... ) leaves replica 0 at the end of its step in flight (t=2, two
    # tokens done) back to the cluster queue; replica 1 (serving from 2) pulls it at 2 and
    # recomputes 4 + 2 tokens [2,3] -> token 3 at 3, token 4 at 4. Request 1 arrives at 2.5 and
    # joins replica 1's batch at the next step: prefill [3,4] with request 0's decode -> first
    # token at 4, finish at 4 (one output token).
    catalog = {"A": spec("A", load_s=1.5)}
    ctl = Scripted({0.5: [AddReplica("A")], 1.5: [RemoveReplica(0)]})
    res = simulate(wl([(0.0, 4, 4, "A"), (2.5, 4, 1, "A")]), [spec("A")], LeastOutstandingRequests(),
                   controller=ctl, catalog=catalog, check_plans=True)
    r = by_id(res)
    assert list(token_times(res, 0)) == [1.0, 2.0, 3.0, 4.0]
    assert r.loc[0, "replica"] == 1 and r.loc[0, "num_evictions"] == 1
    assert r.loc[1, "replica"] == 1 and r.loc[1, "finish_s"] == 4.0
    assert list(res.replicas["state"]) == ["stopped", "serving"]
    assert res.replicas.loc[1, "started_s"] == 0.5 and res.replicas.loc[1, "serving_s"] == 2.0


def test_pull_dispatch_keeps_arrivals_in_the_cluster_queue_until_a_replica_pulls():
    # dispatch='pull': every arrival enters the cluster queue; a replica with room takes the
    # oldest request of its model at once (here both arrive at 0 and are pulled at 0).
    res = simulate(wl([(0.0, 4, 2, "A"), (0.0, 4, 2, "A")]), [spec("A"), spec("A")], LeastOutstandingRequests(),
                   controller=Scripted(dispatch="pull", tick_s=None), check_plans=True)
    r = by_id(res)
    assert sorted(r["replica"]) == [0, 1] and (r["finish_s"] == 2.0).all()


def test_a_controller_that_does_nothing_gives_the_tables_of_no_controller():
    rows = [(0.1 * i, 50 + 7 * i, 5 + i % 4, "A") for i in range(40)]
    plain = simulate(wl(rows), [spec("A")] * 3, LeastOutstandingRequests())
    idle = simulate(wl(rows), [spec("A")] * 3, LeastOutstandingRequests(),
                    controller=Scripted(tick_s=0.25), catalog={"A": spec("A")})
    cols = [c for c in plain.requests.columns if c != "token_steps"]
    pd.testing.assert_frame_equal(plain.requests[cols], idle.requests[cols])
    pd.testing.assert_frame_equal(plain.steps, idle.steps)


def test_a_model_no_replica_may_load_is_an_error_at_start_or_a_rejection_if_configured():
    from sim.errors import InputError

    with pytest.raises(InputError, match="model 'C'"):
        simulate(wl([(0.0, 4, 2, "C")]), [spec("A")], LeastOutstandingRequests(), controller=Scripted(),
                 catalog={"A": spec("A")})
    res = simulate(wl([(0.0, 4, 2, "C"), (0.0, 4, 2, "A")]), [spec("A")], LeastOutstandingRequests(),
                   controller=Scripted(), catalog={"A": spec("A")}, control=ControlSettings(unknown_model="reject"))
    r = by_id(res)
    assert r.loc[0, "outcome"] == "rejected" and r.loc[0, "reject_reason"] == "no_replica_for_model"
    assert r.loc[1, "outcome"] == "finished"


def test_an_action_naming_a_missing_request_or_replica_is_a_controller_error():
    from sim.cluster import ActionError

    with pytest.raises(ActionError, match="replica 7"):
        simulate(wl([(0.0, 4, 4, "A")]), [spec("A")], LeastOutstandingRequests(),
                 controller=Scripted({0.5: [Assign(0, 7)]}))
    with pytest.raises(ActionError, match="request 99"):
        simulate(wl([(0.0, 4, 4, "A")]), [spec("A")], LeastOutstandingRequests(),
                 controller=Scripted({0.5: [Evict(99)]}))


def test_swap_on_demand_gives_a_starved_model_the_idlest_replica_at_the_next_tick():
    # Replicas 0 and 1 serve A; request 0 (A) runs on replica 0 (tokens 1, 2, 3). Request 1 (B)
    # arrives at 0.5 and waits in the cluster queue. At the tick at 1 s model B has demand and
    # no replica: replica 1 (A, idle) gives way, loads B for 5 s (serving at 6) and pulls
    # request 1: prefill [6,7] -> first token 7, decode [7,8] -> finished at 8.
    from policies.control.on_demand import SwapOnDemand

    catalog = {"A": spec("A", load_s=5.0), "B": spec("B", load_s=5.0)}
    res = simulate(wl([(0.0, 4, 3, "A"), (0.5, 4, 2, "B")]), [catalog["A"], catalog["A"]],
                   LeastOutstandingRequests(), controller=SwapOnDemand(tick_s=1.0), catalog=catalog, check_plans=True)
    r = by_id(res)
    assert r.loc[0, "replica"] == 0 and r.loc[0, "finish_s"] == 3.0
    assert r.loc[1, "replica"] == 1 and r.loc[1, "first_token_s"] == 7.0 and r.loc[1, "finish_s"] == 8.0
    assert list(res.replicas["model"]) == ["A", "B"] and res.info["num_model_swaps"] == 1


def test_swap_on_demand_rebalances_an_overloaded_model_and_keeps_every_models_last_replica():
    # 3 replicas: A, A, B. Twenty long B requests and one A request: B's demand per replica is
    # far above A's, so one A replica swaps to B; A keeps its last replica (min 1).
    from policies.control.on_demand import SwapOnDemand

    catalog = {"A": spec("A", load_s=2.0), "B": spec("B", load_s=2.0)}
    rows = [(0.0, 4, 2, "A")] + [(0.0, 64, 50, "B")] * 20
    res = simulate(wl(rows), [catalog["A"], catalog["A"], catalog["B"]], LeastOutstandingRequests(),
                   controller=SwapOnDemand(tick_s=1.0, cooldown_s=1000.0), catalog=catalog, check_plans=True)
    assert (res.requests["outcome"] == "finished").all()
    assert sorted(res.replicas["model"]) == ["A", "B", "B"] and res.info["num_model_swaps"] == 1
