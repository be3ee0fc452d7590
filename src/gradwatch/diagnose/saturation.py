"""Saturated activations: sigmoid/tanh units stuck where their derivative is ~0.

A unit counts as saturated where the derivative is below 1% of its maximum (the
probe's definition). A layer is flagged when, over the judged steps, the median
fraction of saturated units is at least ``LEVEL``, or the median of the layer's mean
derivative (over its maximum) is at most ``LOW_DERIVATIVE``: either way the layer
passes a small fraction of the gradient its activation could pass.

A model's output activation is exempt unless the loss plateaus: a sigmoid or tanh
whose output is the model's output saturates whenever the model is confident and
right, and paired with its loss (BCE on a sigmoid) the gradient at the logit is
p - y, so nothing is lost; "use ReLU" would break the probability it outputs.
"""

from __future__ import annotations

import numpy as np

from . import causes, loss_plateau
from .findings import Finding, layer_names
from .profile import RunView, nanmedian

LEVEL = 0.5  # half the units saturated, as SageMaker Debugger's rule flags a layer
LOW_DERIVATIVE = 0.05  # the layer passes at most 1/20 of the gradient it could


def is_model_output(view: RunView, col: int) -> bool:
    """Whether a layer's output is its model's: every layer of the model that finishes later encloses it.

    Execution order ranks layers by when their output is first seen, so the custom
    containers around the last layer (the root among them) come after it.
    """
    info = view.info[col]
    if info.exec_order is None:
        return False
    return all(
        other.name == "(root)" or info.name.startswith(other.name + ".")
        for other in view.info
        if (other.model or "") == (info.model or "")
        and other.exec_order is not None
        and other.exec_order > info.exec_order
    )


def check(view: RunView) -> list[Finding]:
    sat = view.m("saturated_frac")
    slope = view.m("act_derivative")
    rows = view.finite_rows
    hits = []
    harmed = bool(loss_plateau.check(view))
    for col, info in enumerate(view.info):
        if info.kind not in causes.SATURATING_KINDS:
            continue
        if is_model_output(view, col) and not harmed:
            continue  # a confident output, not a blocked gradient
        values, slopes = sat[rows, col], slope[rows, col]
        measured = np.isfinite(values)
        if measured.sum() < 2:
            continue
        median = float(nanmedian(values))
        mean_slope = float(nanmedian(slopes)) if np.isfinite(slopes).any() else 1.0
        if median >= LEVEL or mean_slope <= LOW_DERIVATIVE:
            over = rows[measured & ((values >= LEVEL) | (slopes <= LOW_DERIVATIVE))]
            if over.size:
                hits.append(
                    (median, col, int(view.steps[over[0]]), int(view.steps[over[-1]]), mean_slope)
                )
    if not hits:
        return []
    hits.sort(key=lambda h: (-h[0], h[4]))
    layers = [view.names[h[1]] for h in hits]
    model = view.info[hits[0][1]].model or ""
    found = causes.rank(
        [causes.saturating_activations(view, model), causes.init_scale(view, model, "large")]
    )
    top = hits[0]
    summary = (
        f"{len(hits)} activation layer(s) are saturated: in {layer_names(layers[:1])}, {top[0]:.0%} of the units have a "
        f"derivative below 1% of its maximum and the mean derivative is {top[4]:.1%} of it, so the layer "
        "passes almost no gradient."
    )
    evidence = {
        "median_saturated_frac": {view.names[h[1]]: round(h[0], 4) for h in hits},
        "median_derivative_over_max": {view.names[h[1]]: round(h[4], 4) for h in hits},
    }
    first = min(h[2] for h in hits)
    last = max(h[3] for h in hits)
    return [Finding("saturation", "warning", layers, first, last, summary, evidence, found)]
