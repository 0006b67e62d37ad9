"""What every Hydra app shares: its entry point, the checks run before simulating, strict JSON.

`hydra_app(...)` is `hydra.main` plus one rule: bad input (an unknown group option, a
misspelt key, a missing value, an `InputError` from a loader or a check) prints one line
naming the problem on stderr and exits with status 2, where Hydra prints a stack trace or
several lines and exits 1. Set `HYDRA_FULL_ERROR=1` to see the full trace instead.
`check_config` and `check_workload` validate what the simulation apps read before any
simulation runs; `write_json` writes strict JSON (NaN and infinities as null).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sim.errors import InputError, explain
from sim.qos import QoS
from sim.workload import Workload
from sim.workload.options import positive_number, whole_number

log = logging.getLogger(__name__)

_one_line_errors = [False]  # True while `hydra_app`'s entry handles errors (HYDRA_FULL_ERROR set by it, not a user)

USER_ERRORS: tuple[type[BaseException], ...] = (InputError, HydraException, OmegaConfBaseException)
"""Exceptions that mean bad input (command line, config, files), not a bug: one line, exit 2."""


# ---------------------------------------------------------------- the entry point


def hydra_app(*, config_path: str, config_name: str, prog: str,
              version_base: str | None = "1.3") -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """Decorator: `hydra.main(config_path, config_name, version_base)` whose bad-input errors
    (`USER_ERRORS`, raised while Hydra composes the config or while the app runs) print
    `<prog>: <one line>` on stderr and exit with status 2. A run that fails this way leaves no
    output folder holding only Hydra's bookkeeping (`.hydra/`, the log). Other exceptions
    (bugs) keep Hydra's report and exit 1. With HYDRA_FULL_ERROR set, everything is raised."""

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @functools.wraps(task)
        def guarded(cfg: DictConfig) -> Any:
            try:
                return task(cfg)
            except USER_ERRORS as exc:
                if _one_line_errors[0]:
                    if HydraConfig.initialized():
                        remove_if_bookkeeping_only(Path(HydraConfig.get().runtime.output_dir))
                    # SystemExit passes Hydra's job runner, which would add a line of its own
                    print(f"{prog}: {explain(exc)}", file=sys.stderr)
                    raise SystemExit(2) from None
                raise

        hydra_main = hydra.main(config_path=config_path, config_name=config_name, version_base=version_base)(guarded)

        @functools.wraps(task)
        def entry() -> Any:
            if os.environ.get("HYDRA_FULL_ERROR"):  # the user asked for full traces
                return hydra_main()
            os.environ["HYDRA_FULL_ERROR"] = "1"  # let Hydra raise instead of printing and exiting 1
            _one_line_errors[0] = True
            try:
                return hydra_main()
            except USER_ERRORS as exc:
                print(f"{prog}: {explain(exc)}", file=sys.stderr)
                raise SystemExit(2) from None
            except BrokenPipeError:  # e.g. `--help | head`: the reader left; no traceback
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                raise SystemExit(1) from None
            finally:
                os.environ.pop("HYDRA_FULL_ERROR", None)
                _one_line_errors[0] = False

        return entry

    return decorate


def remove_if_bookkeeping_only(out_dir: Path) -> None:
    """Delete `out_dir` if it holds nothing but Hydra's bookkeeping (`.hydra/`, `*.log`), and
    then its parents below the working directory that are left empty (`outputs/<date>/`)."""
    if not (out_dir.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in out_dir.iterdir())):
        return
    shutil.rmtree(out_dir, ignore_errors=True)
    cwd, parent = Path.cwd().resolve(), out_dir.resolve().parent
    while cwd in parent.parents and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


# ---------------------------------------------------------------- checks before simulating


