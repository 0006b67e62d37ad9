"""Small builders for simulator tests: a cluster in one call, no config files."""

from __future__ import annotations

import pandas as pd

from policies.fcfs import FCFS
from policies.routing import RoundRobin
from sim.cluster import ReplicaSpec, simulate
from sim.costmodel import ConstantCostModel
from sim.scheduling import EngineLimits


def workload(rows) -> pd.DataFrame:
    """rows: (arrival_s, prompt_tokens, output_tokens) tuples."""
    return pd.DataFrame(rows, columns=["arrival_s", "num_prompt_tokens", "num_output_tokens"])


def run_simple(rows, *, cost=None, policy=FCFS, num_replicas=1, router=None, kv_blocks=1000, block_size=16,
               fast_forward=True, **limits):
    spec = ReplicaSpec(cost or ConstantCostModel(1.0), policy, EngineLimits(**limits), num_kv_blocks=kv_blocks,
                       block_size=block_size)
    return simulate(workload(rows), [spec] * num_replicas, router or RoundRobin(), check_plans=True,
                    fast_forward=fast_forward)
