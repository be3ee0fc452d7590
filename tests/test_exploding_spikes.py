"""The vectorized spike search finds exactly what a plain loop over every step finds."""

from __future__ import annotations

import numpy as np

from gradwatch.diagnose import exploding
from gradwatch.diagnose.profile import WARMUP_STEPS


def naive_spikes(grad):
    found = {}
    for col in range(grad.shape[1]):
        series = grad[:, col]
        for row in range(WARMUP_STEPS, len(series)):
            prev = series[max(0, row - exploding.HISTORY) : row]
            prev = prev[np.isfinite(prev) & (prev > 0)]
            if prev.size < 3:
                continue
            if not np.isfinite(series[row]):
                if col in found:
                    found[col].append((row, float("inf")))
                break
            ratio = series[row] / float(np.median(prev))
            if ratio >= exploding.SPIKE:
                found.setdefault(col, []).append((row, ratio))
    return found


class FakeView:
    def __init__(self, grad):
        self.grad = grad

    def m(self, metric):
        assert metric == "grad_norm"
        return self.grad


def test_spikes_match_a_plain_loop():
    rng = np.random.default_rng(0)
    grad = 10 ** rng.normal(-2, 0.3, (400, 6))
    grad[rng.integers(0, 400, 30), rng.integers(0, 6, 30)] *= 10 ** rng.uniform(1.5, 3, 30)
    grad[rng.integers(0, 400, 20), rng.integers(0, 6, 20)] = np.nan  # unmeasured steps
    grad[350:, 2] = np.inf  # an explosion's end
    grad[5:40, 4] = 0.0  # frozen for a while
    got = exploding.spikes(FakeView(grad))
    want = naive_spikes(grad)
    assert got.keys() == want.keys() and sum(len(v) for v in want.values()) > 5
    for col, hits in want.items():
        assert [r for r, _ in got[col]] == [r for r, _ in hits]
        assert np.allclose([v for _, v in got[col]], [v for _, v in hits], rtol=1e-12)
