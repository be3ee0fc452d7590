"""Closed-form Gaussian kernels: the activations whose mean-field maps need no quadrature.

Each class answers the same questions as :class:`gradwatch.theory.gaussian.Quadrature`
(see :class:`gradwatch.theory.gaussian.GaussianMoments`), exactly. With u ~ N(0, q) and
(u1, u2) of variance q and correlation c:

- relu: the degree-1 arc-cosine kernel of Cho & Saul 2009;
- erf: the kernel of Williams 1997 (``E[erf(a) erf(b)] = 2/pi arcsin(...)``);
- linear: ``E[u1 u2] = q c``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

__all__ = ["ReluKernel", "ErfKernel", "LinearKernel", "CLOSED_FORMS"]

Pairs = Callable[[np.ndarray, np.ndarray | None], tuple[np.ndarray, np.ndarray]]


class _Kernel:
    """Shared plumbing: ``pairs(q)`` binds q and returns ``c -> moments_2d(q, c)``."""

    def moments_2d(self, q: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def pairs(self, q: np.ndarray) -> Pairs:
        """Return ``(c, index) -> (E[phi(u1) phi(u2)], E[phi'(u1) phi'(u2)])`` at the variances q.

        ``index`` picks entries of the flattened q (``None``: all of them).
        """
        q = np.asarray(q, dtype=np.float64)

        def at(c: np.ndarray, index: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
            return self.moments_2d(q if index is None else q.ravel()[index], c)

        return at


class ReluKernel(_Kernel):
    """Relu: ``E[relu(u1) relu(u2)] = q (sqrt(1 - c^2) + (pi - arccos c) c) / (2 pi)``.

    The derivative kernel is ``E[relu'(u1) relu'(u2)] = (pi - arccos c) / (2 pi)``
    (Cho & Saul 2009, degree 0 and 1).

    Example:
        >>> import numpy as np
        >>> cross, cross_d = ReluKernel().moments_2d(np.array(1.0), np.array(0.0))
        >>> round(float(cross), 6), float(cross_d)
        (0.159155, 0.25)
    """

    def moments_1d(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return ``E[phi(u)^2]``, ``E[phi'(u)^2]`` and ``d/dq E[phi(u)^2]``."""
        q = np.asarray(q, dtype=np.float64)
        half = np.full_like(q, 0.5)
        return q / 2.0, half, half.copy()

    def moments_2d(self, q: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return ``E[phi(u1) phi(u2)]`` and ``E[phi'(u1) phi'(u2)]``."""
        q, c = np.broadcast_arrays(np.asarray(q, np.float64), np.asarray(c, np.float64))
        c = np.clip(c, -1.0, 1.0)
        theta = np.arccos(c)
        cross = q * (np.sqrt(1.0 - c * c) + (math.pi - theta) * c) / (2.0 * math.pi)
        return cross, (math.pi - theta) / (2.0 * math.pi)


class ErfKernel(_Kernel):
    """Erf: ``E[erf(u1) erf(u2)] = (2/pi) arcsin(2 q c / (1 + 2 q))`` (Williams 1997).

    The derivative kernel follows from erf'(x) = 2/sqrt(pi) exp(-x^2):
    ``E[erf'(u1) erf'(u2)] = (4/pi) / sqrt((1 + 2q)^2 - (2 q c)^2)``.

    Example:
        >>> import numpy as np
        >>> second, deriv, _ = ErfKernel().moments_1d(np.array(0.0))
        >>> float(second), round(float(deriv), 6)
        (0.0, 1.27324)
    """

    def moments_1d(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return ``E[phi(u)^2]``, ``E[phi'(u)^2]`` and ``d/dq E[phi(u)^2]``."""
        q = np.asarray(q, dtype=np.float64)
        root = np.sqrt(1.0 + 4.0 * q)
        second = (2.0 / math.pi) * np.arcsin(2.0 * q / (1.0 + 2.0 * q))
        return second, (4.0 / math.pi) / root, (4.0 / math.pi) / ((1.0 + 2.0 * q) * root)

    def moments_2d(self, q: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return ``E[phi(u1) phi(u2)]`` and ``E[phi'(u1) phi'(u2)]``."""
        q, c = np.broadcast_arrays(np.asarray(q, np.float64), np.asarray(c, np.float64))
        c = np.clip(c, -1.0, 1.0)
        cross = (2.0 / math.pi) * np.arcsin(2.0 * q * c / (1.0 + 2.0 * q))
        cross_d = (4.0 / math.pi) / np.sqrt((1.0 + 2.0 * q) ** 2 - (2.0 * q * c) ** 2)
        return cross, cross_d


class LinearKernel(_Kernel):
    """Identity: ``E[u1 u2] = q c`` and ``E[1 * 1] = 1``.

    Example:
        >>> import numpy as np
        >>> float(LinearKernel().moments_2d(np.array(2.0), np.array(0.5))[0])
        1.0
    """

    def moments_1d(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return ``E[phi(u)^2]``, ``E[phi'(u)^2]`` and ``d/dq E[phi(u)^2]``."""
        q = np.asarray(q, dtype=np.float64)
        return q.copy(), np.ones_like(q), np.ones_like(q)

    def moments_2d(self, q: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return ``E[phi(u1) phi(u2)]`` and ``E[phi'(u1) phi'(u2)]``."""
        q, c = np.broadcast_arrays(np.asarray(q, np.float64), np.asarray(c, np.float64))
        return q * c, np.ones_like(q)


CLOSED_FORMS: dict[str, type[_Kernel]] = {
    "relu": ReluKernel,
    "erf": ErfKernel,
    "linear": LinearKernel,
}
