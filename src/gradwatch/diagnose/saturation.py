"""Saturated activations: sigmoid/tanh units stuck where their derivative is ~0.

A unit counts as saturated where the derivative is below 1% of its maximum (the
probe's definition). A layer is flagged when the median fraction over the judged
steps is at least ``LEVEL``: then most of the layer passes almost no gradient.
"""

from __future__ import annotations

import numpy as np

from . import causes
from .findings import Finding
from .profile import RunView, nanmedian

LEVEL = 0.5  # half the units saturated, as SageMaker Debugger's rule flags a layer


def check(view: RunView) -> list[Finding]:
    sat = view.m("saturated_frac")
    rows = view.finite_rows
    hits = []
    for col, info in enumerate(view.info):
        if info.kind not in causes.SATURATING_KINDS:
            continue
        values = sat[rows, col]
        measured = np.isfinite(values)
        if measured.sum() < 2:
            continue
        median = float(nanmedian(values))
        if median >= LEVEL:
            over = rows[measured & (values >= LEVEL)]
            hits.append((median, col, int(view.steps[over[0]]), int(view.steps[over[-1]])))
    if not hits:
        return []
    hits.sort(reverse=True)
    layers = [view.names[c] for _, c, _, _ in hits]
    model = view.info[hits[0][1]].model or ""
    found = causes.rank(
        [causes.saturating_activations(view, model), causes.init_scale(view, model, "large")]
    )
    summary = (
        f"{len(hits)} activation layer(s) are saturated: in {layers[0]}, {hits[0][0]:.0%} of the units sit where "
        "the derivative is below 1% of its maximum, so they pass almost no gradient."
    )
    evidence = {"median_saturated_frac": {view.names[c]: round(m, 4) for m, c, _, _ in hits}}
    first = min(h[2] for h in hits)
    last = max(h[3] for h in hits)
    return [Finding("saturation", "warning", layers, first, last, summary, evidence, found)]
