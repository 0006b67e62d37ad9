"""Open-loop replay: send each request at its arrival time and timestamp every streamed token.

`replay` runs one asyncio event loop: a dispatcher sleeps until each request's arrival time
and starts its task (never waiting for earlier answers, so the server's queue builds up as
it would in production), each task streams a completion with a token-id prompt,
`ignore_eos` and `max_tokens` = the request's output length and `return_token_ids`, and
records the client time at which each token arrived. Beside them run a `/metrics` poller
(running / waiting requests over time), a watchdog on the server process and an event-loop
lag probe. The result is a request table in the simulator's schema (`sim.metrics`) plus
`token_times_s`, the per-token client times, and the client's measured overhead.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from experiments.live.metrics import GAUGES, counter_delta, gauge_lines, parse_prometheus, snapshot, total
from experiments.live.server import ServerError
from sim.errors import InputError
from sim.metrics import request_table as sim_request_table
from sim.request import FINISHED, OUTCOMES, REJECTED, UNFINISHED, Request

NOT_SENT = "not_sent"
"""Reject reason of a request the replay never sent (the server died first)."""


@dataclass(frozen=True)
class ReplayConfig:
    """How the client replays. Invariant: positive intervals and timeouts."""

    request_timeout_s: float = 300.0
    """A request still streaming this long after it was sent is abandoned (outcome unfinished, 'timeout')."""
    metrics_interval_s: float = 0.5
    """Seconds between /metrics scrapes during the replay."""
    lag_probe_interval_s: float = 0.01
    """The event-loop lag probe sleeps this long and records how late it wakes."""
    seed: int = 0
    """Seed of the random prompt token ids."""
    min_token_id: int = 10
    """Smallest prompt token id (keeps clear of special tokens)."""
    temperature: float = 1.0
    """Sampling temperature sent with every request. It changes the engine's step time (greedy argmax
    vs. random sampling over the vocabulary for each request), so it must match how the profile
    was measured: the profiler uses vLLM's default sampling (temperature 1.0)."""

    def __post_init__(self) -> None:
        for name in ("request_timeout_s", "metrics_interval_s", "lag_probe_interval_s"):
            if not getattr(self, name) > 0:
                raise InputError("must be > 0", field=f"replay.{name}", value=getattr(self, name))
        if not self.temperature >= 0:
            raise InputError("must be >= 0", field="replay.temperature", value=self.temperature)


@dataclass
class Record:
    """What the client saw of one request (times on the replay clock, seconds after its start)."""

    request_id: int
    intended_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    sent_s: float = math.nan
    token_times_s: list[float] = field(default_factory=list)
    num_chunks: int = 0
    max_tokens_per_chunk: int = 0
    status: int = 0
    outcome: str = UNFINISHED
    reason: str = NOT_SENT


@dataclass
class LiveRun:
    """One replay: the request table, engine gauges over time, counters, client overhead, failure."""

    requests: pd.DataFrame
    gauges: pd.DataFrame
    counters: dict
    overhead: dict
    wall_s: float
    failure: str | None = None
    t0_monotonic: float = math.nan
    """`time.monotonic()` when the replay's clock started (system-wide on Linux: the served engine's step
    log, `profiler.steplog`, is stamped on the same clock)."""


def prompt_ids(rng: np.random.Generator, n: int, vocab_size: int, low: int) -> list[int]:
    return rng.integers(low, max(low + 1, vocab_size - 1), size=n).tolist()


def _payload(model: str, ids: list[int], num_output: int, temperature: float) -> bytes:
    return json.dumps({
        "model": model, "prompt": ids, "max_tokens": int(num_output), "ignore_eos": True,
        "temperature": float(temperature), "stream": True, "return_token_ids": True,
    }).encode()


