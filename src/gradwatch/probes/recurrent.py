"""The spectral radius of a recurrent layer's hidden-to-hidden matrices.

Backpropagation through time multiplies the error by the recurrent Jacobian once per
time step, so a radius above 1 lets gradients grow exponentially with sequence
length and one well below 1 lets them vanish (Pascanu et al. 2013).
"""

from __future__ import annotations

import torch
from torch import nn


def recurrent_radius(module: nn.RNNBase) -> torch.Tensor | None:
    """Largest |eigenvalue| over the recurrent matrices, per gate block for LSTM and GRU.

    Returns a 0-d device tensor (NaN once the weights hold inf or NaN), or None when the matrices are not square blocks
    (an LSTM with ``proj_size``).

    Example:
        >>> rnn = nn.RNN(3, 4)
        >>> with torch.no_grad():
        ...     _ = rnn.weight_hh_l0.copy_(0.5 * torch.eye(4))
        >>> float(recurrent_radius(rnn))
        0.5
    """
    if getattr(module, "proj_size", 0):
        return None
    radii = []
    for name, weight in module.named_parameters():
        if name.startswith("weight_hh"):
            h = weight.shape[1]
            blocks = weight.detach().float().reshape(-1, h, h)  # gates are stacked along rows
            finite = torch.isfinite(blocks).all()
            # LAPACK rejects inf/NaN input, so decompose a cleaned copy and mask the answer.
            radius = torch.linalg.eigvals(torch.nan_to_num(blocks, 0.0, 0.0, 0.0)).abs().amax()
            radii.append(torch.where(finite, radius, torch.full_like(radius, float("nan"))))
    return torch.stack(radii).amax() if radii else None
