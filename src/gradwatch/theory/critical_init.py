"""Re-initialise a user's MLP or CNN on the order-to-chaos line (the edge of chaos).

Every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` gets ``W ~ N(0, sigma_w2 / fan_in)`` and
``b ~ N(0, sigma_b2)`` through ``torch.nn.init``, with sigma_w2 = the critical value
for the network's activation (Schoenholz et al. 2017; for relu this is He et al.
2015's 2, for tanh at sigma_b2 = 0 it is 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .activations import Activation, TensorFn, activation_from_module, resolve_activation
from .meanfield import critical_sigma_w2

__all__ = ["CriticalInit", "critical_init", "find_activation"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class CriticalInit:
    """What :func:`critical_init` did.

    Attributes:
        activation: Name of the activation the line was computed for.
        sigma_w2: The critical weight variance (times fan-in) that was used.
        sigma_b2: The bias variance that was used.
        layers: Qualified names of the re-initialised modules, in order.

    Example:
        >>> from torch import nn
        >>> critical_init(nn.Sequential(nn.Linear(8, 8), nn.Tanh())).layers
        ['0']
    """

    activation: str
    sigma_w2: float
    sigma_b2: float
    layers: list[str]


def find_activation(module: nn.Module) -> Activation:
    """Find the one activation a network uses from its ``nn`` activation modules.

    Args:
        module: The network.

    Returns:
        The activation.

    Raises:
        ValueError: If the network holds no activation module (functional calls such
            as ``torch.tanh`` in ``forward`` are invisible) or several different ones.

    Example:
        >>> from torch import nn
        >>> find_activation(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))).name
        'tanh'
    """
    found: dict[str, Activation] = {}
    for sub in module.modules():
        act = activation_from_module(sub)
        if act is not None:
            found.setdefault(act.name, act)
    if not found:
        raise ValueError(
            "no activation module (nn.Tanh, nn.ReLU, ...) found in the model; activations "
            "called as functions in forward() are invisible: pass activation='tanh' (or any "
            "name or callable) to critical_init"
        )
    if len(found) > 1:
        raise ValueError(
            f"the model mixes activations ({', '.join(sorted(found))}); mean-field "
            "initialisation assumes one: pass activation=... to choose"
        )
    return next(iter(found.values()))


def critical_init(
    module: nn.Module,
    activation: str | TensorFn | Activation | None = None,
    sigma_b2: float = 0.0,
    *,
    generator: torch.Generator | None = None,
) -> CriticalInit:
    """Re-initialise every Linear and Conv layer of ``module`` at criticality (chi1 = 1).

    Weights are drawn with ``torch.nn.init.normal_(std=sqrt(sigma_w2 / fan_in))``
    where fan_in = in_features, or in_channels / groups times the kernel size;
    biases with ``normal_(std=sqrt(sigma_b2))`` (or zeros when sigma_b2 = 0).
    Other layers (norms, embeddings, transposed convolutions) are left alone.

    Args:
        module: The network, changed in place.
        activation: Name, callable or Activation; found from the model's activation
            modules when ``None``.
        sigma_b2: Bias variance; the critical sigma_w2 depends on it.
        generator: Optional random generator, for reproducible draws.

    Returns:
        A :class:`CriticalInit` saying what was used and which layers changed.

    Raises:
        ValueError: If no activation can be found or it is ambiguous, or the model has
            no Linear or Conv layer.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))
        >>> done = critical_init(net)
        >>> round(done.sigma_w2, 6), done.layers
        (2.0, ['0', '2'])
    """
    act = find_activation(module) if activation is None else resolve_activation(activation)
    sigma_w2 = float(critical_sigma_w2(act, sigma_b2))
    names = []
    for name, sub in module.named_modules():
        if not isinstance(sub, _LAYERS):
            continue
        weight = sub.weight
        fan_in = weight.shape[1] * math.prod(weight.shape[2:])
        nn.init.normal_(weight, 0.0, math.sqrt(sigma_w2 / fan_in), generator=generator)
        if sub.bias is not None:
            if sigma_b2 > 0:
                nn.init.normal_(sub.bias, 0.0, math.sqrt(sigma_b2), generator=generator)
            else:
                nn.init.zeros_(sub.bias)
        names.append(name)
    if not names:
        raise ValueError("the model has no nn.Linear or nn.Conv1d/2d/3d layer to initialise")
    return CriticalInit(act.name, sigma_w2, float(sigma_b2), names)
