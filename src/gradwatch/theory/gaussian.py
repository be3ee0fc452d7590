"""Gaussian expectations of an activation: what the mean-field maps are made of.

With u ~ N(0, q), and (u1, u2) jointly Gaussian with variance q and correlation c,
the q-map and c-map of a random network (Poole et al. 2016) need

- ``E[phi(u)^2]``, ``E[phi'(u)^2]`` and ``d/dq E[phi(u)^2]`` (one dimension), and
- ``E[phi(u1) phi(u2)]`` and ``E[phi'(u1) phi'(u2)]`` (two dimensions).

Two engines compute them for any activation, on probabilists' Gauss-Hermite rules
(``numpy.polynomial.hermite_e.hermegauss``), vectorised over arrays of q:

- :class:`Quadrature` integrates the 2D expectations on a tensor-product rule. It
  is the reference, used by :class:`~gradwatch.theory.meanfield.MeanField`.
- :class:`HermiteSeries` expands ``phi(sqrt(q) z)`` in orthonormal Hermite
  polynomials once per q; Mehler's formula then gives the 2D expectations as power
  series in c, ``sum_k a_k^2 c^k`` (the "dual activation" of Daniely et al. 2016).
  Solving for c* then costs a polynomial per step, which makes phase diagrams fast.

Plain Gauss-Hermite converges slowly when phi(sqrt(q) z) is steep: for tanh at q = 3
it needs about 200 nodes for 1e-8, and at q = 12 it is off by 1e-4. :func:`scaled_rule`
shrinks the hermegauss nodes so that they span +-9 standard deviations on a finer,
nearly even grid, and moves the difference of the two Gaussians into the weights, as
in importance sampling. The rule then behaves like the trapezoidal rule, which
converges geometrically for integrands analytic in a strip: 200 nodes give ~1e-11 for
tanh up to q = 12, 100 nodes per axis ~1e-10 in 2D for q <= 3. It is used for q <= 3.

Any Gauss-Hermite rule scales its nodes with sqrt(q), so for q >> 10 it steps over the
bend of phi (width ~1 around u = 0) and returns wrong numbers (for tanh at q = 1e3, chi1
off by a factor 2). Above q = 3 :func:`composite_rule` works in u instead: fixed
Gauss-Legendre panels over |u| <= 40, where the activations bend, and geometrically
graded panels beyond, out to 10 standard deviations, where they are linear or constant.
Measured against scipy's adaptive quadrature for tanh, sigmoid, softplus, gelu, swish
and elu, the 1D moments are good to ~1e-13 relative for every q up to 1e20; the 2D
ones (u2 | u1 on the scaled rule where q (1 - c^2) <= 3, else on the composite rule)
to ~1e-14 for q <= 1e6 and ~1e-9 at worst up to q = 1e12. An activation that still
bends beyond |u| = 40 (say tanh(u / 100)) is not resolved there. A 2D evaluation costs
~1e6 activation and density values at q > 3 against 1e4 below, so
:class:`HermiteSeries` (accurate to ~1e-7 only for q < 5) hands its q > 5 to the
composite rule: correct, but phase diagrams whose q* exceed 5 take ~50x longer.

Activations with a kink (relu, selu, leaky relu) converge only algebraically, so relu,
erf and linear use the closed forms of :mod:`.kernels`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Protocol

import numpy as np
import torch
from numpy.polynomial.hermite_e import hermegauss
from numpy.polynomial.legendre import leggauss

from .activations import Activation
from .kernels import CLOSED_FORMS

__all__ = ["GaussianMoments", "Quadrature", "HermiteSeries", "moments_for", "scaled_rule"]

# c -> (E[phi(u1) phi(u2)], E[phi'(u1) phi'(u2)]) with q bound; the optional index picks
# which of the bound q the given c belong to (None: all of them).
Pairs = Callable[[np.ndarray, np.ndarray | None], tuple[np.ndarray, np.ndarray]]

# Smallest variance evaluated: the Stein form of d/dq divides by sqrt(q).
Q_FLOOR = 1e-12
# The largest of n Gauss-Hermite nodes is about 2 sqrt(n); shrunk by 4.5 / sqrt(n) they
# reach 2 * 4.5 = 9 standard deviations, where the Gaussian tail is e^-40.
_REACH = 4.5
# 2D chunk size in quadrature nodes: bounds memory at ~4 float64 arrays of this size.
_CHUNK_ELEMENTS = 1 << 21
# Nodes of the warm-start rule: ~1e-5 relative for tanh at q = 3, enough to start Newton.
_COARSE_NODES = 40
# Above this variance (1D, the pair, or the conditional variance of u2 given u1) the
# Gauss-Hermite rules step over phi's features; :func:`composite_rule` takes over.
_Q_SMALL = 3.0
# The composite rule: phi may bend anywhere in |u| <= _FEATURES (tanh, sigmoid, softplus,
# gelu and swish are linear or constant beyond it to ~1e-16); there it uses Gauss-Legendre
# panels of width _PANEL with _PANEL_NODES nodes each. Beyond it the Gaussian, out to
# _TAIL_REACH standard deviations (e^-50), gets _TAIL_NODES Gauss-Legendre nodes per side.
_FEATURES = 40.0
_PANEL = 2.0
_PANEL_NODES = 16
_TAIL_PANELS = 12
_TAIL_NODES = 16 * _TAIL_PANELS
_TAIL_REACH = 10.0
# Above this q HermiteSeries hands the 2D expectations to the composite rule.
_SERIES_MAX_Q = 5.0
# Nodes of the scaled rule for u2 | u1 when its variance is small (as Quadrature's n2).
_INNER_NODES = 100
_INV_SQRT_2PI = 1.0 / np.sqrt(2.0 * np.pi)


class GaussianMoments(Protocol):
    """What the mean-field solver needs from an activation (float64 arrays throughout).

    Example:
        >>> import numpy as np
        >>> from gradwatch.theory.kernels import ReluKernel
        >>> engine: GaussianMoments = ReluKernel()
        >>> float(engine.moments_1d(np.array(2.0))[0])  # E[relu(u)^2] = q / 2
        1.0
    """

    def moments_1d(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return ``E[phi(u)^2]``, ``E[phi'(u)^2]`` and ``d/dq E[phi(u)^2]``, u ~ N(0, q)."""
        ...

    def pairs(self, q: np.ndarray) -> Pairs:
        """Bind q; return ``(c, index) -> (E[phi(u1) phi(u2)], E[phi'(u1) phi'(u2)])``.

        ``index`` selects the entries of the flattened q that the c belong to, or is
        ``None`` for all of them.
        """
        ...


