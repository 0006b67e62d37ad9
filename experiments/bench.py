"""Speed benchmark: simulated requests per wall-clock second on fixed scenarios.

    python -m experiments.bench [--policy fcfs|niyama|multimodel|qlm|all] [--requests N] [--load 0.8]
                                [--no-fast-forward] [--profile out.prof]
    python -m experiments.bench --instructions [--update-baseline]   # `make bench-instructions`

Scenario (no file outside the repo): Azure-2023-conversation-shaped lengths (the lognormal
fits in conf/workload/azure_conv_synthetic.yaml), Poisson arrivals, 8 Llama-3-8B/A100
replicas with the published step-cost model, least-outstanding-requests routing, under
FCFS with chunked prefill (target: 20,000 simulated requests/s) and under Niyama with its
three QoS tiers in equal shares (conf/policy/niyama.yaml, conf/slo/niyama_tiers.yaml;
target 10,000 requests/s). The arrival rate is `load` x the cluster's saturation
throughput, which is measured first with the same simulator (one FCFS replica, a backlog of
requests all queued at t=0), so both policies see the same arrivals. The timed region is
`simulate` plus a collection of the young generations (what the run leaves for the cyclic
garbage collector, which `simulate` pauses). Prints one JSON line per scenario.

`--policy qlm` runs the multi-model scenario (8 replicas, 3 models, 50/30/20, roofline
costs) under QLM (conf/controller/qlm.yaml with its MILP scheduler, interactive and batch
requests in equal shares; target: 100,000 requests in under 60 s) and prints a second line
with QLM's counters and the MILP's share of the wall time (HiGHS is bounded by
`milp_time_limit_s` per solve, so that share depends on the machine's load).

`--instructions` counts the CPU instructions of a fixed 20,000-request FCFS run (the
whole process, startup included) under valgrind's callgrind, which is repeatable to ~0.5%
whatever else the machine does, and prints the change against the baseline stored in
`benchmarks/instructions.json` (record a new one with `--update-baseline`). Wall time on
shared hosts varies up to 1.8x; judge a speed change by this count (docs/simulator.md).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

from hydra.utils import instantiate
from omegaconf import OmegaConf

from policies.fcfs import FCFS
from policies.niyama import Niyama
from policies.routing import LeastOutstandingRequests
from sim.cluster import ReplicaSpec, simulate
from sim.paths import project_path
from sim.scheduling import EngineLimits


def _cost_model():
    cfg = OmegaConf.create({
        "model": OmegaConf.load(project_path("conf/model/llama3-8b.yaml")),
        "hardware": OmegaConf.load(project_path("conf/hardware/a100-80gb.yaml")),
        "costmodel": OmegaConf.load(project_path("conf/costmodel/published_llama3_8b_a100.yaml")),
        "cluster": {"tp": 1},
    })
    return instantiate(cfg.costmodel)


def _workload(num_requests: int, rate_qps: float, seed: int, qos_shares: dict | None = None,
              model_shares: dict | None = None, max_total_tokens: int | None = None):
    cfg = OmegaConf.load(project_path("conf/workload/azure_conv_synthetic.yaml"))
    cfg.num_requests = num_requests
    cfg.arrival = {"kind": "poisson", "rate_qps": rate_qps}
    cfg.seed = seed
    cfg.qos_shares = qos_shares
    cfg.model_shares = model_shares
    cfg.max_total_tokens = max_total_tokens
    for key in list(cfg):
        if OmegaConf.is_interpolation(cfg, key):  # e.g. seed/max_model_len from the run app's config
            cfg[key] = None
    cfg.seed = seed
    return instantiate(cfg).requests


def _niyama_factory():
    """Niyama as conf/policy/niyama.yaml configures it, with the tiers of conf/slo/niyama_tiers.yaml."""
    node = OmegaConf.load(project_path("conf/policy/niyama.yaml"))
    slo = OmegaConf.to_container(OmegaConf.load(project_path("conf/slo/niyama_tiers.yaml")))
    kwargs = {k: v for k, v in OmegaConf.to_container(node).items()
              if not k.startswith("_") and not OmegaConf.is_interpolation(node, k)}
    kwargs["slo"] = slo
    return lambda: Niyama(**kwargs), {name: 1.0 for name in slo["classes"]}


BASELINE = project_path("benchmarks/instructions.json")
INSTRUCTION_RUN = ["--policy", "fcfs", "--requests", "20000", "--saturation-requests", "1000"]
"""The fixed run whose instructions are counted (saturation measured on a smaller backlog)."""


def count_instructions(update_baseline: bool = False) -> dict:
    """Instructions of `python -m experiments.bench <INSTRUCTION_RUN>` under callgrind, compared
    with the stored baseline. Raises SystemExit(2) with one line if valgrind is missing."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("bench: valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        raise SystemExit(2)
    cmd = [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-m",
           "experiments.bench", *INSTRUCTION_RUN]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"},
                          cwd=project_path("."))
    m = re.search(r"Collected\s*:\s*(\d+)", proc.stderr)
    if proc.returncode != 0 or m is None:
        print(f"bench: callgrind run failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}",
              file=sys.stderr)
        raise SystemExit(1)
    here = {
        "instructions": int(m.group(1)),
        "run": "python -m experiments.bench " + " ".join(INSTRUCTION_RUN),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "commit": _git_head(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "valgrind_s": round(time.perf_counter() - t0, 1),
    }
    out = {"instructions": here["instructions"]}
    if BASELINE.exists():
        base = json.loads(BASELINE.read_text())
        out["baseline"] = base["instructions"]
        out["baseline_commit"] = base.get("commit")
        out["change_pct"] = round(100.0 * (here["instructions"] / base["instructions"] - 1.0), 2)
        if base.get("python") != here["python"] or base.get("machine") != here["machine"]:
            out["warning"] = (f"baseline counted on Python {base.get('python')} / {base.get('machine')}, this on "
                              f"Python {here['python']} / {here['machine']}: counts are not comparable")
    if update_baseline or not BASELINE.exists():
        BASELINE.parent.mkdir(parents=True, exist_ok=True)
        BASELINE.write_text(json.dumps(here, indent=2) + "\n")
        out["baseline_written"] = str(BASELINE.relative_to(project_path(".")))
    out["valgrind_s"] = here["valgrind_s"]
    print(json.dumps(out))
    return out


def _git_head() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=project_path("."), timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def saturation_qps(spec: ReplicaSpec, num_requests: int = 3000, seed: int = 1) -> float:
    """Requests/s one replica sustains with a deep backlog (all requests queued at t=0)."""
    wl = _workload(num_requests, 1.0, seed)
    wl["arrival_s"] = 0.0
    res = simulate(wl, [spec], LeastOutstandingRequests())
    fin = res.requests[res.requests["outcome"] == "finished"]
    return len(fin) / float(fin["finish_s"].max())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--load", type=float, default=0.8, help="arrival rate as a fraction of saturation")
    ap.add_argument("--no-fast-forward", action="store_true", help="step-by-step simulation (for comparison)")
    ap.add_argument("--profile", metavar="FILE", help="write a cProfile of the timed run to FILE")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy", choices=("fcfs", "niyama", "multimodel", "qlm", "all"), default="all")
    ap.add_argument("--saturation-requests", type=int, default=3000, help=argparse.SUPPRESS)
    ap.add_argument("--instructions", action="store_true",
                    help="count instructions of a fixed 20,000-request run under callgrind; compare with the baseline")
    ap.add_argument("--update-baseline", action="store_true", help="with --instructions: store this count as the baseline")
    args = ap.parse_args(argv)
    if args.instructions:
        return count_instructions(args.update_baseline)

    cost = _cost_model()
    limits = EngineLimits(max_num_seqs=256, max_num_batched_tokens=2048, max_model_len=16384)
    spec = ReplicaSpec(cost, FCFS, limits, block_size=16)
    sat = saturation_qps(spec, args.saturation_requests)
    rate = args.load * sat * args.replicas
    results = []
    for policy in (("fcfs", "niyama", "multimodel", "qlm") if args.policy == "all" else (args.policy,)):
        if policy == "multimodel":
            results.append(_multi_model_run(args, args.load))
            continue
        if policy == "qlm":
            results.append(_qlm_run(args, args.load))
            continue
        if policy == "niyama":
            factory, shares = _niyama_factory()
            pspec = ReplicaSpec(cost, factory, limits, block_size=16)
            label = "niyama (3 tiers, equal shares)"
        else:
            shares, pspec, label = None, spec, "fcfs chunked"
        wl = _workload(args.requests, rate, args.seed, shares)
        results.append(_timed_run(args, [pspec] * args.replicas, label, wl, rate, sat))
    return results[0] if len(results) == 1 else results


MULTI_MODEL_SHARES = {"llama3-8b": 0.5, "mistral-7b": 0.3, "qwen2.5-7b": 0.2}


def _multi_model_run(args, load: float) -> dict:
    """8 replicas, 3 models (conf/cluster/multi_model.yaml, roofline costs on A100), the
    on-demand swap controller ticking every simulated second (conf/controller/on_demand.yaml),
    model shares 50/30/20; arrivals at `load` x the saturation of a Llama-3-8B roofline replica."""
    from hydra import compose, initialize_config_dir

    from experiments.wiring import catalog_specs, control_settings, replica_specs

    with initialize_config_dir(config_dir=str(project_path("conf")), version_base="1.3"):
        cfg = compose("config", overrides=["cluster=multi_model", "costmodel=roofline", "controller=on_demand",
                                           f"cluster.num_replicas={args.replicas}"])
    specs = replica_specs(cfg)
    llama = next(s for s in specs if s.model == "llama3-8b")
    sat = saturation_qps(llama, args.saturation_requests)
    rate = load * sat * args.replicas
    wl = _workload(args.requests, rate, args.seed, None, model_shares=MULTI_MODEL_SHARES,
                   max_total_tokens=llama.limits.max_model_len)
    return _timed_run(args, specs, "3 models, swap-on-demand controller (1 s ticks)", wl, rate, sat,
                      controller=instantiate(cfg.controller), catalog=catalog_specs(cfg),
                      control=control_settings(cfg), costs="roofline cost models")


def _qlm_run(args, load: float) -> dict:
    """The multi-model scenario of `_multi_model_run` (8 replicas, 3 models, shares 50/30/20,
    roofline A100 costs) under QLM (conf/controller/qlm.yaml) with its MILP scheduler, two
    QoS classes in equal shares (conf/slo/interactive_batch.yaml). Reports QLM's counters and
    the MILP's share of the run's wall time."""
    from hydra import compose, initialize_config_dir

    from experiments.wiring import catalog_specs, control_settings, replica_specs

    with initialize_config_dir(config_dir=str(project_path("conf")), version_base="1.3"):
        cfg = compose("config", overrides=["cluster=multi_model", "costmodel=roofline", "controller=qlm",
                                           "controller.scheduler=milp", "slo=interactive_batch",
                                           f"cluster.num_replicas={args.replicas}"])
    specs = replica_specs(cfg)
    llama = next(s for s in specs if s.model == "llama3-8b")
    sat = saturation_qps(llama, args.saturation_requests)
    rate = load * sat * args.replicas
    wl = _workload(args.requests, rate, args.seed, {"interactive": 1.0, "batch": 1.0},
                   model_shares=MULTI_MODEL_SHARES, max_total_tokens=llama.limits.max_model_len)
    controller = instantiate(cfg.controller)
    out = _timed_run(args, specs, "3 models, QLM controller (MILP scheduler, 1 s ticks)", wl, rate, sat,
                     controller=controller, catalog=catalog_specs(cfg), control=control_settings(cfg),
                     costs="roofline cost models")
    st = controller.stats()
    out["qlm"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in st.items()}
    out["milp_share_of_wall"] = round(st["milp_time_s"] / out["wall_s"], 4) if out["wall_s"] else None
    out["qlm_control_share_of_wall"] = round(st["control_time_s"] / out["wall_s"], 4) if out["wall_s"] else None
    print(json.dumps({k: out[k] for k in ("qlm", "milp_share_of_wall", "qlm_control_share_of_wall")}))
    return out


def _timed_run(args, specs: list, label: str, wl, rate: float, sat: float, costs: str = "published cost model",
               **kwargs) -> dict:
    prof = cProfile.Profile() if args.profile else None
    t0 = time.perf_counter()
    c0 = time.process_time()
    if prof:
        prof.enable()
    res = simulate(wl, specs, LeastOutstandingRequests(), fast_forward=not args.no_fast_forward, **kwargs)
    # simulate pauses the cyclic garbage collector; what the run left for it is collected here,
    # inside the timed region, rather than at the caller's next allocation
    gc.collect(1)
    if prof:
        prof.disable()
        prof.dump_stats(args.profile)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    fin = res.requests["outcome"].eq("finished").sum()
    out = {
        "scenario": f"{args.requests} azure-conv-shaped requests, poisson, {len(specs)} replicas on a100 "
                    f"({costs}), {label}, {args.load:.0%} load",
        "saturation_qps_per_replica": round(sat, 3),
        "arrival_qps": round(rate, 3),
        "fast_forward": not args.no_fast_forward,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),  # process CPU time: less sensitive than wall time to a busy machine
        "sim_requests_per_s": round(args.requests / wall, 1),
        "sim_steps_per_s": round(res.info["num_steps"] / wall, 1),
        "num_steps": res.info["num_steps"],
        "finished": int(fin),
        "simulated_s": round(res.end_s, 1),
    }
    if "num_model_swaps" in res.info:
        out["num_model_swaps"] = res.info["num_model_swaps"]
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
