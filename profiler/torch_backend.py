"""The `torch` backend: a Llama-architecture decoder in plain torch, timed on the shape grid.

Built from a Hugging Face `config.json` with random weights: token embedding, per layer
RMSNorm -> fused QKV projection -> rotary embedding -> attention over a KV cache (new keys
and values written into it) -> output projection, RMSNorm -> SwiGLU MLP, then a final norm
and the LM head on each sequence's last token and a greedy pick. One step = one forward pass
for the step's prefill chunks and decodes, timed with CUDA events on a GPU or the wall
clock on a CPU. Under tensor parallelism the weights are the per-GPU shards (heads and MLP
columns split `tp` ways); the two all-reduces per layer are run for real when this process
is one rank of a `torch.distributed` group of `tp` ranks (launch with `torchrun`), else
their cost is added from a latency + bandwidth model and the rows say `allreduce=modelled`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from profiler.measure import TimedStep, measure_shape, observed_numbers
from profiler.shapes import DecodeGroup, ShapeGrid, StepShape

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TorchBackendConfig:
    """How the plain-torch decoder runs. Invariant: tp >= 1 divides the heads; positive costs."""

    device: str = "auto"
    """"cpu", "cuda", "cuda:N" or "auto" (CUDA when available)."""
    dtype: str = "float32"
    """Weights, activations and KV cache dtype."""
    tp: int = 1
    """Tensor-parallel degree: the shapes of one GPU's shard are timed."""
    num_threads: int = 1
    """torch intra-op threads on CPU."""
    allreduce_latency_s: float = 1.0e-5
    """Modelled latency of one all-reduce (used when the all-reduce cannot be measured)."""
    allreduce_bw_bytes_s: float = 1.5e11
    """Modelled bus bandwidth of one all-reduce, bytes/s (ring: 2(tp-1)/tp of the message crosses it)."""
    seed: int = 0
    """Seed of the random weights and tokens."""

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"TorchBackendConfig.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if isinstance(self.tp, bool) or not isinstance(self.tp, int) or self.tp < 1:
            raise ValueError(f"TorchBackendConfig.tp must be a positive integer, got {self.tp!r}")
        if self.allreduce_latency_s < 0 or self.allreduce_bw_bytes_s <= 0:
            raise ValueError("TorchBackendConfig: allreduce_latency_s >= 0 and allreduce_bw_bytes_s > 0 required")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("torch backend: device 'cuda' asked for but CUDA is not available")
    return d


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    var = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(var + eps)).to(x.dtype) * w


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of x [tokens, heads, head_dim] at integer positions pos [tokens]."""
    half = x.shape[-1] // 2
    inv = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    ang = pos.to(torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos()[:, None, :].to(x.dtype), ang.sin()[:, None, :].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class TorchLlama:
    """One GPU's shard of a Llama decoder with random weights. Invariant: tp divides the query heads."""

    def __init__(self, model_cfg: dict, cfg: TorchBackendConfig) -> None:
        self.device = resolve_device(cfg.device)
        self.dtype = _DTYPES[cfg.dtype]
        self.tp = cfg.tp
        h, inter = model_cfg["hidden_size"], model_cfg["intermediate_size"]
        nq, nkv, hd = model_cfg["num_attention_heads"], model_cfg["num_key_value_heads"], model_cfg["head_dim"]
        if nq % cfg.tp or inter % cfg.tp:
            raise ValueError(f"tp={cfg.tp} must divide num_attention_heads={nq} and intermediate_size={inter}")
        self.h, self.hd = h, hd
        self.nq = nq // cfg.tp
        self.nkv = max(1, nkv // cfg.tp)  # KV heads are replicated when tp exceeds them
        self.inter = inter // cfg.tp
        self.vocab = model_cfg["vocab_size"]
        self.vocab_local = -(-self.vocab // cfg.tp)
        self.num_layers = model_cfg["num_hidden_layers"]
        self.eps = float(model_cfg.get("rms_norm_eps", 1e-5))
        self.theta = float(model_cfg.get("rope_theta", 10000.0))
        g = torch.Generator(device="cpu").manual_seed(cfg.seed)

        def w(*shape):
            return (torch.randn(*shape, generator=g) * 0.02).to(device=self.device, dtype=self.dtype)

        self.embed = w(self.vocab_local, h)
        self.layers = [
            {
                "ln1": torch.ones(h, device=self.device, dtype=self.dtype),
                "wqkv": w(h, (self.nq + 2 * self.nkv) * hd),
                "wo": w(self.nq * hd, h),
                "ln2": torch.ones(h, device=self.device, dtype=self.dtype),
                "wgu": w(h, 2 * self.inter),
                "wdown": w(self.inter, h),
            }
            for _ in range(self.num_layers)
        ]
        self.norm = torch.ones(h, device=self.device, dtype=self.dtype)
        self.lm_head = w(h, self.vocab_local)
        self.dist = None
        if cfg.tp > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() == cfg.tp:
                self.dist = torch.distributed
        self.allreduce = "none" if cfg.tp == 1 else ("measured" if self.dist is not None else "modelled")
        self.allreduce_latency_s = cfg.allreduce_latency_s
        self.allreduce_bw = cfg.allreduce_bw_bytes_s

    def modelled_allreduce_s(self, num_tokens: int) -> float:
        """Modelled seconds of one step's all-reduces; 0 unless modelled.

        One after the embedding and two per layer, each over [tokens, hidden].
        """
        if self.allreduce != "modelled":
            return 0.0
        nbytes = num_tokens * self.h * torch.tensor([], dtype=self.dtype).element_size()
        one = self.allreduce_latency_s + 2 * (self.tp - 1) / self.tp * nbytes / self.allreduce_bw
        return (2 * self.num_layers + 1) * one

    def kv_cache(self, batch: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (K, V) caches of `batch` sequences x `length` positions, random (the context 'already in KV')."""
        shape = (batch, self.nkv, length, self.hd)
        return [(torch.randn(shape, device=self.device, dtype=self.dtype),
                 torch.randn(shape, device=self.device, dtype=self.dtype)) for _ in range(self.num_layers)]

    @torch.inference_mode()
    def forward(self, chunks: list[tuple[int, int, list]], decodes: tuple[int, list] | None,
                tokens: torch.Tensor | None = None) -> torch.Tensor:
        """One step; returns the LM-head logits of each sequence's last token (this GPU's vocabulary shard).

        chunks: (tokens, context, per-layer (K, V) caches of shape [1, kv_heads, >= context+tokens, head_dim]);
        decodes: (context of every decoding request, per-layer caches [batch, kv_heads, > context, head_dim]).
        `tokens` are the input ids in that order (random when None).
        """
        pos, seq_last = [], []
        for n, ctx, _ in chunks:
            pos.append(torch.arange(ctx, ctx + n, device=self.device))
            seq_last.append(sum(len(p) for p in pos) - 1)
        num_dec = 0
        if decodes is not None:
            dctx, dcache = decodes
            num_dec = dcache[0][0].shape[0]
            pos.append(torch.full((num_dec,), dctx, device=self.device))
        positions = torch.cat(pos)
        num_prefill = positions.numel() - num_dec
        seq_last += list(range(num_prefill, num_prefill + num_dec))
        if tokens is None:
            tokens = torch.randint(0, self.vocab_local, (positions.numel(),), device=self.device)
        x = F.embedding(tokens, self.embed)
        x = self._allreduce(x)
        for li, layer in enumerate(self.layers):
            hs = _rms_norm(x, layer["ln1"], self.eps)
            qkv = hs @ layer["wqkv"]
            q, k, v = qkv.split([self.nq * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
            q = _rope(q.view(-1, self.nq, self.hd), positions, self.theta)
            k = _rope(k.view(-1, self.nkv, self.hd), positions, self.theta)
            v = v.view(-1, self.nkv, self.hd)
            outs, start = [], 0
            for n, ctx, cache in chunks:
                kc, vc = cache[li]
                kc[0, :, ctx:ctx + n] = k[start:start + n].transpose(0, 1)
                vc[0, :, ctx:ctx + n] = v[start:start + n].transpose(0, 1)
                qi = q[start:start + n].transpose(0, 1).unsqueeze(0)
                if ctx == 0:
                    o = F.scaled_dot_product_attention(qi, kc[:, :, :n], vc[:, :, :n], is_causal=True, enable_gqa=True)
                else:
                    keys = torch.arange(ctx + n, device=self.device)
                    mask = keys[None, :] <= (ctx + torch.arange(n, device=self.device))[:, None]
                    o = F.scaled_dot_product_attention(qi, kc[:, :, :ctx + n], vc[:, :, :ctx + n], attn_mask=mask,
                                                       enable_gqa=True)
                outs.append(o[0].transpose(0, 1).reshape(n, -1))
                start += n
            if decodes is not None:
                kc, vc = dcache[li]
                kc[:, :, dctx] = k[start:]
                vc[:, :, dctx] = v[start:]
                qd = q[start:].unsqueeze(2)  # [batch, heads, 1, head_dim]
                o = F.scaled_dot_product_attention(qd, kc[:, :, :dctx + 1], vc[:, :, :dctx + 1], enable_gqa=True)
                outs.append(o.reshape(num_dec, -1))
            attn = torch.cat(outs)
            x = x + self._allreduce(attn @ layer["wo"])
            hs = _rms_norm(x, layer["ln2"], self.eps)
            gate, up = (hs @ layer["wgu"]).chunk(2, dim=-1)
            x = x + self._allreduce((F.silu(gate) * up) @ layer["wdown"])
        last = _rms_norm(x[torch.tensor(seq_last, device=self.device)], self.norm, self.eps)
        return last @ self.lm_head

    def _allreduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.dist is not None:
            self.dist.all_reduce(t)
        return t


def init_tensor_parallel(cfg: TorchBackendConfig) -> TorchBackendConfig:
    """Under `torchrun` with WORLD_SIZE == tp, join the process group (NCCL on CUDA, gloo on CPU).

    On CUDA each rank takes the GPU of its LOCAL_RANK.
    """
    if cfg.tp == 1 or int(os.environ.get("WORLD_SIZE", "1")) != cfg.tp:
        return cfg
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        cfg = dataclasses.replace(cfg, device=f"cuda:{local}")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return cfg


def is_reporting_rank() -> bool:
    """True unless this process is a non-zero rank of a process group (only rank 0 writes the profile)."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0


class TorchStepTimer:
    """Times `TorchLlama` steps for each shape of the grid (the composition is what we build, by construction).

    Under tensor parallelism every rank runs the same steps in lockstep (the all-reduces
    synchronise them); the contention filter is then off so all ranks attempt equally often.
    """

    def __init__(self, model_cfg: dict, cfg: TorchBackendConfig) -> None:
        cfg = init_tensor_parallel(cfg)
        if cfg.num_threads >= 1 and resolve_device(cfg.device).type == "cpu":
            torch.set_num_threads(cfg.num_threads)
        self.cfg = cfg
        self.model = TorchLlama(model_cfg, cfg)
        self.device = self.model.device

    def _time(self, fn) -> tuple[float, float]:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            wall = start.elapsed_time(end) / 1e3
            return wall, wall  # no CPU-time contention test on a GPU
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        return time.perf_counter() - t0, time.process_time() - c0

    def _attempt(self, shape: StepShape, dec) -> Callable[[], tuple[float, float, dict, bool]]:
        caches = [self.model.kv_cache(1, ctx + n) for n, ctx in shape.prefill_chunks]
        chunks = [(n, ctx, c) for (n, ctx), c in zip(shape.prefill_chunks, caches)]
        numbers = observed_numbers(shape.prefill_chunks, [shape.decode_context] * shape.num_decodes)
        extra_s = self.model.modelled_allreduce_s(shape.num_tokens)

        def attempt():
            wall, cpu = self._time(lambda: self.model.forward(chunks, dec).argmax(dim=-1))
            return wall + extra_s, cpu + extra_s, numbers, True

        return attempt

    def measure(self, prefill: list[StepShape], groups: list[DecodeGroup], grid: ShapeGrid, *,
                min_cpu_fraction: float, progress=None) -> tuple[list[StepShape], list[TimedStep]]:
        shapes: list[StepShape] = []
        steps: list[TimedStep] = []
        if self.model.allreduce == "measured":
            min_cpu_fraction = 0.0
        kw = dict(repetitions=grid.repetitions, max_attempts=grid.repetitions * grid.max_attempts_factor,
                  min_cpu_fraction=min_cpu_fraction, warmup_attempts=grid.shape_warmup_attempts)
        for shape in prefill:
            shapes.append(shape)
            steps += measure_shape(len(shapes) - 1, shape, self._attempt(shape, None), **kw)
            if progress is not None:
                progress.update(1)
        for group in groups:
            # one slot past the context for the token each decode writes
            dec = (group.decode_context, self.model.kv_cache(group.num_decodes, group.decode_context + 1))
            for _ in range(grid.warmup_steps):
                self.model.forward([], dec)
            for shape in group.shapes:
                shapes.append(shape)
                steps += measure_shape(len(shapes) - 1, shape, self._attempt(shape, dec), **kw)
                if progress is not None:
                    progress.update(1)
            del dec
        return shapes, steps


def torch_version() -> str:
    return str(torch.__version__)


def bytes_per_element(dtype: str) -> int:
    return torch.tensor([], dtype=_DTYPES[dtype]).element_size()

