"""Matrix-free eigen-solvers for a symmetric positive semi-definite operator ``G``.

``G`` is given as a function that maps a block of row vectors ``(b, d)`` to ``(b, d)``;
in gradwatch it is ``J^T J`` or ``J J^T`` applied through batched jvps and vjps. The
block methods here spend nearly all their time in that function, so each step hands it
a whole block at once. Bases are kept in float64 whatever the model's dtype, because
orthogonalisation is cheap next to a pass through the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Operator = Callable[[Tensor], Tensor]


def _orthonormal_rows(w: Tensor, basis: Tensor | None, drop: float = 1e-10) -> Tensor:
    """Rows of ``w`` made orthonormal and orthogonal to the rows of ``basis``.

    Two passes of classical Gram-Schmidt against ``basis`` ("twice is enough"), then an
    eigen-decomposition of the block's Gram matrix (SVQB, Stathopoulos & Wu 2002) that
    drops directions whose norm fell below ``drop`` times the largest: a block that the
    basis already spans shrinks instead of producing noise.
    """
    for _ in range(2):
        if basis is not None and len(basis):
            w = w - (w @ basis.T) @ basis
        gram = w @ w.T
        vals, vecs = torch.linalg.eigh(gram)
        keep = vals > drop**2 * vals.max().clamp_min(1e-300)
        w = (vecs[:, keep] / vals[keep].sqrt()).T @ w
        if not len(w):
            break
    return w


def _random_rows(rows: int, d: int, generator: torch.Generator) -> Tensor:
    return torch.randn(rows, d, generator=generator, dtype=torch.float64)


@dataclass
class TopEigs:
    """Largest eigenpairs of ``G`` found by :func:`block_krylov_top`."""

    values: Tensor  # (k,) descending Ritz values
    vectors: Tensor  # (k, d) Ritz vectors as rows
    residuals: Tensor  # (k,) ||G y - theta y|| for unit Ritz vectors y
    iterations: int  # blocks of G applied after the first
    matvecs: int  # vectors G was applied to, in all
    converged: bool


def block_krylov_top(
    op: Operator,
    d: int,
    k: int,
    *,
    block: int,
    max_basis: int,
    tol: float,
    max_iters: int,
    generator: torch.Generator,
) -> TopEigs:
    """The ``k`` largest eigenpairs of ``G`` by block Krylov with Rayleigh-Ritz.

    Each step extends the basis by ``G`` applied to the current best ``block`` Ritz
    vectors (their residuals, which span the same new directions); in exact arithmetic the
    basis is the block Krylov space ``span{X, G X, G^2 X, ...}`` of a random start ``X``,
    the method of Halko, Martinsson & Tropp (2011, sec. 4.4) and Musco & Musco (2015),
    whose Ritz values approach the top eigenvalues from below without needing a gap
    between them. When the basis reaches ``max_basis`` rows it is restarted from the
    best Ritz vectors; ``G`` on the restarted basis is known without new products.

    Stops when each of the top ``k`` Ritz values ``theta_i`` has a residual below
    ``tol * theta_i`` (then an eigenvalue lies within that distance of it), or when none
    of them rose by more than ``tol / 100`` of itself over one step; the second test
    fires first when the top of the spectrum is clustered and residuals shrink slowly.
    """
    k = min(k, d)
    block = max(1, min(block, d))
    max_basis = max(max_basis, k + 2 * block)
    v = _orthonormal_rows(_random_rows(block, d, generator), None)
    gv = op(v).double()
    matvecs, iterations = len(v), 0
    previous: Tensor | None = None
    while True:
        h = v @ gv.T
        theta, y = torch.linalg.eigh((h + h.T) / 2)
        theta, y = theta.flip(0), y.flip(1)  # descending
        top = min(max(k, block), len(theta))
        ritz = y[:, :top].T @ v
        resid = y[:, :top].T @ gv - theta[:top, None] * ritz
        rnorm = resid.norm(dim=1)
        # Relative to each value, floored where float32 noise would swamp tiny ones.
        scale = theta[:k].abs().clamp_min(1e-6 * float(theta[0].abs()) + 1e-300)
        settled = bool((rnorm[:k] <= tol * scale).all())
        if previous is not None and not settled:
            rise = (theta[:k] - previous) / scale
            settled = bool((rise.abs() <= tol / 100).all())
        invariant = len(v) >= d
        if settled or invariant or iterations >= max_iters:
            break
        previous = theta[:k].clone()
        new = _orthonormal_rows(resid[:block], v)
        if not len(new):
            invariant = True
            break
        if len(v) + len(new) > max_basis:
            keep = max_basis - len(new)
            v, gv = y[:, :keep].T @ v, y[:, :keep].T @ gv
        v = torch.cat([v, new])
        gv = torch.cat([gv, op(new).double()])
        matvecs += len(new)
        iterations += 1
    return TopEigs(
        values=theta[:k],
        vectors=ritz[:k],
        residuals=rnorm[:k],
        iterations=iterations,
        matvecs=matvecs,
        converged=settled or invariant,
    )


@dataclass
class Lanczos:
    """Tridiagonal Lanczos matrices of ``G``, one per starting vector."""

    alphas: list[Tensor]  # diagonal of each T
    betas: list[Tensor]  # off-diagonal of each T

    def quadrature(self) -> tuple[list[Tensor], list[Tensor]]:
        """Gauss quadrature nodes (eigenvalues of T) and weights (first components squared).

        Golub & Meurant (2010); with a unit start vector ``v``, ``sum_j w_j p(t_j)`` equals
        ``v^T p(G) v`` for every polynomial ``p`` of degree below ``2 * steps``.
        """
        nodes, weights = [], []
        for a, b in zip(self.alphas, self.betas, strict=True):
            t = torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)
            vals, vecs = torch.linalg.eigh(t)
            nodes.append(vals)
            weights.append(vecs[0] ** 2)
        return nodes, weights


def batched_lanczos(op: Operator, starts: Tensor, steps: int) -> Lanczos:
    """Run Lanczos from each row of ``starts`` together, one block product per step.

    Keeps every Lanczos vector and reorthogonalises against all of them (twice), so the
    nodes carry no spurious copies. A start whose Krylov space is exhausted (breakdown,
    ``beta`` negligible) stops there and is fed zeros afterwards.
    """
    p, d = starts.shape
    steps = min(steps, d)
    q = starts.double() / starts.double().norm(dim=1, keepdim=True)
    basis = torch.zeros(p, steps, d, dtype=torch.float64)
    alphas = torch.zeros(p, steps, dtype=torch.float64)
    betas = torch.zeros(p, steps, dtype=torch.float64)
    length = torch.full((p,), steps)
    alive = torch.ones(p, dtype=torch.bool)
    for j in range(steps):
        basis[:, j] = q
        w = op(q).double()
        alphas[:, j] = (w * q).sum(1)
        for _ in range(2):
            w = w - torch.einsum("pj,pjd->pd", torch.einsum("pjd,pd->pj", basis, w), basis)
        beta = w.norm(dim=1)
        if j == steps - 1:
            break
        scale = alphas[:, : j + 1].abs().amax(1).clamp_min(1e-300)
        done = alive & (beta <= 1e-10 * scale)
        length[done] = j + 1
        alive &= ~done
        betas[:, j] = torch.where(alive, beta, torch.zeros_like(beta))
        q = torch.where(alive[:, None], w / beta.clamp_min(1e-300)[:, None], torch.zeros_like(w))
        if not alive.any():
            break
    return Lanczos(
        alphas=[alphas[i, : length[i]] for i in range(p)],
        betas=[betas[i, : length[i] - 1] for i in range(p)],
    )


@dataclass
class TraceMoments:
    """Hutchinson estimates of ``tr(G)`` and ``tr(G^2)`` with their standard errors."""

    tr1: float
    tr2: float
    se1: float
    se2: float
    cov12: float  # covariance of the two means, for the delta method
    probes: int


def hutchinson_moments(
    half: Operator, other_half: Operator, d: int, probes: int, generator: torch.Generator
) -> TraceMoments:
    """``tr(G) = E||H z||^2`` and ``tr(G^2) = E||G z||^2`` over Rademacher probes ``z``.

    ``G = H^T H`` with ``H = half``. Rademacher probes give the smaller variance of the
    two usual choices (Hutchinson 1990; Avron & Toledo 2011). All probes go through the
    model as one block; the standard errors are the sample spread over sqrt(probes).
    """
    z = torch.randint(0, 2, (probes, d), generator=generator, dtype=torch.float64) * 2 - 1
    hz = half(z)
    gz = other_half(hz)
    a = hz.double().pow(2).sum(1)
    b = gz.double().pow(2).sum(1)
    if probes > 1:
        cov = torch.cov(torch.stack([a, b])) / probes
        se1, se2, cov12 = float(cov[0, 0].sqrt()), float(cov[1, 1].sqrt()), float(cov[0, 1])
    else:
        se1 = se2 = cov12 = float("nan")
    return TraceMoments(float(a.mean()), float(b.mean()), se1, se2, cov12, probes)
