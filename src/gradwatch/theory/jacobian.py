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
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from gradwatch.theory._krylov import (
    batched_lanczos,
    block_krylov_top,
    hutchinson_moments,
)
from gradwatch.theory._linops import EXACT_MAX_BYTES, JacobianOperator

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

Method = Literal["auto", "exact", "iterative"]

# Layers whose own Jacobian takes at most this many bytes get an exact SVD in
# layer_gains: 4 MiB is a 1024 x 1024 float32 matrix, whose svdvals take about 0.2 s.
LAYER_EXACT_MAX_BYTES = 4 * 2**20


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
        converged: False if the iterative path stopped at ``max_iters``.
    """

    values: Tensor
    smallest: Tensor | None
    path: str
    shape: tuple[int, int]
    seconds: float
    rel_residuals: Tensor | None = None
    iterations: int | None = None
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


def _choose_path(op: JacobianOperator, method: str, max_bytes: int = EXACT_MAX_BYTES) -> str:
    if method not in ("auto", "exact", "iterative"):
        raise ValueError(f"method must be 'auto', 'exact' or 'iterative', not {method!r}")
    if method == "auto":
        return "exact" if op.nbytes <= max_bytes else "iterative"
    return method


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _default_block(k: int) -> int:
    # Oversampling by k (at least 8) extra vectors: Halko et al. (2011) advise a few
    # beyond k; a wider block also keeps the vmapped model passes efficient.
    return k + max(8, k)


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
    tol: float = 1e-4,
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
        tol: iterative path: target relative accuracy of each ``s_i^2``.
        max_iters: iterative path: most block steps.
        block_size: iterative path: vectors per block (default ``k + max(8, k)``).
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
    path = _choose_path(op, method)
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
    block Krylov run (relative accuracy about 1e-3), and no condition number is given.

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
    path = _choose_path(op, method)
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
        op.gram, d, 1, block=4, max_basis=64, tol=1e-3, max_iters=100, generator=gen
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
        sigma: width of the Gaussian smoothing, in grid units (default: 1/100 of the
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


_LeafCall = tuple[str, int, nn.Module, tuple[Callable[[Tensor], Tensor], Tensor]]


def _capture_leaf_calls(model: nn.Module, x: Tensor) -> list[_LeafCall]:
    """Run ``model(x)`` once and return, in execution order, each leaf call's name, call
    number, module, and a function of its (first, floating-point) input with that input."""
    calls: list[_LeafCall] = []
    counts: dict[str, int] = {}
    handles = []

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not args or not isinstance(args[0], Tensor) or not args[0].is_floating_point():
                return
            inp = args[0].detach().clone()  # before the call: in-place modules overwrite it
            rest = tuple(a.detach() if isinstance(a, Tensor) else a for a in args[1:])

            def fn(v: Tensor, module: nn.Module = module, rest: tuple = rest) -> Tensor:
                out = module(v, *rest, **kwargs)
                return out[0] if isinstance(out, (tuple, list)) else out

            calls.append((name, counts.get(name, 0), module, (fn, inp)))
            counts[name] = counts.get(name, 0) + 1

        return hook

    try:
        for name, module in model.named_modules():
            if next(module.children(), None) is None:
                handles.append(
                    module.register_forward_pre_hook(hook_for(name or "<root>"), with_kwargs=True)
                )
        with torch.no_grad():
            try:
                model(x)
            except Exception as error:
                raise ValueError(
                    f"an input of shape {tuple(x.shape)} does not fit module "
                    f"{type(model).__name__}: {type(error).__name__}: {error}"
                ) from error
    finally:
        for handle in handles:
            handle.remove()
    return calls


def layer_gains(
    model: nn.Module,
    x: Tensor,
    *,
    method: Method = "auto",
    probes: int = 32,
    max_iters: int = 200,
    tol: float = 1e-3,
    seed: int = 0,
) -> list[LayerGain]:
    """Per-layer Jacobian gains along the model's execution order.

    Runs ``model(x)`` once with forward pre-hooks on every leaf module (removed again
    even if the model raises) to capture each call's actual input, then measures the
    Jacobian of that call's output with respect to that input: its spectral norm and
    ``||J||_F / sqrt(n_in)``. Their product over layers brackets the end-to-end gain that
    the seeds' product of Jacobians describes. With ``method="auto"`` a layer whose
    Jacobian takes at most 4 MiB gets an exact SVD. Larger layers get power iteration on
    ``J^T J`` from a block of 4 random vectors that keeps every iterate and reads the
    largest value out of all of them by Rayleigh-Ritz (block Lanczos, the Krylov form of
    power iteration: the same products, but it converges in about the square root of the
    steps when the top of the spectrum is clustered, as it is for a tanh or conv layer),
    and a Hutchinson estimate of ``||J||_F^2`` with standard error.

    Leaf calls whose first argument is not a floating-point tensor (an embedding's
    indices) are skipped; other arguments are held fixed; a tuple output counts by its
    first element. The model's train/eval mode is left as it is: BatchNorm in training
    mode would update its running statistics during the capture pass, so call
    ``model.eval()`` first.

    Args:
        model: the network.
        x: its input (the whole tensor is the input vector; pass ``x[:1]`` for one sample).
        method: ``"auto"``, ``"exact"`` or ``"iterative"`` for every layer.
        probes: Hutchinson probes per layer on the iterative path.
        max_iters: most power-iteration steps per layer.
        tol: relative accuracy of ``spectral_norm**2`` at which the iteration stops.
        seed: seed of the random vectors.

    Returns:
        A list of :class:`LayerGain`, one per leaf-module call, in execution order.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> [g.name for g in layer_gains(net, torch.randn(1, 4))]
        ['0', '1']
    """
    gains = []
    gen = _generator(seed)
    for name, call, module, (fn, inp) in _capture_leaf_calls(model, x):
        try:
            op = JacobianOperator(fn, inp)
            path = _choose_path(op, method, LAYER_EXACT_MAX_BYTES)
            if path == "exact":
                jac = op.matrix()
                spectral = float(torch.linalg.matrix_norm(jac, ord=2)) if jac.numel() else 0.0
                frob2, frob2_se, settled = float(jac.double().pow(2).sum()), 0.0, True
            else:
                top = block_krylov_top(
                    op.gram,
                    op.d,
                    1,
                    block=4,
                    max_basis=64,
                    tol=tol,
                    max_iters=max_iters,
                    generator=gen,
                )
                spectral, settled = float(top.values[0].clamp_min(0).sqrt()), top.converged
                tm = hutchinson_moments(op.half, op.other_half, op.d, probes, gen)
                frob2, frob2_se = tm.tr1, tm.se1
        except ValueError:
            raise
        except Exception as error:
            raise ValueError(
                f"could not differentiate layer {name!r} ({type(module).__name__}) at its "
                f"input of shape {tuple(inp.shape)}: {type(error).__name__}: {error}. "
                "Modules in training mode that update state (BatchNorm) or draw random "
                "numbers (Dropout) need model.eval() first."
            ) from error
        frob_rms = math.sqrt(max(frob2, 0.0) / op.n)
        # d sqrt(F)/dF = 1 / (2 sqrt(F)): the standard error carried through the root.
        rms_se = frob2_se / (2 * math.sqrt(frob2 * op.n)) if frob2 > 0 else 0.0
        gains.append(
            LayerGain(
                name=name,
                call=call,
                kind=type(module).__name__,
                in_shape=op.in_shape,
                out_shape=op.out_shape,
                spectral_norm=spectral,
                frobenius_rms=frob_rms,
                frobenius_rms_se=rms_se,
                path=path,
                converged=settled,
            )
        )
    return gains
