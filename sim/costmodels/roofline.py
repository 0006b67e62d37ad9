"""Analytic roofline step times from model and GPU specs, for hardware nobody has profiled yet.

Each operator of a step (QKV, O, gate/up and down projections, prefill and decode
attention, the LM head) takes max(FLOPs / achieved FLOP/s, bytes / achieved bandwidth);
a step adds them over layers, plus a fixed overhead and, under tensor parallelism, two
ring all-reduces per layer. Efficiencies and overheads are assumptions, not measurements;
docs/costmodels.md writes out every formula.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from sim.costmodels._fields import check_keys, get_mapping, get_number, get_str
from sim.costmodels.linear import capacity_kv_blocks, capacity_load_s, check_capacity_fields, check_provenance
from sim.costmodels.specs import GpuSpec, ModelSpec, spec_from_dict, spec_to_dict
from sim.errors import InputError

CLASS_PATH = "sim.costmodels.roofline.RooflineCostModel"


class RooflineCostModel:
    """Step time = overhead + layers * sum(max(compute, memory) per operator) + LM head + all-reduce.

    Invariant: efficiencies in (0, 1], overheads >= 0; the time is non-decreasing in every
    token and context count (for a fixed number of prefill chunks, batch_size - num_decodes).
    """

    def __init__(
        self,
        model: ModelSpec,
        gpu: GpuSpec,
        tp: int = 1,
        compute_efficiency: float = 0.6,
        memory_efficiency: float = 0.8,
        step_overhead_s: float = 2e-3,
        allreduce_latency_s: float = 1e-5,
        name: str | None = None,
        *,
        kv_blocks: int | None = None,
        block_size: int | None = None,
        gpu_memory_utilization: float = 0.9,
        load_s: float | None = None,
        provenance: dict | None = None,
    ) -> None:
        if not isinstance(model, ModelSpec):
            raise InputError("RooflineCostModel: model must be a ModelSpec", field="model", value=model)
        if not isinstance(gpu, GpuSpec):
            raise InputError("RooflineCostModel: gpu must be a GpuSpec", field="gpu", value=gpu)
        name = name or f"roofline-{model.name}-{gpu.name}-tp{tp}"
        owner = f"cost model {name!r}"
        for field, v, lo_open in (("compute_efficiency", compute_efficiency, True),
                                  ("memory_efficiency", memory_efficiency, True),
                                  ("step_overhead_s", step_overhead_s, False),
                                  ("allreduce_latency_s", allreduce_latency_s, False)):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ok = ok and ((0 < v <= 1) if lo_open else v >= 0)
            if not ok:
                raise InputError(f"{owner}: must be " + ("in (0, 1]" if lo_open else "a number >= 0"),
                                 field=field, value=v)
        check_capacity_fields(kv_blocks=kv_blocks, block_size=block_size, model=model, gpu=gpu, tp=tp,
                              gpu_memory_utilization=gpu_memory_utilization, load_s=load_s, owner=owner)
        self.name = name
        self.model = model
        self.gpu = gpu
        self.tp = tp
        self.compute_efficiency = float(compute_efficiency)
        self.memory_efficiency = float(memory_efficiency)
        self.step_overhead_s = float(step_overhead_s)
        self.allreduce_latency_s = float(allreduce_latency_s)
        self.kv_blocks = kv_blocks
        self.block_size = block_size
        self.gpu_memory_utilization = gpu_memory_utilization
        self.load_s = load_s
        self.provenance = check_provenance(provenance, model, gpu, owner)
        self._precompute()

    def _precompute(self) -> None:
        """Seconds per FLOP / per byte folded into per-token and per-step constants."""
        m, tp = self.model, self.tp
        s_flop = 1.0 / (self.gpu.peak_flops * self.compute_efficiency)
        s_byte = 1.0 / (self.gpu.mem_bw_bytes_s * self.memory_efficiency)
        w = m.dtype_bytes
        hd = m.head_dim
        q = m.num_heads_per_gpu(tp) * hd
        kv = m.num_kv_heads_per_gpu(tp) * hd
        inter = m.layer_linear_params(tp)["down"] // m.hidden_size
        h = m.hidden_size
        # (params, input width, output width) of each GEMM of a layer, on one GPU
        gemms = [(h * (q + 2 * kv), h, q + 2 * kv), (q * h, q, h), (2 * h * inter, h, 2 * inter), (inter * h, inter, h)]
        # per GEMM: (compute s per token, weight-read s per step, activation s per token)
        self._gemms = tuple((2.0 * p * s_flop, p * w * s_byte, (i + o) * w * s_byte) for p, i, o in gemms)
        # attention: compute s per (query x key) pair, s per KV token read, s per query (read Q, write O)
        self._attn_pair_s = 4.0 * q * s_flop
        self._attn_kv_s = 2.0 * kv * w * s_byte
        self._attn_q_s = 2.0 * q * w * s_byte
        vocab = -(-m.vocab_size // tp)
        self._lm_flop_s = 2.0 * vocab * h * s_flop
        self._lm_weight_s = vocab * h * w * s_byte
        self._lm_act_s = (h + vocab) * w * s_byte
        self._layers = float(m.num_layers)
        if tp > 1:
            self._ar_const_s = 2.0 * m.num_layers * self.allreduce_latency_s
            self._ar_token_s = 2.0 * m.num_layers * 2.0 * (tp - 1) / tp * h * w / self.gpu.interconnect_bw_bytes_s
        else:
            self._ar_const_s = 0.0
            self._ar_token_s = 0.0

    def _seconds(self, P, Cp, D, Cd, B, maximum):
        """The roofline formula; `maximum` is builtin max for scalars, np.maximum for arrays."""
        n = P + D
        layer = 0.0
        for flop_s, weight_s, act_s in self._gemms:
            layer = layer + maximum(flop_s * n, weight_s + act_s * n)
        # prefill chunks k = B - D, assumed equal: sum_i p_i * (c_i + (p_i + 1) / 2) = P*Cp/k + P*P/(2k) + P/2
        k = maximum(B - D, 1.0)
        pairs = P * Cp / k + P * P / (2.0 * k) + P / 2.0
        layer = layer + maximum(self._attn_pair_s * pairs, self._attn_kv_s * (Cp + P) + self._attn_q_s * P)
        dctx = Cd + D  # each decode attends to its context plus its own new token
        layer = layer + maximum(self._attn_pair_s * dctx, self._attn_kv_s * dctx + self._attn_q_s * D)
        # vLLM computes logits at one position per request in the batch
        lm = maximum(self._lm_flop_s * B, self._lm_weight_s + self._lm_act_s * B)
        return self.step_overhead_s + self._layers * layer + lm + (self._ar_const_s + self._ar_token_s * n)

    def step_time_s(self, num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size):
        # `_seconds` unrolled with plain floats for speed (it runs once per simulated step);
        # the same operations in the same order, so it equals `step_times_s` exactly.
        P = float(num_prefill_tokens)
        Cp = float(prefill_context)
        D = float(num_decodes)
        Cd = float(decode_context_sum)
        B = float(batch_size)
        (f0, w0, a0), (f1, w1, a1), (f2, w2, a2), (f3, w3, a3) = self._gemms
        n = P + D
        x, y = f0 * n, w0 + a0 * n
        layer = 0.0 + (x if x > y else y)
        x, y = f1 * n, w1 + a1 * n
        layer = layer + (x if x > y else y)
        x, y = f2 * n, w2 + a2 * n
        layer = layer + (x if x > y else y)
        x, y = f3 * n, w3 + a3 * n
        layer = layer + (x if x > y else y)
        k = B - D
        if not k > 1.0:
            k = 1.0
        pairs = P * Cp / k + P * P / (2.0 * k) + P / 2.0
        x, y = self._attn_pair_s * pairs, self._attn_kv_s * (Cp + P) + self._attn_q_s * P
        layer = layer + (x if x > y else y)
        dctx = Cd + D
        x, y = self._attn_pair_s * dctx, self._attn_kv_s * dctx + self._attn_q_s * D
        layer = layer + (x if x > y else y)
        x, y = self._lm_flop_s * B, self._lm_weight_s + self._lm_act_s * B
        lm = x if x > y else y
        return self.step_overhead_s + self._layers * layer + lm + (self._ar_const_s + self._ar_token_s * n)

    def step_times_s(self, num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size):
        P, Cp, D, Cd, B = np.broadcast_arrays(*(np.asarray(a, dtype=float) for a in (
            num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size)))
        return np.asarray(self._seconds(P, Cp, D, Cd, B, np.maximum), dtype=float)

    def num_kv_blocks(self, block_size: int) -> int | None:
        return capacity_kv_blocks(self, block_size)

    def model_load_s(self) -> float:
        return capacity_load_s(self)

    def to_dict(self) -> dict:
        return {
            "class": CLASS_PATH,
            "name": self.name,
            "model": spec_to_dict(self.model),
            "gpu": spec_to_dict(self.gpu),
            "tp": self.tp,
            "compute_efficiency": self.compute_efficiency,
            "memory_efficiency": self.memory_efficiency,
            "step_overhead_s": self.step_overhead_s,
            "allreduce_latency_s": self.allreduce_latency_s,
            "kv_blocks": self.kv_blocks,
            "block_size": self.block_size,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "load_s": self.load_s,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> RooflineCostModel:
        check_keys(d, {"class", "name", "model", "gpu", "tp", "compute_efficiency", "memory_efficiency",
                       "step_overhead_s", "allreduce_latency_s", "kv_blocks", "block_size",
                       "gpu_memory_utilization", "load_s", "provenance"}, "RooflineCostModel")
        if d.get("class", CLASS_PATH) != CLASS_PATH:
            raise InputError(f"expected class {CLASS_PATH}", field="class", value=d.get("class"))
        for key in ("model", "gpu"):
            if d.get(key) is None:
                raise InputError("missing required field", field=key)
        return cls(
            spec_from_dict(ModelSpec, d["model"], "model"),
            spec_from_dict(GpuSpec, d["gpu"], "gpu"),
            tp=get_number(d, "tp", default=1, integer=True),
            compute_efficiency=get_number(d, "compute_efficiency", default=0.6),
            memory_efficiency=get_number(d, "memory_efficiency", default=0.8),
            step_overhead_s=get_number(d, "step_overhead_s", default=2e-3),
            allreduce_latency_s=get_number(d, "allreduce_latency_s", default=1e-5),
            name=get_str(d, "name", default=None),
            kv_blocks=get_number(d, "kv_blocks", default=None, allow_none=True, integer=True),
            block_size=get_number(d, "block_size", default=None, allow_none=True, integer=True),
            gpu_memory_utilization=get_number(d, "gpu_memory_utilization", default=0.9),
            load_s=get_number(d, "load_s", default=None, allow_none=True),
            provenance=get_mapping(d, "provenance"),
        )

    def __repr__(self) -> str:
        return f"RooflineCostModel(name={self.name!r}, model={self.model.name!r}, gpu={self.gpu.name!r}, tp={self.tp})"
