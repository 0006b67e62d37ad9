"""Speed benchmark: simulated requests per wall-clock second on a fixed scenario.

    python -m experiments.bench [--requests N] [--load 0.8] [--no-fast-forward] [--profile out.prof]

Scenario (no file outside the repo): Azure-2023-conversation-shaped lengths (the lognormal
fits in conf/workload/azure_conv_synthetic.yaml), Poisson arrivals, 8 Llama-3-8B/A100
replicas with the published step-cost model, FCFS with chunked prefill, least-outstanding-
requests routing. The arrival rate is `load` x the cluster's saturation throughput, which
is measured first with the same simulator (one replica, a backlog of requests all queued
at t=0). The timed region is `simulate` plus a collection of the young generations (what
the run leaves for the cyclic garbage collector, which `simulate` pauses). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import time

from hydra.utils import instantiate
from omegaconf import OmegaConf

from policies.fcfs import FCFS
from policies.routing import LeastOutstandingRequests
from sim.cluster import ReplicaSpec, simulate
from sim.paths import project_path
from sim.scheduling import EngineLimits


def _cost_model():
    cfg = OmegaConf.create({
        "model": OmegaConf.load(project_path("conf/model/llama3-8b.yaml")),
        "hardware": OmegaConf.load(project_path("conf/hardware/a100-80gb.yaml")),
        "costmodel": OmegaConf.load(project_path("conf/costmodel/published_llama3_8b_a100.yaml")),
    })
    return instantiate(cfg.costmodel)


def _workload(num_requests: int, rate_qps: float, seed: int):
    cfg = OmegaConf.load(project_path("conf/workload/azure_conv_synthetic.yaml"))
    cfg.num_requests = num_requests
    cfg.arrival = {"kind": "poisson", "rate_qps": rate_qps}
    cfg.seed = seed
    return instantiate(cfg).requests


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
    args = ap.parse_args(argv)

    cost = _cost_model()
    spec = ReplicaSpec(cost, FCFS, EngineLimits(max_num_seqs=256, max_num_batched_tokens=2048,
                                                max_model_len=16384), block_size=16)
    sat = saturation_qps(spec)
    rate = args.load * sat * args.replicas
    wl = _workload(args.requests, rate, args.seed)
    prof = cProfile.Profile() if args.profile else None
    t0 = time.perf_counter()
    c0 = time.process_time()
    if prof:
        prof.enable()
    res = simulate(wl, [spec] * args.replicas, LeastOutstandingRequests(), fast_forward=not args.no_fast_forward)
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
        "scenario": f"{args.requests} azure-conv-shaped requests, poisson, {args.replicas} x llama3-8b/a100 "
                    f"(published cost model), fcfs chunked, {args.load:.0%} load",
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
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
