"""Loss plateau: the loss has not come down from where it started.

Judged on the whole run: the median of the last tenth of the losses against where
the run started (see :func:`~.profile.loss_start`). Fewer than ``MIN_STEPS`` finite
losses are not judged. A loss that ends higher than it started is left to the
divergence rule only where that rule claims it; short of that, it has not come down.
"""

from __future__ import annotations

import numpy as np

from .findings import Finding
from .loss_divergence import RISE
from .profile import RunView, loss_start

MIN_STEPS = 30
MIN_IMPROVEMENT = 0.1  # the loss should fall by at least a tenth of its starting value


def loss_change(view: RunView) -> tuple[float, float] | None:
    """(start, end): :func:`~.profile.loss_start` and the median of the last tenth of the finite losses."""
    loss = view.finite_loss()
    if loss.size < MIN_STEPS:
        return None
    tail = max(5, loss.size // 10)
    return loss_start(loss), float(np.median(loss[-tail:]))


def check(view: RunView) -> list[Finding]:
    if view.optimizers > 1:
        return []  # adversarial or multi-objective training: the mean of the losses is no objective
    change = loss_change(view)
    if change is None:
        return []
    start, end = change
    if abs(start) < 1e-8 or (start - end) / abs(start) >= MIN_IMPROVEMENT:
        return []
    if end > start * 1.5 and end > RISE * float(np.min(view.finite_loss())):
        return []  # rising: loss_divergence reports it
    steps = view.steps[np.isfinite(view.loss)]
    summary = (
        f"The loss has not come down: {start:.4g} at the start, {end:.4g} at the end "
        f"({(end - start) / abs(start):+.1%}, where a tenth down is the least expected)."
    )
    evidence = {"loss_start": start, "loss_end": end, "steps": int(steps.size)}
    return [
        Finding("loss_plateau", "warning", [], int(steps[0]), int(steps[-1]), summary, evidence)
    ]
