"""Cost models: published coefficients, scalar/vector agreement, KV capacity, files and configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from sim.costmodel import CostModel
from sim.costmodels import (
    FEATURES,
    GpuSpec,
    LinearRegimesCostModel,
    ModelSpec,
    Regime,
    RooflineCostModel,
    feature_matrix,
    kv_blocks_for,
    load_cost_model,
    save_cost_model,
)
from sim.errors import InputError

CONF = Path(__file__).resolve().parent.parent / "conf"
GIB = 2**30


def load_conf(group: str, name: str):
    return OmegaConf.load(CONF / group / f"{name}.yaml")


def spec(group: str, name: str):
    return instantiate(load_conf(group, name))


def compose(costmodel: str, model: str = "llama3-8b", hardware: str = "a100-80gb", **overrides):
    """Build {model, hardware, costmodel} as Hydra would and instantiate the cost model."""
    cfg = OmegaConf.create({"model": load_conf("model", model), "hardware": load_conf("hardware", hardware),
                            "costmodel": load_conf("costmodel", costmodel), "cluster": {"tp": 1}})
    for k, v in overrides.items():
        cfg.costmodel[k] = v
    return instantiate(cfg.costmodel)


@pytest.fixture(scope="module")
def published():
    return compose("published_llama3_8b_a100")


@pytest.fixture(scope="module")
def llama8b():
    return spec("model", "llama3-8b")


@pytest.fixture(scope="module")
def a100():
    return spec("hardware", "a100-80gb")


# ---------------------------------------------------------------- published model

def published_by_hand(P, Cp, D, Cd):
    """POLICIES.md: t = c0 + a*N + b*P + c*D + d*Cd + e*Cp, regimes N <= 512 and N > 512."""
    N = P + D
    if N <= 512:
        return 0.014936 + 5.882475e-5 * N + 2.247956e-5 * P + 3.634519e-5 * D + 1.111258e-7 * Cd + 7.554773e-7 * Cp
    return 0.005004 + 2.719050e-5 * N + 6.863043e-5 * P - 4.143993e-5 * D + 1.663409e-7 * Cd + 2.727223e-6 * Cp


@pytest.mark.parametrize(
    "P, Cp, D, Cd, expected_regime",
    [
        (512, 0, 0, 0, 0),            # a full 512-token prefill: the last shape of the small regime
        (448, 1024, 64, 64 * 1024, 0),  # N = 512 exactly, mixed
        (449, 1024, 64, 64 * 1024, 1),  # N = 513: the large regime
        (0, 0, 64, 64 * 1024, 0),     # decode batch of 64 at 1k context
        (2048, 0, 0, 0, 1),           # a 2048-token prefill
    ],
)
def test_published_model_reproduces_the_formula(published, P, Cp, D, Cd, expected_regime):
    B = D + (1 if P else 0)
    assert published.step_time_s(P, Cp, D, Cd, B) == pytest.approx(published_by_hand(P, Cp, D, Cd), rel=1e-12)
    assert (P + D > 512) == bool(expected_regime)


def test_published_model_regime_boundary_values(published):
    # written out in full: at N = 512 the small regime applies, at 513 the large one
    at_512 = 0.014936 + 5.882475e-5 * 512 + 2.247956e-5 * 512
    at_513 = 0.005004 + 2.719050e-5 * 513 + 6.863043e-5 * 513
    assert published.step_time_s(512, 0, 0, 0, 1) == pytest.approx(at_512, rel=1e-12)
    assert published.step_time_s(513, 0, 0, 0, 1) == pytest.approx(at_513, rel=1e-12)
    assert at_512 == pytest.approx(0.0565645, abs=1e-6)
    vec = published.step_times_s([512, 513], 0, 0, 0, 1)  # the vectorised path splits at the same place
    assert vec[0] == pytest.approx(at_512, rel=1e-12) and vec[1] == pytest.approx(at_513, rel=1e-12)


def test_published_model_is_labelled_and_satisfies_protocol(published):
    assert isinstance(published, CostModel)
    assert "published" in published.name
    assert published.provenance["measured_by_slosim"] is False
    assert published.tp == 1 and published.model.name == "llama3-8b" and published.gpu.name == "a100-80gb"


def test_published_model_refuses_another_model_or_gpu():
    with pytest.raises(Exception, match="qwen2.5-7b"):
        compose("published_llama3_8b_a100", model="qwen2.5-7b")
    with pytest.raises(Exception, match="h100-80gb"):
        compose("published_llama3_8b_a100", hardware="h100-80gb")


# ---------------------------------------------------------------- scalar == vectorised

shapes = st.tuples(
    st.integers(0, 8192),      # prefill tokens
    st.integers(0, 131072),    # prefill context
    st.integers(0, 512),       # decodes
    st.integers(0, 4096),      # mean decode context
    st.integers(0, 8),         # prefill chunks
).map(lambda t: (t[0], t[1] if t[0] else 0, t[2], t[2] * t[3], t[2] + (max(t[4], 1) if t[0] else 0)))

coef = st.floats(-1e-3, 1e-3, allow_nan=False, allow_infinity=False)


@st.composite
def linear_models(draw):
    bounds = sorted(draw(st.sets(st.integers(1, 10000), max_size=3)))
    regimes = [Regime(b, {f: draw(coef) for f in FEATURES}) for b in bounds + [None]]
    return LinearRegimesCostModel(regimes, name="random", min_step_s=draw(st.sampled_from([1e-6, 1e-3])))


def assert_scalar_matches_vector(cm, batch):
    cols = [np.array(c, dtype=np.int64) for c in zip(*batch)]
    vec = cm.step_times_s(*cols)
    scalar = np.array([cm.step_time_s(*s) for s in batch])
    np.testing.assert_array_equal(vec, scalar)  # bit-for-bit, not approximately
    # the simulator may hand numpy integers to the scalar path
    assert cm.step_time_s(*(np.int64(v) for v in batch[0])) == scalar[0]


@settings(max_examples=60, deadline=None)
@given(st.lists(shapes, min_size=1, max_size=40), linear_models())
def test_linear_scalar_equals_vectorised(batch, random_model):
    assert_scalar_matches_vector(random_model, batch)


@settings(max_examples=60, deadline=None)
@given(st.lists(shapes, min_size=1, max_size=40))
def test_published_and_roofline_scalar_equal_vectorised(batch):
    for cm in _models_under_test():
        assert_scalar_matches_vector(cm, batch)


@settings(max_examples=60, deadline=None)
@given(linear_models(), st.integers(1, 600), st.lists(st.integers(0, 2_000_000), min_size=1, max_size=20))
def test_linear_decode_step_fn_equals_step_time_bit_for_bit(random_model, n, contexts):
    # fast-forward prices decode runs with it and must match step-by-step simulation exactly
    for cm in (random_model, _models_under_test()[0]):
        fn = cm.decode_step_time_fn(n)
        assert [fn(c) for c in contexts] == [cm.step_time_s(0, 0, n, c, n) for c in contexts]


def test_scalar_equals_vectorised_on_many_random_shapes():
    rng = np.random.default_rng(7)
    n = 3000
    P = rng.integers(0, 8192, n) * rng.integers(0, 2, n)
    Cp = rng.integers(0, 131072, n) * (P > 0)
    D = rng.integers(0, 512, n)
    Cd = D * rng.integers(0, 4096, n)
    B = D + (P > 0) * rng.integers(1, 9, n)
    for cm in _models_under_test():
        assert_scalar_matches_vector(cm, list(zip(P, Cp, D, Cd, B)))


_MODELS: list = []


def _models_under_test():
    if not _MODELS:
        _MODELS.append(compose("published_llama3_8b_a100"))
        _MODELS.append(compose("roofline"))
        _MODELS.append(compose("roofline", model="llama3-70b", hardware="h100-80gb", tp=4))
        _MODELS.append(compose("roofline", model="qwen2.5-7b", hardware="l40s", tp=2))
    return _MODELS


def test_vectorised_broadcasts_scalars(published):
    out = published.step_times_s(np.array([0, 512, 600]), 0, 1, 100, 1)
    assert out.shape == (3,)
    assert out[1] == published.step_time_s(512, 0, 1, 100, 1)


def test_features_agree_with_the_scalar_path():
    """Each named feature, alone with coefficient 1 (plus const 1), is what step_time_s computes."""
    shape = (300, 700, 40, 9000, 43)
    for name, f in FEATURES.items():
        cm = LinearRegimesCostModel([{"max_total_tokens": None, "coefficients": {"const": 1.0, name: 1.0}}], name=name)
        value = f(*(np.array([float(v)]) for v in shape))[0]
        assert cm.step_time_s(*shape) == pytest.approx(value if name == "const" else 1.0 + value)
    X = feature_matrix(*shape)
    assert X.shape == (len(FEATURES),) and X[list(FEATURES).index("prefill_tokens_x_context")] == 300 * 700


def test_step_time_is_clipped_at_min_step_s():
    cm = LinearRegimesCostModel([Regime(None, {"const": 0.01, "num_decodes": -1e-3})], name="neg", min_step_s=1e-4)
    assert cm.step_time_s(0, 0, 5, 0, 5) == pytest.approx(0.005)
    assert cm.step_time_s(0, 0, 50, 0, 50) == 1e-4
    assert cm.step_times_s([0], [0], [50], [0], [50])[0] == 1e-4


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize(
    "regimes, match",
    [
        ([{"max_total_tokens": 512, "coefficients": {"const": 1}},
          {"max_total_tokens": 256, "coefficients": {"const": 1}}], "increasing"),
        ([{"max_total_tokens": None, "coefficients": {"const": 1}},
          {"max_total_tokens": 256, "coefficients": {"const": 1}}], "only the last"),
        ([{"max_total_tokens": None, "coefficients": {"prefil_tokens": 1}}], "unknown feature"),
        ([{"max_total_tokens": None, "coefficients": {"const": float("nan")}}], "finite"),
        ([{"max_total_tokens": -5, "coefficients": {"const": 1}}], "positive"),
        ([], "non-empty"),
    ],
)
def test_bad_regimes_are_rejected(regimes, match):
    with pytest.raises(InputError, match=match):
        LinearRegimesCostModel(regimes, name="bad")


def test_regime_above_last_finite_bound_extrapolates():
    cm = LinearRegimesCostModel([Regime(100, {"const": 1.0}), Regime(200, {"const": 2.0})], name="x")
    assert [cm.step_time_s(n, 0, 0, 0, 1) for n in (100, 101, 200, 5000)] == [1.0, 2.0, 2.0, 2.0]


def test_model_spec_validation():
    base = dict(name="m", num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=2,
                intermediate_size=128, vocab_size=100, max_model_len=256)
    assert ModelSpec(**base).head_dim == 8
    with pytest.raises(InputError, match="num_kv_heads"):
        ModelSpec(**{**base, "num_kv_heads": 3})
    with pytest.raises(InputError, match="dtype"):
        ModelSpec(**{**base, "dtype": "int4"})
    with pytest.raises(InputError, match="num_layers"):
        ModelSpec(**{**base, "num_layers": 0})
    with pytest.raises(InputError, match="mem_bw_bytes_s"):
        GpuSpec(name="g", peak_flops=1e12, mem_bw_bytes_s=-1, mem_bytes=1e9, interconnect_bw_bytes_s=1e9)


def test_tp_must_shard_heads():
    qwen = spec("model", "qwen2.5-7b")  # 28 heads, 4 KV heads
    with pytest.raises(InputError, match="num_heads"):
        qwen.weight_bytes(8)
    assert qwen.num_kv_heads_per_gpu(4) == 1


# ---------------------------------------------------------------- specs and KV capacity

def test_llama3_8b_parameters_and_kv_bytes(llama8b):
    per_layer = 4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336 + 2 * 4096
    total = 32 * per_layer + 2 * 128256 * 4096 + 4096
    assert llama8b.num_params() == total == 8_030_261_248  # "8B"
    assert llama8b.kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2 == 128 * 1024
    assert llama8b.kv_bytes_per_token(tp=2) == 64 * 1024


def test_kv_heads_replicate_beyond_their_count():
    m70 = spec("model", "llama3-70b")  # 8 KV heads
    assert m70.kv_bytes_per_token(8) == 2 * 80 * 1 * 128 * 2
    assert m70.kv_bytes_per_token(16) == m70.kv_bytes_per_token(8)  # one replicated KV head per GPU
    assert m70.weight_bytes(2) < m70.weight_bytes(1) / 2 + 1e9


def test_kv_blocks_llama3_8b_on_a100_by_hand(llama8b, a100):
    weights = 8_030_261_248 * 2
    free = 80 * GIB * 0.9 - weights - 2 * GIB
    expected = int(free // (128 * 1024 * 16))
    assert kv_blocks_for(llama8b, a100, tp=1, block_size=16, gpu_memory_utilization=0.9) == expected == 28181
    cm = compose("published_llama3_8b_a100")
    assert cm.num_kv_blocks(16) == expected
    assert cm.num_kv_blocks(32) == int(free // (128 * 1024 * 32))


def test_llama3_70b_does_not_fit_one_a100(a100):
    m70 = spec("model", "llama3-70b")
    with pytest.raises(InputError, match=r"llama3-70b does not fit on a100-80gb at tp=1") as e:
        kv_blocks_for(m70, a100, tp=1, block_size=16)
    assert "131.4" in str(e.value)  # its weights, in GiB, named in the message
    assert kv_blocks_for(m70, a100, tp=2, block_size=16) > 0


def test_explicit_kv_blocks_convert_by_tokens():
    cm = LinearRegimesCostModel([Regime(None, {"const": 0.01})], name="x", kv_blocks=1000, block_size=16)
    assert cm.num_kv_blocks(16) == 1000 and cm.num_kv_blocks(32) == 500 and cm.num_kv_blocks(8) == 2000
    assert LinearRegimesCostModel([Regime(None, {"const": 0.01})], name="y").num_kv_blocks(16) is None
    with pytest.raises(InputError, match="go together"):
        LinearRegimesCostModel([Regime(None, {"const": 0.01})], name="z", kv_blocks=1000)


def test_model_load_time(published, llama8b):
    assert published.model_load_s() == pytest.approx(llama8b.weight_bytes() / 3e9)
    assert LinearRegimesCostModel([Regime(None, {"const": 0.01})], name="x").model_load_s() == 0.0
    assert LinearRegimesCostModel([Regime(None, {"const": 0.01})], name="x", load_s=120.0).model_load_s() == 120.0


# ---------------------------------------------------------------- roofline

@pytest.fixture(scope="module")
def roofline():
    return compose("roofline")


def test_roofline_is_monotone_in_tokens_and_context(roofline):
    assert isinstance(roofline, RooflineCostModel)
    grid = np.arange(0, 8193, 64)
    for t in (
        roofline.step_times_s(grid, 0, 0, 0, 1),                 # prefill tokens
        roofline.step_times_s(512, grid * 16, 0, 0, 1),           # prefill context
        roofline.step_times_s(0, 0, 64, grid * 64, 64),           # decode context
        roofline.step_times_s(256, 1000, grid // 16, grid * 64, grid // 16 + 1),  # decodes (batch grows with them)
    ):
        assert np.all(np.diff(t) >= 0)
    assert roofline.step_time_s(0, 0, 64, 64 * 2048, 64) > roofline.step_time_s(0, 0, 64, 64 * 1024, 64)


def test_roofline_decode_cannot_beat_reading_the_weights(roofline, llama8b, a100):
    weight_read_s = llama8b.weight_bytes() / a100.mem_bw_bytes_s
    assert roofline.step_time_s(0, 0, 1, 100, 1) > weight_read_s


def test_roofline_tensor_parallel_is_faster_but_pays_allreduce():
    tp1 = compose("roofline", model="llama3-70b", hardware="h100-80gb", tp=1)
    tp4 = compose("roofline", model="llama3-70b", hardware="h100-80gb", tp=4)
    shape = (2048, 0, 0, 0, 1)
    assert tp4.step_time_s(*shape) < tp1.step_time_s(*shape)
    assert tp4.step_time_s(*shape) > tp1.step_time_s(*shape) / 4  # all-reduce and overhead do not shard


@pytest.mark.parametrize(
    "shape",
    [(0, 0, 64, 64 * 1024, 64), (512, 0, 0, 0, 1), (2048, 0, 0, 0, 1)],
    ids=["decode64x1k", "prefill512", "prefill2048"],
)
def test_roofline_is_within_3x_of_the_published_a100_model(roofline, published, shape):
    """A sanity band, not a fit: docs/costmodels.md reports the actual ratios."""
    ratio = roofline.step_time_s(*shape) / published.step_time_s(*shape)
    assert 1 / 3 < ratio < 3


# ---------------------------------------------------------------- dicts and files

def _round_trip_models(published, roofline):
    explicit = LinearRegimesCostModel(
        [Regime(256, {"const": 0.01, "prefill_tokens_sq": 1e-9}), Regime(None, {"const": 0.02, "batch_size": 1e-4})],
        name="explicit", kv_blocks=4000, block_size=16, load_s=30.0, tp=2, provenance={"note": "hand-made"})
    return [published, roofline, explicit]


SAMPLE = [(0, 0, 64, 65536, 64), (512, 0, 0, 0, 1), (300, 2000, 100, 200000, 103), (4000, 0, 10, 900, 12)]


def assert_same_predictions(a, b):
    cols = [np.array(c) for c in zip(*SAMPLE)]
    np.testing.assert_array_equal(a.step_times_s(*cols), b.step_times_s(*cols))
    assert [a.step_time_s(*s) for s in SAMPLE] == [b.step_time_s(*s) for s in SAMPLE]
    assert a.num_kv_blocks(16) == b.num_kv_blocks(16)
    assert a.model_load_s() == b.model_load_s()
    assert a.name == b.name and a.provenance == b.provenance


def test_to_dict_from_dict_round_trip(published, roofline):
    for cm in _round_trip_models(published, roofline):
        d = json.loads(json.dumps(cm.to_dict(), allow_nan=False))  # JSON-safe
        assert d["class"].startswith("sim.costmodels.")
        assert_same_predictions(cm, type(cm).from_dict(d))


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_save_load_round_trip(tmp_path, published, roofline, suffix):
    for i, cm in enumerate(_round_trip_models(published, roofline)):
        path = save_cost_model(cm, tmp_path / f"cm{i}{suffix}")
        assert_same_predictions(cm, load_cost_model(path))


def test_load_applies_overrides(tmp_path, published):
    path = save_cost_model(published, tmp_path / "p.json")
    assert load_cost_model(path, kv_blocks=100, block_size=16).num_kv_blocks(16) == 100


def test_file_config_instantiates(tmp_path, published):
    path = save_cost_model(published, tmp_path / "p.json")
    cfg = load_conf("costmodel", "file")
    cfg.path = str(path)
    assert_same_predictions(published, instantiate(cfg))


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_file_errors_name_the_problem(tmp_path, published):
    with pytest.raises(InputError, match="not found"):
        load_cost_model(tmp_path / "missing.json")

    bad = _write(tmp_path, "bad.json", '{\n  "class": "sim.costmodels.linear.LinearRegimesCostModel",\n  "name": ,\n}')
    with pytest.raises(InputError, match=r"bad\.json:3: invalid JSON"):
        load_cost_model(bad)

    bad_yaml = _write(tmp_path, "bad.yaml", "class: x\nname: [unclosed\n")
    with pytest.raises(InputError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_cost_model(bad_yaml)

    d = published.to_dict()
    for cls, match in [("builtins.dict", "under sim.costmodels"), ("os.system", "under sim.costmodels"),
                       ("sim.costmodels.linear.NoSuchModel", "unknown cost model class")]:
        p = _write(tmp_path, "cls.json", json.dumps({**d, "class": cls}))
        with pytest.raises(InputError, match=match):
            load_cost_model(p)

    no_class = {k: v for k, v in d.items() if k != "class"}
    with pytest.raises(InputError, match="'class'"):
        load_cost_model(_write(tmp_path, "nc.json", json.dumps(no_class)))

    no_regimes = {k: v for k, v in d.items() if k != "regimes"}
    with pytest.raises(InputError, match=r"nr\.json: field 'regimes'"):
        load_cost_model(_write(tmp_path, "nr.json", json.dumps(no_regimes)))

    with pytest.raises(InputError, match=r"field 'tp' = 'two'"):
        load_cost_model(_write(tmp_path, "tp.json", json.dumps({**d, "tp": "two"})))

    with pytest.raises(InputError, match="unknown field"):
        load_cost_model(_write(tmp_path, "typo.json", json.dumps({**d, "kv_block": 5})))

    bad_model = {**d, "model": {**d["model"], "num_kv_heads": 5}}
    with pytest.raises(InputError, match=r"field 'model.num_kv_heads' = 5"):
        load_cost_model(_write(tmp_path, "m.json", json.dumps(bad_model)))

    with pytest.raises(InputError, match="end in .json"):
        save_cost_model(published, tmp_path / "x.pkl")


# ---------------------------------------------------------------- every shipped config

OWNED_COSTMODELS = sorted(p.stem for p in (CONF / "costmodel").glob("*.yaml")
                          if not p.stem.startswith(("cpu_", "fitted")) and p.stem != "file")


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_model_configs_instantiate(name):
    m = spec("model", name)
    assert isinstance(m, ModelSpec) and m.name == name
    if name == "llama-cpu-small":
        # the CPU profile's toy model: 4 x (qkv 786,432 + o 262,144 + gate_up 1,441,792 + down
        # 720,896 + norms 1,024) + embeddings and LM head 2 x 32,000 x 512 + final norm 512
        assert m.num_params() == 4 * (786_432 + 262_144 + 1_441_792 + 720_896 + 1_024) + 2 * 32_000 * 512 + 512
    else:
        assert 5e9 < m.num_params() < 1e11


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "hardware").glob("*.yaml")))
def test_hardware_configs_instantiate(name):
    g = spec("hardware", name)
    assert isinstance(g, GpuSpec) and g.name == name
    assert isinstance(g.peak_flops, float) and g.peak_flops > 1e14 and g.mem_bytes >= 24 * GIB


@pytest.mark.parametrize("name", OWNED_COSTMODELS)
def test_costmodel_configs_compose_with_model_and_hardware(name):
    cm = compose(name)
    assert isinstance(cm, CostModel)
    assert cm.step_time_s(128, 0, 8, 8000, 9) > 0
    assert cm.num_kv_blocks(16) > 0 and cm.model_load_s() > 0


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
@pytest.mark.parametrize("hardware", sorted(p.stem for p in (CONF / "hardware").glob("*.yaml")))
def test_roofline_composes_with_every_model_and_hardware(model, hardware):
    cm = compose("roofline", model=model, hardware=hardware)
    assert cm.step_time_s(512, 0, 0, 0, 1) > cm.step_time_s(0, 0, 1, 512, 1)