@lru_cache(maxsize=16)
def scaled_rule(n: int) -> tuple[np.ndarray, np.ndarray]:
    """A Gauss-Hermite rule for ``E[f(z)]``, z ~ N(0, 1), on a grid narrower than the Gaussian.

    The nodes are ``r x_i`` for the hermegauss nodes x_i with ``r = min(1, 4.5/sqrt(n))``,
    so they reach about 9 standard deviations. The weights carry the ratio of the two
    Gaussian densities, ``w_i r exp(x_i^2 (1 - r^2) / 2)``. For u ~ N(0, v) use the nodes
    ``sqrt(v) z_i``: the rule does not depend on v.

    Args:
        n: Number of nodes.

    Returns:
        ``(z, weights)``, two arrays of length n (read-only: they are cached).

    Example:
        >>> z, w = scaled_rule(60)
        >>> round(float(w @ (2.0 * z) ** 2), 10)  # E[u^2] for u ~ N(0, 4)
        4.0
    """
    x, w = hermegauss(n)
    r = min(1.0, _REACH / np.sqrt(n))
    weights = np.exp(np.log(w / w.sum()) + 0.5 * x * x * (1.0 - r * r)) * r
    z = r * x
    z.flags.writeable = False
    weights.flags.writeable = False
    return z, weights


