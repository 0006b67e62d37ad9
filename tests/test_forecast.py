"""Arrival forecasters for OServe (policies.estimators.forecast): exponential smoothing by hand,
the LSTM deterministic for a seed and learning a pattern the baseline cannot, window counts,
one-step errors, and the errors for bad input or a missing torch."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from policies.estimators.forecast import (ExponentialSmoothing, LSTMForecaster, counts_per_window,
                                          one_step_errors)
from sim.errors import InputError


def test_counts_per_window_by_hand():
    c = counts_per_window([0.0, 0.5, 1.0, 2.9, 3.0], [0, 1, 1, 0, 1], 2, window_s=1.0)
    assert c.tolist() == [[1, 1], [0, 1], [1, 0], [0, 1]]
    with pytest.raises(InputError) as e:
        counts_per_window([0.0], [0], 1, window_s=0)
    assert e.value.field == "window_s"


def test_exponential_smoothing_by_hand():
    f = ExponentialSmoothing(alpha=0.5)
    # level: 4 -> 0.5*8 + 0.5*4 = 6 -> 0.5*2 + 0.5*6 = 4
    assert f.predict([[4.0], [8.0], [2.0]]).tolist() == [4.0]
    assert one_step_errors(np.full((10, 2), 3.0), f, 4) == {"mae": 0.0, "wape": 0.0, "num_test_windows": 6}
    with pytest.raises(InputError):
        ExponentialSmoothing(alpha=0)
    with pytest.raises(InputError) as e:
        f.predict([[1.0, -2.0]])
    assert e.value.field == "history"


def _alternating(n=60):
    """Two types trading places every 4 windows (code-like and conversation-like segments)."""
    t = np.arange(n)
    hi = (t // 4) % 2 == 0
    return np.stack([np.where(hi, 40.0, 5.0), np.where(hi, 5.0, 40.0)], axis=1)


def test_lstm_is_deterministic_for_a_seed():
    s = _alternating()
    a = LSTMForecaster(epochs=40, seed=7).fit(s[:30]).predict(s[:40])
    b = LSTMForecaster(epochs=40, seed=7).fit(s[:30]).predict(s[:40])
    c = LSTMForecaster(epochs=40, seed=8).fit(s[:30]).predict(s[:40])
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (2,) and np.all(a >= 0)


def test_lstm_learns_a_periodic_switch_that_smoothing_lags():
    s = _alternating()
    lstm = one_step_errors(s, LSTMForecaster(lookback=8, epochs=300, seed=0), 40)
    es = one_step_errors(s, ExponentialSmoothing(0.5), 40)
    assert lstm["wape"] < es["wape"]


def test_lstm_without_torch_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(InputError) as e:
        LSTMForecaster()
    assert e.value.field == "forecaster" and "torch" in str(e.value)


def test_lstm_bad_settings_and_short_history():
    with pytest.raises(InputError) as e:
        LSTMForecaster(lookback=0)
    assert e.value.field == "lookback"
    f = LSTMForecaster(lookback=6, epochs=5).fit([[1.0], [2.0]])   # too short to train: the last window
    assert f.predict([[1.0], [2.0]]).tolist() == [2.0]