async def _stream(session, url: str, body: bytes, rec: Record, clock: Callable[[], float], timeout_s: float) -> None:
    """POST one streaming completion; fill `rec` with token times and the outcome."""
    import aiohttp

    rec.sent_s = clock()
    rec.reason = ""
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                rec.status = resp.status
                if resp.status != 200:
                    text = (await resp.text())[:300].replace("\n", " ")
                    rec.outcome = REJECTED if 400 <= resp.status < 500 else UNFINISHED
                    rec.reason = f"HTTP {resp.status}: {text}"
                    return
                async for line in resp.content:
                    t = clock()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    obj = json.loads(data)
                    if "error" in obj:
                        rec.reason = f"stream error: {str(obj['error'])[:300]}"
                        break
                    n = sum(len(c.get("token_ids") or ()) for c in obj.get("choices") or ())
                    if n:
                        rec.num_chunks += 1
                        rec.max_tokens_per_chunk = max(rec.max_tokens_per_chunk, n)
                        rec.token_times_s.extend([t] * n)
    except TimeoutError:
        rec.reason = "timeout"
    except (aiohttp.ClientError, OSError, json.JSONDecodeError) as e:
        rec.reason = f"{type(e).__name__}: {str(e)[:200]}"
    except asyncio.CancelledError:
        rec.reason = rec.reason or "cancelled (server exited)"
        raise
    finally:
        if len(rec.token_times_s) >= rec.num_output_tokens and not rec.reason:
            rec.outcome = FINISHED
        elif rec.outcome != REJECTED:
            rec.outcome = UNFINISHED
            rec.reason = rec.reason or f"stream ended after {len(rec.token_times_s)} of {rec.num_output_tokens} tokens"


async def _scrape(session, url: str, gauges_only: bool = False) -> list | None:
    try:
        async with session.get(url) as resp:
            if resp.status != 200:
                return None
            text = await resp.text()
            return parse_prometheus(gauge_lines(text) if gauges_only else text)
    except (OSError, asyncio.TimeoutError, InputError, Exception):  # noqa: BLE001 (a missed sample is not fatal)
        return None


async def idle_health_rtt(base_url: str, num: int = 20) -> float:
    """Median round trip of GET /health on the idle server: the HTTP path's own latency."""
    import aiohttp

    times = []
    async with aiohttp.ClientSession() as session:
        for _ in range(num):
            t0 = time.perf_counter()
            async with session.get(base_url + "/health") as resp:
                await resp.read()
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


async def scrape_once(base_url: str) -> list:
    """One /metrics scrape (raises if the server does not answer)."""
    import aiohttp

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.get(base_url + "/metrics") as resp:
                resp.raise_for_status()
                return parse_prometheus(await resp.text())
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        raise ServerError(f"cannot read {base_url}/metrics: {type(e).__name__}: {e}") from None


async def wait_idle(base_url: str, timeout_s: float = 120.0, alive: Callable[[], None] | None = None) -> None:
    """Wait until the engine reports no running and no waiting request."""
    deadline = time.perf_counter() + timeout_s
    while True:
        if alive is not None:
            alive()
        snap = snapshot(await scrape_once(base_url))
        if snap["num_running"] == 0 and snap["num_waiting"] == 0:
            return
        if time.perf_counter() > deadline:
            raise TimeoutError(f"engine still busy after {timeout_s:.0f} s: {snap['num_running']} running, "
                               f"{snap['num_waiting']} waiting")
        await asyncio.sleep(0.5)


