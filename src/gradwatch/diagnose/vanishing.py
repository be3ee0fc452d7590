"""Vanishing gradients: the backpropagated error shrinks layer after layer towards the input."""

from __future__ import annotations

from . import causes
from .depth import affected_layers, depth_episodes, episode_evidence
from .findings import Finding, agree, layer_names
from .profile import RunView


def check(view: RunView) -> list[Finding]:
    findings = []
    for episode in depth_episodes(view, direction=+1):
        ev = episode_evidence(view, episode)
        layers = affected_layers(view, episode)
        depth = ev["layers_in_profile"]
        found = causes.rank(
            [
                causes.saturating_activations(view, episode.model),
                causes.init_scale(view, episode.model, "small"),
                causes.depth_without_normalization(view, episode.model, depth),
                causes.recurrent_radius(view, episode.model, above=False),
            ]
        )
        zeros = ev["layers_error_underflowed"]
        orders = f"{ev['orders_of_magnitude_across_depth']:.1f} orders of magnitude"
        span = (
            f"{orders} across {depth - len(zeros)} of the {depth} layers, and in {layer_names(zeros)}, "
            "nearest the input, it underflowed to exactly zero"
            if zeros
            else f"{orders} across {depth} layers"
        )
        summary = (
            f"The backpropagated error shrinks by {ev['gain_per_layer']:.2g}x per layer on its way to the input "
            f"from step {episode.first_step}: {span}. "
            f"{layer_names(layers, start=True) if layers else 'The early layers'} "
            f"barely {agree(layers, 'learns', 'learn')}."
        )
        findings.append(
            Finding(
                "vanishing_gradient",
                "warning",
                layers,
                episode.first_step,
                episode.last_step,
                summary,
                ev,
                found,
            )
        )
    return findings
