"""Step shapes: what one engine step computes, and the grid of shapes a profile measures.

A shape is the simulator's view of a step (see `sim.costmodel.CostModel`): prefill chunks
(tokens, tokens already in KV), decoding requests (one token each, with their context), and
their counts. A `ShapeGrid` expands into the pure-prefill, pure-decode and mixed shapes that
`profiler.run` measures, grouped by the decode batch each needs set up first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields

from sim.errors import InputError

STEP_KINDS = ("prefill", "decode", "mixed")
"""Every step is one of these: only prefill chunks, only decodes, or decodes plus prefill chunks."""


@dataclass(frozen=True)
class StepShape:
    """One step's composition. Invariant: at least one token; chunk sizes >= 1; contexts >= 0."""

    prefill_chunks: tuple[tuple[int, int], ...] = ()
    """(tokens computed, tokens already in KV) for each prefill chunk in the step."""
    num_decodes: int = 0
    """Requests that compute exactly one token this step."""
    decode_context: int = 0
    """Tokens in KV of each decoding request when its decode batch was set up (drifts +1 per step)."""

    def __post_init__(self) -> None:
        chunks = tuple((int(n), int(c)) for n, c in self.prefill_chunks)
        object.__setattr__(self, "prefill_chunks", chunks)
        if any(n < 1 or c < 0 for n, c in chunks):
            raise ValueError(f"StepShape: chunk sizes must be >= 1 and contexts >= 0, got {chunks}")
        if self.num_decodes < 0 or self.decode_context < 0:
            raise ValueError(f"StepShape: negative decode count/context: {self.num_decodes}, {self.decode_context}")
        if not chunks and self.num_decodes == 0:
            raise ValueError("StepShape: a step computes at least one token")
        if self.num_decodes and self.decode_context < 1:
            raise ValueError("StepShape: a decoding request has at least one token in KV")

    @property
    def kind(self) -> str:
        if not self.prefill_chunks:
            return "decode"
        return "mixed" if self.num_decodes else "prefill"

    @property
    def num_prefill_tokens(self) -> int:
        return sum(n for n, _ in self.prefill_chunks)

    @property
    def prefill_context(self) -> int:
        return sum(c for _, c in self.prefill_chunks)

    @property
    def batch_size(self) -> int:
        return len(self.prefill_chunks) + self.num_decodes

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decodes

    def label(self) -> str:
        chunks = "+".join(f"{n}@{c}" for n, c in self.prefill_chunks) or "-"
        return f"{self.kind}[p={chunks} d={self.num_decodes}x{self.decode_context}]"


@dataclass(frozen=True)
class DecodeGroup:
    """Shapes that share one decode batch: `num_decodes` requests prefilled to `decode_context` tokens."""

    num_decodes: int
    decode_context: int
    shapes: tuple[StepShape, ...]


def _ints(owner: str, name: str, values: object, *, minimum: int) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InputError(f"{owner}: must be a list of integers", field=name, value=values)
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise InputError(f"{owner}: every entry must be an integer >= {minimum}", field=name, value=v)
        out.append(v)
    return tuple(sorted(set(out)))


