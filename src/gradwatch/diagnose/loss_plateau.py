"""Loss plateau: the loss has not come down from where it started.

Judged on the whole run: the median of the last tenth of the losses against the
median of the first few. Fewer than ``MIN_STEPS`` finite losses are not judged.
"""

from __future__ import annotations

import numpy as np

from .findings import Finding
from .profile import RunView

MIN_STEPS = 30
MIN_IMPROVEMENT = 0.1  # the loss should fall by at least a tenth of its starting value


def loss_change(view: RunView) -> tuple[float, float] | None:
    """(start, end): medians of the first five and of the last tenth of the finite losses."""
    loss = view.finite_loss()
    if loss.size < MIN_STEPS:
        return None
    tail = max(5, loss.size // 10)
    return float(np.median(loss[:5])), float(np.median(loss[-tail:]))


def check(view: RunView) -> list[Finding]:
    if view.optimizers > 1:
        return []  # adversarial or multi-objective training: the mean of the losses is no objective
    change = loss_change(view)
    if change is None:
        return []
    start, end = change
    if abs(start) < 1e-8 or (start - end) / abs(start) >= MIN_IMPROVEMENT:
        return []
    if end > start * 1.5:
        return []  # rising: that is divergence, not a plateau
    steps = view.steps[np.isfinite(view.loss)]
    summary = f"The loss has not come down: {start:.4g} at the start, {end:.4g} at the end ({(start - end) / abs(start):+.1%})."
    evidence = {"loss_start": start, "loss_end": end, "steps": int(steps.size)}
    return [
        Finding("loss_plateau", "warning", [], int(steps[0]), int(steps[-1]), summary, evidence)
    ]
