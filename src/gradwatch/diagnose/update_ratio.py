"""Update-to-weight ratios: layers that learn far too slowly or too fast for their scale.

||w_after - w_before|| / ||w_before|| per optimizer step is healthy around 1e-3
(CS231n). A layer is too fast when its median ratio exceeds ``FAST`` (each step
rewrites a tenth of the weights), too slow when it is below ``SLOW`` or ``RELATIVE``
times the model's typical layer. Embeddings are exempt from "too slow": only the
rows a batch uses move, by design. Ratios are judged over the later half of the
measured steps, after weights that start at zero have grown. Such a layer's ratio is
about 1/k at step k (one update over the k summed so far; momentum at most doubles
that), whatever its first step gave, so the median of the first half stays at or
below ``BLOWUP`` = 1 once that half holds five ratios. A first-half median above it
is no growth from zero: each step rewrote more than the whole weight, and the layer
is too fast even when the blow-up left it still (dead, all zero) in the later half.

A layer whose gradient is exactly zero on most judged steps does not move for want of
a gradient, not of learning rate: it is left out of the typical layer and of "too
slow", and reported on its own. A layer that a vanishing-gradient episode names is in
neither finding: its updates are small (or nil, its error underflowed) because its
error is, and that finding says so.
"""

from __future__ import annotations

import numpy as np

from .depth import affected_layers, depth_episodes
from .findings import Cause, Finding, agree, layer_names
from .profile import RunView, nanmedian

FAST = 0.1
SLOW = 1e-6
RELATIVE = 1e-4
BLOWUP = 1.0  # a median above this in the first half: more than growth from zero gives
SPARSE_BY_DESIGN = ("Embedding", "EmbeddingBag")


def check(view: RunView) -> list[Finding]:
    ratio = view.m("update_ratio")[view.finite_rows]
    grad = view.m("grad_norm")[view.finite_rows]
    if not np.isfinite(ratio).any():
        return []
    medians, fastest, no_grad = {}, {}, {}
    for col in range(ratio.shape[1]):
        measured = np.flatnonzero(np.isfinite(ratio[:, col]))
        if measured.size < 3:
            continue
        early, judged = measured[: measured.size // 2], measured[measured.size // 2 :]
        # The later half: a layer that starts at zero (a zero-initialised residual
        # branch) has huge ratios while its weights grow from nothing.
        late = float(np.median(ratio[judged, col]))
        blowup = float(np.median(ratio[early, col])) if early.size >= 5 else 0.0
        rate = blowup if blowup > BLOWUP else late
        if rate > FAST:
            fastest[col] = rate
        grads = grad[judged, col][np.isfinite(grad[judged, col])]
        if grads.size and np.median(grads) == 0:
            no_grad[col] = int((grads == 0).sum()), int(grads.size)
        else:
            medians[col] = late
    if not medians and not no_grad:
        return []
    typical = float(nanmedian(np.array(list(medians.values())))) if medians else float("nan")
    fast = sorted(((m, c) for c, m in fastest.items()), reverse=True)
    starved = {
        name
        for episode in depth_episodes(view, direction=+1)
        for name in affected_layers(view, episode)
    }
    no_grad = {c: n for c, n in no_grad.items() if view.names[c] not in starved}
    slow = sorted(
        (m, c)
        for c, m in medians.items()
        if (m < SLOW or m < RELATIVE * typical)
        and c not in fastest
        and view.names[c] not in starved
        and view.info[c].type not in SPARSE_BY_DESIGN
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
        when = ", over the first half of the measured steps" if fast[0][0] > BLOWUP else ""
        summary = (
            f"{layer_names(layers, start=True)} {agree(layers, 'learns', 'learn')} too fast for "
            f"{agree(layers, 'its', 'their')} weight scale: median update/weight ratio "
            f"{fast[0][0]:.1e} at the fastest{when}."
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
    if no_grad:
        # A finding of its own rather than left to dead_units or vanishing: those name the
        # activations or the error profile, not the parametrised layers that cannot learn,
        # and a branch cut off from the loss (a zero gate, a mask) shows in no other rule.
        # Stating the fact and its possible sources misleads less than any one guess.
        layers = [view.names[c] for c in no_grad]
        zero, judged = no_grad[next(iter(no_grad))]
        cause = Cause(
            "no_gradient",
            f"the gradient of {layer_names(layers[:1])} is exactly zero on {zero} of the {judged} judged steps: "
            "nothing downstream passes error back to it (units after it that are dead or saturated, "
            "a branch cut off from the loss, or an error that underflowed), and no learning rate "
            "moves a layer without a gradient",
            1.0,
            {"zero_gradient_steps": zero, "judged_steps": judged},
        )
        summary = (
            f"{layer_names(layers, start=True)} {agree(layers, 'gets', 'get')} no gradient: "
            f"{agree(layers, 'its', 'their')} gradient is exactly zero on most judged steps, so "
            f"{agree(layers, 'it does', 'they do')} not learn at all."
        )
        evidence = {
            "zero_gradient_steps": {view.names[c]: n for c, (n, _) in no_grad.items()},
            "judged_steps": {view.names[c]: m for c, (_, m) in no_grad.items()},
        }
        findings.append(
            Finding("update_ratio", "warning", layers, first, last, summary, evidence, [cause])
        )
    return findings
