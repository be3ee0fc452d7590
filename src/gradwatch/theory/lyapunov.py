"""Lyapunov exponents of a discrete-time dynamical system h_{t+1} = f(h_t, x_t).

The exponents are the average per-step log growth rates of perturbations; the largest
says whether the dynamics (and so gradients through time) explode (> 0) or vanish
(< 0). :func:`lyapunov_spectrum` uses the standard QR method: push k orthonormal
tangent vectors through the Jacobian each step and re-orthonormalise them, summing
log |R_ii| (Benettin et al. 1980; Engelken, Wolf & Abbott 2020, "Lyapunov spectra of
chaotic recurrent neural networks"). Jacobian-vector products come from
``torch.func.jvp`` batched over the k vectors with ``torch.func.vmap``; the Jacobian is
never formed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import jvp, vmap

__all__ = ["StepFn", "lyapunov_spectrum", "mean_field_lyapunov"]

StepFn = Callable[[Tensor, Tensor | None], Tensor]


def lyapunov_spectrum(
    step: StepFn,
    h0: Tensor,
    steps: int,
    k: int | None = None,
    inputs: Tensor | None = None,
    *,
    transient: int = 0,
    seed: int = 0,
) -> Tensor:
    """The k largest Lyapunov exponents of ``h_{t+1} = step(h_t, x_t)``, by the QR method.

    Args:
        step: ``step(h, x) -> h_next`` on a 1D state; ``x`` is ``inputs[t]`` or ``None``.
            It must be written in torch operations that ``torch.func.jvp`` supports.
        h0: Initial state, a 1D tensor (its dtype and device are used throughout).
        steps: Steps averaged over, after the transient.
        k: Number of exponents (default: all, ``h0.numel()``).
        inputs: Optional driving inputs indexed by time, at least
            ``transient + steps`` long.
        transient: Steps run first, and not averaged, so that both the state and
            the tangent vectors settle onto the attractor.
        seed: Seed of the random initial tangent vectors.

    Returns:
        The exponents in nats per step, largest first, shape ``(k,)``.

    Raises:
        ValueError: For a state that is not 1D, a bad k or too few inputs.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.tensor([0.5, 0.25], dtype=torch.float64))
        >>> h0 = torch.ones(2, dtype=torch.float64)
        >>> spec = lyapunov_spectrum(lambda h, x: A @ h, h0, steps=50, transient=20)
        >>> torch.allclose(spec, torch.log(torch.tensor([0.5, 0.25], dtype=torch.float64)))
        True
    """
    if h0.dim() != 1:
        raise ValueError(f"the state must be a 1D tensor, got shape {tuple(h0.shape)}")
    n = h0.numel()
    k = n if k is None else int(k)
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the state size {n}, got {k}")
    if steps < 1 or transient < 0:
        raise ValueError("steps must be >= 1 and transient >= 0")
    total = transient + steps
    if inputs is not None and len(inputs) < total:
        raise ValueError(f"inputs has {len(inputs)} steps; transient + steps needs {total}")
    generator = torch.Generator(device=h0.device).manual_seed(seed)
    tangents = torch.randn(n, k, generator=generator, dtype=h0.dtype, device=h0.device)
    basis, _ = torch.linalg.qr(tangents)
    h = h0.detach()
    log_growth = torch.zeros(k, dtype=h0.dtype, device=h0.device)
    with torch.no_grad():
        for t in range(total):
            x = None if inputs is None else inputs[t]
            h, pushed = _push(step, h, x, basis)
            basis, r = torch.linalg.qr(pushed)
            if t >= transient:
                log_growth += torch.log(torch.abs(torch.diagonal(r)))
    return torch.sort(log_growth / steps, descending=True).values


def _push(step: StepFn, h: Tensor, x: Tensor | None, basis: Tensor) -> tuple[Tensor, Tensor]:
    """``(step(h, x), J @ basis)`` with J the Jacobian of step at h, column by column."""

    def along(v: Tensor) -> tuple[Tensor, Tensor]:
        return jvp(lambda state: step(state, x), (h,), (v,))

    h_next, pushed = vmap(along, in_dims=1, out_dims=(None, 1))(basis)
    return h_next, pushed


def mean_field_lyapunov(g: float, activation: str = "tanh") -> float:
    """Mean-field maximal Lyapunov exponent of ``h_{t+1} = J phi(h_t)``, J_ij ~ N(0, g^2/N).

    For large N the state's variance settles at Delta = g^2 E[phi(sqrt(Delta) z)^2], and
    a perturbation's squared norm grows by g^2 E[phi'(sqrt(Delta) z)^2] per step, so
    ``lambda = 1/2 ln(g^2 E[phi'(sqrt(Delta) z)^2])``: for tanh this is
    ``1/2 ln[g^2 E sech^4(sqrt(Delta) z)]`` for g > 1 and ``ln g`` for g < 1, where
    Delta = 0 (the discrete-time analogue of Sompolinsky, Crisanti & Sommers 1988).
    This is exactly the mean-field chi1 of a feed-forward net with sigma_w2 = g^2 and
    sigma_b2 = 0 (Poole et al. 2016), so it is computed by :class:`MeanField`.

    Args:
        g: Gain of the random coupling matrix.
        activation: Name or callable of phi.

    Returns:
        The exponent in nats per step.

    Example:
        >>> round(mean_field_lyapunov(0.5), 4)
        -0.6931
        >>> round(mean_field_lyapunov(2.0), 4)
        0.1547
    """
    from .meanfield import MeanField

    if g <= 0:
        raise ValueError(f"the gain g must be positive, got {g}")
    return 0.5 * math.log(MeanField(activation, g * g, 0.0).chi1)
