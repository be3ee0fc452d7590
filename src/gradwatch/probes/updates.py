"""Update-to-weight ratios measured on the optimizer's real step.

The ratio ||w_after - w_before|| / ||w_before|| is taken from a snapshot made in the
optimizer's step pre-hook and compared in its post-hook, so it is right for Adam,
momentum and weight decay alike; lr * ||grad|| would not be. Around 1e-3 per step is
the usual healthy value (CS231n).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .grads import norm_dtype


class UpdateProbe:
    """Snapshot parameters before an update and measure the change after it."""

    def __init__(self) -> None:
        self._before: dict[int, tuple[list[int], list[torch.Tensor], list[torch.Tensor]]] = {}

    def begin(self, key: int, indices: Sequence[int], params: Sequence[torch.Tensor]) -> None:
        if not params:
            return
        tensors = [p.detach() for p in params]
        self._before[key] = (list(indices), tensors, torch._foreach_mul(tensors, 1.0))

    def pending(self, key: int) -> bool:
        return key in self._before

    def end(
        self, key: int, keep: set[int] | None = None
    ) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
        """Return (indices, update norms, weight norms before the update)."""
        if key not in self._before:
            return [], [], []
        indices, now, before = self._before.pop(key)
        if keep is not None:
            chosen = [k for k, i in enumerate(indices) if i in keep]
            indices = [indices[k] for k in chosen]
            now = [now[k] for k in chosen]
            before = [before[k] for k in chosen]
        if not indices:
            return [], [], []
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for k, t in enumerate(now):  # foreach kernels take one device and dtype at a time
            groups.setdefault((t.device, t.dtype), []).append(k)
        order: list[int] = []
        update: list[torch.Tensor] = []
        weight: list[torch.Tensor] = []
        for (_, dtype), positions in groups.items():
            was = [before[k] for k in positions]
            reduce_in = norm_dtype(dtype)
            weight.extend(torch._foreach_norm(was, 2, dtype=reduce_in))
            torch._foreach_sub_(was, [now[k] for k in positions])  # now -(update)
            update.extend(torch._foreach_norm(was, 2, dtype=reduce_in))
            order.extend(indices[k] for k in positions)
        return order, update, weight

    def discard(self) -> None:
        self._before.clear()
