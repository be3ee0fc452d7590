"""Gaussian expectations at large variance q against scipy's adaptive quadrature.

Gauss-Hermite rules scale their nodes with sqrt(q), so for q >> 10 they step over the
bend of tanh (width ~1 around u = 0): MeanField("tanh", 1e4, 0.05) came out ordered
with chi1 = 0.0066 instead of chaotic with chi1 = 53.4. The references here integrate
in u with scipy.integrate.quad, split at the bend. Tolerance: 1e-7 relative (the
engines reach ~1e-13 in 1D and ~1e-10 in 2D; quad's own error is ~1e-11).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradwatch.theory import MeanField, phase_diagram
from gradwatch.theory.activations import resolve_activation
from gradwatch.theory.gaussian import HermiteSeries, Quadrature

integrate = pytest.importorskip("scipy.integrate")
optimize = pytest.importorskip("scipy.optimize")

RTOL = 1e-7
# quad reports roundoff near its 1e-12 target; the results are still good to ~1e-11.
pytestmark = pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")
_BENDS = (-40.0, -10.0, -3.0, -1.0, 0.0, 1.0, 3.0, 10.0, 40.0)


def _tanh(u):
    return math.tanh(u)


def _dtanh(u):
    return 1.0 - math.tanh(u) ** 2


def _gauss(f, m: float, s: float) -> float:
    """E[f(m + s Z)] by adaptive quadrature in u over m +- 12 s, split at tanh's bend."""
    if s == 0.0:
        return f(m)
    lo, hi = m - 12.0 * s, m + 12.0 * s
    norm = 1.0 / (s * math.sqrt(2.0 * math.pi))

    def integrand(u: float) -> float:
        t = (u - m) / s
        return f(u) * math.exp(-0.5 * t * t) * norm

    points = [p for p in _BENDS if lo < p < hi]
    value, _ = integrate.quad(
        integrand, lo, hi, points=points, limit=500, epsabs=1e-16, epsrel=1e-12
    )
    return value


def _moments_1d_ref(q: float) -> tuple[float, float, float]:
    s = math.sqrt(q)
    second = _gauss(lambda u: _tanh(u) ** 2, 0.0, s)
    deriv = _gauss(lambda u: _dtanh(u) ** 2, 0.0, s)
    slope = _gauss(lambda u: u * _tanh(u) * _dtanh(u), 0.0, s) / q  # Stein's lemma
    return second, deriv, slope


def _pair_ref(f, q: float, c: float) -> float:
    """E[f(u1) f(u2)]: u1 ~ N(0, q) outside, u2 | u1 ~ N(c u1, q (1 - c^2)) inside."""
    spread = math.sqrt(q * (1.0 - c * c))
    return _gauss(lambda u: f(u) * _gauss(f, c * u, spread), 0.0, math.sqrt(q))


@pytest.mark.parametrize("q", [1.0, 12.0, 100.0, 1e3, 1e4, 1e6])
def test_1d_moments_match_adaptive_quadrature(q):
    got = Quadrature(resolve_activation("tanh")).moments_1d(np.array([q]))
    for name, value, want in zip(
        ("E phi^2", "E phi'^2", "d/dq"), got, _moments_1d_ref(q), strict=True
    ):
        assert float(value[0]) == pytest.approx(want, rel=RTOL), (q, name)


@pytest.mark.parametrize(
    ("q", "c"), [(12.0, 0.5), (100.0, 0.9), (1e3, -0.5), (1e4, 0.3), (1e4, 0.999), (1e6, 0.9)]
)
def test_2d_moments_match_nested_adaptive_quadrature(q, c):
    act = resolve_activation("tanh")
    want = _pair_ref(_tanh, q, c), _pair_ref(_dtanh, q, c)
    for engine in (Quadrature(act), HermiteSeries(act)):
        cross, cross_d = engine.moments_2d(np.array([q]), np.array([c]))
        assert float(cross[0]) == pytest.approx(want[0], rel=RTOL), (type(engine), q, c)
        assert float(cross_d[0]) == pytest.approx(want[1], rel=RTOL), (type(engine), q, c)


def _fixed_point_ref(sigma_w2: float, sigma_b2: float) -> tuple[float, float]:
    """q* by brentq on the q-map with adaptive-quadrature moments (E[tanh^2] < 1)."""

    def excess(q: float) -> float:
        return sigma_w2 * _gauss(lambda u: _tanh(u) ** 2, 0.0, math.sqrt(q)) + sigma_b2 - q

    q_star = optimize.brentq(excess, sigma_b2 + 1e-12, sigma_w2 + sigma_b2, xtol=1e-12, rtol=1e-13)
    return q_star, sigma_w2 * _gauss(lambda u: _dtanh(u) ** 2, 0.0, math.sqrt(q_star))


@pytest.mark.parametrize("sigma_w2", [300.0, 1000.0, 1e4])
def test_mean_field_at_large_sigma_w2_matches_reference(sigma_w2):
    q_star, chi1 = _fixed_point_ref(sigma_w2, 0.05)
    mf = MeanField("tanh", sigma_w2, 0.05)
    assert mf.q_star == pytest.approx(q_star, rel=RTOL)
    assert mf.chi1 == pytest.approx(chi1, rel=RTOL)
    assert mf.phase == "chaotic"  # chi1 = 9.43, 17.04, 53.4
    # The correlation fixed point is a fixed point, and the phase diagram agrees.
    assert mf.c_map(mf.c_star) == pytest.approx(mf.c_star, rel=1e-9)
    diagram = phase_diagram("tanh", [sigma_w2], [0.05])
    assert diagram.chi1[0, 0] == pytest.approx(mf.chi1, rel=1e-9)
    assert diagram.c_star[0, 0] == pytest.approx(mf.c_star, rel=1e-7)
    assert diagram.xi_c[0, 0] == pytest.approx(mf.xi_c, rel=1e-7)


def test_huge_variance_stays_finite_and_accurate():
    # For q >> 1, E[tanh'(u)^2] -> N(0; 0, q) * integral of sech^4 = (4/3) / sqrt(2 pi q).
    quad = Quadrature(resolve_activation("tanh"))
    q = np.array([1e12, 1e16])
    second, deriv, _ = quad.moments_1d(q)
    assert np.all(second < 1.0) and np.all(second > 0.999)
    np.testing.assert_allclose(deriv, (4.0 / 3.0) / np.sqrt(2.0 * np.pi * q), rtol=1e-10)
    mf = MeanField("tanh", 1e8, 0.05)
    assert mf.phase == "chaotic" and mf.q_star == pytest.approx(1e8, rel=1e-3)
    assert mf.chi1 == pytest.approx(1e8 * (4.0 / 3.0) / math.sqrt(2.0 * math.pi * mf.q_star))
