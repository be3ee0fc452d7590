"""Activation health: output moments, saturated units, zeros and dead units.

A unit is *saturated* where the activation's derivative is below 1% of its maximum:
for a sigmoid that is y(1-y) < 0.0025 (|x| > 5.3), for tanh 1 - y^2 < 0.01
(|y| > 0.995). A ReLU unit is *dead* when it outputs zero for every sample over a
whole flush window; the window is tracked per unit on the device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# Derivative below this fraction of its maximum counts as saturated (issue #2's definition).
SATURATION_LEVEL = 0.01


def _hardtanh_flat(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    lo, hi = float(module.min_val), float(module.max_val)
    return lambda y: (y <= lo) | (y >= hi)


def saturation_mask(
    module: nn.Module, kind: str | None
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A function from a module's output to a bool mask of saturated entries, or None."""
    if kind == "sigmoid":
        return lambda y: y * (1 - y) < SATURATION_LEVEL * 0.25  # sigmoid' peaks at 1/4
    if kind == "tanh":
        return lambda y: 1 - y * y < SATURATION_LEVEL  # tanh' = 1 - tanh^2 peaks at 1
    if kind == "softsign":
        return lambda y: (1 - y.abs()) ** 2 < SATURATION_LEVEL  # softsign' = (1 - |y|)^2
    if kind == "hardsigmoid":
        return lambda y: (y <= 0) | (y >= 1)
    if kind == "hardtanh":
        return _hardtanh_flat(module)
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
