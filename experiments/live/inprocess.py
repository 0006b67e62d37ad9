"""In-process live replay: vLLM's engine stepped in this process, timed by the engine itself.

No HTTP server, no client process: `InProcessEngine` builds vLLM's `LLMEngine` with its engine
core in this process (`profiler.vllm_backend.VllmStepDriver`, the very engine construction the
shipped profile was measured with, plus vLLM's request stats), and `InProcessEngine.replay`
adds each request when the wall clock reaches its arrival time and steps the engine in a loop
(our design; vLLM's own engine-core busy loop does the same: take new requests, then one
`EngineCore.step()`). Only the engine uses the CPU while it runs; between steps with nothing to
do the loop sleeps until the next arrival.

Timestamps are vLLM's own (engine-side, `time.monotonic`, the clock vLLM stamps with):
- queued: the scheduler's QUEUED event of the request (`EngineCoreEvent`, stamped in
  `Scheduler.add_request`, at the first step boundary after its arrival time);
- first scheduled: its first SCHEDULED event; preemptions: its PREEMPTED events;
- every output token: the `timestamp` of the `EngineCoreOutputs` that carried it (stamped when
  the engine core builds a step's outputs, after the forward pass and sampling; vLLM's own
  TTFT / inter-token latency metrics use the same stamp, `vllm/v1/metrics/stats.py`).

The request table has the columns of the server mode's (`experiments.live.client.request_table`,
the simulator's `sim.metrics.request_table` first) and fills `first_scheduled_s` and
`num_preemptions` from the events. Each engine step is recorded too (start / end, what the
scheduler returned as the cost model's five features), so the cost model's price of the very
steps the engine ran can be compared with their measured times (`step_table`).

The speed calibration of a cost model on this engine (`calibrate_speed`, `ScaledCostModel`) lives
in `experiments.live.calibration`.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from experiments.live.client import NOT_SENT, LiveRun, Record, lag_stats, request_table
from experiments.live.server import ServerError
from sim.errors import InputError
from sim.request import FINISHED, REJECTED, UNFINISHED

log = logging.getLogger(__name__)

CONTENDED_CPU_FRACTION = 0.8
"""A replay step whose process CPU time is below this share of its wall time was slowed by another
process (as `profiler.measure.is_contended`); the replay reports the share of such steps and time."""

# --------------------------------------------------------------------------------- the engine

@dataclass(frozen=True)
class InProcessConfig:
    """How the in-process engine is built: the profile's engine (profiles/cpu-llama-small/metadata.json)."""

    model_dir: str
    dtype: str = "float32"
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 512
    max_model_len: int = 8192
    enforce_eager: bool = False
    kv_cache_space_gib: int = 2
    gpu_memory_utilization: float = 0.3
    num_threads: int = 1
    """OpenMP / torch threads (the profile: 1)."""
    seed: int = 0
    temperature: float = 1.0
    scheduling_policy: str = "fcfs"
    """'fcfs' or 'priority' (vLLM's `scheduling_policy`; per-request priorities come with the workload)."""
    num_gpu_blocks_override: int | None = None
    """KV blocks instead of what `kv_cache_space_gib` allows (the priority check makes KV scarce)."""


