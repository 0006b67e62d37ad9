"""A non-parametric fitted cost model: linear regimes corrected by a boosted tree ensemble.

`step_time = base(shape) * exp(sum over trees of learning_rate * tree(features))`, where
`base` is a `LinearRegimesCostModel` (so shapes beyond the measured grid still extrapolate
physically) and the trees, fitted by `profiler.fit` with scikit-learn gradient boosting on
log(measured / base), correct what the straight lines miss. Trees are stored as plain
arrays (feature, threshold, children, leaf value) and evaluated with numpy only: loading or
predicting never needs scikit-learn or pickle.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from sim.costmodels._fields import check_keys, get_mapping, get_number, get_str
from sim.costmodels.linear import FEATURES, LinearRegimesCostModel
from sim.errors import InputError

CLASS_PATH = "sim.costmodels.fitted.TreeEnsembleCostModel"

TREE_FEATURES = {
    **FEATURES,
    "mean_decode_context": lambda P, Cp, D, Cd, B: Cd / np.maximum(D, 1.0),
    "num_prefill_chunks": lambda P, Cp, D, Cd, B: B - D,
}
"""Inputs a tree may split on: the linear features plus per-request averages trees cannot form themselves."""


def tree_feature_matrix(num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size,
                        names) -> np.ndarray:
    """Design matrix of the named `TREE_FEATURES`, one column per name."""
    shape = np.broadcast_arrays(*(np.asarray(a, dtype=float) for a in (
        num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size)))
    return np.stack([np.broadcast_to(TREE_FEATURES[n](*shape), shape[0].shape) for n in names], axis=-1)
_TREE_KEYS = ("feature", "threshold", "left", "right", "value")


class Tree:
    """One regression tree as arrays. Invariant: node 0 is the root; a leaf has left = right = -1;
    an inner node's children have larger indices than the node (so walking always terminates)."""

    def __init__(self, feature, threshold, left, right, value) -> None:
        self.feature = np.asarray(feature, dtype=np.int64)
        self.threshold = np.asarray(threshold, dtype=np.float64)
        self.left = np.asarray(left, dtype=np.int64)
        self.right = np.asarray(right, dtype=np.int64)
        self.value = np.asarray(value, dtype=np.float64)
        n = self.feature.size
        if n == 0 or any(a.shape != (n,) for a in (self.threshold, self.left, self.right, self.value)):
            raise InputError("tree arrays must be non-empty and of equal length", field="trees")
        leaf = self.left < 0
        if not np.array_equal(leaf, self.right < 0):
            raise InputError("a node has exactly one child", field="trees")
        inner = ~leaf
        idx = np.arange(n)
        if (np.any(self.left[inner] <= idx[inner]) or np.any(self.right[inner] <= idx[inner])
                or np.any(self.left[inner] >= n) or np.any(self.right[inner] >= n)):
            raise InputError("child indices must point forward inside the tree", field="trees")
        if not (np.all(np.isfinite(self.value)) and np.all(np.isfinite(self.threshold[inner]))):
            raise InputError("tree values and thresholds must be finite", field="trees")
        self.depth = self._depth()

    def _depth(self) -> int:
        depth = np.zeros(self.feature.size, dtype=np.int64)
        for i in range(self.feature.size):
            if self.left[i] >= 0:
                depth[self.left[i]] = depth[self.right[i]] = depth[i] + 1
        return int(depth.max())

    def leaf_index(self, X32: np.ndarray) -> np.ndarray:
        """Leaf reached by each row of X32 (features as float32, compared as scikit-learn does)."""
        node = np.zeros(X32.shape[0], dtype=np.int64)
        rows = np.arange(X32.shape[0])
        for _ in range(self.depth):
            f = self.feature[node]
            inner = self.left[node] >= 0
            x = X32[rows, np.where(inner, f, 0)]
            node = np.where(inner, np.where(x <= self.threshold[node], self.left[node], self.right[node]), node)
        return node

    def to_dict(self) -> dict:
        return {"feature": self.feature.tolist(), "threshold": [float(t) for t in self.threshold],
                "left": self.left.tolist(), "right": self.right.tolist(), "value": [float(v) for v in self.value]}

    @classmethod
    def from_dict(cls, d: Mapping) -> Tree:
        check_keys(d, set(_TREE_KEYS), "tree")
        missing = [k for k in _TREE_KEYS if k not in d]
        if missing:
            raise InputError("missing required field", field=f"trees.{missing[0]}")
        return cls(*(d[k] for k in _TREE_KEYS))


