"""The simulator's scheduling checked step by step: a replay re-simulated on the live engine's own step
boundaries (our design).

`step_replay` simulates the requests a live engine served with every step lasting exactly as long as the
engine's step of the same index did (from its start to the next step's start, so that the time the
engine spent between steps is inside it; `LiveStepDurations`). Arrivals then reach the simulated
scheduler at the same step as they reached the engine's, and any difference in what a step holds is a
difference of scheduling, batching or KV accounting, not of speed. The check reports how many steps
hold the same number of tokens and requests on both sides, where they first differ, and the
preemption counts. After a divergence the two may re-synchronise (at light load within a step or two)
or fall apart for good (a different batch frees different KV blocks), so the first divergence matters most.

The composition compared is the step's token count and batch size: the simulator counts a request
computing its one remaining prompt token as a decode (`sim.scheduling.StepPlan.shape`) while the
engine's observation counts it a one-token prefill chunk; token and request counts are the same either
way. In-process mode only: there the engine's arrival times are the replay's own; in server mode a
request reaches the engine core after the front end's processing, by an amount not recorded per request.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from omegaconf import OmegaConf


class LiveStepDurations:
    """A cost model that prices the k-th step it is asked for as the k-th live step's duration (start to
    next start; the last one its own wall time), and any step past the live ones with `base`."""

    def __init__(self, steps: pd.DataFrame, base) -> None:
        start = steps["start_s"].to_numpy(dtype=float)
        self._dur = np.append(np.diff(start), steps["wall_s"].to_numpy(dtype=float)[-1:]) if len(start) else start
        self._k = 0
        self.base = base
        self.name = "the live engine's step durations, in order"

    def step_time_s(self, num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size) -> float:
        k = self._k
        self._k += 1
        if k < len(self._dur):
            return float(self._dur[k])
        return self.base.step_time_s(num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size)

    def num_kv_blocks(self, block_size: int):
        return self.base.num_kv_blocks(block_size)

    def model_load_s(self) -> float:
        return self.base.model_load_s()


def step_replay(cfg, steps: pd.DataFrame, requests: pd.DataFrame, replica) -> dict:
    """Simulate `requests` (the live request table: arrivals, lengths, and `num_preemptions` as the engine
    counted them) on `replica` with the live `steps`' durations in order (`LiveStepDurations`, no
    fast-forward: one cost-model call per step) and compare the two step sequences. Returns
    num_steps_live / num_steps_sim; identical_steps (same tokens and batch size at the same index);
    share_identical (over the longer sequence, so that extra steps on either side count against it; steps
    are matched by index, so after a divergence alike decode steps can match again);
    first_divergence_step / _s (None when none, including when one side only has more steps);
    preemptions_live / preemptions_sim (totals) and preempted_requests_differ (requests whose
    preemption count differs between the two)."""
    from experiments.live.simulate import simulate_like_engine

    live = steps[(steps["num_prefill_tokens"] + steps["num_decodes"]) > 0].reset_index(drop=True)
    tcfg = OmegaConf.merge(cfg, {"sim": {"fast_forward": False}})
    sim = simulate_like_engine(tcfg, requests, replica, LiveStepDurations(live, replica.cost_model))
    s = sim.steps.reset_index(drop=True)
    n = min(len(s), len(live))

    def composition(df):
        return np.stack([(df["num_prefill_tokens"] + df["num_decodes"]).to_numpy()[:n],
                         df["batch_size"].to_numpy()[:n]], axis=1)

    same = (composition(s) == composition(live)).all(axis=1) if n else np.zeros(0, dtype=bool)
    first = None if same.all() else int(np.argmin(same))
    if first is None and len(s) != len(live):
        first = n  # one side ran more steps
    longest = max(len(s), len(live))
    pre_live = requests.set_index("request_id")["num_preemptions"].astype(int)
    pre_sim = sim.requests.set_index("request_id")["num_preemptions"].astype(int).reindex(pre_live.index).fillna(0)
    differ = pre_live.index[(pre_live != pre_sim).to_numpy()]
    return {"num_steps_live": int(len(live)), "num_steps_sim": int(len(s)), "identical_steps": int(same.sum()),
            "share_identical": float(same.sum() / longest) if longest else float("nan"),
            "first_divergence_step": first,
            "first_divergence_s": None if first is None or first >= len(live) else float(live["start_s"].iloc[first]),
            "preemptions_live": int(pre_live.sum()), "preemptions_sim": int(sim.requests["num_preemptions"].sum()),
            "preempted_requests_differ": [int(x) for x in differ]}


def describe(sr: dict) -> str:
    """One line of a run's `step_replay` result, for the console."""
    where = ("every step" if sr["first_divergence_step"] is None else
             f"first divergence at step {sr['first_divergence_step']}"
             + (f" (t={sr['first_divergence_s']:.2f} s)" if sr["first_divergence_s"] is not None else ""))
    return (f"step replay (the engine's own step times): {sr['identical_steps']} of {sr['num_steps_live']} live "
            f"steps ({sr['num_steps_sim']} simulated) with the same tokens and batch size, {where}; preemptions "
            f"live {sr['preemptions_live']} sim {sr['preemptions_sim']}, "
            f"{len(sr['preempted_requests_differ'])} requests preempted a different number of times")


def summarise(results: list[dict]) -> dict:
    """The runs' `step_replay` results summed (validation.json's top-level `step_replay`)."""
    return {"identical_steps": sum(x["identical_steps"] for x in results),
            "num_steps": sum(max(x["num_steps_live"], x["num_steps_sim"]) for x in results),
            "requests_preempted_differently": sum(len(x.get("preempted_requests_differ", [])) for x in results),
            "preemptions_live": sum(x["preemptions_live"] for x in results),
            "preemptions_sim": sum(x["preemptions_sim"] for x in results)}
