"""Activation health: output moments, saturated units, zeros and dead units.

A unit is *saturated* where the activation's derivative is below 1% of its maximum:
for a sigmoid that is y(1-y) < 0.0025 (|x| > 6), for tanh 1 - y^2 < 0.01
(|y| > 0.995). The mean of the derivative over its maximum is kept as well: a layer
whose units all sit at sigmoid(5) is not "saturated" by the 1% rule, yet passes only
2.6% of the gradient it could. A ReLU unit is *dead* when it outputs zero for every sample over a
whole flush window; the window is tracked per unit on the device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# Derivative below this fraction of its maximum counts as saturated (issue #2's definition).
SATURATION_LEVEL = 0.01


def _flat_outside(lo: float, hi: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda y: ((y > lo) & (y < hi)).to(y.dtype)


def relative_derivative(
    module: nn.Module, kind: str | None
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A function from a module's output y to its derivative at each entry, over its maximum.

    Written in terms of the output, which is all a forward hook sees. None for
    activations that do not saturate.
    """
    if kind == "sigmoid":
        return lambda y: 4.0 * y * (1 - y)  # sigmoid' = y(1 - y), 1/4 at most
    if kind == "tanh":
        return lambda y: 1 - y * y  # tanh' = 1 - y^2, 1 at most
    if kind == "softsign":
        return lambda y: (1 - y.abs()) ** 2  # softsign' = (1 - |y|)^2
    if kind == "hardsigmoid":
        return _flat_outside(0.0, 1.0)
    if kind == "hardtanh":
        return _flat_outside(float(module.min_val), float(module.max_val))
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
    """The largest output of each unit over the batch (and positions)."""
    dims = unit_dims(tensor)
    return tensor.detach().amax(dim=dims) if dims else tensor.detach()


def moments(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Population variance and mean over all entries, in at least float32."""
    t = tensor.detach()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return torch.var_mean(t, correction=0)


def output_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of all entries in at least float32: non-finite iff some entry is (or it overflows)."""
    t = tensor.detach()
    return t.sum(dtype=torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t.sum()
