"""The plan app (experiments/plan.py) end to end on a small plan, its configs of candidates, the
re-run command, the uncertainty ensemble it builds, and bad input (one line, exit 2)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from experiments.plan import candidates, ensemble, fleet_config, pool_config, prices, run_plan
from experiments.run import run
from experiments.wiring import replica_specs
from planner.fleet import Candidate, Pool
from sim.errors import InputError
from sim.paths import PROJECT_ROOT
from sim.qos import QoS

CONF = PROJECT_ROOT / "conf"


def compose_cfg(*overrides: str, name: str = "plan"):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


SMALL = ["plan.rate_qps=3", "workload.num_requests=300", "plan.capacity_requests=300", "plan.verify.num_requests=300",
         "plan.verify.seeds=[1000]", "plan.progress=false", "uncertainty.cost_model=none", "plan.capacity.rel_tol=0.1"]


@pytest.fixture(scope="module")
def small_plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan")
    cfg = compose_cfg(*SMALL, "plan.check.seeds=[7,8]", "plan.hardware=[a100-80gb,h100-80gb]",
                      "plan.topologies=[shared,mixed]")
    result = run_plan(cfg, out, base_overrides=["costmodel=roofline", *SMALL])
    return cfg, result, out


def test_small_plan_writes_its_outputs_and_a_winner_that_meets(small_plan):
    cfg, result, out = small_plan
    for name in ("plan.json", "plan.csv", "candidates.csv", "pareto.png", "winner_requests.parquet"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "plan.json").read_text())
    assert saved["winner"]["label"] == result["winner"]["label"]
    w = result["winner"]
    assert w["meets"] and w["p_meet"] >= 0.9
    assert w["cost_per_hour"] == pytest.approx(sum(n * 1 * result["prices_per_gpu_hour"][p["hardware"]]
                                                   for n, p in zip(w["replicas"], w["candidate"]["pools"])))
    for f in result["check"]["fleets"]:
        assert f["meets"] == f["is_plan"]  # the plan meets at the new seeds; one replica fewer does not
    n = result["counts"]
    assert n["num_candidates"] == 3 and n["num_simulations"] > 0
    assert n["num_capacity_searches"] == 2  # the mixed fleet reuses both hardware's per-replica capacity


def test_the_printed_command_rebuilds_the_winners_fleet(small_plan):
    _, result, _ = small_plan
    w = result["winner"]
    args = shlex.split(result["command"])
    assert args[:3] == ["python", "-m", "experiments.run"]
    cfg = compose_cfg(*args[3:], "workload.num_requests=200", "output.plots=false", "sim.progress=false", name="config")
    specs = replica_specs(cfg)
    assert len(specs) == sum(w["replicas"])
    assert {s.hardware for s in specs} == {p["hardware"] for p, n in zip(w["candidate"]["pools"], w["replicas"]) if n}
    out = run(cfg)
    assert out.summary["outcomes"]["finished"] == 200


def test_siloed_candidate_config_maps_pools_to_classes_and_pool_runs_see_their_classes_only():
    cfg = compose_cfg("plan.topologies=[siloed]", "plan.hardware=[a100-80gb]")
    qos = QoS.from_config(cfg.slo)
    (c,) = candidates(cfg, qos)
    assert [(p.name, p.classes, round(p.share, 6)) for p in c.pools] == [("interactive", ("interactive",), 0.7),
                                                                          ("batch", ("batch",), 0.3)]
    fleet = fleet_config(cfg, c, (2, 1))
    assert dict(fleet.router.pools) == {"interactive": ["interactive"], "batch": ["batch"]}
    assert [s.name for s in replica_specs(fleet)] == ["interactive0", "interactive1", "batch2"]
    one = pool_config(cfg, c, 1, qos)
    assert dict(one.workload.qos_shares) == {"batch": 1.0} and len(replica_specs(one)) == 1


def test_mixed_candidates_pair_hardware_and_drop_empty_pools():
    cfg = compose_cfg("plan.topologies=[mixed]", "plan.hardware=[a100-80gb,h100-80gb,h200]")
    cands = candidates(cfg, QoS.from_config(cfg.slo))
    assert len(cands) == 3 and all(len(c.pools) == 2 for c in cands)
    fleet = fleet_config(cfg, cands[0], (0, 2))
    assert [s.hardware for s in replica_specs(fleet)] == ["h100-80gb", "h100-80gb"]


def test_ensembles_follow_the_cost_model_kind():
    cfg = compose_cfg()
    c = Candidate("llama3-8b", "fcfs", "shared", (Pool("shared", "h100-80gb", 1),))
    members, about = ensemble(cfg, c)
    assert len(members) == 3 and about.startswith("band (roofline)") and "1.12" in about
    cpu = compose_cfg("+plan=cpu_small_live", "costmodel=cpu_llama_small")
    c_cpu = Candidate("llama-cpu-small", "fcfs", "shared", (Pool("shared", "xeon-2vcpu", 1),))
    members, about = ensemble(cpu, c_cpu)
    assert about.startswith("bootstrap") and len(members) == 3
    base = replica_specs(fleet_config(cpu, c_cpu, (1,)))[0].cost_model
    assert members[0](base) is base and members[1](base) is not base
    assert ensemble(compose_cfg("uncertainty.cost_model=none"), c)[0] == [None]


def test_prices_come_from_the_hardware_files_and_can_be_overridden():
    assert prices(compose_cfg()) == {"a100-80gb": 3.4309, "h100-80gb": 6.88}
    assert prices(compose_cfg("plan.prices.h100-80gb=2.5"))["h100-80gb"] == 2.5


@pytest.mark.parametrize("overrides,needle", [
    (["plan.hardware=[tpu9]"], "plan.hardware"),
    (["plan.topologies=[ring]"], "plan.topologies"),
    (["plan.policies=[nope]"], "plan.policies"),
    (["plan.tp=[0]"], "plan.tp"),
])
def test_bad_candidate_lists_name_their_key(overrides, needle):
    cfg = compose_cfg(*overrides)
    with pytest.raises(InputError) as e:
        prices(cfg)
        candidates(cfg, QoS.from_config(cfg.slo))
    assert needle in str(e.value.field)


@pytest.mark.parametrize("override,needle", [
    ("plan.hardware=[a10]", "plan.prices.a10"),
    ("plan.targets={nope: 0.9}", "plan.targets"),
])
def test_bad_input_is_one_line_and_exit_2(override, needle, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.plan", override, f"hydra.run.dir={tmp_path}/o"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_the_plan_app_has_its_own_help():
    proc = subprocess.run([sys.executable, "-m", "experiments.plan", "--help"], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for text in ("experiments.plan: the cheapest fleet", "confidence=0.9", "+plan=llama70b_tp", "hydra/launcher=joblib"):
        assert text in proc.stdout, text


def test_a_rate_schedule_is_planned_for_its_peak_at_a_constant_rate():
    from experiments.plan import _at_rate, target_rate

    cfg = compose_cfg("workload=surge")
    assert target_rate(cfg) == 5.0
    flat = _at_rate(cfg)
    assert flat.workload.arrival.get("schedule") is None and flat.workload.arrival.kind == "poisson"
    assert target_rate(compose_cfg("workload=surge", "plan.rate_qps=7")) == 7.0
