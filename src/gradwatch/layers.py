"""Which modules of a model are layers, what they compute, and which parameters they own.

A *layer* is any module except the plain containers (``nn.Sequential``,
``nn.ModuleList``, ``nn.ModuleDict``) that only pass tensors along, so their
statistics would repeat their last child's. Each parameter belongs to exactly one
layer (the first that owns it in ``named_modules`` order), so tied or shared
parameters are counted once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

# The activation families gradwatch knows how to judge. Keys are module classes.
SATURATING: dict[type[nn.Module], str] = {
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.Hardsigmoid: "hardsigmoid",
    nn.Hardtanh: "hardtanh",
    nn.Softsign: "softsign",
}
RECTIFYING: dict[type[nn.Module], str] = {nn.ReLU: "relu", nn.ReLU6: "relu6"}
RECURRENT = (nn.RNNBase,)

# Modules that map finite inputs to finite outputs by construction: bounded or
# 1-Lipschitz elementwise functions, dropout, max-pooling and reshapes. None of them
# can be where an inf or NaN first appears, so the every-step non-finite check skips
# them; they are measured on detailed steps only. Matched by exact type, since a
# subclass may override forward. (SELU is left out: its 1.05 gain can overflow float16.)
FINITE_PRESERVING: frozenset[type[nn.Module]] = frozenset(
    {
        nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
        nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softsign,
        nn.Softplus, nn.LogSigmoid, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink,
        nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
        nn.Identity, nn.Flatten, nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
        nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    }
)  # fmt: skip


def activation_kind(module: nn.Module) -> str | None:
    """The activation family of ``module`` ("sigmoid", "tanh", "relu", ...), or None."""
    for table in (SATURATING, RECTIFYING):
        for cls, name in table.items():
            if isinstance(module, cls):
                return name
    return None


@dataclass
class Layer:
    """One measured layer: a module, its dotted name and the parameters it owns."""

    index: int
    name: str
    module: nn.Module = field(repr=False)
    root: nn.Module = field(repr=False)
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list, repr=False)

    @property
    def type(self) -> str:
        return type(self.module).__name__

    @property
    def kind(self) -> str | None:
        return activation_kind(self.module)

    @property
    def checked_every_step(self) -> bool:
        """Whether its output is checked for inf/NaN on every step, not only detailed ones."""
        return type(self.module) not in FINITE_PRESERVING

    @property
    def fan_in(self) -> int | None:
        """Inputs per output unit of the layer's main weight, as ``torch.nn.init`` counts them.

        A parametrized weight is not read: that would run its parametrization, and
        spectral_norm's takes a power-iteration step in training mode, changing the
        training. Its largest original tensor has the weight's shape (spectral_norm,
        orthogonal, weight_norm's direction).
        """
        if parametrize.is_parametrized(self.module, "weight"):
            originals = self.module.parametrizations["weight"].parameters(recurse=False)
            weight = max(originals, key=lambda t: t.numel(), default=None)
        else:
            weight = getattr(self.module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
            return int(weight.shape[1] * weight[0][0].numel())
        return None


def named_roots(
    models: nn.Module | Iterable[nn.Module] | Mapping[str, nn.Module],
) -> dict[str, nn.Module]:
    """Give each watched model a name prefix: "" for a single model, else its key or index."""
    if isinstance(models, nn.Module):
        return {"": models}
    if isinstance(models, Mapping):
        items = list(models.items())
    else:
        items = [(str(i), m) for i, m in enumerate(models)]
    for name, model in items:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"gradwatch watches torch.nn.Module objects; got {type(model).__name__} for {name!r}"
            )
    if len(items) == 1:
        return {"": items[0][1]}
    return dict(items)


PASS_THROUGH = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def is_layer(module: nn.Module) -> bool:
    """Leaves, modules with parameters of their own, and containers with a forward of their own.

    A custom container computes something between its children (``q @ k.T``, a
    residual sum), so a non-finite value can first appear in it; only the plain
    pass-through containers are left out.
    """
    return (
        not isinstance(module, PASS_THROUGH)
        or next(module.parameters(recurse=False), None) is not None
    )


def discover_layers(
    roots: Mapping[str, nn.Module], start: int = 0, seen_params: set[int] | None = None
) -> list[Layer]:
    """List the layers of every root, assigning each parameter to one layer only.

    Example:
        >>> from torch import nn
        >>> layers = discover_layers({"": nn.Sequential(nn.Linear(2, 2), nn.ReLU())})
        >>> [(layer.name, layer.type) for layer in layers]
        [('0', 'Linear'), ('1', 'ReLU')]
    """
    seen_params = set() if seen_params is None else seen_params
    seen_modules: set[int] = set()
    layers: list[Layer] = []
    for prefix, root in roots.items():
        for name, module in root.named_modules(remove_duplicate=False):
            if id(module) in seen_modules or not is_layer(module):
                continue
            seen_modules.add(id(module))
            full = ".".join(part for part in (prefix, name) if part) or "(root)"
            layer = Layer(start + len(layers), full, module, root)
            owned = module.named_parameters(recurse=False)
            if parametrize.is_parametrized(module):
                # The parametrizations compute the module's weight; they are not layers of
                # the network, and the originals they hold are the module's parameters.
                tree = module.parametrizations
                seen_modules.update(id(m) for m in tree.modules())
                own = list(owned)
                owned = own + [(f"parametrizations.{n}", p) for n, p in tree.named_parameters()]
            for pname, p in owned:
                if id(p) not in seen_params:
                    seen_params.add(id(p))
                    layer.params.append((f"{full}.{pname}" if full != "(root)" else pname, p))
            layers.append(layer)
    return layers
