"""Update-to-weight ratios measured on the optimizer's real step.

The ratio ||w_after - w_before|| / ||w_before|| is taken from a snapshot made in the
optimizer's step pre-hook and compared in its post-hook, so it is right for Adam,
momentum and weight decay alike; lr * ||grad|| would not be. Around 1e-3 per step is
the usual healthy value (CS231n).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .grads import GradNormPlan, group_norms


class UpdateProbe:
    """Snapshot parameters before an update and measure the change after it.

    Example:
        >>> w = torch.nn.Parameter(torch.full((4,), 2.0))
        >>> probe = UpdateProbe()
        >>> probe.begin(0, [7], [w])
        >>> with torch.no_grad():
        ...     _ = w.sub_(0.5)  # the optimizer's step
        >>> idx, update, weight = probe.end(0)
        >>> idx, float(update[0]), float(weight[0])
        ([7], 1.0, 4.0)
    """

    def __init__(self) -> None:
        self._before: dict[int, tuple[list[int], list[torch.Tensor], list[torch.Tensor]]] = {}
        # (device, dtype) groups of positions, by the parameter indices measured: the
        # same set comes back every step, and grouping costs more than the norms.
        self._plans: dict[tuple[int, ...], GradNormPlan] = {}

    def begin(self, key: int, indices: Sequence[int], params: Sequence[torch.Tensor]) -> None:
        if not params:
            return
        with torch.no_grad():  # one context, not a detach() per parameter
            snapshot = torch._foreach_mul(params, 1.0)
        self._before[key] = (list(indices), list(params), snapshot)

    def pending(self, key: int) -> bool:
        return key in self._before

    def end(
        self, key: int, keep: set[int] | None = None
    ) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
        """Return (indices, update norms, weight norms before the update)."""
        if key not in self._before:
            return [], [], []
        indices, now, before = self._before.pop(key)
        if keep is not None and not keep.issuperset(indices):
            chosen = [k for k, i in enumerate(indices) if i in keep]
            indices = [indices[k] for k in chosen]
            now = [now[k] for k in chosen]
            before = [before[k] for k in chosen]
        if not indices:
            return [], [], []
        plan = self._plans.get(tuple(indices))
        if plan is None or plan.stale(now, full=True):  # converted since (model.half())
            plan = self._plans[tuple(indices)] = GradNormPlan(range(len(now)), now)
        order: list[int] = []
        update: list[torch.Tensor] = []
        weight: list[torch.Tensor] = []
        with torch.no_grad():
            for positions, reduce_in, blas in plan.groups:  # foreach takes one device and dtype
                was = [before[k] for k in positions]
                weight.extend(group_norms(was, reduce_in, blas))
                torch._foreach_sub_(was, [now[k] for k in positions])  # now -(update)
                update.extend(group_norms(was, reduce_in, blas))
                order.extend(indices[k] for k in positions)
        return order, update, weight

    def discard(self) -> None:
        self._before.clear()
