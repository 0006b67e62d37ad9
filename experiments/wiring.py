"""One wiring from a composed config to a simulated cluster, shared by every app.

`replica_specs(cfg)` turns `cfg.cluster` (a homogeneous `num_replicas`, or `pools`) into
`ReplicaSpec`s; `catalog_specs(cfg)` the configurations a controller may start (every model of
`cluster.models`); `simulate_config(cfg, requests)` builds the router and the controller
(`cfg.controller`, if any) and runs `sim.simulate` with the `cfg.sim` options and
`cluster.control` settings. `experiments.run`, `capacity`, `reproduce` and `validate` all
call these, so a cluster means the same thing in every app.

A replica's configuration is stated in one place, the cluster (or its pool): the model it
loads (`model`, a `conf/model` option; default the top-level `model`), its hardware
(`hardware`, a `conf/hardware` option; default the top-level `hardware`), its tensor
parallelism (`tp`; default `cluster.tp`), engine limits, and optionally its own batch
`policy` and `costmodel` (a `conf/costmodel` option name or a full config). The cost model
is built *for* that model, hardware and parallelism: the top-level `model`, `hardware` and
`cluster.tp` are replaced by the pool's while the cost-model config is resolved, so a
roofline prices the pool's GPU, and a cost model measured for another GPU, model or TP
degree (its provenance says so) is an `InputError` rather than a silent mispricing. The KV
capacity follows the same cost model unless `num_kv_blocks` is given.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sim.cluster import ReplicaSpec, SimResult, simulate
from sim.controlplane import ControlSettings
from sim.costmodels.specs import ModelSpec, spec_from_dict
from sim.errors import InputError
from sim.paths import project_path
from sim.scheduling import EngineLimits

ENGINE_FIELDS = ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "enable_chunked_prefill")
"""Cluster keys that become `EngineLimits` (named as vLLM's engine arguments)."""

POOL_KEYS = frozenset({"name", "count", "model", "model_name", "hardware", "tp", "policy", "costmodel",
                       "num_kv_blocks", "block_size", *ENGINE_FIELDS})
"""Keys a pool entry may set (the rest of the cluster's keys are shared by every pool)."""


def _option(group: str, value: Any, where: str) -> dict:
    """A config group option as a plain mapping: a name (loaded from `conf/<group>/<name>.yaml`,
    unresolved) or a mapping given inline."""
    if isinstance(value, str):
        path = project_path(f"conf/{group}/{value}.yaml")
        if not path.is_file():
            known = sorted(p.stem for p in project_path(f"conf/{group}").glob("*.yaml"))
            raise InputError(f"unknown {group} option; known: {known}", field=where, value=value)
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        node.pop("defaults", None)
        return node
    if isinstance(value, dict):
        return value
    raise InputError(f"must be a conf/{group} option name or a mapping", field=where, value=value)


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError("must be an integer >= 1", field=where, value=value)
    return value


def _check_cost_model(cm: Any, model: str, hardware: str, tp: int, where: str) -> None:
    """InputError when the built cost model states another model, GPU or TP degree than the replica."""
    spec = getattr(cm, "model", None)
    if isinstance(spec, ModelSpec) and spec.name != model:
        raise InputError(f"the cost model {getattr(cm, 'name', '?')!r} is for model {spec.name!r}, the replica "
                         f"loads {model!r}", field=f"{where}.model", value=model)
    gpu = getattr(cm, "gpu", None)
    if gpu is not None and getattr(gpu, "name", hardware) != hardware:
        raise InputError(f"the cost model {getattr(cm, 'name', '?')!r} is for hardware {gpu.name!r}, the replica "
                         f"runs on {hardware!r}", field=f"{where}.hardware", value=hardware)
    cm_tp = getattr(cm, "tp", None)
    if cm_tp is not None and cm_tp != tp:
        raise InputError(f"the cost model {getattr(cm, 'name', '?')!r} prices tp={cm_tp} but the replica has "
                         f"tp={tp}; state the parallelism once, in cluster.tp (or the pool's tp)",
                         field=f"{where}.tp", value=tp)
    prov = getattr(cm, "provenance", None) or {}
    measured_on = prov.get("engine_model") if isinstance(prov, dict) else None
    if isinstance(measured_on, str) and model and measured_on != model:
        raise InputError(f"the step times of cost model {getattr(cm, 'name', '?')!r} were measured on model "
                         f"{measured_on!r}, the replica loads {model!r}; select model={measured_on}",
                         field=f"{where}.model", value=model)
    prov_tp = prov.get("tp") if isinstance(prov, dict) else None
    if prov_tp is not None and int(prov_tp) != tp:
        raise InputError(f"the step times of cost model {getattr(cm, 'name', '?')!r} were obtained at "
                         f"tp={prov_tp}; at tp={tp} use a cost model for that degree (e.g. costmodel=roofline)",
                         field=f"{where}.tp", value=tp)


def _instantiate(node: DictConfig, where: str):
    """`hydra.utils.instantiate`, with the InputError behind Hydra's wrapper re-raised naming `where`."""
    try:
        return instantiate(node)
    except InstantiationException as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, InputError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        field = f"{where}.{cause.field}" if cause.field else where
        raise InputError(cause.problem, path=cause.path, line=cause.line, field=field, value=cause.value) from None


def _pools(cfg: DictConfig) -> tuple[list[dict], list[str], bool]:
    """The cluster's pools as plain mappings, where each is in the config, and whether `pools` was given."""
    cl = OmegaConf.to_container(cfg.cluster, resolve=False)
    raw_pools = cl.get("pools")
    if raw_pools is not None and not isinstance(raw_pools, list):
        raise InputError("must be a list of pools or null", field="cluster.pools", value=raw_pools)
    if raw_pools:
        return raw_pools, [f"cluster.pools[{i}]" for i in range(len(raw_pools))], True
    return [{"name": "", "count": cfg.cluster.get("num_replicas")}], ["cluster"], False


def _models(cfg: DictConfig) -> list[str]:
    """`cluster.models`: the models replicas may load (a multi-model cluster), or []."""
    models = cfg.cluster.get("models")
    if models is None:
        return []
    models = OmegaConf.to_container(models, resolve=True) if not isinstance(models, list) else models
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise InputError("must be a non-empty list of conf/model option names, or null", field="cluster.models",
                         value=models)
    return models


def _template(cfg: DictConfig, pool: dict, w: str, pooled: bool) -> ReplicaSpec:
    """One replica of `pool` (name and routing model left to the caller)."""
    if not isinstance(pool, dict):
        raise InputError("a pool is a mapping of cluster keys", field=w, value=pool)
    unknown = sorted(set(pool) - POOL_KEYS)
    if unknown:
        raise InputError(f"unknown pool key(s) {unknown}; known: {sorted(POOL_KEYS)}", field=w)
    sub = cfg.copy()
    OmegaConf.set_struct(sub, False)
    # The pool's model, hardware and tp stand in for the top-level ones while its cost
    # model, KV capacity and limits resolve (interpolations such as ${model} follow).
    if pool.get("model") is not None:
        sub.model = _option("model", pool["model"], f"{w}.model")
    if pool.get("hardware") is not None:
        sub.hardware = _option("hardware", pool["hardware"], f"{w}.hardware")
    for key in ("tp", *ENGINE_FIELDS, "num_kv_blocks", "block_size"):
        if key in pool and pool[key] is not None:
            sub.cluster[key] = pool[key]
    if pool.get("costmodel") is not None:
        sub.costmodel = _option("costmodel", pool["costmodel"], f"{w}.costmodel")
    if pool.get("policy") is not None:
        sub.policy = _option("policy", pool["policy"], f"{w}.policy")
    # the key to name in errors: the pool's (where a fix goes), or the top-level group without pools
    src = {k: f"{w}.{k}" if pooled else k for k in ("costmodel", "policy", "model")}
    tp = _positive_int(sub.cluster.get("tp", 1), f"{w}.tp")
    model_cfg = OmegaConf.to_container(sub.model, resolve=True) if sub.get("model") else None
    model_spec = spec_from_dict(ModelSpec, model_cfg, src["model"]) if model_cfg else None
    model_name = model_spec.name if model_spec else ""
    if model_spec is not None:
        try:
            model_spec.check_tp(tp)
        except InputError as e:
            raise InputError(e.problem, field=f"{w}.tp", value=tp) from None
    hw_cfg = OmegaConf.to_container(sub.hardware, resolve=True) if sub.get("hardware") else {}
    hardware = str(hw_cfg.get("name", "")) if isinstance(hw_cfg, dict) else ""
    if sub.get("costmodel") is None:
        raise InputError("no cost model: select one (costmodel=...) or give the pool a costmodel",
                         field=f"{w}.costmodel")
    cost_model = _instantiate(sub.costmodel, src["costmodel"])
    _check_cost_model(cost_model, model_name, hardware, tp, w)
    prov = getattr(cost_model, "provenance", None) or {}
    if getattr(cost_model, "gpu", None) is None and isinstance(prov.get("hardware"), str):
        hardware = prov["hardware"]  # a measured (e.g. CPU) profile: report where it was measured
    policy_factory = _instantiate(sub.policy, src["policy"])
    if not callable(policy_factory):
        raise InputError("policy config must build a factory (set `_partial_: true`)", field=src["policy"])
    scl = OmegaConf.to_container(sub.cluster, resolve=True)
    limits = EngineLimits(**{k: scl[k] for k in ENGINE_FIELDS})
    if model_spec is not None and limits.max_model_len > model_spec.max_model_len:
        raise InputError(f"longer than {model_name}'s max_model_len ({model_spec.max_model_len})",
                         field=f"{w}.max_model_len", value=limits.max_model_len)
    kv = scl.get("num_kv_blocks")
    return ReplicaSpec(
        cost_model=cost_model, policy_factory=policy_factory, limits=limits,
        num_kv_blocks=None if kv is None else _positive_int(kv, f"{w}.num_kv_blocks"),
        block_size=_positive_int(scl.get("block_size", 16), f"{w}.block_size"),
        model=str(pool.get("model_name") or ""), model_spec_name=model_name, hardware=hardware, tp=tp,
    )


def replica_specs(cfg: DictConfig) -> list[ReplicaSpec]:
    """ReplicaSpecs from `cfg.cluster`: `num_replicas` identical replicas, or `pools` (each entry
    overrides the cluster's keys; see the module docstring). Replicas are named
    `<pool name><index>` (`replica<index>` without pools), which `policies.siloed` relies on.
    With `cluster.models` (a multi-model cluster), a pool that names no model starts its
    replicas on those models in turn. Every replica serves (routes by) the model it holds;
    requests naming no model go to any replica.

    Raises InputError naming the config key for a bad count, an unknown model / hardware /
    cost-model option, a TP degree the model cannot be sharded by, or a cost model that was
    made for another model, GPU or TP degree than the replica it would price."""
    pools, where, pooled = _pools(cfg)
    models = _models(cfg)
    specs: list[ReplicaSpec] = []
    for pool, w in zip(pools, where):
        count = _positive_int(pool.get("count") if isinstance(pool, dict) else None,
                              f"{w}.count" if pooled else "cluster.num_replicas")
        if models and pool.get("model") is None:
            templates = [_template(cfg, {**pool, "model": m}, w, pooled) for m in models]
        else:
            templates = [_template(cfg, pool, w, pooled)]
        for k in range(count):
            t = templates[k % len(templates)]
            # a replica serves (routes by) the model it holds: a request naming another model is an
            # error, or rejected / served anywhere as cluster.control.unknown_model says
            routes = t.model or t.model_spec_name or ""
            specs.append(replace(t, name=f"{pool.get('name') or 'replica'}{len(specs)}", model=routes))
    return specs


def catalog_specs(cfg: DictConfig) -> dict[str, ReplicaSpec]:
    """The configurations a controller may start or swap to: every model of `cluster.models`
    on every pool's hardware and tp, named by the model (`<model>@<hardware>-tp<tp>` when the
    pools differ in hardware or tp). Empty without `cluster.models`."""
    models = _models(cfg)
    if not models:
        return {}
    pools, where, pooled = _pools(cfg)
    out: dict[str, ReplicaSpec] = {}
    templates = [_template(cfg, {**p, "model": m, "count": 1}, w, pooled) for p, w in zip(pools, where)
                 for m in models]
    distinct = {(t.hardware, t.tp) for t in templates}
    for t in templates:
        key = t.model_spec_name if len(distinct) == 1 else f"{t.model_spec_name}@{t.hardware}-tp{t.tp}"
        out.setdefault(key, replace(t, name=key, model=t.model_spec_name))
    return out


def control_settings(cfg: DictConfig) -> ControlSettings:
    """`cluster.control` (the cluster mechanism's settings) as ControlSettings."""
    node = cfg.cluster.get("control")
    if node is None:
        return ControlSettings()
    node = OmegaConf.to_container(node, resolve=True)
    known = set(ControlSettings.__dataclass_fields__)
    unknown = sorted(set(node) - known)
    if unknown:
        raise InputError(f"unknown key(s) {unknown}; known: {sorted(known)}", field="cluster.control")
    return ControlSettings(**node)


def simulate_config(cfg: DictConfig, requests, *, replicas: list[ReplicaSpec] | None = None,
                    progress: bool | None = None, controller=None, catalog: dict | None = None) -> SimResult:
    """Simulate `requests` (a workload table) on the cluster, router and `sim` options of `cfg`.
    `replicas` reuses specs already built from `cfg`; `progress` overrides `cfg.sim.progress`;
    `controller` is a controller object used instead of building `cfg.controller` (so the caller
    can read its counters after the run); `catalog` (configuration name -> ReplicaSpec) is used
    instead of `catalog_specs(cfg)` (a controller's own configurations, e.g. OServe's)."""
    sim_cfg = cfg.sim
    if controller is None and cfg.get("controller") is not None:
        controller = _instantiate(cfg.controller, "controller")
    return simulate(
        requests, replica_specs(cfg) if replicas is None else replicas, instantiate(cfg.router),
        horizon_s=sim_cfg.horizon_s, fast_forward=sim_cfg.fast_forward,
        check_plans=sim_cfg.get("check_plans", False),
        progress=bool(sim_cfg.get("progress", False)) if progress is None else progress,
        controller=controller, catalog=(catalog_specs(cfg) or None) if catalog is None else catalog,
        control=control_settings(cfg),
    )
