"""One wiring from config to cluster (experiments.wiring): a replica's cost model and KV
capacity follow its model, hardware and tensor parallelism, stated once; mismatches are
errors naming the config key; every app builds clusters the same way."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from experiments.wiring import replica_specs, simulate_config
from sim.costmodels.roofline import RooflineCostModel
from sim.costmodels.specs import GpuSpec, ModelSpec, kv_blocks_for
from sim.errors import InputError
from sim.paths import PROJECT_ROOT

CONF = PROJECT_ROOT / "conf"


def cfg_with(*overrides: str, config: str = "config"):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config, overrides=list(overrides))


def spec(group: str, name: str, cls):
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{name}.yaml"))
    d.pop("_target_")
    return cls(**d)


LLAMA8B = spec("model", "llama3-8b", ModelSpec)
H200 = spec("hardware", "h200", GpuSpec)
A100 = spec("hardware", "a100-80gb", GpuSpec)


def test_cluster_tp_prices_the_replica_and_sizes_its_kv_cache():
    one = replica_specs(cfg_with("costmodel=roofline", "cluster.num_replicas=1"))[0]
    two = replica_specs(cfg_with("costmodel=roofline", "cluster.num_replicas=1", "cluster.tp=2"))[0]
    assert (one.tp, two.tp) == (1, 2) and two.cost_model.tp == 2
    # half the weights per GPU and half the KV heads per GPU: the capacity of vLLM's rule at tp=2
    assert two.resolve_kv_blocks() == kv_blocks_for(LLAMA8B, A100, 2, 16) > one.resolve_kv_blocks()
    # a weight-bound decode step streams half the bytes per GPU: tp=2 is faster
    t1 = one.cost_model.step_time_s(0, 0, 8, 8 * 1000, 8)
    t2 = two.cost_model.step_time_s(0, 0, 8, 8 * 1000, 8)
    assert t2 < t1


def test_a_tp_degree_the_model_cannot_be_sharded_by_is_an_error_naming_cluster_tp():
    with pytest.raises(InputError, match=r"cluster.tp.*3.*num_heads \(32\)"):
        replica_specs(cfg_with("costmodel=roofline", "cluster.tp=3"))


def test_a_cost_model_measured_at_another_tp_is_an_error_not_a_silent_mispricing():
    # the published Llama-3-8B/A100 coefficients were measured on one GPU
    with pytest.raises(InputError, match=r"cluster.tp.*obtained at tp=1"):
        replica_specs(cfg_with("cluster.tp=2"))
    # the cost model's own tp disagreeing with the cluster's: one place states it
    with pytest.raises(InputError, match=r"tp=2.*tp=1|cluster.tp"):
        replica_specs(cfg_with("costmodel=roofline", "costmodel.tp=2"))


def test_a_pool_on_other_hardware_gets_that_hardwares_cost_model_and_kv_capacity():
    specs = replica_specs(cfg_with("cluster=heterogeneous", "cluster.pools.1.hardware=h200"))
    a100, h200 = specs[0], specs[2]
    assert (a100.hardware, h200.hardware) == ("a100-80gb", "h200")
    assert isinstance(h200.cost_model, RooflineCostModel) and h200.cost_model.gpu.name == "h200"
    assert h200.resolve_kv_blocks() == kv_blocks_for(LLAMA8B, H200, 1, 16)
    assert a100.resolve_kv_blocks() == kv_blocks_for(LLAMA8B, A100, 1, 16)
    assert h200.cost_model.step_time_s(512, 0, 0, 0, 1) < a100.cost_model.step_time_s(512, 0, 0, 0, 1) * 1.5


def test_a_pool_without_a_cost_model_inherits_the_top_level_one_for_its_own_hardware():
    # the top-level (published A100) cost model on an H100 pool: an error naming the pool, not A100 prices
    with pytest.raises(InputError, match=r"cluster.pools\[1\].*a100-80gb.*h100-80gb"):
        replica_specs(cfg_with("cluster=heterogeneous", "cluster.pools.1.costmodel=null"))
    # with a hardware-generic top-level model (roofline) the pool is priced for its hardware
    specs = replica_specs(cfg_with("cluster=heterogeneous", "costmodel=roofline", "cluster.pools.0.costmodel=null"))
    assert specs[0].cost_model.gpu.name == "a100-80gb"


def test_top_level_hardware_other_than_the_measured_cost_models_is_an_error():
    with pytest.raises(InputError, match=r"costmodel.*a100-80gb.*h200"):
        replica_specs(cfg_with("hardware=h200"))


def test_a_profiled_cost_model_needs_the_model_it_was_measured_on():
    with pytest.raises(InputError, match=r"measured on model 'llama-cpu-small'.*model=llama-cpu-small"):
        replica_specs(cfg_with("costmodel=cpu_llama_small"))
    specs = replica_specs(cfg_with("costmodel=cpu_llama_small", "model=llama-cpu-small", "cluster.num_replicas=1"))
    assert specs[0].model_spec_name == "llama-cpu-small" and specs[0].resolve_kv_blocks() == 8192


def test_siloed_pools_run_the_top_level_policy_unless_a_pool_sets_its_own():
    specs = replica_specs(cfg_with("cluster=siloed", "router=siloed", "policy=edf"))
    assert [type(s.policy_factory()).__name__ for s in specs] == ["EDF"] * 4
    specs = replica_specs(cfg_with("cluster=siloed", "router=siloed", "+cluster.pools.0.policy=sarathi"))
    assert [type(s.policy_factory()).__name__ for s in specs] == ["Sarathi", "FCFS", "FCFS", "FCFS"]


def test_the_siloed_reproduction_keeps_its_per_pool_policies():
    from experiments.capacity import variant_configs

    cfg = cfg_with("+experiment=repro_siloed", config="capacity")
    variants = variant_configs(cfg)
    siloed = next(v for k, v in variants.items() if k.startswith("siloed_"))
    policies = {s.name.rstrip("0123456789"): type(s.policy_factory()).__name__ for s in replica_specs(siloed)}
    assert policies == {"interactive": "Sarathi", "batch": "FCFS"}
    shared = replica_specs(variants["shared"])
    assert {type(s.policy_factory()).__name__ for s in shared} == {"Niyama"}


@pytest.mark.parametrize("override,field", [
    ("cluster.num_replicas=abc", "cluster.num_replicas"),
    ("cluster.num_replicas=0", "cluster.num_replicas"),
    ("cluster.block_size=0", "block_size"),
    ("cluster.max_model_len=100000", "max_model_len"),
])
def test_bad_cluster_values_are_input_errors_naming_the_key(override, field):
    with pytest.raises(InputError, match=field):
        replica_specs(cfg_with(override))


def test_the_replica_table_names_model_hardware_and_tp():
    import pandas as pd

    cfg = cfg_with("costmodel=roofline", "cluster.tp=2", "cluster.num_replicas=2", "sim.progress=false")
    wl = pd.DataFrame({"arrival_s": [0.0, 0.1], "num_prompt_tokens": [100, 200], "num_output_tokens": [5, 5]})
    res = simulate_config(cfg, wl)
    assert res.replicas["model"].tolist() == ["llama3-8b"] * 2
    assert res.replicas["hardware"].tolist() == ["a100-80gb"] * 2
    assert res.replicas["tp"].tolist() == [2, 2]
    assert (res.requests["outcome"] == "finished").all()


def test_a_multi_model_cluster_starts_replicas_on_its_models_in_turn_and_catalogs_every_model():
    from experiments.wiring import catalog_specs

    cfg = cfg_with("cluster=multi_model", "costmodel=roofline", "cluster.num_replicas=4")
    specs = replica_specs(cfg)
    assert [s.model for s in specs] == ["llama3-8b", "mistral-7b", "qwen2.5-7b", "llama3-8b"]
    assert [s.cost_model.model.name for s in specs] == [s.model for s in specs]
    catalog = catalog_specs(cfg)
    assert sorted(catalog) == ["llama3-8b", "mistral-7b", "qwen2.5-7b"]
    # a swap pays the new model's weights over the hardware's load bandwidth (A100 conf: 3 GB/s from NVMe)
    llama = catalog["llama3-8b"].cost_model
    assert llama.model_load_s() == pytest.approx(LLAMA8B.weight_bytes(1) / A100.host_load_bw_bytes_s)
    # the published Llama-3-8B/A100 model cannot price the other two models
    with pytest.raises(InputError, match="mistral-7b|qwen2.5-7b"):
        replica_specs(cfg_with("cluster=multi_model"))


def test_the_multi_model_experiment_runs_with_its_controller_and_counts_its_swaps():
    cfg = cfg_with("+experiment=multi_model", "workload.num_requests=600", "sim.progress=false")
    from hydra.utils import instantiate

    wl = instantiate(cfg.workload).requests
    assert set(wl["model"]) == {"llama3-8b", "mistral-7b", "qwen2.5-7b"}
    res = simulate_config(cfg, wl)
    assert len(res.requests) == 600 and (res.requests["outcome"] == "finished").all()
    assert "num_model_swaps" in res.info and set(res.replicas["state"]) <= {"serving", "starting", "draining"}
    # demand is 50/30/20 but replicas start 3/3/2: the controller moves some towards llama3-8b
    assert res.info["num_model_swaps"] >= 1


def test_requests_go_to_replicas_of_the_model_they_name_and_an_unserved_model_is_an_error():
    """Found by a new user: a request naming a model was served by whatever model the cluster held
    unless `cluster.models` was set. Every replica now routes by the model it holds."""
    import pandas as pd

    def wl(*models):
        return pd.DataFrame({"arrival_s": [0.1 * k for k in range(len(models))], "num_prompt_tokens": 50,
                             "num_output_tokens": 5, "model": list(models), "qos_class": "interactive"})

    het = cfg_with("cluster=heterogeneous", "costmodel=roofline", "+cluster.pools.1.model=mistral-7b")
    specs = replica_specs(het)
    res = simulate_config(het, wl("mistral-7b", "llama3-8b", "", "mistral-7b"))
    held = dict(enumerate(s.model for s in specs))
    placed = dict(zip(res.requests["model"], res.requests["replica"]))
    assert held[placed["mistral-7b"]] == "mistral-7b" and held[placed["llama3-8b"]] == "llama3-8b"
    assert (res.requests["outcome"] == "finished").all()
    single = cfg_with()
    with pytest.raises(InputError, match="gpt-9.*unknown_model"):
        simulate_config(single, wl("llama3-8b", "gpt-9"))
    rejected = simulate_config(cfg_with("cluster.control={unknown_model: reject}"), wl("llama3-8b", "gpt-9"))
    assert rejected.requests["outcome"].tolist() == ["finished", "rejected"]
    anywhere = simulate_config(cfg_with("cluster.control={unknown_model: any}"), wl("llama3-8b", "gpt-9"))
    assert anywhere.requests["outcome"].tolist() == ["finished", "finished"]
    assert anywhere.info["num_model_cleared"] == 1
