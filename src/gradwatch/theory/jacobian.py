"""Singular values of the input-output Jacobian of a model at one input.

A gradient reaching the input of a network is the output gradient multiplied by ``J^T``,
with ``J = d f(x) / d x`` the product of the layers' Jacobians. The singular values of
``J`` say which directions are amplified and which are lost; dynamical isometry means
they all sit near one (Pennington, Schoenholz & Ganguli 2017, arXiv:1711.04735; 2018,
arXiv:1802.09979).

**What the input vector is.** The whole input tensor ``x`` is the input vector and the
whole output tensor the output vector, so ``J`` has shape ``(f(x).numel(), x.numel())``.
A batch of ``B`` independent samples therefore gives a block-diagonal ``J`` whose
spectrum is the union of the ``B`` per-sample spectra (plus cross terms if the model
mixes samples, as BatchNorm in training mode does) at ``B^2`` times the memory of one
block. gradwatch does not split the batch for you, because whether samples interact is
the model's business; pass one sample (``x[:1]``) for the usual per-example Jacobian.
Put the model in ``eval()`` mode first when it has dropout (a random function has no
single Jacobian) or BatchNorm.

**Two paths.** With ``method="auto"`` the exact path runs whenever the dense Jacobian
takes at most ``EXACT_MAX_BYTES`` (64 MiB): it is formed with ``torch.func.jacrev`` (one
vjp per output, when outputs are fewer) or with batched jvps (one per input), then
``torch.linalg.svdvals`` gives every singular value. Otherwise the iterative path works on
the Gram matrix ``G`` (``J^T J`` or ``J J^T``, whichever is smaller) through batched jvps
and vjps and never forms ``J``.

**What the iterative path cannot promise.** It finds the *largest* singular values. The
smallest ones of an ill-conditioned Jacobian are out of its reach: a Krylov method on
``G`` resolves eigenvalues only down to about ``sigma_max^2`` times the float precision,
and convergence at the bottom of a spectrum with condition number ``1e11`` stalls (scipy's
``svds`` did not converge in 15 minutes on a 64-layer tanh MLP). Ask for the exact path
(``method="exact"``) when the smallest values matter and the matrix fits in memory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor

from gradwatch.theory._jacobian_results import (
    LayerGain,
    SingularValues,
    SpectralDensity,
    SpectrumStats,
)
from gradwatch.theory._krylov import (
    batched_lanczos,
    block_krylov_top,
    hutchinson_moments,
)
from gradwatch.theory._layers import layer_gains
from gradwatch.theory._linops import EXACT_MAX_BYTES, JacobianOperator, Method, choose_path

__all__ = [
    "EXACT_MAX_BYTES",
    "LayerGain",
    "SingularValues",
    "SpectralDensity",
    "SpectrumStats",
    "layer_gains",
    "singular_values",
    "spectral_density",
    "spectrum_stats",
]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _default_block(k: int) -> int:
    # A few vectors beyond k: block Krylov needs no more than k for gap-free accuracy
    # (Musco & Musco 2015); on the bench's conv stack, blocks of k to k + 2 needed the
    # fewest model passes for the top 10 (210-228, against 280 with a block of 2k).
    return k + max(2, k // 4)


def _max_basis(d: int, block: int) -> int:
    # Keep the float64 basis and its image (2 * rows * d * 8 bytes) under 1 GiB.
    by_memory = 2**30 // (16 * d)
    return max(2 * block + 1, min(16 * block, by_memory))


def singular_values(
    f: Callable[[Tensor], Tensor],
    x: Tensor,
    k: int | None = None,
    method: Method = "auto",
    *,
    tol: float = 1e-3,
    max_iters: int = 500,
    block_size: int | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
) -> SingularValues:
    """Singular values of the input-output Jacobian of ``f`` at ``x``.

    ``method="auto"`` forms the Jacobian (exact path) when it takes at most
    ``EXACT_MAX_BYTES`` (64 MiB), else runs randomized block Krylov with Rayleigh-Ritz on
    ``J^T J`` or ``J J^T`` through batched jvps and vjps (iterative path; Halko,
    Martinsson & Tropp 2011; Musco & Musco 2015), which needs ``k`` and returns only the
    largest values. See the module docstring for batches and for what the iterative path
    cannot promise (the smallest values of an ill-conditioned ``J``).

    Args:
        f: a module or function of one tensor returning one tensor.
        x: the input; the whole tensor is the input vector (pass ``x[:1]`` for one sample).
        k: how many of the largest (and, on the exact path, smallest) values to return;
            None returns all of them and needs the exact path.
        method: ``"auto"``, ``"exact"`` or ``"iterative"``.
        tol: iterative path: target relative accuracy of each ``s_i^2`` (so about
            ``tol / 2`` on ``s_i``).
        max_iters: iterative path: most block steps.
        block_size: iterative path: vectors per block (default ``k + max(2, k // 4)``).
        seed: seed of the random start block.
        chunk_size: vectors per vmapped model pass (default from the activation memory).

    Returns:
        A :class:`SingularValues`.

    Raises:
        ValueError: if ``x`` does not fit ``f`` (the message names the shape and the
            model's own error), or ``k`` is None on the iterative path.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
        >>> sv = singular_values(net, torch.randn(1, 8), k=2)
        >>> sv.path, sv.values.shape, sv.smallest.shape
        ('exact', torch.Size([2]), torch.Size([2]))
    """
    start = time.perf_counter()
    op = JacobianOperator(f, x, chunk_size=chunk_size)
    path = choose_path(op, method)
    if k is not None and k < 1:
        raise ValueError(f"k must be a positive number of singular values, not {k}")
    if path == "exact":
        s = torch.linalg.svdvals(op.matrix())
        values, smallest = (s, None) if k is None else (s[:k], s.flip(0)[:k])
        return SingularValues(values, smallest, "exact", (op.m, op.n), time.perf_counter() - start)
    if k is None:
        raise ValueError(
            f"the Jacobian is {op.m} x {op.n} ({op.nbytes / 2**30:.1f} GiB), too large to form; "
            f"pass k=... for the k largest singular values, or method='exact' to form it anyway"
        )
    block = block_size or _default_block(k)
    top = block_krylov_top(
        op.gram,
        op.d,
        k,
        block=block,
        max_basis=_max_basis(op.d, block),
        tol=tol,
        max_iters=max_iters,
        generator=_generator(seed),
    )
    theta = top.values.clamp_min(0)
    return SingularValues(
        values=theta.sqrt().to(op.dtype),
        smallest=None,
        path="iterative",
        shape=(op.m, op.n),
        seconds=time.perf_counter() - start,
        rel_residuals=(top.residuals / theta.clamp_min(1e-300)).to(op.dtype),
        iterations=top.iterations,
        products=top.matvecs,
        converged=top.converged,
    )


def _stats_from_singular_values(s: Tensor) -> tuple[float, float, float, float, float]:
    lam = s.double() ** 2
    m1, m2 = float(lam.mean()), float((lam**2).mean())
    smax, smin = float(s.max()), float(s.min())
    cond = smax / smin if smin > 0 else math.inf
    nv = m2 / m1**2 - 1 if m1 > 0 else math.nan
    return m1, m2, nv, smax, cond


def spectrum_stats(
    f: Callable[[Tensor], Tensor],
    x: Tensor,
    probes: int = 64,
    method: Method = "auto",
    *,
    seed: int = 0,
    chunk_size: int | None = None,
) -> SpectrumStats:
    """Dynamical-isometry measures of the Jacobian of ``f`` at ``x``.

    ``m1 = tr(G) / dim``, ``m2 = tr(G^2) / dim`` and ``m2 / m1^2 - 1`` over the squared
    singular values (Pennington et al. 2017, eqs. for the moments of ``J J^T``), plus the
    largest singular value. On the exact path (same rule as :func:`singular_values`) all
    come from the SVD, with the condition number. Otherwise ``tr(G)`` and ``tr(G^2)``
    are Hutchinson estimates over ``probes`` Rademacher vectors sent through the model as
    one vmapped block, each with its standard error; ``sigma_max`` then comes from a short
    block Krylov run (``sigma_max**2`` to about 1 %, usually far better; use
    :func:`singular_values` for more digits), and no condition number is given.

    Args:
        f: a module or function of one tensor returning one tensor.
        x: the input (the whole tensor is the input vector; see the module docstring).
        probes: Hutchinson probes for the iterative path; the standard errors shrink as
            ``1 / sqrt(probes)``.
        method: ``"auto"``, ``"exact"`` or ``"iterative"``.
        seed: seed of the probes.
        chunk_size: vectors per vmapped model pass (default from the activation memory).

    Returns:
        A :class:`SpectrumStats`.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(16, 16, bias=False)
        >>> torch.nn.init.orthogonal_(lin.weight)  # doctest: +ELLIPSIS
        Parameter...
        >>> st = spectrum_stats(lin, torch.randn(1, 16))
        >>> round(st.m1, 4), abs(st.normalized_variance) < 1e-5
        (1.0, True)
    """
    start = time.perf_counter()
    op = JacobianOperator(f, x, chunk_size=chunk_size)
    path = choose_path(op, method)
    if path == "exact":
        m1, m2, nv, smax, cond = _stats_from_singular_values(torch.linalg.svdvals(op.matrix()))
        return SpectrumStats(
            m1, m2, nv, smax, cond, "exact", op.d, (op.m, op.n), time.perf_counter() - start
        )
    if probes < 2:
        raise ValueError(f"probes must be at least 2 to give a standard error, not {probes}")
    gen = _generator(seed)
    tm = hutchinson_moments(op.half, op.other_half, op.d, probes, gen)
    d = op.d
    m1, m2 = tm.tr1 / d, tm.tr2 / d
    ratio = d * tm.tr2 / tm.tr1**2  # = m2 / m1^2
    # Delta method for d * B / A^2 with A, B the two sample means.
    rel_var = (tm.se2 / tm.tr2) ** 2 + 4 * (tm.se1 / tm.tr1) ** 2
    rel_var -= 4 * tm.cov12 / (tm.tr1 * tm.tr2)
    top = block_krylov_top(
        op.gram, d, 1, block=4, max_basis=64, tol=1e-2, max_iters=100, generator=gen
    )
    return SpectrumStats(
        m1=m1,
        m2=m2,
        normalized_variance=ratio - 1,
        sigma_max=float(top.values[0].clamp_min(0).sqrt()),
        condition_number=None,
        path="iterative",
        dim=d,
        shape=(op.m, op.n),
        seconds=time.perf_counter() - start,
        probes=probes,
        m1_se=tm.se1 / d,
        m2_se=tm.se2 / d,
        normalized_variance_se=ratio * math.sqrt(max(rel_var, 0.0)),
    )


def spectral_density(
    f: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    steps: int = 64,
    probes: int = 8,
    grid_points: int = 512,
    sigma: float | None = None,
    log_scale: bool = False,
    seed: int = 0,
    chunk_size: int | None = None,
) -> SpectralDensity:
    """Density of the squared singular values of ``J`` by stochastic Lanczos quadrature.

    Runs ``steps`` Lanczos steps on the smaller Gram matrix from each of ``probes``
    random unit vectors, all probes in one vmapped block per step, and turns each
    tridiagonal matrix into Gauss quadrature nodes and weights (Ubaru, Chen & Saad 2017;
    used for Hessians by PyHessian, Yao et al. 2020, arXiv:1912.07145). The matrix is
    never formed, so this scales to any model that fits a few batched passes.

    Args:
        f: a module or function of one tensor returning one tensor.
        x: the input (the whole tensor is the input vector; see the module docstring).
        steps: Lanczos steps per probe (capped at ``min(m, n)``); moments up to order
            ``2 * steps - 1`` are then exact per probe.
        probes: random start vectors; the spread between them is the estimator's noise.
        grid_points: points of the returned grid.
        sigma: width of the Gaussian smoothing, in the grid's units (default: 1/100 of the
            node range).
        log_scale: give the density of ``log10(s^2)`` instead of ``s^2``; nodes at or
            below zero are dropped from it.
        seed: seed of the probes.
        chunk_size: vectors per vmapped model pass (default from the activation memory).

    Returns:
        A :class:`SpectralDensity`.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh())
        >>> sd = spectral_density(net, torch.randn(1, 32), steps=16, probes=4)
        >>> sd.nodes.shape, sd.weights.sum(1).round(decimals=6).tolist()
        (torch.Size([4, 16]), [1.0, 1.0, 1.0, 1.0])
    """
    start = time.perf_counter()
    op = JacobianOperator(f, x, chunk_size=chunk_size)
    gen = _generator(seed)
    starts = torch.randn(probes, op.d, generator=gen, dtype=torch.float64)
    lanczos = batched_lanczos(op.gram, starts, steps)
    node_list, weight_list = lanczos.quadrature()
    width_steps = max(len(t) for t in node_list)
    # A probe whose Lanczos run ended early (its Krylov space was exhausted) is padded
    # with zero-weight nodes at 0.
    nodes = torch.zeros(probes, width_steps, dtype=torch.float64)
    weights = torch.zeros(probes, width_steps, dtype=torch.float64)
    for i, (t, w) in enumerate(zip(node_list, weight_list, strict=True)):
        nodes[i, : len(t)], weights[i, : len(w)] = t, w
    points, mass = nodes.flatten(), weights.flatten() / probes
    if log_scale:
        keep = (points > 0) & (mass > 0)
        points, mass = points[keep].log10(), mass[keep]
    lo, hi = float(points.min()), float(points.max())
    width = sigma if sigma is not None else max(hi - lo, 1e-12 * max(abs(hi), 1.0)) / 100
    grid = torch.linspace(lo - 3 * width, hi + 3 * width, grid_points, dtype=torch.float64)
    kernel = torch.exp(-0.5 * ((grid[:, None] - points[None, :]) / width) ** 2)
    density = kernel @ mass / (width * math.sqrt(2 * math.pi))
    return SpectralDensity(
        grid=grid,
        density=density,
        nodes=nodes,
        weights=weights,
        sigma=width,
        log_scale=log_scale,
        dim=op.d,
        probes=probes,
        steps=min(steps, op.d),
        seconds=time.perf_counter() - start,
    )
