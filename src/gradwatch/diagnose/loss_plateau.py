"""Loss plateau: the loss has not come down from where it started.

Judged on the whole run: the median of the last tenth of the losses against where
the run started (see :func:`~.profile.loss_start`). Fewer than ``MIN_STEPS`` finite
losses are not judged. A loss that ends higher than it started is left to the
divergence rule only where that rule claims it; short of that, it has not come down.

A flat loss alone does not say why. A vanilla RNN whose recurrent matrix starts below
radius 1 is named as a cause: the error of a loss at the end of a sequence shrinks
through time on its way to the early inputs (see :func:`~.causes.recurrent_radius`).

Nothing in the run store tells a model with nothing left to learn (targets the inputs
do not predict, a model that starts at its optimum) from one that learns nothing: both
put out about the best constant, with gradients of healthy size. So the plateau stays a
finding, but where no other rule finds a gradient pathology and the typical layer's
weights move at a healthy rate, it is a note rather than harm (see :func:`grade`).
"""

from __future__ import annotations

import numpy as np

from . import causes
from .findings import Finding
from .loss_divergence import RISE
from .profile import RunView, loss_start, nanmedian
from .update_ratio import FAST

MIN_STEPS = 30
MIN_IMPROVEMENT = 0.1  # the loss should fall by at least a tenth of its starting value
# Update/weight ratios within an order of magnitude below the healthy 1e-3 (CS231n), and
# below what the update-ratio rule calls too fast: the weights move at an ordinary rate.
MOVING = causes.HEALTHY_UPDATE_RATIO / 10


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
    found = causes.rank(
        [causes.recurrent_radius(view, m, above=False, kinds=("RNN",)) for m in view.models]
    )
    return [
        Finding(
            "loss_plateau", "warning", [], int(steps[0]), int(steps[-1]), summary, evidence, found
        )
    ]


def typical_update_ratio(view: RunView) -> float | None:
    """The median over layers of each layer's median update/weight ratio, or None where unmeasured."""
    ratio = view.m("update_ratio")[view.finite_rows]
    cols = [j for j in range(ratio.shape[1]) if np.isfinite(ratio[:, j]).sum() >= 3]
    if not cols:
        return None
    return float(np.median(nanmedian(ratio[:, cols], axis=0)))


def grade(plateau: Finding, others: list[Finding], view: RunView) -> None:
    """A plateau with healthy gradients becomes a note (``info``), not harm.

    That is when the plateau has no cause, no other rule finds anything (no vanishing or
    exploding error, no dead or saturated units, no layer too slow, too fast or without
    gradient, nothing non-finite, every forward pass measured), the errors were measured,
    and the typical layer's update/weight ratio lies between ``MOVING`` and ``FAST``.
    Otherwise the plateau stays a warning, and it is the harm that makes the pathologies
    found beside it errors.
    """
    if plateau.causes or any(f.severity != "info" or f.kind == "unmeasured" for f in others):
        return
    if not np.isfinite(view.m("error_norm")).any():
        return  # gradient norms only: the rules could not judge the errors
    typical = typical_update_ratio(view)
    if typical is None or not MOVING <= typical < FAST:
        return
    plateau.severity = "info"
    plateau.evidence["typical_update_ratio"] = typical
    plateau.summary += (
        f" No gradient pathology shows, and the typical layer moves {typical:.1e} of its weight norm "
        "per step (about 1e-3 is healthy): the gradients reach the weights and move them, but the loss "
        "does not follow. That is no gradient problem: the loss may already be at the floor the data "
        "allows (targets the inputs do not predict), or the model lacks the capacity or the signal to "
        "go lower."
    )
