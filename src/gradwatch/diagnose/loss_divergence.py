"""Loss divergence: the loss turns non-finite, or climbs well above where it started."""

from __future__ import annotations

import numpy as np

from . import causes
from .findings import Finding
from .profile import RunView, loss_start

RISE = 2.0  # the end of the run at twice its best level and 1.5x its start


def check(view: RunView) -> list[Finding]:
    loss = view.loss
    finite = view.finite_loss()
    # SQLite stores NaN as NULL, so a NaN loss reads back like a missing one: count it
    # only from the first step that the store marks non-finite, in a run that logged losses.
    start_bad = view.first_nonfinite_row
    lost = (
        np.flatnonzero(~np.isfinite(loss[start_bad:]))
        if start_bad is not None and finite.size
        else []
    )
    if len(lost):
        row = int(start_bad + lost[0])
        step = int(view.steps[row])
        value = "inf" if np.isinf(loss[row]) else "NaN"
        summary = f"The loss diverged to {value} at step {step}."
        evidence = {"step": step, "last_finite_loss": float(finite[-1]) if finite.size else None}
    elif finite.size >= 10 and view.optimizers <= 1:  # several objectives: no single loss to climb
        start, best = loss_start(finite), float(np.min(finite))
        end = float(np.median(finite[-max(5, finite.size // 10) :]))
        if not (end > RISE * best and end > 1.5 * start and end > 0):
            return []
        row = int(np.argmax(view.loss >= (best + end) / 2)) if np.isfinite(view.loss).any() else 0
        step = int(view.steps[row])
        summary = f"The loss climbed from {start:.4g} (best {best:.4g}) to {end:.4g}."
        evidence = {"loss_start": start, "loss_best": best, "loss_end": end}
    else:
        return []
    found = causes.rank([causes.learning_rate(view, np.arange(0, row + 1), high=True)])
    return [
        Finding("loss_divergence", "error", [], step, int(view.steps[-1]), summary, evidence, found)
    ]
