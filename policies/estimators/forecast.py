"""Forecasts of each request type's arrivals over the next window, for OServe's re-planning.

The paper forecasts with an LSTM (design/POLICIES.md, OServe); the architecture and training
below are **our design** (the paper gives none): `LSTMForecaster`, a one-layer LSTM over the
last `lookback` windows' log1p counts of every type jointly, trained by Adam on the history it
is given, seeded and deterministic (torch, imported only when an LSTM is built: an optional
extra). `ExponentialSmoothing` is the light baseline. Both map a history (windows x types
array of counts) to the next window's counts per type; `one_step_errors` scores them.
"""

from __future__ import annotations

import math

import numpy as np

from sim.errors import InputError


def counts_per_window(arrival_s, type_index, num_types: int, window_s: float, end_s: float | None = None) -> np.ndarray:
    """Arrivals per (window, type): array of shape (ceil(end / window), num_types), window k
    covering [k * window_s, (k + 1) * window_s)."""
    if not (isinstance(window_s, (int, float)) and window_s > 0 and math.isfinite(window_s)):
        raise InputError("must be a finite number of seconds > 0", field="window_s", value=window_s)
    a = np.asarray(arrival_s, dtype=float)
    k = np.asarray(type_index, dtype=np.int64)
    end = float(a.max()) if end_s is None and len(a) else float(end_s or 0.0)
    n_w = max(int(math.floor(end / window_s)) + 1, 1)
    w = np.minimum((a // window_s).astype(np.int64), n_w - 1)
    out = np.zeros((n_w, num_types))
    np.add.at(out, (w, k), 1.0)
    return out


def _check_history(history) -> np.ndarray:
    h = np.asarray(history, dtype=float)
    if h.ndim != 2 or h.shape[0] < 1 or not np.all(np.isfinite(h)) or np.any(h < 0):
        raise InputError("history must be a non-empty (windows x types) array of counts >= 0", field="history",
                         value=getattr(h, "shape", None))
    return h


class ExponentialSmoothing:
    """Simple exponential smoothing per type: level <- alpha * x + (1 - alpha) * level, started at
    the first window; the forecast is the level. Invariant: 0 < alpha <= 1."""

    name = "exp_smoothing"

    def __init__(self, alpha: float = 0.5) -> None:
        if not 0 < alpha <= 1:
            raise InputError("must be in (0, 1]", field="alpha", value=alpha)
        self.alpha = float(alpha)

    def fit(self, history) -> ExponentialSmoothing:
        _check_history(history)
        return self

    def predict(self, history) -> np.ndarray:
        h = _check_history(history)
        level = h[0].copy()
        for x in h[1:]:
            level = self.alpha * x + (1 - self.alpha) * level
        return level


class LSTMForecaster:
    """One-layer LSTM (hidden size `hidden`) reading the last `lookback` windows of log1p
    counts (all types), a linear head giving the next window's log1p counts; trained full-batch
    by Adam for `epochs` on every (lookback -> next) pair of the history given to `fit`.
    Deterministic for a seed: weights drawn from `torch.Generator(seed)`, one CPU thread while it
    trains and predicts. A history shorter than lookback + 1 windows cannot train it: `predict`
    then falls back to the last window. Raises InputError when torch is not installed."""

    name = "lstm"

    def __init__(self, lookback: int = 6, hidden: int = 16, epochs: int = 300, lr: float = 0.02, seed: int = 0) -> None:
        for field, v in (("lookback", lookback), ("hidden", hidden), ("epochs", epochs)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError("must be an integer >= 1", field=field, value=v)
        if not lr > 0:
            raise InputError("must be > 0", field="lr", value=lr)
        try:
            import torch  # noqa: F401
        except ImportError:
            raise InputError("the LSTM forecaster needs torch (pip install torch, the CPU build will do); "
                             "or use the exponential-smoothing forecaster", field="forecaster", value="lstm") from None
        self.lookback, self.hidden, self.epochs, self.lr, self.seed = lookback, hidden, epochs, float(lr), int(seed)
        self._net = None
        self._scale = 1.0
        self.train_loss: float = float("nan")

    def _build(self, num_types: int):
        import torch

        class Net(torch.nn.Module):
            def __init__(self, n: int, hidden: int) -> None:
                super().__init__()
                self.lstm = torch.nn.LSTM(n, hidden, batch_first=True)
                self.head = torch.nn.Linear(hidden, n)

            def forward(self, x):
                out, _ = self.lstm(x)
                return self.head(out[:, -1]) + x[:, -1]  # a residual on the last window

        g = torch.Generator().manual_seed(self.seed)
        net = Net(num_types, self.hidden)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.empty_like(p).uniform_(-0.3, 0.3, generator=g) / math.sqrt(self.hidden))
        return net

    def fit(self, history) -> LSTMForecaster:
        import torch

        h = _check_history(history)
        z = np.log1p(h)
        self._scale = float(max(z.max(), 1.0))
        z = z / self._scale
        n = len(z) - self.lookback
        if n < 1:
            self._net = None
            return self
        x = torch.tensor(np.stack([z[i:i + self.lookback] for i in range(n)]), dtype=torch.float32)
        y = torch.tensor(z[self.lookback:], dtype=torch.float32)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            net = self._build(h.shape[1])
            opt = torch.optim.Adam(net.parameters(), lr=self.lr)
            for _ in range(self.epochs):
                opt.zero_grad()
                loss = torch.mean((net(x) - y) ** 2)
                loss.backward()
                opt.step()
            self.train_loss = float(loss.detach())
        finally:
            torch.set_num_threads(threads)
        self._net = net
        return self

    def predict(self, history) -> np.ndarray:
        import torch

        h = _check_history(history)
        if self._net is None or len(h) < self.lookback:
            return h[-1].copy()
        if h.shape[1] != self._net.head.out_features:
            raise InputError(f"history has {h.shape[1]} types, the LSTM was trained on {self._net.head.out_features}",
                             field="history", value=h.shape[1])
        z = np.log1p(h[-self.lookback:]) / self._scale
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                out = self._net(torch.tensor(z[None], dtype=torch.float32))[0].numpy()
        finally:
            torch.set_num_threads(threads)
        return np.maximum(np.expm1(out.astype(float) * self._scale), 0.0)


def one_step_errors(series, forecaster, train_windows: int) -> dict:
    """Fit on the first `train_windows` windows, then forecast each later window from everything
    before it (one step ahead, no refit). Returns MAE (counts per window, over windows and types)
    and WAPE (sum |error| / sum actual) over the test windows, and their count."""
    s = _check_history(series)
    if not 1 <= train_windows < len(s):
        raise InputError(f"must be in [1, {len(s) - 1}] for a series of {len(s)} windows", field="train_windows",
                         value=train_windows)
    forecaster.fit(s[:train_windows])
    pred = np.stack([forecaster.predict(s[:k]) for k in range(train_windows, len(s))])
    actual = s[train_windows:]
    err = np.abs(pred - actual)
    return {"mae": float(err.mean()), "wape": float(err.sum() / max(actual.sum(), 1e-12)),
            "num_test_windows": int(len(actual))}