@dataclass(frozen=True)
class ShapeGrid:
    """Which shapes to measure. Invariant: all sizes positive; contexts non-negative.

    Shapes whose tokens exceed the engine's token budget, whose sequences exceed the model
    length, or whose decode batch would hold more than `max_decode_kv_tokens` are skipped
    when the grid is expanded for an engine (see `expand`).
    """

    name: str
    """Label recorded in the profile metadata (e.g. "full", "quick")."""
    prefill_chunk_sizes: Sequence[int]
    """Chunk sizes of pure-prefill steps without prior context (first chunks)."""
    prefill_contexts: Sequence[int]
    """Prior contexts (tokens already in KV) for later chunks of a chunked prefill."""
    prefill_context_chunk_sizes: Sequence[int]
    """Chunk sizes measured at each non-zero prefill context."""
    multi_prefill: Sequence[Sequence[int]]
    """(number of chunks, tokens per chunk) pairs: several first chunks in one step."""
    decode_batch_sizes: Sequence[int]
    """Decoding requests per step."""
    decode_contexts: Sequence[int]
    """Tokens in KV of each decoding request."""
    mixed_chunk_sizes: Sequence[int]
    """Prefill chunk sizes added to each decode batch for mixed steps."""
    mixed_prefill_contexts: Sequence[int] = (0,)
    """Prior contexts of the prefill chunk in mixed steps."""
    mixed_batch_sizes: Sequence[int] | None = None
    """Decode batch sizes that also get mixed steps (None = all of `decode_batch_sizes`)."""
    max_decode_kv_tokens: int = 65536
    """Skip decode batches holding more tokens than this (setting them up costs prefill time)."""
    repetitions: int = 7
    """Accepted timed steps per shape (the median and p90 are over these)."""
    warmup_steps: int = 2
    """Untimed steps before each decode batch's timed steps."""
    max_attempts_factor: int = 3
    """At most this many times `repetitions` attempts per shape before giving up on clean steps."""
    shape_warmup_attempts: int = 1
    """Untimed steps of each shape before its timed ones (the first step of a new shape is slower)."""

    def __post_init__(self) -> None:
        owner = f"grid {self.name!r}"
        for name, minimum in (("prefill_chunk_sizes", 1), ("prefill_contexts", 0), ("prefill_context_chunk_sizes", 1),
                              ("decode_batch_sizes", 1), ("decode_contexts", 1), ("mixed_chunk_sizes", 1),
                              ("mixed_prefill_contexts", 0)):
            object.__setattr__(self, name, _ints(owner, name, getattr(self, name), minimum=minimum))
        if self.mixed_batch_sizes is not None:
            object.__setattr__(self, "mixed_batch_sizes",
                               _ints(owner, "mixed_batch_sizes", self.mixed_batch_sizes, minimum=1))
        pairs = []
        for p in self.multi_prefill:
            if (isinstance(p, (str, bytes)) or len(p) != 2
                    or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in p)):
                raise InputError(f"{owner}: entries are [num_chunks, chunk_tokens] positive integers",
                                 field="multi_prefill", value=p)
            pairs.append((int(p[0]), int(p[1])))
        object.__setattr__(self, "multi_prefill", tuple(pairs))
        for name, minimum in (("max_decode_kv_tokens", 1), ("repetitions", 1), ("max_attempts_factor", 1),
                              ("warmup_steps", 0), ("shape_warmup_attempts", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise InputError(f"{owner}: must be an integer >= {minimum}", field=name, value=v)

    @classmethod
    def from_dict(cls, d: Mapping) -> ShapeGrid:
        """From a config mapping; unknown keys are an error (a typo must not pass silently)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"grid: unknown field(s) {unknown}; known: {sorted(known)}", field=unknown[0])
        if "name" not in d:
            raise InputError("grid: missing required field", field="name")
        return cls(**d)

    def expand(self, *, max_tokens: int, max_seqs: int,
               max_model_len: int) -> tuple[list[StepShape], list[DecodeGroup]]:
        """(pure-prefill shapes, decode groups with their decode and mixed shapes) that fit the engine limits."""
        prefill: list[StepShape] = []
        for n in self.prefill_chunk_sizes:
            if n <= max_tokens and n < max_model_len:
                prefill.append(StepShape(((n, 0),)))
        for ctx in self.prefill_contexts:
            if ctx == 0:
                continue
            for n in self.prefill_context_chunk_sizes:
                if n <= max_tokens and ctx + n < max_model_len:
                    prefill.append(StepShape(((n, ctx),)))
        for k, n in self.multi_prefill:
            if k * n <= max_tokens and k <= max_seqs and n < max_model_len:
                prefill.append(StepShape(((n, 0),) * k))
        groups: list[DecodeGroup] = []
        mixed_bs = self.decode_batch_sizes if self.mixed_batch_sizes is None else self.mixed_batch_sizes
        for ctx in self.decode_contexts:
            for b in self.decode_batch_sizes:
                if b * ctx > self.max_decode_kv_tokens or b > max_seqs or b > max_tokens:
                    continue
                shapes = [StepShape((), b, ctx)]
                if b in mixed_bs and b + 1 <= max_seqs:
                    for pctx in self.mixed_prefill_contexts:
                        for n in self.mixed_chunk_sizes:
                            if b + n <= max_tokens and pctx + n < max_model_len:
                                shapes.append(StepShape(((n, pctx),), b, ctx))
                if ctx + 1 + self.group_steps_bound(shapes, max_tokens) >= max_model_len:
                    continue  # the decodes would reach the model length before the group is done
                groups.append(DecodeGroup(b, ctx, tuple(shapes)))
        return prefill, groups

    def group_steps_bound(self, shapes: Sequence[StepShape], max_tokens: int) -> int:
        """Most steps a decode group runs after set-up (each adds one token to every decode)."""
        attempts = self.shape_warmup_attempts + self.repetitions * self.max_attempts_factor
        steps = self.warmup_steps
        for s in shapes:
            setup = sum(-(-ctx // max(1, max_tokens - s.num_decodes)) for _, ctx in s.prefill_chunks)
            steps += attempts * (1 + setup)
        return steps

def count_steps(prefill: Sequence[StepShape], groups: Sequence[DecodeGroup], repetitions: int) -> int:
    """Timed steps the grid asks for (for the progress bar)."""
    return repetitions * (len(prefill) + sum(len(g.shapes) for g in groups))