async def replay_async(base_url: str, model: str, workload: pd.DataFrame, cfg: ReplayConfig, *, vocab_size: int,
                       alive: Callable[[], None] | None = None) -> LiveRun:
    """Replay `workload` (arrival_s, num_prompt_tokens, num_output_tokens[, request_id]) open-loop.

    `alive()` raises if the server died; the replay then stops, keeps what it has and
    returns with `failure` set (requests in flight end 'unfinished', the rest 'not_sent')."""
    import aiohttp

    arrivals = workload["arrival_s"].to_numpy(dtype=float)
    if len(arrivals) and (np.any(np.diff(arrivals) < 0) or arrivals[0] < 0):
        raise InputError("arrival_s must be >= 0 and non-decreasing", field="arrival_s")
    ids = workload["request_id"].to_numpy() if "request_id" in workload else np.arange(len(workload))
    recs = [Record(int(i), float(a), int(p), int(o)) for i, a, p, o in zip(
        ids, arrivals, workload["num_prompt_tokens"].to_numpy(), workload["num_output_tokens"].to_numpy())]
    rng = np.random.default_rng(cfg.seed)
    # built before the clock starts: no JSON encoding of prompts on the hot path
    bodies = [_payload(model, prompt_ids(rng, r.num_prompt_tokens, vocab_size, cfg.min_token_id), r.num_output_tokens,
                       cfg.temperature) for r in recs]
    url = base_url + "/v1/completions"
    gauges: list[tuple] = []
    lags: list[float] = []
    failure: list[str] = []
    before = snapshot(await scrape_once(base_url))
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)  # no client-side queueing of requests
    session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
    metrics_session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
    t0 = time.perf_counter()
    t0_mono = time.monotonic()
    c0 = time.process_time()

    def clock() -> float:
        return time.perf_counter() - t0

    tasks: set[asyncio.Task] = set()
    finished = asyncio.Event()

    async def dispatch() -> None:
        for rec, body in zip(recs, bodies):
            delay = rec.intended_s - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(_stream(session, url, body, rec, clock, cfg.request_timeout_s))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.wait(set(tasks))
        finished.set()

    async def poll_metrics() -> None:
        while not finished.is_set():
            t = clock()
            samples = await _scrape(metrics_session, base_url + "/metrics", gauges_only=True)
            if samples is not None:
                gauges.append((t, *(total(samples, m) for m in GAUGES.values())))
            await asyncio.sleep(max(0.0, cfg.metrics_interval_s - (clock() - t)))

    async def probe_lag() -> None:
        step = cfg.lag_probe_interval_s
        while not finished.is_set():
            t = time.perf_counter()
            await asyncio.sleep(step)
            lags.append(time.perf_counter() - t - step)

    async def watchdog() -> None:
        while not finished.is_set():
            try:
                if alive is not None:
                    alive()
            except Exception as e:  # noqa: BLE001 (the server died: record why, stop the replay)
                failure.append(str(e))
                return
            await asyncio.sleep(0.25)

    dispatcher = asyncio.create_task(dispatch())
    helpers = [asyncio.create_task(f()) for f in (poll_metrics, probe_lag)]
    dog = asyncio.create_task(watchdog())
    try:
        await asyncio.wait({dispatcher, dog}, return_when=asyncio.FIRST_COMPLETED)
        if failure:
            dispatcher.cancel()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(dispatcher, *tasks, return_exceptions=True)
            finished.set()
    finally:
        wall_s = clock()
        cpu_s = time.process_time() - c0
        finished.set()
        for task in (*helpers, dog, dispatcher):
            task.cancel()
        await asyncio.gather(*helpers, dog, dispatcher, return_exceptions=True)
        await session.close()
        after_samples = None if failure else await _scrape(metrics_session, base_url + "/metrics")
        await metrics_session.close()
    after = snapshot(after_samples) if after_samples is not None else None
    table = request_table(recs)
    gauge_df = pd.DataFrame(gauges, columns=["t_s", *GAUGES])
    counters = counter_delta(before, after) if after is not None else {}
    overhead = client_overhead(table, lags, cpu_s, wall_s, counters)
    return LiveRun(table, gauge_df, counters, overhead, wall_s, failure[0] if failure else None, t0_mono)


def replay(base_url: str, model: str, workload: pd.DataFrame, cfg: ReplayConfig, *, vocab_size: int,
           alive: Callable[[], None] | None = None) -> LiveRun:
    """Synchronous wrapper around `replay_async` (one fresh event loop)."""
    return asyncio.run(replay_async(base_url, model, workload, cfg, vocab_size=vocab_size, alive=alive))


def request_table(recs: list[Record]) -> pd.DataFrame:
    """The simulator's request table (`sim.metrics.request_table`, same columns in the same order)
    from client records, followed by `token_times_s` (every token's client time),
    `intended_arrival_s`, `send_lag_s`, `num_chunks`, `max_tokens_per_chunk` and `http_status`.
    Live arrivals are send times; columns only a simulator knows (`first_scheduled_s`,
    `token_steps`, QoS fields) keep the values of a request the simulator never ran."""
    n = len(recs)
    sent = np.array([r.sent_s for r in recs], dtype=float)
    intended = np.array([r.intended_s for r in recs], dtype=float)
    arrival = np.where(np.isnan(sent), intended, sent)
    first = np.array([r.token_times_s[0] if r.token_times_s else math.nan for r in recs], dtype=float)
    last = np.array([r.token_times_s[-1] if r.token_times_s else math.nan for r in recs], dtype=float)
    done = np.array([len(r.token_times_s) for r in recs], dtype=np.int64)
    outcome = [r.outcome for r in recs]
    finish = np.where(np.array([o == FINISHED for o in outcome], dtype=bool), last, math.nan)
    live = {
        "request_id": np.array([r.request_id for r in recs], dtype=np.int64),
        "arrival_s": arrival,
        "num_prompt_tokens": np.array([r.num_prompt_tokens for r in recs], dtype=np.int64),
        "num_output_tokens": np.array([r.num_output_tokens for r in recs], dtype=np.int64),
        "num_output_tokens_done": done,
        "replica": np.zeros(n, dtype=np.int64),
        "outcome": pd.Categorical(outcome, categories=list(OUTCOMES)),
        "reject_reason": [r.reason for r in recs],
        "first_token_s": first,
        "finish_s": finish,
    }
    live["ttft_s"] = first - arrival
    live["e2e_s"] = finish - arrival
    with np.errstate(invalid="ignore", divide="ignore"):
        live["tpot_s"] = np.where(done > 1, (finish - first) / (done - 1), math.nan)
    live["tbt_max_s"] = np.array([max(np.diff(r.token_times_s)) if len(r.token_times_s) > 1 else math.nan
                                  for r in recs], dtype=float)
    defaults = _never_run_row()
    df = pd.DataFrame({col: live[col] if col in live else _repeat(defaults[col], n) for col in defaults.index})
    df["token_times_s"] = [np.asarray(r.token_times_s, dtype=float) for r in recs]
    df["intended_arrival_s"] = intended
    df["send_lag_s"] = sent - intended
    df["num_chunks"] = np.array([r.num_chunks for r in recs], dtype=np.int64)
    df["max_tokens_per_chunk"] = np.array([r.max_tokens_per_chunk for r in recs], dtype=np.int64)
    df["http_status"] = np.array([r.status for r in recs], dtype=np.int64)
    return df