def check_config(cfg: DictConfig) -> None:
    """Validate a simulation config (run, capacity variant, surge) before anything runs.

    Raises InputError for: a value still missing (`???`, e.g. `workload.path`); a `seed` that
    is not a whole number >= 0; `sim.horizon_s` not a number > 0 or null; an SLO objective that
    is not a positive number of seconds; a policy whose constructor refuses its arguments
    (built once here, as each replica will)."""
    missing = sorted(str(k) for k in OmegaConf.missing_keys(cfg))
    if missing:
        raise InputError(f"missing value: set it on the command line ({missing[0]}=...)"
                         + (f"; also missing: {missing[1:]}" if missing[1:] else ""), field=missing[0])
    if "seed" in cfg:
        whole_number(cfg.seed, "seed", minimum=0)
    sim = cfg.get("sim") or {}
    if sim.get("horizon_s") is not None:
        positive_number(sim.get("horizon_s"), "sim.horizon_s")
    if cfg.get("slo") is not None:
        try:
            QoS.from_config(cfg.slo)
        except InputError as e:
            raise InputError(e.problem, field=f"slo.{e.field}" if e.field else "slo", value=e.value) from None
    if cfg.get("policy") is not None:
        check_policy(cfg.policy, "policy")


def workload_config(cfg: DictConfig) -> DictConfig:
    """`cfg.workload`, with `qos_shares: null` replaced by the slo tiers' own traffic shares
    when the tiers give them (conf/slo/niyama_tiers.yaml does), as the capacity app does."""
    node = cfg.workload
    shares = QoS.from_config(cfg.slo).shares() if cfg.get("slo") is not None else None
    if shares and "qos_shares" in node and node.qos_shares is None:
        node = node.copy()
        OmegaConf.set_struct(node, False)
        node.qos_shares = shares
    return node


def check_policy(node: DictConfig, where: str) -> None:
    """Build one policy from `node` (a `_partial_` factory): a constructor that refuses its
    arguments (a ValueError or TypeError, e.g. `chunk_size=0`) becomes an InputError naming `where`."""
    factory = instantiate(node)
    if not callable(factory):
        return  # the wiring reports a policy config without `_partial_`
    try:
        factory()
    except (TypeError, ValueError) as exc:
        args = {k: v for k, v in OmegaConf.to_container(node, resolve=False).items()
                if not str(k).startswith("_") and k != "slo"}
        raise InputError(f"{node.get('_target_', '?')} refused {args}: {exc}", field=where) from None


def check_workload(workload: Workload, cfg: DictConfig) -> list[str]:
    """Check a built workload against the config; returns warnings (already logged).

    Raises InputError when a request's QoS class has no objectives in `cfg.slo` (see
    `Workload.check_qos_classes`; an slo without classes accepts every class). Warns when
    `sim.horizon_s` comes before the first arrival (every request is then `not_arrived`) or
    before later arrivals (those are `not_arrived`, left out of SLO attainment)."""
    classes = (cfg.get("slo") or {}).get("classes") or {}
    if "*" not in classes:
        workload.check_qos_classes(set(map(str, classes)))
    warnings: list[str] = []
    horizon = (cfg.get("sim") or {}).get("horizon_s")
    arrival = workload.requests["arrival_s"].to_numpy()
    if horizon is not None and len(arrival):
        late = int((arrival > horizon).sum())
        if arrival[0] > horizon:
            warnings.append(f"sim.horizon_s={horizon:g} s is before the first arrival ({arrival[0]:g} s): no request "
                            f"arrives, all {late} are 'not_arrived' and nothing is measured")
        elif late:
            warnings.append(f"{late} of {len(arrival)} requests arrive after sim.horizon_s={horizon:g} s: outcome "
                            "'not_arrived', left out of SLO attainment")
    for w in warnings:
        log.warning("%s", w)
    return warnings


# ---------------------------------------------------------------- output


def json_ready(o: Any) -> Any:
    """`o` with numpy scalars as Python numbers, tuples as lists and NaN/infinities as None."""
    if isinstance(o, dict):
        return {str(k): json_ready(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_ready(v) for v in o]
    if hasattr(o, "item") and not isinstance(o, (str, bytes)):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as strict JSON (`json_ready`: NaN becomes null), indented."""
    path = Path(path)
    path.write_text(json.dumps(json_ready(obj), indent=2, allow_nan=False))
    return path
