"""What a cost model needs to know about the model and the GPU it runs on.

`ModelSpec` holds a decoder-only transformer's architecture (the numbers in its Hugging Face
`config.json`) and derives parameter counts, per-GPU weight bytes and KV bytes per token
under tensor parallelism. `GpuSpec` holds datasheet numbers. `kv_blocks_for` turns both
into the KV-cache capacity a vLLM-like engine would allocate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields

from sim.errors import InputError

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
"""Bytes per element of each supported weight / KV-cache dtype."""

GIB = 2**30

DEFAULT_ACTIVATION_RESERVE_BYTES = 2 * GIB
"""GPU memory kept back for activations, CUDA graphs and the CUDA context (an assumption;
vLLM measures it by a profiling run; about 1.5-2.5 GiB for a 7-8B model at 8k batched tokens)."""


def _check_positive_int(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(f"{owner}: must be a positive integer", field=name, value=value)


def _check_positive_float(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InputError(f"{owner}: must be a positive finite number", field=name, value=value)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A dense decoder-only transformer (Llama/Mistral/Qwen2 layout: GQA attention, SwiGLU MLP).

    Invariant: every size is a positive integer, `num_heads` is a multiple of `num_kv_heads`
    and `dtype` is one of `DTYPE_BYTES`.
    """

    name: str
    """Short name used in tables and file names (e.g. "llama3-8b")."""
    num_layers: int
    """Decoder layers (`num_hidden_layers`)."""
    hidden_size: int
    """Model width (`hidden_size`)."""
    num_heads: int
    """Query heads (`num_attention_heads`)."""
    num_kv_heads: int
    """Key/value heads (`num_key_value_heads`; fewer than `num_heads` under GQA)."""
    intermediate_size: int
    """MLP width (`intermediate_size`); the MLP has gate, up and down projections."""
    vocab_size: int
    """Vocabulary size (rows of the embedding and the LM head)."""
    max_model_len: int
    """Longest sequence (prompt + output) the model serves (`max_position_embeddings`)."""
    head_dim: int | None = None
    """Per-head width; None means `hidden_size // num_heads`."""
    dtype: str = "bfloat16"
    """Weights and KV-cache dtype: one of "bfloat16", "float16", "float32"."""
    tie_word_embeddings: bool = False
    """True when the LM head shares the embedding matrix (counted once)."""
    attention_bias: bool = False
    """True when the Q/K/V projections carry biases (Qwen2)."""
    hf_id: str | None = None
    """Hugging Face repository whose config.json the numbers come from."""

    def __post_init__(self) -> None:
        owner = f"ModelSpec {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise InputError("ModelSpec: name must be a non-empty string", field="name", value=self.name)
        for f in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size",
                  "vocab_size", "max_model_len"):
            _check_positive_int(owner, f, getattr(self, f))
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise InputError(f"{owner}: hidden_size is not a multiple of num_heads; give head_dim",
                                 field="head_dim", value=None)
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        _check_positive_int(owner, "head_dim", self.head_dim)
        if self.num_heads % self.num_kv_heads:
            raise InputError(f"{owner}: num_heads ({self.num_heads}) must be a multiple of num_kv_heads",
                             field="num_kv_heads", value=self.num_kv_heads)
        if self.dtype not in DTYPE_BYTES:
            raise InputError(f"{owner}: dtype must be one of {sorted(DTYPE_BYTES)}", field="dtype", value=self.dtype)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def check_tp(self, tp: int) -> None:
        """Raise InputError unless `tp` shards this model the way vLLM allows."""
        _check_positive_int(f"tensor parallelism for {self.name!r}", "tp", tp)
        if self.num_heads % tp:
            raise InputError(f"{self.name}: num_heads ({self.num_heads}) is not divisible by tp", field="tp", value=tp)
        if self.num_kv_heads % tp and tp % self.num_kv_heads:
            raise InputError(
                f"{self.name}: tp must divide num_kv_heads ({self.num_kv_heads}) or be a multiple of it",
                field="tp", value=tp)

    def num_heads_per_gpu(self, tp: int = 1) -> int:
        self.check_tp(tp)
        return self.num_heads // tp

    def num_kv_heads_per_gpu(self, tp: int = 1) -> int:
        """KV heads each GPU holds: they split across GPUs, and replicate once tp exceeds them."""
        self.check_tp(tp)
        return max(1, self.num_kv_heads // tp)

    def layer_linear_params(self, tp: int = 1) -> dict[str, int]:
        """Weights of one layer's matrix multiplies on one GPU: qkv, o, gate_up, down."""
        hd = self.head_dim
        q = self.num_heads_per_gpu(tp) * hd
        kv = self.num_kv_heads_per_gpu(tp) * hd
        inter = _ceil_div(self.intermediate_size, tp)
        return {
            "qkv": self.hidden_size * (q + 2 * kv),
            "o": q * self.hidden_size,
            "gate_up": 2 * self.hidden_size * inter,
            "down": inter * self.hidden_size,
        }

    def _params_per_gpu(self, tp: int) -> int:
        layer = sum(self.layer_linear_params(tp).values())
        layer += 2 * self.hidden_size  # the two RMSNorm weights, replicated
        if self.attention_bias:
            layer += (self.num_heads_per_gpu(tp) + 2 * self.num_kv_heads_per_gpu(tp)) * self.head_dim
        vocab = _ceil_div(self.vocab_size, tp)  # embedding and LM head are vocab-parallel
        embed = vocab * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + self.hidden_size  # + final norm

    def num_params(self) -> int:
        """Total parameters of the model (no tensor parallelism)."""
        return self._params_per_gpu(1)

    def weight_bytes(self, tp: int = 1) -> int:
        """Bytes of weights each GPU holds at tensor parallelism `tp`."""
        return self._params_per_gpu(tp) * self.dtype_bytes

    def kv_bytes_per_token(self, tp: int = 1) -> int:
        """KV-cache bytes one token occupies on each GPU (K and V, every layer)."""
        return 2 * self.num_layers * self.num_kv_heads_per_gpu(tp) * self.head_dim * self.dtype_bytes

    def linear_flops_per_token(self, tp: int = 1) -> int:
        """FLOPs of all matrix multiplies (layers + LM head) for one token on one GPU."""
        layer = sum(self.layer_linear_params(tp).values())
        return 2 * (self.num_layers * layer + _ceil_div(self.vocab_size, tp) * self.hidden_size)

    def attention_flops(self, num_query_tokens: float, num_context_tokens: float, tp: int = 1) -> float:
        """FLOPs of QK^T and PV when `num_query_tokens` queries each attend to `num_context_tokens` keys."""
        per_pair = 4.0 * self.num_layers * self.num_heads_per_gpu(tp) * self.head_dim
        return per_pair * num_query_tokens * num_context_tokens


@dataclass(frozen=True, kw_only=True)
class GpuSpec:
    """One accelerator's datasheet numbers. Invariant: every number is positive and finite."""

    name: str
    """Short name (e.g. "a100-80gb")."""
    peak_flops: float
    """Dense BF16 tensor-core FLOP/s (without structured sparsity)."""
    mem_bw_bytes_s: float
    """Device memory (HBM/GDDR) bandwidth in bytes/s."""
    mem_bytes: float
    """Device memory capacity in bytes."""
    interconnect_bw_bytes_s: float
    """GPU-to-GPU bandwidth per GPU and direction (NVLink, else PCIe), used for TP all-reduce."""
    host_load_bw_bytes_s: float = 3e9
    """Bandwidth at which weights reach the GPU when a model is loaded (assumed: a local NVMe
    SSD, ~3 GB/s, is the bottleneck, not PCIe)."""
    price_per_gpu_hour: float | None = None
    """On-demand list price of one GPU for one hour, USD (the fleet planner's cost; each
    conf/hardware file cites its source and date); None: unknown. Prices no step time."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InputError("GpuSpec: name must be a non-empty string", field="name", value=self.name)
        owner = f"GpuSpec {self.name!r}"
        for f in ("peak_flops", "mem_bw_bytes_s", "interconnect_bw_bytes_s", "host_load_bw_bytes_s"):
            _check_positive_float(owner, f, getattr(self, f))
        _check_positive_float(owner, "mem_bytes", self.mem_bytes)
        if self.price_per_gpu_hour is not None:
            _check_positive_float(owner, "price_per_gpu_hour", self.price_per_gpu_hour)


def kv_blocks_for(
    model: ModelSpec,
    gpu: GpuSpec,
    tp: int,
    block_size: int,
    gpu_memory_utilization: float = 0.9,
    activation_reserve_bytes: int = DEFAULT_ACTIVATION_RESERVE_BYTES,
) -> int:
    """KV blocks of `block_size` tokens per GPU: (memory * utilization - weights - reserve) // block bytes.

    vLLM allocates the same number of blocks on every GPU of a TP group, so this is also
    the replica's block count. Raises InputError when the weights do not fit.
    """
    _check_positive_int("kv_blocks_for", "block_size", block_size)
    if not 0 < gpu_memory_utilization <= 1:
        raise InputError("gpu_memory_utilization must be in (0, 1]", field="gpu_memory_utilization",
                         value=gpu_memory_utilization)
    if activation_reserve_bytes < 0:
        raise InputError("must be >= 0", field="activation_reserve_bytes", value=activation_reserve_bytes)
    budget = gpu.mem_bytes * gpu_memory_utilization
    weights = model.weight_bytes(tp)
    free = budget - weights - activation_reserve_bytes
    block_bytes = model.kv_bytes_per_token(tp) * block_size
    if free < block_bytes:
        raise InputError(
            f"{model.name} does not fit on {gpu.name} at tp={tp}: {gpu.mem_bytes / GIB:.1f} GiB x "
            f"utilization {gpu_memory_utilization} = {budget / GIB:.2f} GiB, weights take "
            f"{weights / GIB:.2f} GiB per GPU and the activation reserve {activation_reserve_bytes / GIB:.2f} GiB, "
            f"leaving {free / GIB:.2f} GiB for KV cache (one block of {block_size} tokens needs "
            f"{block_bytes / 2**20:.2f} MiB); raise tp or use a larger GPU",
            field="tp",
            value=tp,
        )
    return int(free // block_bytes)


def spec_from_dict(cls: type, value: object, field: str):
    """Build `cls` (ModelSpec or GpuSpec) from a mapping, or pass an instance through; InputError otherwise."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise InputError(f"expected a mapping of {cls.__name__} fields", field=field, value=value)
    known = {f.name for f in fields(cls)}
    extra = sorted(set(value) - known - {"_target_"})
    if extra:
        raise InputError(f"unknown {cls.__name__} field(s) {extra}; known: {sorted(known)}", field=field)
    missing = [f.name for f in fields(cls)
               if f.default is MISSING and f.default_factory is MISSING and f.name not in value]
    if missing:
        raise InputError(f"missing {cls.__name__} field(s) {missing}", field=field)
    kwargs = {k: v for k, v in value.items() if k != "_target_"}
    try:
        return cls(**kwargs)
    except InputError as e:
        raise InputError(e.problem, field=f"{field}.{e.field}" if e.field else field, value=e.value) from None


def spec_to_dict(spec) -> dict | None:
    """JSON-safe dict of a ModelSpec/GpuSpec (None passes through)."""
    return None if spec is None else asdict(spec)
