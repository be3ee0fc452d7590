"""Update-to-weight ratios: layers that learn far too slowly or too fast for their scale.

||w_after - w_before|| / ||w_before|| per optimizer step is healthy around 1e-3
(CS231n). A layer is too fast when its median ratio exceeds ``FAST`` (each step
rewrites a tenth of the weights), too slow when it is below ``SLOW`` or ``RELATIVE``
times the model's typical layer. Embeddings are exempt from "too slow": only the
rows a batch uses move, by design. Ratios are judged over the later half of the
measured steps, after weights that start at zero have grown.
"""

from __future__ import annotations

import numpy as np

from .findings import Cause, Finding, agree, layer_names
from .profile import RunView, nanmedian

FAST = 0.1
SLOW = 1e-6
RELATIVE = 1e-4
SPARSE_BY_DESIGN = ("Embedding", "EmbeddingBag")


def check(view: RunView) -> list[Finding]:
    ratio = view.m("update_ratio")[view.finite_rows]
    if not np.isfinite(ratio).any():
        return []
    medians = {}
    for col in range(ratio.shape[1]):
        values = ratio[:, col][np.isfinite(ratio[:, col])]
        if values.size >= 3:
            # The later half: a layer that starts at zero (a zero-initialised residual
            # branch) has huge ratios while its weights grow from nothing.
            medians[col] = float(np.median(values[values.size // 2 :]))
    if not medians:
        return []
    typical = float(nanmedian(np.array(list(medians.values()))))
    fast = sorted(((m, c) for c, m in medians.items() if m > FAST), reverse=True)
    slow = sorted(
        (m, c)
        for c, m in medians.items()
        if (m < SLOW or m < RELATIVE * typical) and view.info[c].type not in SPARSE_BY_DESIGN
    )
    findings = []
    steps = view.steps[view.finite_rows]
    first, last = (int(steps[0]), int(steps[-1])) if steps.size else (None, None)
    if fast:
        layers = [view.names[c] for _, c in fast]
        cause = Cause(
            "learning_rate_too_high",
            f"each step changes {layer_names(layers[:1])} by {fast[0][0]:.1e} of its norm (about 1e-3 is healthy)",
            1.0 + float(np.log10(fast[0][0] / 1e-3)),
            {"median_update_ratio": fast[0][0]},
        )
        summary = (
            f"{layer_names(layers, start=True)} {agree(layers, 'learns', 'learn')} too fast for "
            f"{agree(layers, 'its', 'their')} weight scale: median update/weight ratio "
            f"{fast[0][0]:.1e} at the fastest."
        )
        evidence = {
            "median_update_ratio": {view.names[c]: m for m, c in fast},
            "typical_layer": typical,
        }
        findings.append(
            Finding("update_ratio", "warning", layers, first, last, summary, evidence, [cause])
        )
    if slow:
        layers = [view.names[c] for _, c in slow]
        slowest = slow[0][0]
        moves = (
            "does not change at all: each update is below float32's resolution of its weights"
            if slowest == 0
            else f"moves {slowest:.1e} of its norm per step"
        )
        typical_text = (
            f"the typical layer moves {typical:.1e}, also far below the healthy 1e-3"
            if typical < SLOW
            else f"the typical layer moves {typical:.1e}"
        )
        cause = Cause(
            "learning_rate_too_low",
            f"{layer_names(layers[:1], start=True)} {moves}, while {typical_text}",
            1.0,
            {"median_update_ratio": slowest, "typical_layer": typical},
        )
        summary = (
            f"{layer_names(layers, start=True)} barely {agree(layers, 'learns', 'learn')}: median "
            f"update/weight ratio {slowest:.1e} at the slowest, against {typical:.1e} for the typical layer."
        )
        evidence = {
            "median_update_ratio": {view.names[c]: m for m, c in slow},
            "typical_layer": typical,
        }
        findings.append(
            Finding("update_ratio", "warning", layers, first, last, summary, evidence, [cause])
        )
    return findings
