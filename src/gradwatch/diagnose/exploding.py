"""Exploding gradients: errors that grow over depth, or gradient norms that spike over time.

Two signatures. Over depth: the backpropagated error grows by orders of magnitude
towards the input (see depth.py). Over time: a layer's gradient norm jumps to
``SPIKE`` times its running median, which recurrent nets show when a sequence
drives the hidden state into a region of large Jacobians. A single spike counts
only when harm follows it (the run turns non-finite soon after); otherwise it
has to recur. A spike at a step whose logged loss is itself ``LOSS_SPIKE`` times its
running median is the batch's doing (a mislabelled or outlying sample carries a
large error), not a gain inside the network: it does not count towards recurrence,
unless harm follows it.
"""

from __future__ import annotations

import warnings

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from . import causes
from .depth import affected_layers, depth_episodes, episode_evidence
from .findings import Finding, layer_names
from .profile import WARMUP_STEPS, RunView

SPIKE = 100.0  # two orders of magnitude above the recent median
HISTORY = 20  # steps in the running median
HARM_WITHIN = 10  # steps from a spike to the first inf/NaN for the spike to count alone
LOSS_SPIKE = 10.0  # a batch loss an order of magnitude above the running median


def spikes(view: RunView) -> dict[int, list[tuple[int, float]]]:
    """Per layer column: (row, ratio to running median) of each spike.

    The running median is over the last ``HISTORY`` finite, positive values and
    needs three of them. Medians are taken only at candidate rows: a value 100x
    the median is at least 100x the window's minimum, which numpy finds for every
    row at once.
    """
    grad = view.m("grad_norm")
    n, width = grad.shape
    found: dict[int, list[tuple[int, float]]] = {}
    if n <= WARMUP_STEPS:
        return found
    clean = np.where(np.isfinite(grad) & (grad > 0), grad, np.nan)
    padded = np.vstack([np.full((HISTORY, width), np.nan), clean])
    windows = sliding_window_view(padded, HISTORY, axis=0)[:n]  # row r: rows r-20 .. r-1
    enough = (~np.isnan(windows)).sum(axis=-1) >= 3
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows give NaN
        low = np.nanmin(windows, axis=-1)
    rows = np.arange(WARMUP_STEPS, n)
    for col in range(width):
        series = grad[rows, col]
        ok = enough[rows, col]
        finite = np.isfinite(series)
        broken = rows[ok & ~finite]
        stop = int(broken[0]) if len(broken) else n
        with np.errstate(invalid="ignore"):
            candidate = ok & finite & (rows < stop) & (series >= SPIKE * low[rows, col])
        for row in rows[candidate].tolist():
            base = float(np.nanmedian(windows[row, col]))
            if grad[row, col] / base >= SPIKE:
                found.setdefault(col, []).append((row, grad[row, col] / base))
        if stop < n and col in found:
            # inf/NaN is the end of an explosion only after finite growth: straight from
            # normal values it is a numerical singularity (log(0), 0/0), not a gain.
            found[col].append((stop, float("inf")))
    return found


def batch_explained(view: RunView, row: int) -> bool:
    """Whether the batch at ``row`` explains its spike: its loss alone stands out.

    The loss logged at ``row`` is ``LOSS_SPIKE`` times the median of the last
    ``HISTORY`` logged losses, and the next logged loss is back below that: weights
    that blew up would keep the next batch's loss high too. Judged only where these
    losses (at least three in the window) are finite and positive.
    """
    loss = view.loss
    window = loss[max(0, row - HISTORY) : row]
    window = window[~np.isnan(window)]  # steps without a logged loss
    after = loss[row + 1 :][~np.isnan(loss[row + 1 :])][:1]
    if window.size < 3 or not after.size:
        return False
    if not (np.isfinite(window).all() and (window > 0).all() and np.isfinite(loss[row])):
        return False
    bar = LOSS_SPIKE * float(np.median(window))
    return bool(loss[row] >= bar and np.isfinite(after[0]) and after[0] < bar)


def _over_time(view: RunView) -> Finding | None:
    bad = view.first_nonfinite_row
    found = {}
    for col, hits in spikes(view).items():
        kept = [
            (r, x)
            for r, x in hits
            if not np.isfinite(x)
            or (bad is not None and r <= bad <= r + HARM_WITHIN)
            or not batch_explained(view, r)
        ]
        if kept:
            found[col] = kept
    if not found:
        return None
    first_row = min(r for hits in found.values() for r, _ in hits)
    harmed = bad is not None and first_row <= bad <= first_row + HARM_WITHIN
    recurring = max(len(h) for h in found.values()) >= 3
    if not (harmed or recurring):
        return None
    order = sorted(found, key=lambda c: (-min(max(r for _, r in found[c]), 1e300), found[c][0][0]))
    layers = [view.names[c] for c in order]
    top = max((r for _, r in found[order[0]]), default=0.0)
    first_col = min(found, key=lambda c: found[c][0][0])
    first_ratio = found[first_col][0][1]
    # The learning rate is read from the last measured updates before the first spike: a
    # spike's own update is large at any learning rate.
    measured = np.isfinite(view.m("update_ratio")[:first_row]).any(axis=1)
    rows = np.flatnonzero(measured)[-HISTORY:]
    model = view.info[order[0]].model or ""
    found_causes = causes.rank(
        [
            causes.recurrent_radius(view, model, above=True, layers=layers),
            causes.learning_rate(view, rows, high=True),
            causes.init_scale(view, model, "large"),
        ]
    )
    steps = view.steps
    last_row = max(r for hits in found.values() for r, _ in hits)
    first_text = (
        "to inf/NaN"
        if not np.isfinite(first_ratio)
        else f"to {first_ratio:.2g}x its running median"
    )
    summary = (
        f"The gradient norm of {layer_names([view.names[first_col]])} jumps {first_text} at step {int(steps[first_row])}"
        + (
            f"; the run turns non-finite at step {int(steps[bad])}."
            if harmed
            else ", and such spikes recur."
        )
    )
    evidence = {
        "spiking_layers": {
            view.names[c]: [int(steps[r]) for r, _ in found[c]][:10] for c in order[:5]
        },
        "largest_ratio_to_running_median": None if not np.isfinite(top) else round(top, 1),
        "first_nonfinite_step": None if bad is None else int(steps[bad]),
    }
    return Finding(
        "exploding_gradient", "warning", layers, int(steps[first_row]), int(steps[last_row]), summary, evidence,
        found_causes,
    )  # fmt: skip


def check(view: RunView) -> list[Finding]:
    findings = []
    for episode in depth_episodes(view, direction=-1):
        ev = episode_evidence(view, episode)
        layers = affected_layers(view, episode)
        found = causes.rank(
            [
                causes.init_scale(view, episode.model, "large"),
                causes.learning_rate(view, view.finite_rows, high=True),
                causes.recurrent_radius(view, episode.model, above=True, layers=layers),
            ]
        )
        summary = (
            f"The backpropagated error grows by {ev['gain_per_layer']:.2g}x per layer on its way to the input: "
            f"{ev['orders_of_magnitude_across_depth']:.1f} orders of magnitude across {ev['layers_in_profile']} "
            f"layers, from step {episode.first_step}."
        )
        findings.append(
            Finding(
                "exploding_gradient",
                "warning",
                layers,
                episode.first_step,
                episode.last_step,
                summary,
                ev,
                found,
            )
        )
    over_time = _over_time(view)
    if over_time is not None:
        findings.append(over_time)
    return findings
