"""Gradient norms and zero-gradient fractions, per parameter.

Norms are taken with ``torch._foreach_norm`` over tensors grouped by (device, dtype),
the way ``torch.nn.utils.get_total_norm`` does it, so a whole model costs a few fused
kernels. Low-precision gradients are reduced in float32, so a norm cannot overflow
float16 while every entry is finite.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

LOW_PRECISION = (torch.float16, torch.bfloat16)


def norm_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype to reduce in: float32 for half-precision tensors, else their own."""
    return torch.float32 if dtype in LOW_PRECISION else None


def vector_norm(tensor: torch.Tensor) -> torch.Tensor:
    """L2 norm of one tensor as a 0-d device tensor, safe for half precision."""
    return torch.linalg.vector_norm(tensor, dtype=norm_dtype(tensor.dtype))


def grad_norms(
    indices: Sequence[int], grads: Sequence[torch.Tensor]
) -> tuple[list[int], list[torch.Tensor]]:
    """L2 norm of each gradient, returned with the caller's index of each.

    Example:
        >>> g = [torch.ones(4), torch.full((2,), 3.0)]
        >>> idx, norms = grad_norms([7, 9], g)
        >>> idx, [round(float(n), 4) for n in norms]
        ([7, 9], [2.0, 4.2426])
    """
    out_idx: list[int] = []
    out: list[torch.Tensor] = []
    dense = [(i, g) for i, g in zip(indices, grads, strict=True) if not g.is_sparse]
    for i, g in zip(indices, grads, strict=True):
        if g.is_sparse:  # foreach kernels take dense tensors only
            out_idx.append(i)
            out.append(vector_norm(g.coalesce().values()))
    if not dense:
        return out_idx, out
    positions, tensors = zip(*dense, strict=True)
    grouped = _group_tensors_by_device_and_dtype([list(tensors)], with_indices=True)
    for (_device, dtype), ([group], where) in grouped.items():
        norms = torch._foreach_norm(group, 2, dtype=norm_dtype(dtype))
        out_idx.extend(positions[w] for w in where)
        out.extend(norms)
    return out_idx, out


def zero_counts(grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Number of exactly-zero entries of each gradient (0-d tensors)."""
    return [
        torch.count_nonzero(g.coalesce().values() if g.is_sparse else g).neg_().add_(g.numel())
        for g in grads
    ]