class InProcessEngine:
    """A vLLM engine in this process: start it, replay workloads, time reference steps, stop it.

    Start-up failures raise `ServerError` (the validate app's "live side failed", exit 3), as a
    server that never became healthy does in server mode. One per process at a time."""

    def __init__(self, cfg: InProcessConfig) -> None:
        self.cfg = cfg
        self.driver = None
        self.startup_s = math.nan
        self.children_before: set[int] = set()

    # ---- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        from profiler.vllm_backend import VllmEngineConfig, VllmStepDriver
        from sim.paths import project_path

        self.children_before = _child_pids()
        ecfg = VllmEngineConfig(
            model_dir=str(project_path(self.cfg.model_dir)), dtype=self.cfg.dtype,
            max_num_batched_tokens=self.cfg.max_num_batched_tokens, max_num_seqs=self.cfg.max_num_seqs,
            max_model_len=self.cfg.max_model_len, enforce_eager=self.cfg.enforce_eager,
            kv_cache_space_gib=self.cfg.kv_cache_space_gib, gpu_memory_utilization=self.cfg.gpu_memory_utilization,
            num_threads=self.cfg.num_threads, seed=self.cfg.seed, temperature=self.cfg.temperature,
            scheduling_policy=self.cfg.scheduling_policy, log_stats=True,
            num_gpu_blocks_override=self.cfg.num_gpu_blocks_override)
        try:
            self.driver = VllmStepDriver(ecfg)
        except Exception as e:  # noqa: BLE001 - any start-up failure is the live side failing
            raise ServerError(f"the in-process vLLM engine failed to start: {type(e).__name__}: {e}") from e
        self.startup_s = self.driver.startup_s

    @property
    def engine(self):
        return self.driver.engine

    @property
    def num_kv_blocks(self) -> int:
        return self.driver.kv_blocks

    @property
    def block_size(self) -> int:
        return self.driver.block_size

    @property
    def vocab_size(self) -> int:
        return self.driver.vocab_size

    def stop(self) -> list[int]:
        """Shut the engine down; returns the pids of child processes it left running (expected: [])."""
        if self.driver is not None:
            try:
                self.driver.engine.engine_core.shutdown()
            except Exception as e:  # noqa: BLE001 - report, never mask the original error
                log.warning("in-process engine shutdown raised %s: %s", type(e).__name__, e)
            self.driver = None
            gc.collect()
        return sorted(_child_pids() - self.children_before)

    def idle(self) -> bool:
        return not self.driver.core.scheduler.has_requests()

    def abort_all(self) -> None:
        """Abort every request still in the engine and step until it is empty."""
        sched = self.driver.core.scheduler
        ids = list(sched.requests)
        if ids:
            self.engine.engine_core.abort_requests(ids)
        for _ in range(1000):
            if not sched.has_requests():
                return
            self.engine.engine_core.get_output()

    # ---- replay ---------------------------------------------------------------------------

    def replay(self, workload: pd.DataFrame, *, seed: int = 0, min_token_id: int = 10,
               timeout_s: float = 600.0, step_hook=None) -> LiveRun:
        """Replay `workload` (columns `arrival_s` (s after the start), `num_prompt_tokens`,
        `num_output_tokens`, optional `request_id`, optional integer `priority`: smaller is
        served first, vLLM's convention) open-loop on this engine.

        Requests are built (random prompt token ids from `seed`, `max_tokens` = output length,
        `ignore_eos`, the configured temperature) before the clock starts; a request vLLM's input
        processing rejects ends `rejected` with its message and is never added. A request still
        in the engine `timeout_s` after the replay started ends `unfinished` ('timeout'). An
        exception from the engine mid-replay ends the replay: what was measured is kept, the rest
        ends `unfinished`, and `LiveRun.failure` names the error. `step_hook(i)`, if given, is
        called before step i (tests inject faults with it).

        Returns a `LiveRun` whose `requests` is the server mode's request table (times in s since
        the replay's start, engine clock), `gauges` the running / waiting requests after every
        step, `counters` what the engine did (steps, tokens, preemptions), `overhead` the replay
        loop's own timing, and `steps` (attribute) the step table."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine import EngineCoreEventType

        _check_workload(workload)
        n = len(workload)
        ids = workload["request_id"].to_numpy() if "request_id" in workload else np.arange(n)
        arrival = workload["arrival_s"].to_numpy(dtype=float)
        prompt = workload["num_prompt_tokens"].to_numpy(dtype=np.int64)
        output = workload["num_output_tokens"].to_numpy(dtype=np.int64)
        prio = workload["priority"].to_numpy(dtype=np.int64) if "priority" in workload else np.zeros(n, np.int64)
        order = np.argsort(arrival, kind="stable")
        engine = self.engine
        client = engine.engine_core
        sched = self.driver.core.scheduler
        recs = [Record(int(ids[i]), float(arrival[i]), int(prompt[i]), int(output[i])) for i in range(n)]
        rng = np.random.default_rng(seed)
        tasks = engine.get_supported_tasks()
        built: list = [None] * n
        for i in range(n):
            high = max(min_token_id + 1, self.vocab_size - 1)
            tokens = rng.integers(min_token_id, high, size=int(prompt[i])).tolist()
            params = SamplingParams(max_tokens=int(output[i]), ignore_eos=True, detokenize=False,
                                    temperature=float(self.cfg.temperature))
            try:
                req = engine.input_processor.process_inputs(f"r{int(ids[i])}", TokensPrompt(prompt_token_ids=tokens),
                                                            params, supported_tasks=tasks, arrival_time=0.0,
                                                            priority=int(prio[i]))
                engine.input_processor.assign_request_id(req)
            except Exception as e:  # noqa: BLE001 - vLLM rejects it: the request's outcome, not a crash
                recs[i].outcome, recs[i].reason = REJECTED, f"{type(e).__name__}: {e}"[:300]
                continue
            built[i] = req
        index = {built[i].request_id: i for i in range(n) if built[i] is not None}
        queued = np.full(n, math.nan)
        scheduled = np.full(n, math.nan)
        preemptions = np.zeros(n, dtype=np.int64)
        steps: list[tuple] = []
        gauges: list[tuple] = []
        sleeps_late: list[float] = []
        failure = None
        in_engine: set[int] = set()
        k = 0
        gc.collect()
        gc.disable()  # a collection inside a timed step would be ours, not the engine's
        c0 = time.process_time()
        t0 = time.monotonic()
        try:
            while True:
                now = time.monotonic() - t0
                while k < n and arrival[order[k]] <= now:
                    i = order[k]
                    k += 1
                    req = built[i]
                    if req is None:
                        continue
                    req.arrival_time = time.time()
                    recs[i].sent_s = time.monotonic() - t0
                    recs[i].reason = ""
                    client.add_request(req)
                    in_engine.add(i)
                if sched.has_requests():
                    if step_hook is not None:
                        step_hook(len(steps))
                    q0, s0 = time.process_time(), time.monotonic()
                    outs = client.get_output()
                    s1, q1 = time.monotonic(), time.process_time()
                    obs = self.driver._last
                    self.driver._last = None
                    ts = (outs.timestamp or s1) - t0
                    for o in outs.outputs:
                        i = index.get(o.request_id)
                        if i is None:
                            continue
                        rec = recs[i]
                        for ev in o.events or ():
                            if ev.type == EngineCoreEventType.QUEUED:
                                queued[i] = ev.timestamp - t0
                            elif ev.type == EngineCoreEventType.SCHEDULED:
                                if math.isnan(scheduled[i]):
                                    scheduled[i] = ev.timestamp - t0
                            elif ev.type == EngineCoreEventType.PREEMPTED:
                                preemptions[i] += 1
                        if o.new_token_ids:
                            rec.token_times_s.extend([ts] * len(o.new_token_ids))
                            rec.num_chunks += 1
                            rec.max_tokens_per_chunk = max(rec.max_tokens_per_chunk, len(o.new_token_ids))
                        if o.finish_reason is not None:
                            in_engine.discard(i)
                            done = len(rec.token_times_s) == rec.num_output_tokens
                            rec.outcome = FINISHED if done else UNFINISHED
                            rec.reason = "" if done else f"finished early: {o.finish_reason!s}"
                    if obs is not None:
                        f = _features(obs)
                        steps.append((s0 - t0, s1 - t0, ts, f["num_prefill_tokens"], f["prefill_context"],
                                      f["num_decodes"], f["decode_context_sum"], f["batch_size"],
                                      f["num_prefill_chunks"], q1 - q0))
                    running, waiting = sched.get_request_counts()
                    gauges.append((s1 - t0, running, waiting))
                    if s1 - t0 > timeout_s:
                        failure = None
                        break
                elif k < n:
                    wait = arrival[order[k]] - (time.monotonic() - t0)
                    if wait > 0:
                        time.sleep(wait)
                    sleeps_late.append(time.monotonic() - t0 - arrival[order[k]])
                else:
                    break
        except Exception as e:  # noqa: BLE001 - the engine failed mid-replay: keep what was measured
            failure = f"the engine raised mid-replay: {type(e).__name__}: {e}"
            log.error("%s", failure)
        finally:
            wall = time.monotonic() - t0
            cpu = time.process_time() - c0
            gc.enable()
        for i in in_engine:
            recs[i].outcome = UNFINISHED
            recs[i].reason = "engine failed" if failure else "timeout"
        if failure is None and in_engine:
            self.abort_all()
        for i, rec in enumerate(recs):
            if rec.outcome == UNFINISHED and rec.reason == NOT_SENT and failure is None and built[i] is not None:
                rec.reason = "timeout"
        table = request_table(recs)
        # arrival_s: when the request arrived (its arrival time on the replay clock; the engine takes it
        # at the end of the step in flight, as vLLM's engine core takes requests from its input queue
        # between steps, so that wait is part of its TTFT, as in the simulator); the engine's own
        # QUEUED stamp is kept beside it
        table["arrival_s"] = arrival
        table["ttft_s"] = table["first_token_s"] - table["arrival_s"]
        table["e2e_s"] = table["finish_s"] - table["arrival_s"]
        table["queued_s"] = queued
        table["first_scheduled_s"] = scheduled
        table["num_preemptions"] = preemptions
        table["priority"] = prio
        step_df = pd.DataFrame(steps, columns=["start_s", "end_s", "output_ts_s", "num_prefill_tokens",
                                               "prefill_context", "num_decodes", "decode_context_sum", "batch_size",
                                               "num_prefill_chunks", "cpu_s"])
        step_df["wall_s"] = step_df["end_s"] - step_df["start_s"]
        # a step that got less than 80% of a core was slowed by another process (the profiler's test)
        contended = step_df["cpu_s"] < CONTENDED_CPU_FRACTION * step_df["wall_s"]
        gdf = pd.DataFrame(gauges, columns=["t_s", "num_running", "num_waiting"])
        fin = table["outcome"] == FINISHED
        counters = {"num_steps": int(len(step_df)),
                    "mean_tokens_per_step": float((step_df["num_prefill_tokens"] + step_df["num_decodes"]).mean())
                    if len(step_df) else math.nan,
                    "num_preemptions": int(preemptions.sum()),
                    "busy_s": float(step_df["wall_s"].sum()),
                    "generation_tokens": int(table["num_output_tokens_done"].sum()),
                    "num_finished": int(fin.sum()),
                    "contended_step_share": float(contended.mean()) if len(step_df) else math.nan,
                    "contended_time_share": float(step_df.loc[contended, "wall_s"].sum() / step_df["wall_s"].sum())
                    if len(step_df) and step_df["wall_s"].sum() > 0 else math.nan}
        overhead = {"add_lag_s": lag_stats(table["send_lag_s"]),
                    "sleep_wake_late_s": lag_stats(sleeps_late),
                    "loop_cpu_s": cpu, "loop_cpu_fraction": cpu / wall if wall > 0 else math.nan,
                    "engine_busy_fraction": counters["busy_s"] / wall if wall > 0 else math.nan,
                    "output_stamp_minus_step_end_s": lag_stats((step_df["output_ts_s"] - step_df["end_s"]).to_numpy())}
        run = LiveRun(table, gdf, counters, overhead, wall, failure)
        run.steps = step_df
        return run


def _features(obs) -> dict:
    from profiler.measure import observed_numbers

    return observed_numbers(obs.chunks, list(obs.decodes.values()))


def _check_workload(wl: pd.DataFrame) -> None:
    for col in ("arrival_s", "num_prompt_tokens", "num_output_tokens"):
        if col not in wl:
            raise InputError("the replay's workload lacks a column", field=col)
    if len(wl) and (not np.all(np.isfinite(wl["arrival_s"])) or (wl["arrival_s"] < 0).any()):
        raise InputError("arrival times must be finite and >= 0", field="arrival_s")
    for col in ("num_prompt_tokens", "num_output_tokens"):
        if len(wl) and (wl[col] < 1).any():
            raise InputError("must be >= 1", field=col, value=int(wl[col].min()))


def _child_pids() -> set[int]:
    try:
        import psutil
    except ImportError:
        return set()
    return {p.pid for p in psutil.Process(os.getpid()).children(recursive=True)}
