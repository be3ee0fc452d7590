"""Dead ReLU units: units that output zero for every sample over a whole flush window.

A dead unit gets no gradient, so nothing moves it back. A layer is flagged when at
least ``LEVEL`` of its units are dead in the latest windows (the last two, or the only
one), so a unit that is silent for a while and then recovers is not counted.
"""

from __future__ import annotations

import numpy as np

from . import causes
from .findings import Cause, Finding, layer_names
from .profile import RunView

LEVEL = 0.5  # half the layer dead: SageMaker Debugger's layer threshold


def check(view: RunView) -> list[Finding]:
    dead = view.m("dead_frac")[view.finite_rows]  # NaN outputs say nothing about dead units
    hits = []
    for col in range(dead.shape[1]):
        rows = np.flatnonzero(np.isfinite(dead[:, col]))
        if not rows.size:
            continue
        latest = dead[rows[-2:], col]
        if (latest >= LEVEL).all():
            first = rows[dead[rows, col] >= LEVEL][0]
            hits.append((float(latest[-1]), col, int(view.steps[first]), int(view.steps[rows[-1]])))
    if not hits:
        return []
    hits.sort(reverse=True)
    layers = [view.names[c] for _, c, _, _ in hits]
    first_row = int(np.searchsorted(view.steps, min(h[2] for h in hits)))
    found = causes.rank(
        [
            causes.learning_rate(view, np.arange(0, first_row + 1), high=True),
            Cause(
                "dead_relu",
                "ReLU units pushed below zero for every input get exactly zero gradient and cannot recover",
                0.5,
            ),
        ]
    )
    summary = (
        f"{hits[0][0]:.0%} of the units of {layer_names(layers[:1])} output zero for every sample since step {hits[0][2]}: "
        "they are dead and receive no gradient."
    )
    evidence = {"dead_frac": {view.names[c]: round(f, 4) for f, c, _, _ in hits}}
    return [
        Finding(
            "dead_units",
            "warning",
            layers,
            min(h[2] for h in hits),
            max(h[3] for h in hits),
            summary,
            evidence,
            found,
        )
    ]