@lru_cache(maxsize=1)
def _composite_parts() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fixed nodes and weights on [-_FEATURES, _FEATURES]; Gauss-Legendre on [-1, 1] for tails."""
    x, w = leggauss(_PANEL_NODES)
    left = np.arange(-_FEATURES, _FEATURES, _PANEL)
    mid = (left[:, None] + 0.5 * _PANEL * (x + 1.0)).ravel()
    mid_w = np.tile(0.5 * _PANEL * w, left.size)
    tail_x, tail_w = leggauss(_TAIL_NODES // _TAIL_PANELS)
    for array in (mid, mid_w, tail_x, tail_w):
        array.flags.writeable = False
    return mid, mid_w, tail_x, tail_w


def composite_rule(m: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A rule for ``E[f(m + s Z)]``, Z ~ N(0, 1), that resolves f near 0 at any spread s.

    Gauss-Hermite rules scale their nodes with s, so for s >> 1 they step over the
    bend of tanh (width ~1 around u = 0). This rule works in u instead: fixed
    Gauss-Legendre panels (:data:`_FEATURES` wide on each side of 0, panels of width
    2, 16 nodes each) where an activation bends, plus 12 geometrically growing
    panels of 16 nodes per side for the part of ``[m - 10 s, m + 10 s]`` beyond them,
    where phi is linear or constant. The Gaussian density is folded into the weights.
    Meant for s >= 1.7 (``s^2 > 3``; the Gaussian must be smooth on the panels);
    accurate to ~1e-13 relative for tanh, sigmoid, softplus and gelu up to s = 1e10.

    Args:
        m: Means, any shape.
        s: Standard deviations, broadcastable with ``m``.

    Returns:
        ``(tail_nodes, tail_weights, fixed_weights)``: the first two with shape
        ``(*shape, 2 * _TAIL_NODES)``, the last ``(*shape, N)`` for the N fixed nodes
        ``composite_nodes()``; ``E[f] = fixed_weights @ f(fixed) + sum(tail_weights * f(tails))``.

    Example:
        >>> import numpy as np
        >>> tails, tail_w, fixed_w = composite_rule(np.array(3.0), np.array(100.0))
        >>> nodes = composite_nodes()
        >>> round(float(fixed_w @ nodes**2 + tail_w @ tails**2), 6)  # E[u^2] = 9 + 1e4
        10009.0
    """
    mid, mid_w, tail_x, tail_w = _composite_parts()
    m, s = np.broadcast_arrays(np.asarray(m, np.float64), np.asarray(s, np.float64))
    m, s = m[..., None], s[..., None]
    reach = _TAIL_REACH * s
    right = _graded_panels(np.maximum(_FEATURES, m - reach), np.maximum(_FEATURES, m + reach))
    left = _graded_panels(-np.minimum(-_FEATURES, m + reach), -np.minimum(-_FEATURES, m - reach))
    tails = np.concatenate([-left[0], right[0]], -1)
    weights = np.concatenate([left[1], right[1]], -1) * _density(tails, m, s)
    return tails, weights, mid_w * _density(mid, m, s)