def _never_run_row() -> pd.Series:
    """The simulator's request-table row of a request it never ran: the schema and neutral values."""
    return sim_request_table([Request(0, 0.0, 1, 1)], [np.empty(0)]).iloc[0]


def _repeat(value, n: int):
    if isinstance(value, np.ndarray):
        return [value.copy() for _ in range(n)]
    return pd.Series([value] * n)


def lag_stats(x) -> dict:
    """p50 / p99 / max / mean (s) of the finite values of `x` (NaN each when there are none)."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"p50": math.nan, "p99": math.nan, "max": math.nan, "mean": math.nan}
    return {"p50": float(np.percentile(x, 50)), "p99": float(np.percentile(x, 99)), "max": float(x.max()),
            "mean": float(x.mean())}


def client_overhead(table: pd.DataFrame, lags: list[float], cpu_s: float, wall_s: float, counters: dict) -> dict:
    """How much the client could have distorted the measurement.

    - `send_lag_s`: how late each request left the client versus its arrival time;
    - `loop_lag_s`: how late the event loop woke a 10 ms sleeper (a busy client delays token timestamps);
    - `client_cpu_fraction`: the client's CPU time over the replay's wall time (share of one core);
    - `coalesced_token_share`: tokens that arrived in a chunk with others (their gaps read 0);
    - `near_zero_gap_share`: token gaps under 1 ms (bunched chunks: the API server or the client fell behind);
    - client-minus-server mean TTFT / end-to-end latency, from vLLM's own histograms (HTTP + client path)."""
    fin = table[table["outcome"] == FINISHED]
    tokens = int(table["num_output_tokens_done"].sum())
    chunks = int(table["num_chunks"].sum())
    out = {
        "send_lag_s": lag_stats(table["send_lag_s"]),
        "loop_lag_s": lag_stats(lags),
        "client_cpu_s": cpu_s,
        "client_cpu_fraction": cpu_s / wall_s if wall_s > 0 else math.nan,
        "num_tokens": tokens,
        "num_chunks": chunks,
        "coalesced_token_share": (tokens - chunks) / tokens if tokens else math.nan,
    }
    gaps = [np.diff(np.asarray(t, dtype=float)) for t in table["token_times_s"] if len(t) > 1]
    gaps = np.concatenate(gaps) if gaps else np.empty(0)
    out["near_zero_gap_share"] = float((gaps < 1e-3).mean()) if gaps.size else math.nan
    if counters and len(fin):
        out["client_mean_ttft_s"] = float(fin["ttft_s"].mean())
        out["server_mean_ttft_s"] = counters.get("server_mean_ttft_s", math.nan)
        out["client_minus_server_ttft_s"] = out["client_mean_ttft_s"] - out["server_mean_ttft_s"]
        out["client_mean_e2e_s"] = float(fin["e2e_s"].mean())
        out["server_mean_e2e_s"] = counters.get("server_mean_e2e_s", math.nan)
        out["client_minus_server_e2e_s"] = out["client_mean_e2e_s"] - out["server_mean_e2e_s"]
    return out
