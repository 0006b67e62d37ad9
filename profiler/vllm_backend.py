"""The `vllm` backend: time single steps of a real vLLM engine running in this process.

The engine core runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so each
`LLMEngine.step()` is exactly one schedule + forward + sample + output pass. We choose a
step's composition by what is queued and by setting the scheduler's token budget for that
one step (the scheduler serves running requests first, then waiting ones, FCFS):
- prefill chunk of `n` tokens after `ctx` tokens: a request of `ctx + n` prompt tokens and
  one output token; untimed steps bring it to `ctx` computed tokens, the timed step has
  budget `n` (plus the running decodes, for mixed steps);
- decodes: `b` requests prefilled to the wanted context, then steps with budget `b`.
The scheduler's `schedule()` is wrapped to record what it really returned; a timed step
whose observed composition differs from the intended one is discarded and counted.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from profiler.measure import TimedStep, measure_shape, observed_numbers
from profiler.shapes import DecodeGroup, ShapeGrid, StepShape

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VllmEngineConfig:
    """How the profiled engine is built. Invariant: positive limits; threads >= 1."""

    model_dir: str
    """Folder with a Hugging Face `config.json` (weights are random: `load_format="dummy"`)."""
    dtype: str = "float32"
    """Weights / activations dtype (this CPU has no native bfloat16 instructions)."""
    max_num_batched_tokens: int = 512
    """Token budget per step (the largest prefill chunk measured)."""
    max_num_seqs: int = 128
    """Most requests in one step."""
    max_model_len: int = 8192
    """Longest sequence the engine accepts."""
    enforce_eager: bool = False
    """True skips torch.compile (fast start-up for tests; steps ~10% slower on CPU)."""
    kv_cache_space_gib: int = 2
    """`VLLM_CPU_KVCACHE_SPACE`: GiB of KV cache the CPU backend allocates."""
    gpu_memory_utilization: float = 0.3
    """Share of memory the engine may reserve (the CPU backend applies it to host memory)."""
    num_threads: int = 1
    """OpenMP / torch threads of the engine (`OMP_NUM_THREADS`)."""
    seed: int = 0
    """Seed for the engine and the random prompt tokens."""
    temperature: float = 1.0
    """Sampling temperature of the profiled requests. It changes the step time: random sampling
    (vLLM's default, 1.0) draws over the whole vocabulary per request, greedy (0.0) does not,
    so a cost model prices traffic sampled like its profile (recorded in the metadata)."""
    scheduling_policy: str = "fcfs"
    """vLLM's `scheduling_policy`: "fcfs" (its default, what the profile measured) or "priority"
    (waiting requests by (priority, arrival), preemption victim the running request with the
    largest (priority, arrival)); used by the in-process live replay (experiments/live/inprocess.py)."""
    log_stats: bool = False
    """vLLM's stats (`disable_log_stats=False`): the engine core then stamps each request's
    QUEUED / SCHEDULED / PREEMPTED events (monotonic time), which the in-process replay reads.
    Off for profiling (it adds a little work per step)."""
    num_gpu_blocks_override: int | None = None
    """vLLM's `num_gpu_blocks_override`: this many KV blocks instead of what `kv_cache_space_gib`
    allows (None: not set). The live priority check uses it to make KV scarce, so that overload
    preempts."""

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len", "kv_cache_space_gib", "num_threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"VllmEngineConfig.{name} must be a positive integer, got {v!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"VllmEngineConfig.temperature must be a number >= 0, got {self.temperature!r}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"VllmEngineConfig.scheduling_policy must be 'fcfs' or 'priority', "
                             f"got {self.scheduling_policy!r}")
        v = self.num_gpu_blocks_override
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"VllmEngineConfig.num_gpu_blocks_override must be a positive integer or None, got {v!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("VllmEngineConfig.gpu_memory_utilization must be in (0, 1], "
                             f"got {self.gpu_memory_utilization}")


def prepare_environment(cfg: VllmEngineConfig) -> dict[str, str]:
    """Set the environment vLLM reads at import/start-up; returns what was set (for the metadata)."""
    env = {
        "HF_HUB_OFFLINE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_space_gib),
        "OMP_NUM_THREADS": str(cfg.num_threads),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    os.environ.update(env)
    if os.environ.pop("SLOSIM_STEP_LOG", None):  # profiler.steplog would log (and slow) this engine's steps
        log.warning("SLOSIM_STEP_LOG is set in the environment: ignored here (it is for a served engine core; "
                    "experiments.validate mode=server sets it)")
    return env


@dataclass(frozen=True)
class Observed:
    """What the scheduler returned for one step: prefill chunks and decoding requests."""

    chunks: tuple[tuple[int, int], ...]
    """(tokens, tokens already computed) per prefill chunk, sorted."""
    decodes: dict[str, int]
    """Internal request id -> tokens already computed, for requests decoding one token."""
    odd: bool = False
    """A request past its prompt was scheduled more than one token (speculation; never expected)."""


def observe_schedule(out, requests) -> Observed:
    """What one `SchedulerOutput` of vLLM's v1 scheduler holds: its prefill chunks and decoding requests
    (`requests`: the scheduler's request map, for each request's prompt length)."""
    computed = {r.req_id: r.num_computed_tokens for r in out.scheduled_new_reqs}
    cached = out.scheduled_cached_reqs
    computed.update(zip(cached.req_ids, cached.num_computed_tokens))
    chunks, decodes, odd = [], {}, False
    for rid, n in out.num_scheduled_tokens.items():
        ctx = int(computed[rid])
        if ctx >= requests[rid].num_prompt_tokens:
            decodes[rid] = ctx
            odd |= n != 1
        else:
            chunks.append((int(n), ctx))
    return Observed(tuple(sorted(chunks)), decodes, odd)


class VllmStepDriver:
    """An in-process vLLM engine whose steps we compose and time. One per process at a time."""

    def __init__(self, cfg: VllmEngineConfig) -> None:
        self.cfg = cfg
        self.env = prepare_environment(cfg)
        import torch  # profiler/ is the only package that imports torch / vllm

        torch.set_num_threads(cfg.num_threads)
        from vllm import SamplingParams
        from vllm.engine.arg_utils import EngineArgs
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.llm_engine import LLMEngine

        self._SamplingParams, self._TokensPrompt = SamplingParams, TokensPrompt
        self.engine_args = dict(
            model=str(Path(cfg.model_dir).resolve()), load_format="dummy", skip_tokenizer_init=True,
            dtype=cfg.dtype, max_model_len=cfg.max_model_len, max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_num_seqs=cfg.max_num_seqs, enable_prefix_caching=False, enable_chunked_prefill=True,
            async_scheduling=False, enforce_eager=cfg.enforce_eager, gpu_memory_utilization=cfg.gpu_memory_utilization,
            seed=cfg.seed, disable_log_stats=not cfg.log_stats,
        )
        if cfg.scheduling_policy != "fcfs":  # only when asked: the profile's engine arguments stay as they were
            self.engine_args["scheduling_policy"] = cfg.scheduling_policy
        if cfg.num_gpu_blocks_override is not None:
            self.engine_args["num_gpu_blocks_override"] = cfg.num_gpu_blocks_override
        t0 = time.perf_counter()
        self.engine = LLMEngine.from_engine_args(EngineArgs(**self.engine_args))
        self.startup_s = time.perf_counter() - t0
        self.core = self.engine.engine_core.engine_core
        self.scheduler = self.core.scheduler
        if getattr(self.core, "batch_queue", None) is not None:
            raise RuntimeError("vLLM engine uses a batch queue (pipelined steps): "
                               "one step() would not be one forward pass")
        self.max_budget = int(self.scheduler.max_num_scheduled_tokens)
        self.kv_blocks = int(self.scheduler.cache_config.num_gpu_blocks)
        self.block_size = int(self.scheduler.cache_config.block_size)
        self.vocab_size = int(self.engine.model_config.get_vocab_size())
        self.engine_threads = torch.get_num_threads()
        self._rng = np.random.default_rng(cfg.seed)
        self._next_id = 0
        self._external: dict[str, str] = {}
        self._last: Observed | None = None
        original = self.scheduler.schedule

        def recording_schedule(*args, **kwargs):
            out = original(*args, **kwargs)
            self._last = self._observe(out)
            return out

        self.scheduler.schedule = recording_schedule
        self.timing = "step"
        """What `step` times: 'step', the whole `LLMEngine.step` (engine core step plus the front end's
        output processing; how the shipped profiles were measured), or 'core', the engine core's step
        alone (`EngineCoreClient.get_output`: schedule, forward, sample, outputs), which is what a served
        engine core runs per step (vLLM's API server processes outputs in its own process) and what the
        in-process replay steps."""
        self._core_times: tuple[float, float] | None = None
        client = self.engine.engine_core
        original_get_output = client.get_output

        def timed_get_output(*args, **kwargs):
            c0, t0 = time.process_time(), time.perf_counter()
            out = original_get_output(*args, **kwargs)
            self._core_times = (time.perf_counter() - t0, time.process_time() - c0)
            return out

        client.get_output = timed_get_output

    # ---- primitives -------------------------------------------------------------------

    def _observe(self, out) -> Observed:
        return observe_schedule(out, self.scheduler.requests)

    def add_request(self, prompt_len: int, max_tokens: int) -> str:
        """Queue a request of random prompt tokens; returns the engine's internal request id."""
        external = f"prof-{self._next_id}"
        self._next_id += 1
        tokens = self._rng.integers(10, self.vocab_size - 1, size=prompt_len).tolist()
        params = self._SamplingParams(max_tokens=max_tokens, ignore_eos=True, detokenize=False,
                                      temperature=float(self.cfg.temperature))
        internal = self.engine.add_request(external, self._TokensPrompt(prompt_token_ids=tokens), params)
        self._external[internal] = external
        return internal

    def step(self, budget: int) -> tuple[float, float, Observed | None]:
        """One engine step with token budget `budget`: (wall_s, cpu_s, what the scheduler returned);
        the times are of what `timing` names."""
        self.scheduler.max_num_scheduled_tokens = int(min(budget, self.max_budget))
        self._last = None
        self._core_times = None
        try:
            c0, t0 = time.process_time(), time.perf_counter()
            self.engine.step()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        finally:
            self.scheduler.max_num_scheduled_tokens = self.max_budget
        if self.timing == "core" and self._core_times is not None:
            wall, cpu = self._core_times
        return wall, cpu, self._last

    def computed_tokens(self, internal_id: str) -> int:
        return int(self.scheduler.requests[internal_id].num_computed_tokens)

    def is_decoding(self, internal_id: str) -> bool:
        r = self.scheduler.requests.get(internal_id)
        return r is not None and r.num_computed_tokens >= r.num_prompt_tokens and r.num_output_tokens >= 1

    def abort(self, internal_ids) -> None:
        ids = [self._external.pop(i) for i in internal_ids if i in self._external]
        if ids:
            self.engine.abort_request(ids)

    def drain(self) -> None:
        """Abort everything queued and step until the engine is idle."""
        self.abort(list(self._external))
        for _ in range(10_000):
            if not self.engine.has_unfinished_requests():
                break
            self.step(self.max_budget)
        self._external.clear()

    def prefill_to(self, internal_id: str, context: int, num_decodes: int) -> None:
        """Untimed steps until request `internal_id` has `context` tokens computed (running decodes advance too)."""
        room = self.max_budget - num_decodes
        if room < 1:
            raise RuntimeError("no token budget left for a prefill beside the decodes")
        while (done := self.computed_tokens(internal_id)) < context:
            self.step(num_decodes + min(context - done, room))

    def shutdown(self) -> None:
        try:
            self.drain()
        finally:
            self.engine.engine_core.shutdown()

    # ---- measuring shapes -------------------------------------------------------------

    def _attempt(self, shape: StepShape, decode_ids: list[str]) -> Callable[[], tuple[float, float, dict, bool]]:
        """A closure that sets up and times one step of `shape` beside the running decodes `decode_ids`."""

        def attempt():
            new_ids = [self.add_request(ctx + n, max_tokens=1) for n, ctx in shape.prefill_chunks]
            for rid, (_, ctx) in zip(new_ids, shape.prefill_chunks):
                if ctx:
                    self.prefill_to(rid, ctx, len(decode_ids))
            wall, cpu, obs = self.step(shape.num_tokens)
            if obs is None:
                return wall, cpu, observed_numbers((), ()), False
            matched = (not obs.odd and obs.chunks == tuple(sorted(shape.prefill_chunks))
                       and set(obs.decodes) == set(decode_ids))
            leftover = [rid for rid in new_ids if rid in self.scheduler.requests]
            if leftover:  # a chunk that did not finish its prompt must not leak into later steps
                self.abort(leftover)
                matched = False
            return wall, cpu, observed_numbers(obs.chunks, list(obs.decodes.values())), matched

        return attempt

    def measure(self, prefill: list[StepShape], groups: list[DecodeGroup], grid: ShapeGrid, *,
                min_cpu_fraction: float, progress=None) -> tuple[list[StepShape], list[TimedStep]]:
        """Time every shape; returns (the shapes, indexed by `TimedStep.shape_id`; all timed steps)."""
        shapes: list[StepShape] = []
        steps: list[TimedStep] = []
        kw = dict(repetitions=grid.repetitions, max_attempts=grid.repetitions * grid.max_attempts_factor,
                  min_cpu_fraction=min_cpu_fraction, warmup_attempts=grid.shape_warmup_attempts)
        self.warm_up()
        for shape in prefill:
            shapes.append(shape)
            steps += measure_shape(len(shapes) - 1, shape, self._attempt(shape, []), **kw)
            if progress is not None:
                progress.update(1)
        for group in groups:
            decode_ids = self.start_decodes(group, grid)
            for shape in group.shapes:
                shapes.append(shape)
                steps += measure_shape(len(shapes) - 1, shape, self._attempt(shape, decode_ids), **kw)
                if progress is not None:
                    progress.update(1)
            self.drain()
        return shapes, steps

    def warm_up(self) -> None:
        """A few untimed prefill and decode steps so lazy initialisation is not timed."""
        ids = [self.add_request(min(64, self.max_budget), max_tokens=4) for _ in range(4)]
        for _ in range(8):
            if not self.engine.has_unfinished_requests():
                break
            self.step(self.max_budget)
        self.abort(ids)
        self.drain()

    def start_decodes(self, group: DecodeGroup, grid: ShapeGrid) -> list[str]:
        """Prefill `group.num_decodes` requests of `group.decode_context` tokens; run the warm-up decodes."""
        max_tokens = self.cfg.max_model_len - group.decode_context
        ids = [self.add_request(group.decode_context, max_tokens=max_tokens) for _ in range(group.num_decodes)]
        for _ in range(100_000):
            if all(self.is_decoding(i) for i in ids):
                break
            self.step(self.max_budget)
        for _ in range(grid.warmup_steps):
            self.step(group.num_decodes)
        return ids


def vllm_version() -> str:
    import vllm

    return str(vllm.__version__)
