"""Episodes of compounding gain over depth, shared by the vanishing and exploding rules.

The backpropagated error is multiplied by one layer Jacobian per layer. A gain below
1 that compounds over depth leaves the input-side layers with errors orders of
magnitude smaller than the output side (vanishing); above 1, larger (exploding).
Per step, the rule fits a robust line to log10(error RMS) over the parametrised
layers in execution order and asks for three things:

* the fitted trend spans at least ``ORDERS`` orders of magnitude across the depth;
* the measured first-to-last span agrees (the fit is not an artefact);
* no single layer accounts for most of it: a cliff at one layer (units that died,
  a frozen block) is not a compounding gain, and other rules name it.

A layer whose error RMS is exactly 0 has no logarithm and stays out of the fit (a
zero must not make a cliff). In a vanishing episode, zeros on the input side of the
most starved measured layer are the same shrinking error gone below float32's range:
those layers are named first among the affected ones, and counted in the depth.

The weight-gradient norm is not used here: it is the product of the error and the
layer's input, so a net whose forward signal shrinks while its error grows can show
flat weight gradients while it vanishes (the deep linear net with W = 0.5 I).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from .profile import DepthProfile, RunView

ORDERS = 2.0  # 100x across the network: the gradient scale problem, not noise
CLIFF_SHARE = 0.6  # one layer may account for at most this share of the span


@dataclass
class DepthEpisode:
    model: str
    direction: int  # +1: error grows towards the output (vanishing); -1: exploding
    hits: list[DepthProfile]
    judged: int  # profiles that could be judged in the window

    @property
    def first_step(self) -> int:
        return self.hits[0].step

    @property
    def last_step(self) -> int:
        return self.hits[-1].step


def _holds(profile: DepthProfile, direction: int) -> bool:
    trend, span = direction * profile.trend, direction * profile.span
    return trend >= ORDERS and span >= ORDERS and profile.largest_jump <= CLIFF_SHARE * span


def depth_episodes(view: RunView, direction: int) -> list[DepthEpisode]:
    """Per model, the steps where the error profile compounds in ``direction``, if persistent.

    Computed once per view and direction: several rules ask.
    """
    key = ("depth_episodes", direction)
    if key not in view.memo:
        view.memo[key] = _depth_episodes(view, direction)
    return view.memo[key]


def _depth_episodes(view: RunView, direction: int) -> list[DepthEpisode]:
    episodes = []
    harm_follows = view.first_nonfinite_row is not None
    for model in view.models:
        columns = view.param_layers(model)
        profiles = [
            p for r in view.finite_rows if (p := view.depth_profile(int(r), columns)) is not None
        ]
        hits = [p for p in profiles if _holds(p, direction)]
        if not hits:
            continue
        # Persistent: on most judged steps (at least two), or on every step there was
        # before the run turned non-finite.
        persistent = len(hits) >= 2 and len(hits) >= 0.5 * len(profiles)
        if persistent or (harm_follows and len(hits) == len(profiles)):
            episodes.append(DepthEpisode(model, direction, hits, len(profiles)))
    return episodes


def _underflowed(profile: DepthProfile) -> list[int]:
    """Zero-error layers before (input side of) the most starved layer that still has an error."""
    weakest = profile.layers[int(np.argmin(profile.log_rms))]
    return [c for c in profile.zeros if c < weakest]  # columns are in execution order


def underflowed_layers(episode: DepthEpisode) -> list[int]:
    """Columns whose error underflowed to exactly 0 on most steps of a vanishing episode."""
    if episode.direction < 0:
        return []  # a growing error does not underflow on its way to the input
    counts = Counter(c for p in episode.hits for c in _underflowed(p))
    return sorted(c for c, n in counts.items() if n >= 0.5 * len(episode.hits))


def affected_layers(view: RunView, episode: DepthEpisode) -> list[str]:
    """Layers whose error is 100x off the best-served layer, the worst first.

    Layers whose error underflowed to zero come first, the one nearest the input first.
    """
    zeros = underflowed_layers(episode)
    by_layer: dict[int, list[float]] = {}
    for p in episode.hits:
        for col, value in zip(p.layers, p.log_rms, strict=True):
            if col not in zeros:
                by_layer.setdefault(col, []).append(float(value))
    medians = {col: float(np.median(v)) for col, v in by_layer.items()}
    if episode.direction > 0:
        best = max(medians.values())
        worst = sorted((v, c) for c, v in medians.items() if v <= best - ORDERS)
    else:
        best = min(medians.values())
        worst = sorted(((-v, c) for c, v in medians.items() if v >= best + ORDERS))
    return [view.names[c] for c in zeros] + [view.names[c] for _, c in worst]


def episode_evidence(view: RunView, episode: DepthEpisode) -> dict:
    gains = [p.gain_per_layer for p in episode.hits]
    spans = [p.span for p in episode.hits]
    first = episode.hits[0]
    zeros = underflowed_layers(episode)
    return {
        "gain_per_layer": round(float(np.median(gains)), 4),
        # A size, positive either way: the finding's kind says which way the error goes.
        "orders_of_magnitude_across_depth": round(episode.direction * float(np.median(spans)), 2),
        "layers_in_profile": len(set(first.layers) | set(zeros)),
        "layers_error_underflowed": [view.names[c] for c in zeros],
        "steps_with_pathology": len(episode.hits),
        "steps_judged": episode.judged,
        "error_rms_first_layer": 0.0 if zeros else float(10 ** first.log_rms[0]),
        "error_rms_last_layer": float(10 ** first.log_rms[-1]),
        "profile_step": first.step,
    }
