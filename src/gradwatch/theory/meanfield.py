"""Mean-field theory of deep random networks: phases, depth scales and the edge of chaos.

Convention: h^l = W^l phi(h^{l-1}) + b^l with W_ij ~ N(0, sigma_w2 / N) and
b_i ~ N(0, sigma_b2); every input here is a variance. The theory follows Poole et al.
2016 (Exponential expressivity in deep neural networks through transient chaos) and
Schoenholz et al. 2017 (Deep information propagation):

- q* is the fixed point of the length map, chi1 = sigma_w2 E[phi'(u)^2] at q*;
- chi1 < 1 is the ordered phase (c* = 1, gradients vanish), chi1 > 1 the chaotic
  phase (c* < 1, gradients explode), chi1 = 1 the edge of chaos;
- the depth scales xi = 1 / |ln(slope)| are the number of layers over which a
  perturbation of q, of c, or the gradient norm changes by a factor e; they are
  infinite at criticality, and networks deeper than about 6 xi_c do not train.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._extras import require
from .activations import Activation, TensorFn, resolve_activation
from .fixed_points import CRITICAL_TOL, solve_chi1, solve_fixed_points
from .gaussian import GaussianMoments, moments_for

__all__ = ["MeanField", "PhaseDiagram", "critical_sigma_w2", "phase_diagram", "depth_scale"]

# Schoenholz et al. 2017: random networks train only up to about 6 correlation depth scales.
TRAINABLE_DEPTH_FACTOR = 6.0

ActivationSpec = str | TensorFn | Activation


def depth_scale(slope: float | np.ndarray) -> float | np.ndarray:
    """Depth scale ``1 / |ln|slope||`` of a map with the given slope at its fixed point.

    A perturbation grows or shrinks by ``slope`` per layer, so by a factor e every
    ``depth_scale(slope)`` layers. It is infinite at ``slope == 1`` (within 1e-9),
    the edge of chaos, and ``nan`` for a ``nan`` slope.

    Args:
        slope: Per-layer factor (chi1, chi_c or the q-map slope).

    Returns:
        The depth scale, a float for a float input.

    Example:
        >>> round(depth_scale(0.759), 2)
        3.63
        >>> depth_scale(1.0)
        inf
    """
    s = np.abs(np.asarray(slope, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        log = np.abs(np.log(s))
        out = np.where(log < CRITICAL_TOL, np.inf, 1.0 / log)
    return float(out) if out.ndim == 0 else out


class MeanField:
    """The mean-field state of a deep random network with one activation.

    Args:
        activation: A registered name (``"tanh"``, ``"relu"``, ...), any elementwise
            torch callable, or an :class:`~gradwatch.theory.activations.Activation`.
        sigma_w2: Weight variance times fan-in, ``Var(W_ij) * N``.
        sigma_b2: Bias variance.
        closed_form: Use the closed-form kernels of relu, erf and linear (default);
            ``False`` integrates numerically like any other activation.
        q0: Input length from which the q-map is iterated to q*.

    Attributes:
        q_star: Fixed point of the length map (0 when the signal dies out, inf when it
            explodes, as for relu with sigma_w2 > 2).
        chi1: ``sigma_w2 E[phi'(sqrt(q*) z)^2]``: the mean squared singular value of one
            layer's Jacobian, the per-layer factor of ``||gradient||^2``.
        c_star: Attracting fixed point of the correlation map; 1 in the ordered phase.
        chi_c: Slope of the c-map at c* (``sigma_w2 E[phi'(u1) phi'(u2)]``).
        xi_q: Depth scale of the length, ``1/|ln(dq'/dq at q*)|``.
        xi_c: Depth scale of correlations: ``-1/ln chi1`` in the ordered phase,
            ``-1/ln chi_c`` in the chaotic phase; infinite at the edge of chaos.
        xi_grad: Depth scale of the gradient norm, ``1/|ln chi1|``: gradients shrink
            (chi1 < 1) or grow (chi1 > 1) by e every xi_grad layers; inf at chi1 = 1.
        trainable_depth: ``6 xi_c``, the depth up to which Schoenholz et al. 2017 found
            such networks trainable.
        phase: ``"ordered"``, ``"critical"`` or ``"chaotic"``.

    With an infinite q* there is no fixed point: chi1 and xi_grad are the large-q
    limits, and c_star, chi_c, xi_q, xi_c and trainable_depth are ``nan``.

    Example:
        >>> mf = MeanField("tanh", sigma_w2=1.0, sigma_b2=0.05)
        >>> mf.phase, round(mf.chi1, 3), round(mf.xi_c, 2)
        ('ordered', 0.759, 3.63)
    """

    def __init__(
        self,
        activation: ActivationSpec,
        sigma_w2: float,
        sigma_b2: float,
        *,
        closed_form: bool = True,
        q0: float = 1.0,
    ) -> None:
        _check_variance("sigma_w2", sigma_w2)
        _check_variance("sigma_b2", sigma_b2)
        self.activation = resolve_activation(activation)
        self.sigma_w2 = float(sigma_w2)
        self.sigma_b2 = float(sigma_b2)
        self._moments: GaussianMoments = moments_for(self.activation, closed_form)
        fp = solve_fixed_points(
            self._moments, np.array([self.sigma_w2]), np.array([self.sigma_b2]), q0
        )
        self.q_star = float(fp.q_star[0])
        self.chi1 = float(fp.chi1[0])
        self.c_star = float(fp.c_star[0])
        self.chi_c = float(fp.chi_c[0])
        self._q_eval = float(fp.q_eval[0])
        exploded = math.isinf(self.q_star)
        self.xi_q = math.nan if exploded else depth_scale(float(fp.q_slope[0]))
        self.xi_c = depth_scale(self.chi_c)
        self.xi_grad = depth_scale(self.chi1)
        self.trainable_depth = TRAINABLE_DEPTH_FACTOR * self.xi_c

    @property
    def phase(self) -> str:
        """``"ordered"`` (chi1 < 1), ``"critical"`` (chi1 = 1 within 1e-9) or ``"chaotic"``."""
        if abs(self.chi1 - 1.0) <= CRITICAL_TOL:
            return "critical"
        return "ordered" if self.chi1 < 1.0 else "chaotic"

    def q_map(self, q: float | np.ndarray) -> float | np.ndarray:
        """Length map ``q' = sigma_w2 E[phi(sqrt(q) z)^2] + sigma_b2``.

        Args:
            q: Pre-activation variance(s) of the layer below.

        Returns:
            The next layer's variance(s), a float for a float input.

        Example:
            >>> mf = MeanField("linear", sigma_w2=0.5, sigma_b2=1.0)
            >>> mf.q_map(2.0)
            2.0
        """
        second, _, _ = self._moments.moments_1d(np.asarray(q, dtype=np.float64))
        return _same_kind(q, self.sigma_w2 * second + self.sigma_b2)

    def c_map(self, c: float | np.ndarray) -> float | np.ndarray:
        """Correlation map at the fixed length q*.

        ``c' = (sigma_w2 E[phi(u1) phi(u2)] + sigma_b2) / q'`` where (u1, u2) have
        variance q* and correlation c and q' = q-map(q*) (= q* up to the solver's
        tolerance; it keeps c' = 1 at c = 1 exactly).

        Args:
            c: Correlation(s) in [-1, 1] between two inputs' pre-activations.

        Returns:
            The next layer's correlation(s).

        Example:
            >>> mf = MeanField("relu", sigma_w2=2.0, sigma_b2=0.0)
            >>> round(mf.c_map(0.0), 4)
            0.3183
        """
        cross, _ = self._pairs(c)
        return _same_kind(c, (self.sigma_w2 * cross + self.sigma_b2) / self._q_next)

    def c_map_slope(self, c: float | np.ndarray) -> float | np.ndarray:
        """Slope ``dc'/dc = sigma_w2 E[phi'(u1) phi'(u2)]`` of the c-map at q*.

        Args:
            c: Correlation(s) in [-1, 1].

        Returns:
            The slope(s); at c = 1 this is chi1.

        Example:
            >>> mf = MeanField("tanh", sigma_w2=1.5, sigma_b2=0.05)
            >>> round(mf.c_map_slope(1.0), 4) == round(mf.chi1, 4)
            True
        """
        _, cross_d = self._pairs(c)
        return _same_kind(c, self.sigma_w2 * self._q_eval * cross_d / self._q_next)

    def iterate_c_map(self, c0: float, layers: int) -> np.ndarray:
        """Correlations ``c^0 = c0, c^1, ..., c^layers`` through a deep network at q*.

        Args:
            c0: Correlation of the two inputs.
            layers: Number of layers.

        Returns:
            Array of length ``layers + 1``.

        Example:
            >>> MeanField("relu", 2.0, 0.0).iterate_c_map(0.0, 2).round(4).tolist()
            [0.0, 0.3183, 0.4937]
        """
        out = np.empty(layers + 1)
        out[0] = c0
        for layer in range(layers):
            out[layer + 1] = self.c_map(out[layer])
        return out

    def iterate_q_map(self, q0: float, layers: int) -> np.ndarray:
        """Lengths ``q^0 = q0, ..., q^layers`` of one input's pre-activations.

        Args:
            q0: Variance of the input pre-activations.
            layers: Number of layers.

        Returns:
            Array of length ``layers + 1``.

        Example:
            >>> MeanField("linear", 0.5, 1.0).iterate_q_map(0.0, 2).tolist()
            [0.0, 1.0, 1.5]
        """
        out = np.empty(layers + 1)
        out[0] = q0
        for layer in range(layers):
            out[layer + 1] = self.q_map(out[layer])
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: the inputs and every attribute; non-finite numbers become ``None``.

        ``None`` stands for an infinite depth scale (the edge of chaos) or an
        infinite q*, and for the undefined (nan) values that come with it.

        Example:
            >>> sorted(MeanField("tanh", 1.5, 0.05).to_dict())[:3]
            ['activation', 'c_star', 'chi1']
        """
        values = {
            "activation": self.activation.name,
            "sigma_w2": self.sigma_w2,
            "sigma_b2": self.sigma_b2,
            "q_star": self.q_star,
            "chi1": self.chi1,
            "c_star": self.c_star,
            "xi_q": self.xi_q,
            "xi_c": self.xi_c,
            "xi_grad": self.xi_grad,
            "trainable_depth": self.trainable_depth,
        }
        return {
            k: (v if isinstance(v, str) or math.isfinite(v) else None) for k, v in values.items()
        }

    def __repr__(self) -> str:
        return (
            f"MeanField({self.activation.name!r}, sigma_w2={self.sigma_w2:g}, "
            f"sigma_b2={self.sigma_b2:g}: {self.phase}, q*={self.q_star:.4g}, "
            f"chi1={self.chi1:.4g}, c*={self.c_star:.4g}, xi_c={self.xi_c:.4g})"
        )

    @property
    def _q_next(self) -> float:
        second, _, _ = self._moments.moments_1d(np.array(self._q_eval))
        return float(self.sigma_w2 * second + self.sigma_b2)

    def _pairs(self, c: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = np.asarray(c, dtype=np.float64)
        if np.any(np.abs(c) > 1.0):
            raise ValueError("a correlation must lie in [-1, 1]")
        return self._moments.pairs(np.full(c.shape, self._q_eval))(c, None)


def critical_sigma_w2(
    activation: ActivationSpec,
    sigma_b2: float | Iterable[float],
    *,
    closed_form: bool = True,
) -> float | np.ndarray:
    """The order-to-chaos line: the sigma_w2 at which chi1 = 1 for a given sigma_b2.

    Solved with ``scipy.optimize.brentq`` to about 1e-12 (Schoenholz et al. 2017, Fig. 1;
    Poole et al. 2016). For tanh at sigma_b2 = 0 it is 1; for relu it is 2 (He et al.
    2015) for every sigma_b2, although with sigma_b2 > 0 q* is only finite below it.

    Args:
        activation: Name, torch callable or Activation.
        sigma_b2: One bias variance or several.
        closed_form: As in :class:`MeanField`.

    Returns:
        The critical sigma_w2, a float for one sigma_b2 or an array for several.

    Raises:
        ValueError: If chi1 never reaches 1 for sigma_w2 up to 1e4, or a variance is negative.
        ImportError: If scipy (the ``gradwatch[theory]`` extra) is missing.

    Example:
        >>> round(critical_sigma_w2("tanh", 0.05), 3)
        1.761
        >>> critical_sigma_w2("relu", [0.0, 0.1]).round(6).tolist()
        [2.0, 2.0]
    """
    brentq = require("scipy.optimize", "theory").brentq
    act = resolve_activation(activation)
    moments = moments_for(act, closed_form)
    values = np.atleast_1d(np.asarray(sigma_b2, dtype=np.float64))
    out = np.empty_like(values)
    for i, sb in enumerate(values):
        _check_variance("sigma_b2", sb)

        def excess(sw: float, sb: float = float(sb)) -> float:
            return float(solve_chi1(moments, np.array(sw), np.array(sb))) - 1.0

        # chi1 ~ sigma_w2 phi'^2 is tiny at sigma_w2 = 1e-6; double hi until chi1 > 1.
        lo, hi = 1e-6, 2.0
        while excess(hi) < 0.0:
            lo, hi = hi, 2.0 * hi
            if hi > 1e4:
                raise ValueError(
                    f"chi1 of {act.name!r} stays below 1 for sigma_w2 up to 1e4 at "
                    f"sigma_b2={sb:g}: no order-to-chaos transition"
                )
        if excess(lo) > 0.0:
            raise ValueError(f"chi1 of {act.name!r} exceeds 1 already at sigma_w2={lo:g}")
        out[i] = brentq(excess, lo, hi, xtol=1e-12, maxiter=500)
    return float(out[0]) if np.ndim(sigma_b2) == 0 else out


@dataclass(frozen=True)
class PhaseDiagram:
    """chi1, xi_c, q* and c* over a grid; 2D arrays are indexed ``[sigma_b2, sigma_w2]``.

    Attributes:
        activation: Name of the activation.
        sigma_w2: The sigma_w2 grid (columns).
        sigma_b2: The sigma_b2 grid (rows).
        chi1: chi1 at every grid point.
        xi_c: Correlation depth scale (inf on the critical line, nan where q* = inf).
        q_star: Length fixed point.
        c_star: Correlation fixed point.

    Example:
        >>> import numpy as np
        >>> pd = phase_diagram("tanh", np.array([1.0, 2.0]), np.array([0.05]))
        >>> (pd.chi1[0] > 1).tolist()
        [False, True]
    """

    activation: str
    sigma_w2: np.ndarray
    sigma_b2: np.ndarray
    chi1: np.ndarray
    xi_c: np.ndarray
    q_star: np.ndarray
    c_star: np.ndarray


def phase_diagram(
    activation: ActivationSpec,
    sigma_w2_grid: Iterable[float],
    sigma_b2_grid: Iterable[float],
    *,
    closed_form: bool = True,
) -> PhaseDiagram:
    """chi1 and xi_c on a (sigma_w2, sigma_b2) grid, the picture of Poole et al. 2016 Fig. 2.

    All grid points are solved together. The c-map uses the Hermite series of
    :class:`~gradwatch.theory.gaussian.HermiteSeries` (Mehler's formula) rather than
    2D quadrature, so a 100 x 100 grid takes a fraction of a second; it agrees with
    :class:`MeanField` to about 1e-7 relative for smooth activations with q* < 5.
    Points with q* > 5, where the series is inaccurate, use the composite quadrature
    of :mod:`.gaussian` instead: as accurate, but ~50 ms each in the chaotic phase.

    Args:
        activation: Name, torch callable or Activation.
        sigma_w2_grid: Weight variances (columns of the result).
        sigma_b2_grid: Bias variances (rows of the result).
        closed_form: As in :class:`MeanField`.

    Returns:
        A :class:`PhaseDiagram`.

    Example:
        >>> import numpy as np
        >>> pd = phase_diagram("tanh", np.linspace(0.5, 4, 8), np.linspace(0, 1, 5))
        >>> pd.chi1.shape
        (5, 8)
    """
    act = resolve_activation(activation)
    sw = np.asarray(list(sigma_w2_grid), dtype=np.float64)
    sb = np.asarray(list(sigma_b2_grid), dtype=np.float64)
    for name, grid in (("sigma_w2", sw), ("sigma_b2", sb)):
        if grid.ndim != 1 or grid.size == 0 or np.any(grid < 0) or not np.all(np.isfinite(grid)):
            raise ValueError(f"{name} grid must be a non-empty 1D list of finite variances >= 0")
    moments = moments_for(act, closed_form, method="series")
    fp = solve_fixed_points(moments, sw[None, :], sb[:, None])
    return PhaseDiagram(
        activation=act.name,
        sigma_w2=sw,
        sigma_b2=sb,
        chi1=fp.chi1,
        xi_c=depth_scale(fp.chi_c),
        q_star=fp.q_star,
        c_star=fp.c_star,
    )


def _check_variance(name: str, value: float) -> None:
    if not (isinstance(value, int | float | np.floating | np.integer) and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} is a variance and must be >= 0, got {value:g}")


def _same_kind(like: Any, value: np.ndarray) -> float | np.ndarray:
    return float(value) if np.ndim(like) == 0 else value