class TreeEnsembleCostModel:
    """Linear-regime base times a multiplicative tree correction.

    Invariant: the trees only use indices into `feature_names`, which are names of
    `TREE_FEATURES`; every step takes at least `min_step_s`.
    """

    def __init__(
        self,
        *,
        name: str,
        base: LinearRegimesCostModel | Mapping,
        trees: Sequence[Tree | Mapping],
        feature_names: Sequence[str],
        learning_rate: float,
        kv_blocks: int | None = None,
        block_size: int | None = None,
        load_s: float | None = None,
        min_step_s: float = 1e-6,
        provenance: Mapping | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise InputError("TreeEnsembleCostModel: name must be a non-empty string", field="name", value=name)
        owner = f"cost model {name!r}"
        self.base = base if isinstance(base, LinearRegimesCostModel) else LinearRegimesCostModel.from_dict(
            {"name": f"{name}-base", **dict(base)})
        names = list(feature_names)
        unknown = [f for f in names if f not in TREE_FEATURES]
        if not names or unknown:
            raise InputError(f"{owner}: feature_names must be names from {list(TREE_FEATURES)}", field="feature_names",
                             value=unknown or names)
        self.feature_names = tuple(names)
        parsed = []
        for i, t in enumerate(trees):
            try:
                parsed.append(t if isinstance(t, Tree) else Tree.from_dict(t))
            except InputError as e:
                raise InputError(f"{owner}: {e.problem}", field=f"trees[{i}]", value=e.value) from None
        if not parsed:
            raise InputError(f"{owner}: needs at least one tree", field="trees")
        for i, t in enumerate(parsed):
            inner = t.left >= 0
            if np.any(t.feature[inner] < 0) or np.any(t.feature[inner] >= len(names)):
                raise InputError(f"{owner}: tree uses a feature index outside feature_names",
                                 field=f"trees[{i}].feature")
        self.trees = tuple(parsed)
        if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and learning_rate > 0):
            raise InputError(f"{owner}: must be a positive number", field="learning_rate", value=learning_rate)
        self.learning_rate = float(learning_rate)
        if (kv_blocks is None) != (block_size is None):
            raise InputError(f"{owner}: kv_blocks and block_size go together", field="block_size", value=block_size)
        for fname, v in (("kv_blocks", kv_blocks), ("block_size", block_size)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise InputError(f"{owner}: must be a positive integer", field=fname, value=v)
        if load_s is not None and not (isinstance(load_s, (int, float)) and math.isfinite(load_s) and load_s >= 0):
            raise InputError(f"{owner}: must be a number >= 0 or null", field="load_s", value=load_s)
        if not (isinstance(min_step_s, (int, float)) and math.isfinite(min_step_s) and min_step_s > 0):
            raise InputError(f"{owner}: must be a positive number", field="min_step_s", value=min_step_s)
        self.name = name
        self.kv_blocks, self.block_size, self.load_s = kv_blocks, block_size, load_s
        self.min_step_s = float(min_step_s)
        self.provenance = dict(provenance or {})
        # learning_rate * leaf value, computed once, so both code paths add the very same numbers
        self._scaled_values = tuple(self.learning_rate * t.value for t in self.trees)
        self._walk = tuple((t.feature.tolist(), t.threshold.tolist(), t.left.tolist(), t.right.tolist(),
                            sv.tolist()) for t, sv in zip(self.trees, self._scaled_values))

    def log_correction(self, num_prefill_tokens, prefill_context, num_decodes, decode_context_sum,
                       batch_size) -> np.ndarray:
        """Sum over trees of learning_rate * leaf value: the log of measured / base the trees learned."""
        X = tree_feature_matrix(num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size,
                                self.feature_names)
        X32 = X.reshape(-1, len(self.feature_names)).astype(np.float32)  # trees compare in float32, as fitted
        total = np.zeros(X32.shape[0])
        for t, scaled in zip(self.trees, self._scaled_values):
            total = total + scaled[t.leaf_index(X32)]
        return total.reshape(X.shape[:-1])

    def step_times_s(self, num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size):
        args = np.broadcast_arrays(*(np.asarray(a, dtype=float) for a in (
            num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size)))
        base = self.base.step_times_s(*args)
        corr = self.log_correction(*args)
        # math.exp element by element, as in the scalar path: both paths agree bit for bit
        factor = np.array([math.exp(c) for c in corr.ravel()], dtype=float).reshape(corr.shape)
        return np.maximum(base * factor, self.min_step_s)

    def step_time_s(self, num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size):
        base = self.base.step_time_s(num_prefill_tokens, prefill_context, num_decodes, decode_context_sum,
                                     batch_size)
        shape = (num_prefill_tokens, prefill_context, num_decodes, decode_context_sum, batch_size)
        x = [float(np.float32(TREE_FEATURES[f](*(float(v) for v in shape)))) for f in self.feature_names]
        total = 0.0
        for feature, threshold, left, right, scaled in self._walk:
            node = 0
            while left[node] >= 0:
                node = left[node] if x[feature[node]] <= threshold[node] else right[node]
            total = total + scaled[node]
        t = base * math.exp(total)
        m = self.min_step_s
        return t if t > m else m

    def num_kv_blocks(self, block_size: int) -> int | None:
        if self.kv_blocks is None:
            return None
        if block_size == self.block_size:
            return self.kv_blocks
        return self.kv_blocks * self.block_size // block_size

    def model_load_s(self) -> float:
        return 0.0 if self.load_s is None else float(self.load_s)

    def to_dict(self) -> dict:
        base = self.base.to_dict()
        base.pop("name", None)
        return {
            "class": CLASS_PATH,
            "name": self.name,
            "base": base,
            "feature_names": list(self.feature_names),
            "learning_rate": self.learning_rate,
            "trees": [t.to_dict() for t in self.trees],
            "kv_blocks": self.kv_blocks,
            "block_size": self.block_size,
            "load_s": self.load_s,
            "min_step_s": self.min_step_s,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> TreeEnsembleCostModel:
        check_keys(d, {"class", "name", "base", "feature_names", "learning_rate", "trees", "kv_blocks",
                       "block_size", "load_s", "min_step_s", "provenance"}, "TreeEnsembleCostModel")
        if d.get("class", CLASS_PATH) != CLASS_PATH:
            raise InputError(f"expected class {CLASS_PATH}", field="class", value=d.get("class"))
        for key in ("base", "trees", "feature_names"):
            if key not in d:
                raise InputError("missing required field", field=key)
        if not isinstance(d["base"], Mapping):
            raise InputError("must be a mapping (a LinearRegimesCostModel's fields)", field="base")
        if isinstance(d["trees"], (str, bytes, Mapping)) or not isinstance(d["trees"], Sequence):
            raise InputError("must be a list of trees", field="trees")
        return cls(
            name=get_str(d, "name"),
            base=d["base"],
            trees=d["trees"],
            feature_names=d["feature_names"],
            learning_rate=get_number(d, "learning_rate"),
            kv_blocks=get_number(d, "kv_blocks", default=None, allow_none=True, integer=True),
            block_size=get_number(d, "block_size", default=None, allow_none=True, integer=True),
            load_s=get_number(d, "load_s", default=None, allow_none=True),
            min_step_s=get_number(d, "min_step_s", default=1e-6),
            provenance=get_mapping(d, "provenance"),
        )

    def __repr__(self) -> str:
        return f"TreeEnsembleCostModel(name={self.name!r}, trees={len(self.trees)}, base={self.base!r})"
