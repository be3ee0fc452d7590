"""Fixed points of the mean-field maps, solved for whole arrays of (sigma_w2, sigma_b2) at once.

For h^l = W^l phi(h^{l-1}) + b^l with W_ij ~ N(0, sigma_w2/N) and b ~ N(0, sigma_b2),
the length q and correlation c of pre-activations follow (Poole et al. 2016)

    q' = sigma_w2 E[phi(u)^2] + sigma_b2,                                u ~ N(0, q)
    c' = (sigma_w2 E[phi(u1) phi(u2)] + sigma_b2) / q',   (u1, u2) variance q, correlation c.

The q-map is solved by Newton's method with a fixed-point step as a fallback. The
c-map is a power series in c with non-negative coefficients (Mehler), so it is convex
on [0, 1]: Newton's method started at c = 0 climbs monotonically to the smallest
fixed point c*, which is the attracting one. All of this works on numpy arrays, so a
phase diagram is a single call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .gaussian import Q_FLOOR, GaussianMoments

__all__ = ["FixedPoints", "solve_fixed_points", "solve_chi1", "CRITICAL_TOL", "Q_INFINITE"]

# |chi - 1| below this counts as exactly critical; the solvers converge to ~1e-13.
CRITICAL_TOL = 1e-9
# A q-map iterate beyond this has no finite fixed point (the signal explodes).
Q_INFINITE = 1e12
# Where a diverging network's slopes are evaluated: large enough that sigma_b2 no longer matters.
Q_LARGE = 1e8
# A q-map still climbing with slope >= 1 beyond this many times sigma_b2 never settles.
_Q_HUGE = 1e6
# Variances below this are reported as exactly zero (q* = 0: the signal dies out).
_Q_ZERO = 1e-10
# Newton needs < 10 steps; halving near a double root (the bifurcation) about 50.
_MAX_ITER = 200


@dataclass(frozen=True)
class FixedPoints:
    """The solved mean-field state, one entry per (sigma_w2, sigma_b2) pair.

    Attributes:
        q_star: Fixed point of the q-map reached from ``q0`` (0 or inf when the
            signal dies out or explodes).
        chi1: ``sigma_w2 E[phi'(u)^2]`` at q*, the slope of the c-map at c = 1.
        q_slope: Slope of the q-map at q*.
        c_star: Attracting fixed point of the c-map (1 in the ordered phase, nan when
            q* is infinite).
        chi_c: Slope of the c-map at c* (equals chi1 when c* = 1).
        q_eval: Where the slopes were evaluated: q* (at least 1e-12), or a large q when
            q* is infinite.

    Example:
        >>> import numpy as np
        >>> from gradwatch.theory.kernels import ReluKernel
        >>> fp = solve_fixed_points(ReluKernel(), np.array([1.0, 2.5]), np.array([0.1, 0.1]))
        >>> fp.q_star.round(12).tolist(), fp.chi1.tolist()
        ([0.2, inf], [0.5, 1.25])
    """

    q_star: np.ndarray
    chi1: np.ndarray
    q_slope: np.ndarray
    c_star: np.ndarray
    chi_c: np.ndarray
    q_eval: np.ndarray


def solve_fixed_points(
    moments: GaussianMoments,
    sigma_w2: np.ndarray,
    sigma_b2: np.ndarray,
    q0: float = 1.0,
) -> FixedPoints:
    """Solve q*, chi1, c* and the slopes for arrays of variances.

    Args:
        moments: The Gaussian expectations of the activation (see :mod:`.gaussian`).
        sigma_w2: Weight variances (times fan-in), any shape.
        sigma_b2: Bias variances, broadcastable with ``sigma_w2``.
        q0: Starting variance of the q-map iteration (unit-variance inputs by default).

    Returns:
        A :class:`FixedPoints` with arrays of the broadcast shape.

    Example:
        >>> import numpy as np
        >>> from gradwatch.theory.kernels import LinearKernel
        >>> fp = solve_fixed_points(LinearKernel(), np.array([0.5]), np.array([1.0]))
        >>> float(fp.q_star[0]), float(fp.chi1[0])
        (2.0, 0.5)
    """
    sw, sb = np.broadcast_arrays(
        np.asarray(sigma_w2, dtype=np.float64), np.asarray(sigma_b2, dtype=np.float64)
    )
    shape = sw.shape
    sw, sb = sw.ravel(), sb.ravel()
    q_star, q_eval, chi1, q_slope, q_next = _length(moments, sw, sb, q0)
    c_star = np.ones_like(sw)
    chi_c = chi1.copy()
    chaotic = (chi1 > 1.0 + CRITICAL_TOL) & np.isfinite(q_star)
    if chaotic.any():
        c_star[chaotic], chi_c[chaotic] = _c_fixed_point(
            moments, sw[chaotic], sb[chaotic], q_eval[chaotic], q_next[chaotic]
        )
    exploded = np.isinf(q_star)
    c_star[exploded] = np.nan
    chi_c[exploded] = np.nan
    return FixedPoints(*(a.reshape(shape) for a in (q_star, chi1, q_slope, c_star, chi_c, q_eval)))


def solve_chi1(
    moments: GaussianMoments, sigma_w2: np.ndarray, sigma_b2: np.ndarray, q0: float = 1.0
) -> np.ndarray:
    """chi1 alone (no correlation fixed point): what the order-to-chaos line needs.

    Args:
        moments: The Gaussian expectations of the activation.
        sigma_w2: Weight variances.
        sigma_b2: Bias variances, broadcastable with ``sigma_w2``.
        q0: Starting variance of the q-map iteration.

    Returns:
        chi1 with the broadcast shape.

    Example:
        >>> import numpy as np
        >>> from gradwatch.theory.kernels import ReluKernel
        >>> solve_chi1(ReluKernel(), np.array([1.0, 2.0]), np.array(0.1)).tolist()
        [0.5, 1.0]
    """
    sw, sb = np.broadcast_arrays(
        np.asarray(sigma_w2, dtype=np.float64), np.asarray(sigma_b2, dtype=np.float64)
    )
    return _length(moments, sw.ravel(), sb.ravel(), q0)[2].reshape(sw.shape)


def _length(
    moments: GaussianMoments, sw: np.ndarray, sb: np.ndarray, q0: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """q*, where to evaluate slopes, chi1, the q-map slope and q-map(q*) for flat arrays."""
    start = np.full_like(sw, float(q0))
    coarse = getattr(moments, "coarse", None)
    if coarse is not None:  # a cheap rule gets close, one or two fine Newton steps finish
        rough = _q_fixed_point(coarse, sw, sb, start)
        start = np.where(rough > 0, rough, start)  # an infinite start stays infinite
    q_star = _q_fixed_point(moments, sw, sb, start)
    q_eval = np.where(np.isinf(q_star), Q_LARGE, np.maximum(q_star, Q_FLOOR))
    second, deriv, slope = moments.moments_1d(q_eval)
    return q_star, q_eval, sw * deriv, sw * slope, sw * second + sb


def _q_fixed_point(
    moments: GaussianMoments, sw: np.ndarray, sb: np.ndarray, start: np.ndarray
) -> np.ndarray:
    """Solve q-map(q) = q: Newton where the map is contracting, else climb or step."""
    q = start.astype(np.float64, copy=True)
    active = np.isfinite(q)
    for _ in range(_MAX_ITER):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        qi = q[idx]
        second, _, slope = moments.moments_1d(qi)
        mapped = sw[idx] * second + sb[idx]
        g = mapped - qi
        g_prime = sw[idx] * slope - 1.0
        use_newton = g_prime < -1e-12  # a stable fixed point lies in the Newton direction
        newton = qi - g / np.where(use_newton, g_prime, -1.0)
        # Where the map expands (slope >= 1) Newton heads for an unstable fixed point,
        # so step away from it instead, at least doubling or halving q: up while the map
        # pushes up, down towards the root in [0, q) that g(0) >= 0 > g(q) promises.
        climbing = ~use_newton & (g > 0)
        # Far above sigma_w2 + sigma_b2 (where a bounded activation's q* lies) climb faster.
        factor = np.where(qi > 100.0 * np.maximum(1.0, sw[idx] + sb[idx]), 100.0, 2.0)
        fallback = np.where(climbing, np.maximum(mapped, factor * qi), np.minimum(mapped, 0.5 * qi))
        # A Newton step below zero means the root lies in [0, q): try q = 0 next.
        new = np.maximum(np.where(use_newton, newton, fallback), 0.0)
        # Already a fixed point to rounding (e.g. relu at sigma_w2 = 2, sigma_b2 = 0).
        settled = np.abs(g) <= 1e-14 * qi
        new = np.where(settled, qi, new)
        # Newton converges quadratically: a relative step of 1e-9 leaves an error near 1e-18.
        tol = np.where(use_newton, 1e-9 * qi, 1e-14 * np.maximum(1.0, qi))
        done = settled | (np.abs(new - qi) <= tol)
        done |= (qi < _Q_ZERO) & (mapped < _Q_ZERO) & use_newton  # q* = 0 is attracting
        # Still climbing with slope >= 1 far above the bias: the length grows without
        # bound (relu with sigma_w2 >= 2 and sigma_b2 > 0, or linear with sigma_w2 > 1).
        blown = climbing & ~settled & (qi > _Q_HUGE * np.maximum(1.0, sb[idx]))
        blown |= new > Q_INFINITE
        q[idx] = np.where(blown, np.inf, new)
        active[idx] = ~(done | blown)
    q[q < _Q_ZERO] = 0.0
    return q


def _c_fixed_point(
    moments: GaussianMoments,
    sw: np.ndarray,
    sb: np.ndarray,
    q: np.ndarray,
    q_next: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Smallest fixed point c* in [0, 1) of a convex c-map, by Newton from c = 0."""
    pairs = moments.pairs(q)
    c = np.zeros_like(sw)
    active = np.ones(sw.shape, dtype=bool)
    for _ in range(_MAX_ITER // 2):  # slow only where c* -> 1 and xi_c is huge anyway
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        ci, swi, qi, qni = c[idx], sw[idx], q[idx], q_next[idx]
        cross, cross_d = pairs(ci, idx)
        g = (swi * cross + sb[idx]) / qni - ci
        g_prime = swi * qi * cross_d / qni - 1.0
        use_newton = g_prime < 0.0
        new = np.where(use_newton, ci - g / np.where(use_newton, g_prime, -1.0), ci + g)
        new = np.clip(new, -1.0, 1.0)
        c[idx] = new
        # Newton from the convex side only ever climbs; a step back is rounding noise.
        active[idx] = (new - ci) > 1e-13
    _, cross_d = pairs(c, None)
    return c, sw * q * cross_d / q_next
