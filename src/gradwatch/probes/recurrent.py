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

    Returns a 0-d device tensor, or None when the matrices are not square blocks
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
            radii.append(torch.linalg.eigvals(blocks).abs().amax())
    return torch.stack(radii).amax() if radii else None
