"""Apply the remedies that are mechanical changes to a model, in place, with torch.nn.init."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

SATURATING = (nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Softsign)
WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def swap_activations(
    model: nn.Module, old: tuple[type[nn.Module], ...], make: Callable[[], nn.Module]
) -> int:
    """Replace every submodule of a type in ``old`` with ``make()``; return how many."""
    count = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, old):
                setattr(parent, name, make())
                count += 1
    return count


def _init(model: nn.Module, init_weight: Callable[[nn.Module], None]) -> int:
    count = 0
    for m in model.modules():
        if isinstance(m, WEIGHTED):
            init_weight(m)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
            count += 1
    return count


def he_init(model: nn.Module) -> int:
    return _init(model, lambda m: nn.init.kaiming_normal_(m.weight, nonlinearity="relu"))


def xavier_init(model: nn.Module) -> int:
    return _init(
        model, lambda m: nn.init.xavier_normal_(m.weight, gain=nn.init.calculate_gain("tanh"))
    )


def orthogonal_init(model: nn.Module) -> int:
    count = _init(model, lambda m: nn.init.orthogonal_(m.weight))
    for m in model.modules():
        if isinstance(m, nn.RNNBase):
            for name, p in m.named_parameters():
                if name.startswith("weight_hh"):
                    for block in p.data.chunk(p.shape[0] // p.shape[1]):
                        nn.init.orthogonal_(block)
                    count += 1
    return count


APPLICABLE: dict[str, Callable[[nn.Module], int]] = {
    "relu": lambda m: swap_activations(m, SATURATING, nn.ReLU),
    "gelu": lambda m: swap_activations(m, SATURATING, nn.GELU),
    "leaky_relu": lambda m: swap_activations(m, (nn.ReLU,), lambda: nn.LeakyReLU(0.01)),
    "he_init": he_init,
    "xavier_init": xavier_init,
    "orthogonal_init": orthogonal_init,
}


def apply_remedies(model: nn.Module, ids: Iterable[str]) -> nn.Module:
    """Apply remedies by id to ``model`` in place and return it.

    Only mechanical fixes can be applied (see ``APPLICABLE``); the others (a lower
    learning rate, clipping, residual blocks) change the training code, and their
    snippets in the catalogue say how.

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 1))
        >>> apply_remedies(m, ["relu", "he_init"])[1]
        ReLU()
    """
    ids = list(ids)
    unknown = [i for i in ids if i not in APPLICABLE]
    if unknown:
        raise ValueError(
            f"cannot apply {', '.join(unknown)} automatically; appliable remedies are "
            f"{', '.join(APPLICABLE)} (the catalogue's snippets show how to do the others)"
        )
    for i in ids:
        APPLICABLE[i](model)
    return model
