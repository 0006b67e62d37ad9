"""Cost-model implementations: model/GPU specs, linear regimes, roofline, and cost-model files.

`sim.costmodel.CostModel` is the protocol; everything here satisfies it and round-trips
through `save_cost_model` / `load_cost_model` (JSON or YAML, never pickle).
"""

from sim.costmodels.files import load_cost_model, save_cost_model
from sim.costmodels.linear import FEATURE_ORDER, FEATURES, LinearRegimesCostModel, Regime, feature_matrix
from sim.costmodels.roofline import RooflineCostModel
from sim.costmodels.specs import DTYPE_BYTES, GpuSpec, ModelSpec, kv_blocks_for

__all__ = [
    "DTYPE_BYTES",
    "FEATURES",
    "FEATURE_ORDER",
    "GpuSpec",
    "LinearRegimesCostModel",
    "ModelSpec",
    "Regime",
    "RooflineCostModel",
    "feature_matrix",
    "kv_blocks_for",
    "load_cost_model",
    "save_cost_model",
]