def _graded_panels(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on [a, b] (0 < a <= b), on panels growing geometrically.

    The panels resolve both a function that bends over a width ~a beyond a (e.g. the
    inner expectation E[phi(u2) | u1] seen by the outer integral) and a Gaussian of
    width ~(b - a) / 20.
    """
    _, _, x, w = _composite_parts()
    edges = a * (b / a) ** (np.arange(_TAIL_PANELS + 1) / _TAIL_PANELS)  # (..., K + 1)
    half = 0.5 * (edges[..., 1:] - edges[..., :-1])
    nodes = edges[..., :-1, None] + half[..., None] * (x + 1.0)
    weights = half[..., None] * w
    shape = (*nodes.shape[:-2], -1)
    return nodes.reshape(shape), weights.reshape(shape)


def composite_nodes() -> np.ndarray:
    """The fixed nodes of :func:`composite_rule` (read-only)."""
    return _composite_parts()[0]


def _density(x: np.ndarray, m: np.ndarray, s: np.ndarray) -> np.ndarray:
    t = (x - m) / s
    return np.exp(-0.5 * t * t) * (_INV_SQRT_2PI / s)


class _OneDimensional:
    """The 1D Gauss-Hermite moments shared by both engines."""

    def __init__(self, activation: Activation, n1: int) -> None:
        self.activation = activation
        self._n1 = n1
        self._z1, self._w1 = scaled_rule(n1)

    @property
    def coarse(self) -> _OneDimensional | None:
        """A cheaper 1D rule (40 nodes) for warm-starting solvers, or None if this is one."""
        if self._n1 <= _COARSE_NODES:
            return None
        return _OneDimensional(self.activation, _COARSE_NODES)

    def _phi(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        y, dy = self.activation.value_and_derivative(torch.from_numpy(u))
        return y.to(torch.float64).numpy(), dy.to(torch.float64).numpy()

    def moments_1d(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return ``E[phi(u)^2]``, ``E[phi'(u)^2]`` and ``d/dq E[phi(u)^2]``, u ~ N(0, q).

        The q-derivative uses Stein's lemma, ``E[u phi(u) phi'(u)] / q``, so phi'' is
        never needed. q <= 3 uses the scaled Gauss-Hermite rule, larger q
        :func:`composite_rule`.
        """
        q = np.maximum(np.asarray(q, dtype=np.float64), Q_FLOOR)
        large = q > _Q_SMALL
        if not large.any():
            return self._moments_1d_small(q)
        second, deriv, slope = (np.empty_like(q) for _ in range(3))
        small = ~large
        if small.any():
            second[small], deriv[small], slope[small] = self._moments_1d_small(q[small])
        second[large], deriv[large], slope[large] = self._moments_1d_large(q[large])
        return second, deriv, slope

    def _moments_1d_small(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        root = np.sqrt(q)
        phi, dphi = self._phi(root[..., None] * self._z1)
        second = (phi * phi) @ self._w1
        deriv = (dphi * dphi) @ self._w1
        slope = (phi * dphi) @ (self._w1 * self._z1) / root
        return second, deriv, slope

    def _moments_1d_large(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The 1D moments of flat q (all > 3) on the composite rule, chunked."""
        nodes = composite_nodes()
        phi_m, dphi_m = self._fixed_values()
        fixed = np.stack([phi_m * phi_m, dphi_m * dphi_m, nodes * phi_m * dphi_m], -1)
        out = np.empty((q.size, 3))
        step = max(1, _CHUNK_ELEMENTS // (nodes.size + 2 * _TAIL_NODES))
        for start in range(0, q.size, step):
            part = q[start : start + step]
            tails, tail_w, fixed_w = composite_rule(np.zeros_like(part), np.sqrt(part))
            phi, dphi = self._phi(tails)
            tail_f = np.stack([phi * phi, dphi * dphi, tails * phi * dphi], -1)
            out[start : start + step] = fixed_w @ fixed + np.einsum("pk,pkj->pj", tail_w, tail_f)
        return out[:, 0], out[:, 1], out[:, 2] / q

    def _fixed_values(self) -> tuple[np.ndarray, np.ndarray]:
        """phi and phi' at the fixed nodes of the composite rule, computed once."""
        if getattr(self, "_fixed", None) is None:
            self._fixed = self._phi(np.array(composite_nodes()))
        return self._fixed

    def _pairs_large(self, q: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """2D expectations of flat (q, c) with q > 3: u1 on the composite rule, then u2 | u1.

        u2 | u1 ~ N(c u1, q (1 - c^2)) uses the scaled Gauss-Hermite rule where that
        variance is at most 3 and the composite rule where it is larger.
        """
        nodes = composite_nodes()
        n_outer = nodes.size + 2 * _TAIL_NODES
        cross, cross_d = np.empty_like(q), np.empty_like(q)
        spread = np.sqrt(q * np.maximum(1.0 - c * c, 0.0))
        narrow = spread * spread <= _Q_SMALL
        for group, n_inner in ((narrow, _INNER_NODES), (~narrow, n_outer)):
            idx = np.flatnonzero(group)
            step = max(1, _CHUNK_ELEMENTS // (n_outer * n_inner))
            for start in range(0, idx.size, step):
                part = idx[start : start + step]
                cross[part], cross_d[part] = self._pairs_chunk(q[part], c[part], spread[part])
        return cross, cross_d

    def _pairs_chunk(
        self, q: np.ndarray, c: np.ndarray, spread: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        nodes = composite_nodes()
        phi_m, dphi_m = self._fixed_values()
        tails, tail_w, fixed_w = composite_rule(np.zeros_like(q), np.sqrt(q))
        u1 = np.concatenate([np.broadcast_to(nodes, (q.size, nodes.size)), tails], -1)
        w1 = np.concatenate([fixed_w, tail_w], -1)  # (P, K)
        phi_t, dphi_t = self._phi(tails)
        phi1 = np.concatenate([np.broadcast_to(phi_m, fixed_w.shape), phi_t], -1)
        dphi1 = np.concatenate([np.broadcast_to(dphi_m, fixed_w.shape), dphi_t], -1)
        mean = c[:, None] * u1  # (P, K): u2 | u1 ~ N(mean, spread^2)
        if np.all(spread * spread <= _Q_SMALL):
            z, w = scaled_rule(_INNER_NODES)
            phi2, dphi2 = self._phi(mean[..., None] + spread[:, None, None] * z)
            inner, inner_d = phi2 @ w, dphi2 @ w
        else:
            tails2, tail_w2, fixed_w2 = composite_rule(mean, spread[:, None])
            phi2, dphi2 = self._phi(tails2)
            inner = fixed_w2 @ phi_m + np.einsum("pkj,pkj->pk", tail_w2, phi2)
            inner_d = fixed_w2 @ dphi_m + np.einsum("pkj,pkj->pk", tail_w2, dphi2)
        return (w1 * phi1 * inner).sum(-1), (w1 * dphi1 * inner_d).sum(-1)

    def moments_2d(self, q: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return ``E[phi(u1) phi(u2)]`` and ``E[phi'(u1) phi'(u2)]`` (q and c broadcast)."""
        q, c = np.broadcast_arrays(np.asarray(q, np.float64), np.asarray(c, np.float64))
        return self.pairs(q)(c, None)

    def pairs(self, q: np.ndarray) -> Pairs:
        raise NotImplementedError


class Quadrature(_OneDimensional):
    """Gauss-Hermite expectations for any activation, on a 2D tensor-product rule.

    The pair is written as u1 ~ N(0, q) and u2 | u1 ~ N(c u1, q (1 - c^2)); both
    integrals use :func:`scaled_rule` with ``n2`` nodes (Poole et al. 2016 write the
    same pair as sqrt(q) z1 and sqrt(q) (c z1 + sqrt(1 - c^2) z2)).

    Args:
        activation: The activation; phi' from autograd if it has no derivative.
        n1: Nodes of the 1D rule.
        n2: Nodes per axis of the 2D rule.

    Example:
        >>> import numpy as np
        >>> from gradwatch.theory.activations import resolve_activation
        >>> quad = Quadrature(resolve_activation("tanh"))
        >>> cross, _ = quad.moments_2d(np.array(1.0), np.array(1.0))
        >>> second, _, _ = quad.moments_1d(np.array(1.0))
        >>> bool(abs(cross - second) < 1e-10)
        True
    """

    # Defaults: ~1e-11 (1D, q <= 12) and ~1e-10 (2D, q <= 3) for tanh; see the module doc.
    def __init__(self, activation: Activation, n1: int = 200, n2: int = 100) -> None:
        super().__init__(activation, n1)
        self._n2 = n2
        self._z2, self._w2 = scaled_rule(n2)

    def pairs(self, q: np.ndarray) -> Pairs:
        """Bind q; see :meth:`GaussianMoments.pairs`."""
        q = np.maximum(np.asarray(q, dtype=np.float64), Q_FLOOR)

        def at(c: np.ndarray, index: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
            qi = q if index is None else q.ravel()[index]
            qq, cc = np.broadcast_arrays(qi, np.clip(np.asarray(c, np.float64), -1.0, 1.0))
            flat_q, flat_c = qq.ravel(), cc.ravel()
            cross, cross_d = np.empty_like(flat_q), np.empty_like(flat_q)
            small = np.flatnonzero(flat_q <= _Q_SMALL)
            step = max(1, _CHUNK_ELEMENTS // self._n2**2)
            for start in range(0, small.size, step):
                part = small[start : start + step]
                cross[part], cross_d[part] = self._chunk(flat_q[part], flat_c[part])
            large = np.flatnonzero(flat_q > _Q_SMALL)
            if large.size:
                cross[large], cross_d[large] = self._pairs_large(flat_q[large], flat_c[large])
            return cross.reshape(qq.shape), cross_d.reshape(qq.shape)

        return at

    def _chunk(self, q: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z, w = self._z2, self._w2
        u1 = np.sqrt(q)[:, None] * z  # (P, n)
        spread = np.sqrt(q * np.maximum(1.0 - c * c, 0.0))[:, None] * z  # u2 - c u1
        u2 = (c[:, None] * u1)[:, :, None] + spread[:, None, :]  # (P, n, n)
        phi1, dphi1 = self._phi(u1)
        phi2, dphi2 = self._phi(u2)
        return (phi1 * (phi2 @ w)) @ w, (dphi1 * (dphi2 @ w)) @ w


class HermiteSeries(_OneDimensional):
    """Gaussian expectations through Hermite coefficients and Mehler's formula.

    With orthonormal probabilists' Hermite polynomials h_k,
    ``a_k = E[phi(sqrt(q) z) h_k(z)]`` and ``d_k = E[phi'(sqrt(q) z) h_k(z)]``, Mehler's
    formula gives ``E[phi(u1) phi(u2)] = sum_k a_k^2 c^k`` and
    ``E[phi'(u1) phi'(u2)] = sum_k d_k^2 c^k`` (Daniely et al. 2016). All the
    coefficients for many q come from one matrix product on a plain Gauss-Hermite
    rule; each c-map evaluation after that is a polynomial. With the default
    ``terms`` the series is accurate to ~1e-7 for smooth activations and q < 5,
    and only to ~1e-3 near c = 1 for activations with a kink or for q >> 5.

    Args:
        activation: The activation; phi' from autograd if it has no derivative.
        n1: Nodes of the 1D moments (as in :class:`Quadrature`).
        terms: Number of Hermite terms kept.
        n_coef: Nodes of the plain rule used for the coefficients.

    Example:
        >>> import numpy as np
        >>> from gradwatch.theory.activations import resolve_activation
        >>> act = resolve_activation("tanh")
        >>> series, quad = HermiteSeries(act), Quadrature(act)
        >>> q, c = np.array([0.5]), np.array([0.3])
        >>> bool(np.allclose(series.moments_2d(q, c), quad.moments_2d(q, c), atol=1e-10))
        True
    """

    # Defaults: 160 terms leave ~1e-8 of tanh's series at q = 3, c = 0.999; the coefficient
    # rule needs more nodes than terms, as h_k oscillates k times.
    def __init__(
        self, activation: Activation, n1: int = 200, terms: int = 160, n_coef: int = 240
    ) -> None:
        super().__init__(activation, n1)
        self._xc, self._root_wc, self._basis = _hermite_basis(n_coef, terms)

    def coefficients(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Hermite coefficients ``a`` of phi(sqrt(q) z) and ``d`` of phi', shape (*q, terms).

        Example:
            >>> import numpy as np
            >>> from gradwatch.theory.activations import resolve_activation
            >>> a, d = HermiteSeries(resolve_activation("linear")).coefficients(np.array(4.0))
            >>> np.abs(a[:3]).round(12).tolist(), np.abs(d[:2]).round(12).tolist()
            ([0.0, 2.0, 0.0], [1.0, 0.0])
        """
        q = np.maximum(np.asarray(q, dtype=np.float64), Q_FLOOR)
        phi, dphi = self._phi(np.sqrt(q)[..., None] * self._xc)
        return (phi * self._root_wc) @ self._basis, (dphi * self._root_wc) @ self._basis

    def pairs(self, q: np.ndarray) -> Pairs:
        """Bind q; see :meth:`GaussianMoments.pairs`."""
        q = np.maximum(np.asarray(q, dtype=np.float64), Q_FLOOR)
        a, d = self.coefficients(q)
        # One row per power, highest first, flattened over q: Horner's scheme below.
        a2 = np.ascontiguousarray((a * a).reshape(-1, a.shape[-1])[:, ::-1].T)
        d2 = np.ascontiguousarray((d * d).reshape(-1, d.shape[-1])[:, ::-1].T)
        shape = np.shape(q)
        flat_q = q.ravel()
        # The series is only good to ~1e-3 for q >> 5: those q get the composite rule.
        large = flat_q > _SERIES_MAX_Q

        def at(c: np.ndarray, index: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
            c = np.clip(np.asarray(c, np.float64), -1.0, 1.0)
            ca, cd = (a2, d2) if index is None else (a2[:, index], d2[:, index])
            out_shape = shape if index is None else np.shape(index)
            flat = np.broadcast_to(c, out_shape).ravel()
            cross, cross_d = np.zeros_like(flat), np.zeros_like(flat)
            for row, row_d in zip(ca, cd, strict=True):
                cross = cross * flat + row
                cross_d = cross_d * flat + row_d
            which = large if index is None else large[np.ravel(index)]
            if which.any():
                qi = flat_q if index is None else flat_q[np.ravel(index)]
                cross[which], cross_d[which] = self._pairs_large(qi[which], flat[which])
            return cross.reshape(out_shape), cross_d.reshape(out_shape)

        return at


def moments_for(
    activation: Activation, closed_form: bool = True, method: str = "quadrature"
) -> GaussianMoments:
    """Pick the expectations engine for an activation.

    Args:
        activation: The activation.
        closed_form: Use the exact kernel when the activation has one; ``False``
            forces numerical integration (useful to test one against the other).
        method: ``"quadrature"`` (2D Gauss-Hermite) or ``"series"`` (Mehler).

    Returns:
        An engine implementing :class:`GaussianMoments`.

    Example:
        >>> from gradwatch.theory.activations import resolve_activation
        >>> type(moments_for(resolve_activation("relu"))).__name__
        'ReluKernel'
        >>> type(moments_for(resolve_activation("relu"), closed_form=False)).__name__
        'Quadrature'
    """
    if closed_form and activation.closed_form in CLOSED_FORMS:
        return CLOSED_FORMS[activation.closed_form]()
    if method == "quadrature":
        return Quadrature(activation)
    if method == "series":
        return HermiteSeries(activation)
    raise ValueError(f"unknown method {method!r}; use 'quadrature' or 'series'")


@lru_cache(maxsize=4)
def _hermite_basis(n: int, terms: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plain hermegauss(n) nodes x, sqrt of the weights, and ``sqrt(w_i) h_k(x_i)``.

    h_k are the orthonormal Hermite polynomials, the basis has shape (n, terms).
    Carrying sqrt(w) through the three-term recurrence
    h_{k+1} = (x h_k - sqrt(k) h_{k-1}) / sqrt(k + 1) keeps every value bounded.
    """
    x, w = hermegauss(n)
    w = w / w.sum()
    basis = np.empty((x.size, terms))
    basis[:, 0] = np.sqrt(w)
    if terms > 1:
        basis[:, 1] = x * basis[:, 0]
    for k in range(1, terms - 1):
        basis[:, k + 1] = (x * basis[:, k] - np.sqrt(k) * basis[:, k - 1]) / np.sqrt(k + 1)
    for array in (x, w, basis):
        array.flags.writeable = False
    return x, np.sqrt(w), basis
