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
tanh up to q = 12, 100 nodes per axis ~1e-10 in 2D for q <= 3. Activations with a kink
(relu, selu, leaky relu) converge only algebraically, so relu, erf and linear use the
closed forms of :mod:`.kernels`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Protocol

import numpy as np
import torch
from numpy.polynomial.hermite_e import hermegauss

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
        never needed.
        """
        q = np.maximum(np.asarray(q, dtype=np.float64), Q_FLOOR)
        root = np.sqrt(q)
        phi, dphi = self._phi(root[..., None] * self._z1)
        second = (phi * phi) @ self._w1
        deriv = (dphi * dphi) @ self._w1
        slope = (phi * dphi) @ (self._w1 * self._z1) / root
        return second, deriv, slope

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
            step = max(1, _CHUNK_ELEMENTS // self._n2**2)
            for start in range(0, flat_q.size, step):
                part = slice(start, start + step)
                cross[part], cross_d[part] = self._chunk(flat_q[part], flat_c[part])
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
        a, d = self.coefficients(q)
        # One row per power, highest first, flattened over q: Horner's scheme below.
        a2 = np.ascontiguousarray((a * a).reshape(-1, a.shape[-1])[:, ::-1].T)
        d2 = np.ascontiguousarray((d * d).reshape(-1, d.shape[-1])[:, ::-1].T)
        shape = np.shape(q)

        def at(c: np.ndarray, index: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
            c = np.clip(np.asarray(c, np.float64), -1.0, 1.0)
            ca, cd = (a2, d2) if index is None else (a2[:, index], d2[:, index])
            out_shape = shape if index is None else np.shape(index)
            flat = np.broadcast_to(c, out_shape).ravel()
            cross, cross_d = np.zeros_like(flat), np.zeros_like(flat)
            for row, row_d in zip(ca, cd, strict=True):
                cross = cross * flat + row
                cross_d = cross_d * flat + row_d
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
