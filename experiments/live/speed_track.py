"""The engine's speed over a live replay, and a cost model priced with it.

`track_speed` measures, per step kind and in sliding windows, how the steps the engine ran compare
with a cost model's prices; `SpeedTrackedCostModel` prices each simulated step at the speed the
engine had when it starts (the simulation clock comes through the cost-model protocol's optional
`bind_clock`). `experiments.validate` simulates every in-process replay with it (`errors_tracked`):
the simulator's scheduling, batching, KV and queueing checked given the engine's speed at each
moment. Our design (docs/validation.md, "Speed tracked over the replay").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from experiments.live.calibration import STEP_KINDS, kind_of, priced_steps, step_kind
from sim.errors import InputError


@dataclass
class SpeedTrack:
    """The engine's speed over a replay, per step kind: at each time of `times_s`, the measured over
    the priced time (sums) of that kind's steps that started within `window_s` / 2 of it (priced by
    the cost model the track was measured against; sums, as the calibration's scales, so that the
    simulated busy time of each window equals the engine's for the steps it ran). Times without a step of a kind in their window
    take the nearest time that has one; a kind without any step takes 1.0."""

    times_s: list[float]
    levels: dict[str, list[float]]
    window_s: float

    def to_dict(self) -> dict:
        lv = {k: np.asarray(v) for k, v in self.levels.items()}
        return {"window_s": self.window_s, "num_points": len(self.times_s),
                "summary": {k: {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}
                            for k, v in lv.items() if len(v)}}


def track_speed(steps: pd.DataFrame, cost_model, *, window_s: float = 5.0, every_s: float = 0.5) -> SpeedTrack:
    """`SpeedTrack` of the steps an engine ran (`steps`: the replay's step table, `start_s`, `wall_s` and
    the five cost-model features) against `cost_model`'s prices. Our design: it measures how the host's
    speed moved during the replay (on the project's shared 2-vCPU hosts the engine's decode step switched
    between two speeds ~25% apart within seconds, 2026-11-30), so that a simulation priced with it
    (`SpeedTrackedCostModel`) is checked on its scheduling, batching, KV and queueing given the engine's
    speed at each moment, not on predicting the host. InputError for a window or spacing that is not > 0."""
    if not (window_s > 0 and every_s > 0):
        raise InputError("the speed-track window and spacing must be > 0 s", field="calibration.track",
                         value={"window_s": window_s, "every_s": every_s})
    steps, price = priced_steps(steps, cost_model)
    if steps.empty:
        return SpeedTrack([0.0], {k: [1.0] for k in STEP_KINDS}, window_s)
    start = steps["start_s"].to_numpy(dtype=float)
    wall = steps["wall_s"].to_numpy(dtype=float)
    kinds = step_kind(steps["num_prefill_tokens"].to_numpy(), steps["num_decodes"].to_numpy())
    times = np.arange(0.0, float(start.max()) + every_s, every_s)
    levels = {}
    for kind in STEP_KINDS:
        m = kinds == kind
        order = np.argsort(start[m], kind="stable")
        t_k = start[m][order]
        cw = np.concatenate([[0.0], np.cumsum(wall[m][order])])  # window sums from cumulative sums
        cp = np.concatenate([[0.0], np.cumsum(price[m][order])])
        lo = np.searchsorted(t_k, times - window_s / 2, side="left")
        hi = np.searchsorted(t_k, times + window_s / 2, side="right")
        lv = np.full(len(times), np.nan)
        ok = (hi > lo) & (cp[hi] - cp[lo] > 0)
        lv[ok] = (cw[hi] - cw[lo])[ok] / (cp[hi] - cp[lo])[ok]
        have = np.flatnonzero(np.isfinite(lv))
        if not len(have):
            lv[:] = 1.0
        else:  # the nearest time with a step of this kind
            j = np.arange(len(times))
            k = np.searchsorted(have, j)
            left, right = have[np.clip(k - 1, 0, len(have) - 1)], have[np.clip(k, 0, len(have) - 1)]
            lv = lv[np.where(j - left <= right - j, left, right)]
        levels[kind] = lv.tolist()
    return SpeedTrack(times.tolist(), levels, window_s)


class SpeedTrackedCostModel:
    """`base`'s price times the tracked speed of the step's kind at the simulation time the step starts
    (`SpeedTrack`, nearest point; the clock comes from `simulate` through `bind_clock`). Without a bound
    clock it prices at time 0."""

    def __init__(self, base, track: SpeedTrack) -> None:
        self.base = base
        self.track = track
        self._times = np.asarray(track.times_s, dtype=float)
        self._levels = {k: np.asarray(v, dtype=float) for k, v in track.levels.items()}
        self._now = lambda: 0.0
        self.name = f"{getattr(base, 'name', 'cost model')} x speed tracked over the replay ({track.window_s:g}-s window)"

    def bind_clock(self, now) -> None:
        self._now = now

    def _level(self, kind: str) -> float:
        ts, now = self._times, self._now()
        i = int(np.searchsorted(ts, now))  # ts[i - 1] < now <= ts[i]: the nearer of the two
        if i == len(ts) or (i > 0 and now - ts[i - 1] < ts[i] - now):
            i -= 1
        return float(self._levels[kind][i])

    def step_time_s(self, num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size) -> float:
        t = self.base.step_time_s(num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size)
        return t * self._level(kind_of(num_prefill_tokens, num_decodes))

    def step_times_s(self, num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size):
        t = np.asarray(self.base.step_times_s(num_prefill_tokens, prefill_context, num_decodes, decode_context_sum,
                                              batch_size), dtype=float)
        kinds = step_kind(np.broadcast_to(np.asarray(num_prefill_tokens), t.shape),
                          np.broadcast_to(np.asarray(num_decodes), t.shape))
        lv = {k: self._level(k) for k in STEP_KINDS}
        return t * np.where(kinds == "prefill", lv["prefill"], np.where(kinds == "decode", lv["decode"], lv["mixed"]))

    def num_kv_blocks(self, block_size: int):
        return self.base.num_kv_blocks(block_size)

    def model_load_s(self) -> float:
        return self.base.model_load_s()


def simulate_tracked(cfg, steps: pd.DataFrame, cost_model, requests: pd.DataFrame, replica, *, window_s: float):
    """(track, SimResult): `requests` simulated on `replica` with `cost_model` priced at the speed `steps`
    (the engine's own step table over the replay) show per kind (`track_speed`, `SpeedTrackedCostModel`),
    without fast-forward so that every step is priced at its own start. Used by both validation modes."""
    from omegaconf import OmegaConf

    from experiments.live.simulate import simulate_like_engine

    track = track_speed(steps, cost_model, window_s=window_s)
    tcfg = OmegaConf.merge(cfg, {"sim": {"fast_forward": False}})
    return track, simulate_like_engine(tcfg, requests, replica, SpeedTrackedCostModel(cost_model, track))
