"""Result types of :mod:`gradwatch.theory.jacobian`, each with a JSON-ready ``to_dict``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from torch import Tensor


def _to_builtin(value: object) -> object:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _to_builtin(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_builtin(v) for v in value]
    return value


class _JSONMixin:
    def to_dict(self) -> dict:
        """A JSON-ready dict: tensors become lists, infinities the strings "inf"/"-inf"."""
        return _to_builtin(asdict(self))  # type: ignore[call-overload, return-value]


@dataclass(frozen=True)
class SingularValues(_JSONMixin):
    """Singular values of ``J``, as returned by :func:`singular_values`.

    Attributes:
        values: descending. All ``min(m, n)`` values when ``k`` was None, else the ``k``
            largest.
        smallest: ascending: the ``k`` smallest of the ``min(m, n)`` values. Only the
            exact path with ``k`` fills it; None otherwise.
        path: ``"exact"`` or ``"iterative"``.
        shape: ``(m, n)``, the Jacobian's shape (output elements, input elements).
        seconds: wall time taken.
        rel_residuals: iterative path only: for each value ``s_i`` there is a true
            squared singular value within ``rel_residuals[i] * s_i^2`` of ``s_i^2``.
        iterations: iterative path only: block steps taken.
        products: iterative path only: vectors the Gram matrix was applied to (each is
            one jvp and one vjp through the model).
        converged: False if the iterative path stopped at ``max_iters``.
    """

    values: Tensor
    smallest: Tensor | None
    path: str
    shape: tuple[int, int]
    seconds: float
    rel_residuals: Tensor | None = None
    iterations: int | None = None
    products: int | None = None
    converged: bool = True


@dataclass(frozen=True)
class SpectrumStats(_JSONMixin):
    """Dynamical-isometry measures of ``J``, as returned by :func:`spectrum_stats`.

    Moments are over the ``dim = min(m, n)`` squared singular values ``s_i^2``, the
    eigenvalues of the smaller Gram matrix; for a square ``J`` they are the paper's
    ``tr(J J^T) / N`` and ``tr((J J^T)^2) / N``.

    Attributes:
        m1: mean of ``s_i^2``.
        m2: mean of ``s_i^4``.
        normalized_variance: ``m2 / m1**2 - 1``, the variance over the squared mean.
        sigma_max: the largest singular value.
        condition_number: ``sigma_max / sigma_min`` (exact path only; ``inf`` if
            ``sigma_min`` is 0).
        path: ``"exact"`` or ``"iterative"``.
        dim: ``min(m, n)``.
        shape: ``(m, n)``.
        probes: Hutchinson probes used (iterative path only).
        m1_se, m2_se, normalized_variance_se: standard errors of the Hutchinson
            estimates (delta method for the ratio); None on the exact path.
        seconds: wall time taken.
    """

    m1: float
    m2: float
    normalized_variance: float
    sigma_max: float
    condition_number: float | None
    path: str
    dim: int
    shape: tuple[int, int]
    seconds: float
    probes: int | None = None
    m1_se: float | None = None
    m2_se: float | None = None
    normalized_variance_se: float | None = None


@dataclass(frozen=True)
class SpectralDensity(_JSONMixin):
    """Density of the squared singular values, as returned by :func:`spectral_density`.

    ``nodes`` and ``weights`` have shape ``(probes, steps)``: row ``i`` is the Gauss
    quadrature rule of probe ``i`` (its weights sum to one). Each row's moment
    ``sum(weights[i] * nodes[i]**p)`` equals ``v_i^T G^p v_i`` for a random unit vector
    ``v_i`` (exactly, for ``p < 2 * steps``), an unbiased estimate of ``mean(s^(2p))``;
    the spread over rows is its noise. ``density`` is the average rule smoothed by a
    Gaussian of width ``sigma`` and evaluated on ``grid`` (in ``log10`` of the squared
    singular value when ``log_scale``); it integrates to one.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    log_scale: bool
    dim: int
    probes: int
    steps: int
    seconds: float


@dataclass(frozen=True)
class LayerGain(_JSONMixin):
    """One leaf-module call's Jacobian gains, as returned by :func:`layer_gains`.

    Attributes:
        name: the module's qualified name in the model.
        call: 0 for its first call in the forward pass, 1 for the second, and so on.
        kind: the module's class name.
        in_shape, out_shape: the shapes it saw.
        spectral_norm: largest singular value of its input-output Jacobian.
        frobenius_rms: ``||J||_F / sqrt(n_in)``, the root-mean-square gain of a random
            input direction (``n_in`` = input elements).
        frobenius_rms_se: standard error of ``frobenius_rms`` (Hutchinson; 0 if exact).
        path: ``"exact"`` (SVD of the formed layer Jacobian) or ``"iterative"``.
        converged: whether the iteration settled (always True when exact).
    """

    name: str
    call: int
    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    spectral_norm: float
    frobenius_rms: float
    frobenius_rms_se: float
    path: str
    converged: bool = field(default=True)
