"""Non-finite values: where inf/NaN first appeared, and what produced it."""

from __future__ import annotations

import numpy as np

from . import causes
from .findings import Finding
from .profile import RunView


def check(view: RunView) -> list[Finding]:
    row = view.first_nonfinite_row
    if row is None:
        return _masks(view)
    info = view.step_rows[row]
    step = int(view.steps[row])
    module = _past_masks(view, row, info["nonfinite_module"])
    params = info["nonfinite_params"]
    bad_rows = [i for i, r in enumerate(view.step_rows) if r["nonfinite"]]
    # Updates over the 20 steps before the first inf/NaN, for every origin alike.
    lr_cause = causes.learning_rate(view, np.arange(max(0, row - 20), row), high=True)
    if module:
        col = view.names.index(module)
        where = f"in the forward output of {module} ({view.info[col].type})"
        layers = [module]
        found = causes.rank(
            [
                causes.log_of_zero(view, row, col),
                causes.low_precision_overflow(view, row, col),
                lr_cause,
            ]
        )
    elif info.get("loss_nonfinite"):
        where = "in the loss, computed outside every watched module: all their outputs were finite"
        layers = []
        found = causes.rank([lr_cause])
    elif params:
        where = f"in the gradients of {', '.join(params[:3])}" + (
            " and more" if len(params) > 3 else ""
        )
        layers = list(dict.fromkeys(p.rsplit(".", 1)[0] if "." in p else "(root)" for p in params))
        found = causes.rank([causes.gradient_norm_overflow(view, row, layers), lr_cause])
    else:
        where = "in the loss or a value outside the watched modules"
        layers = []
        found = []
    summary = f"inf/NaN first appeared at step {step} {where}."
    evidence = {
        "first_step": step,
        "first_module": module,
        "nonfinite_params": params[:20],
        "loss_at_step": info["loss"]
        if info["loss"] is None or np.isfinite(info["loss"])
        else str(info["loss"]),
        "nonfinite_steps": len(bad_rows),
    }
    last = int(view.steps[bad_rows[-1]]) if bad_rows else step
    return [Finding("nonfinite", "error", layers, step, last, summary, evidence, found)]


def _mask_columns(view: RunView) -> set[int]:
    """Modules whose -inf outputs the loss absorbed on some step: known masks."""
    flags = view.m("nonfinite")
    return {int(c) for r in view.masked_rows for c in np.flatnonzero(flags[r] == 1)}


def _past_masks(view: RunView, row: int, module: str | None) -> str | None:
    """The first module of a failing step that is not a known mask, if the store named one.

    A step records the first module, in execution order, whose output was not finite;
    in a masked model that is the mask on every step, also where a NaN began later
    (a value head beside the masked policy). Where the mask alone fails (every entry
    masked), it stays the culprit.
    """
    masks = _mask_columns(view)
    if module is None or module not in view.names or view.names.index(module) not in masks:
        return module
    flags, outputs = view.m("nonfinite")[row], view.m("act_mean")[row]
    # Flagged for its output, not only for its error or gradient: its mean is not finite.
    others = [
        int(c)
        for c in np.flatnonzero(flags == 1)
        if int(c) not in masks
        and not np.isfinite(outputs[c])
        and view.info[int(c)].exec_order is not None
    ]
    if not others:
        return module
    return view.names[min(others, key=lambda c: view.info[c].exec_order)]


def _masks(view: RunView) -> list[Finding]:
    """A note, not a failure, for -inf outputs that the loss absorbs (see ``RunView.masked_rows``)."""
    rows = sorted(view.masked_rows)
    if not rows:
        return []
    layers = [view.names[c] for c in sorted(_mask_columns(view))]
    steps = view.steps
    summary = (
        f"{layers[0]} outputs -inf on {len(rows)} of {len(steps)} steps while the loss and every "
        "gradient stay finite: a mask (softmax gives those entries zero probability), not a failure."
    )
    evidence = {"masked_steps": len(rows), "modules": layers}
    return [
        Finding(
            "nonfinite",
            "info",
            layers,
            int(steps[rows[0]]),
            int(steps[rows[-1]]),
            summary,
            evidence,
        )
    ]
