"""Activation health: output moments, saturated units, zeros and dead units.

A unit is *saturated* where the activation's derivative is below 1% of its maximum:
for a sigmoid that is y(1-y) < 0.0025 (|x| > 6), for tanh 1 - y^2 < 0.01
(|y| > 0.995). The mean of the derivative over its maximum is kept as well: a layer
whose units all sit at sigmoid(5) is not "saturated" by the 1% rule, yet passes only
2.6% of the gradient it could. A ReLU unit is *dead* when it outputs zero for every sample over a
whole flush window; the window is tracked per unit on the device.

Everything here is a reduction to a 0-d device tensor; nothing is read back. The
moments are a sum and the norm of the deviations from the mean (``var_mean`` costs
some ten times more on a CPU), and for sigmoid and tanh the mean derivative follows
from those two alone, since 4y(1-y) and 1-y^2 are polynomials in y.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .scratch import reusable_like

# Derivative below this fraction of its maximum counts as saturated (issue #2's definition).
SATURATION_LEVEL = 0.01

Elementwise = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Saturation:
    """How to read a saturating activation's health from its output ``y``.

    Attributes:
        derivative: the derivative at each entry over its maximum, written in terms
            of the output (all a forward hook sees).
        band: ``(center, radius)`` such that the derivative is below
            :data:`SATURATION_LEVEL` exactly where ``|y - center| > radius``, or None.
        from_moments: ``(sum of y, sum of y^2, n) -> sum of the derivative`` when the
            derivative is a polynomial in y, or None. Works on floats and numpy arrays.
    """

    derivative: Elementwise
    band: tuple[float, float] | None = None
    from_moments: Callable | None = None

    def saturated_count(self, y: torch.Tensor, scratch: dict | None = None) -> torch.Tensor:
        """Entries whose derivative is below 1% of its maximum (a 0-d tensor).

        ``scratch`` takes the distance from the band's center (see :mod:`.scratch`).
        """
        if self.band is None:
            return (self.derivative(y) < SATURATION_LEVEL).sum()
        center, radius = self.band
        out = reusable_like(scratch, y)  # never y itself: it is written in place below
        distance = torch.abs(y, out=out) if center == 0 else torch.sub(y, center, out=out).abs_()
        return distance.gt_(radius).sum()


def _flat_outside(lo: float, hi: float) -> Elementwise:
    return lambda y: ((y > lo) & (y < hi)).to(y.dtype)


def saturation(module: nn.Module, kind: str | None) -> Saturation | None:
    """The :class:`Saturation` reader for a module of activation family ``kind``, or None.

    Example:
        >>> sig = saturation(nn.Sigmoid(), "sigmoid")
        >>> y = torch.sigmoid(torch.tensor([0.0, 7.0, -8.0]))
        >>> int(sig.saturated_count(y)), round(float(sig.derivative(y)[0]), 3)
        (2, 1.0)
    """
    level = SATURATION_LEVEL
    if kind == "sigmoid":  # sigmoid' = y(1 - y), 1/4 at most
        return Saturation(
            lambda y: 4.0 * y * (1 - y),
            band=(0.5, math.sqrt(1 - level) / 2),
            from_moments=lambda s, sq, n: 4.0 * (s - sq),
        )
    if kind == "tanh":  # tanh' = 1 - y^2, 1 at most
        return Saturation(
            lambda y: 1 - y * y,
            band=(0.0, math.sqrt(1 - level)),
            from_moments=lambda s, sq, n: n - sq,
        )
    if kind == "softsign":  # softsign' = (1 - |y|)^2
        return Saturation(lambda y: (1 - y.abs()) ** 2, band=(0.0, 1 - math.sqrt(level)))
    if kind == "hardsigmoid":
        return Saturation(_flat_outside(0.0, 1.0))
    if kind == "hardtanh":
        return Saturation(_flat_outside(float(module.min_val), float(module.max_val)))
    return None


def unit_dims(tensor: torch.Tensor) -> tuple[int, ...]:
    """The dims to reduce over so that one value per unit is left.

    A unit is a feature (last dim) for 2-D and 3-D outputs, (batch, [time,] features),
    and a channel (dim 1) for 4-D and 5-D convolutional outputs.
    """
    if tensor.dim() <= 1:
        return ()
    if tensor.dim() <= 3:
        return tuple(range(tensor.dim() - 1))
    return (0, *range(2, tensor.dim()))


def unit_max(tensor: torch.Tensor) -> torch.Tensor:
    """The largest output of each unit over the batch (and positions), as a new tensor."""
    dims = unit_dims(tensor)
    return tensor.detach().amax(dim=dims) if dims else tensor.detach().clone()


def output_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of all entries in at least float32: non-finite iff some entry is (or it overflows)."""
    t = tensor.detach()
    return t.sum(dtype=torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t.sum()
