"""Activations for the theory code: a small registry by name, or any torch callable.

The mean-field maps only need phi and phi' evaluated on many points at once. A
registered name brings an exact derivative (and, for relu, erf and linear, a
closed-form Gaussian kernel); a plain callable gets its derivative from autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Activation", "KNOWN_ACTIVATIONS", "resolve_activation", "activation_from_module"]

TensorFn = Callable[[Tensor], Tensor]

# 2 / sqrt(pi): the factor in d/dx erf(x) = 2/sqrt(pi) exp(-x^2).
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# SELU's constants, as in torch.nn.SELU (Klambauer et al. 2017).
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


@dataclass(frozen=True)
class Activation:
    """An elementwise nonlinearity phi with an optional exact derivative.

    Args:
        fn: Elementwise torch function, e.g. ``torch.tanh`` or ``nn.GELU()``.
        derivative: phi' as a torch function. When ``None`` it comes from autograd.
        name: Label used in messages and reports.
        closed_form: Name of a closed-form Gaussian kernel in
            :mod:`gradwatch.theory.kernels` (``"relu"``, ``"erf"``, ``"linear"``),
            or ``None`` to integrate numerically.
        fused: Optional ``x -> (phi(x), phi'(x))`` in one pass, used when given.

    Example:
        >>> import torch
        >>> act = Activation(torch.tanh, name="tanh")
        >>> y, dy = act.value_and_derivative(torch.zeros(3, dtype=torch.float64))
        >>> dy.tolist()
        [1.0, 1.0, 1.0]
    """

    fn: TensorFn
    derivative: TensorFn | None = None
    name: str = "custom"
    closed_form: str | None = field(default=None, compare=False)
    # phi and phi' in one pass, where they share work (tanh' = 1 - tanh^2).
    fused: Callable[[Tensor], tuple[Tensor, Tensor]] | None = field(
        default=None, compare=False, repr=False
    )

    def value_and_derivative(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Evaluate phi(x) and phi'(x) elementwise.

        Args:
            x: Points of any shape.

        Returns:
            ``(phi(x), phi'(x))``, both shaped like ``x``.

        Example:
            >>> import torch
            >>> act = resolve_activation("relu")
            >>> act.value_and_derivative(torch.tensor([-1.0, 2.0]))[1].tolist()
            [0.0, 1.0]
        """
        if self.fused is not None:
            with torch.no_grad():
                return self.fused(x)
        if self.derivative is not None:
            with torch.no_grad():
                return self._checked(x, self.fn(x)), self._checked(x, self.derivative(x))
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            y = self._checked(leaf, self.fn(leaf))
            if not y.requires_grad:  # a constant function, e.g. a step: phi' = 0 a.e.
                return y.detach(), torch.zeros_like(x)
            (dy,) = torch.autograd.grad(y, leaf, torch.ones_like(y))
        return y.detach(), dy

    def _checked(self, x: Tensor, y: Tensor) -> Tensor:
        if not isinstance(y, Tensor) or y.shape != x.shape:
            raise ValueError(
                f"activation {self.name!r} must be elementwise: input shape {tuple(x.shape)}, "
                f"output {getattr(y, 'shape', type(y).__name__)}"
            )
        return y


def _dtanh(x: Tensor) -> Tensor:
    return 1.0 - torch.tanh(x) ** 2


def _dsigmoid(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1.0 - s)


def _derf(x: Tensor) -> Tensor:
    return _TWO_OVER_SQRT_PI * torch.exp(-x * x)


def _drelu(x: Tensor) -> Tensor:
    return (x > 0).to(x.dtype)


def _dgelu(x: Tensor) -> Tensor:
    # d/dx [x Phi(x)] = Phi(x) + x phi(x), with Phi, phi the standard normal cdf and pdf.
    cdf = 0.5 * (1.0 + torch.erf(x * _INV_SQRT_2))
    return cdf + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _dswish(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def _dsoftplus(x: Tensor) -> Tensor:
    # F.softplus is exactly linear above its threshold 20, where sigmoid(x) = 1 to 2e-9.
    return torch.where(x > 20.0, torch.ones_like(x), torch.sigmoid(x))


def _delu(x: Tensor) -> Tensor:
    return torch.where(x > 0, torch.ones_like(x), torch.exp(torch.clamp(x, max=0.0)))


def _dselu(x: Tensor) -> Tensor:
    return _SELU_SCALE * torch.where(
        x > 0, torch.ones_like(x), _SELU_ALPHA * torch.exp(torch.clamp(x, max=0.0))
    )


def _dleaky_relu(x: Tensor) -> Tensor:
    return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, 0.01))


def _tanh_both(x: Tensor) -> tuple[Tensor, Tensor]:
    y = torch.tanh(x)
    return y, 1.0 - y * y


def _sigmoid_both(x: Tensor) -> tuple[Tensor, Tensor]:
    s = torch.sigmoid(x)
    return s, s * (1.0 - s)


def _swish_both(x: Tensor) -> tuple[Tensor, Tensor]:
    s = torch.sigmoid(x)
    return x * s, s * (1.0 + x * (1.0 - s))


def _identity(x: Tensor) -> Tensor:
    return x


def _ones(x: Tensor) -> Tensor:
    return torch.ones_like(x)


_REGISTRY: dict[str, Activation] = {
    "linear": Activation(_identity, _ones, "linear", "linear"),
    "tanh": Activation(torch.tanh, _dtanh, "tanh", fused=_tanh_both),
    "relu": Activation(torch.relu, _drelu, "relu", "relu"),
    "erf": Activation(torch.erf, _derf, "erf", "erf"),
    "sigmoid": Activation(torch.sigmoid, _dsigmoid, "sigmoid", fused=_sigmoid_both),
    "gelu": Activation(F.gelu, _dgelu, "gelu"),
    "selu": Activation(F.selu, _dselu, "selu"),
    "elu": Activation(F.elu, _delu, "elu"),
    "softplus": Activation(F.softplus, _dsoftplus, "softplus"),
    "swish": Activation(F.silu, _dswish, "swish", fused=_swish_both),
    "leaky_relu": Activation(F.leaky_relu, _dleaky_relu, "leaky_relu"),
}
_ALIASES = {"identity": "linear", "silu": "swish"}

KNOWN_ACTIVATIONS: tuple[str, ...] = tuple(sorted([*_REGISTRY, *_ALIASES]))


def resolve_activation(spec: str | TensorFn | Activation) -> Activation:
    """Turn a name, a torch callable or an :class:`Activation` into an :class:`Activation`.

    Args:
        spec: A registered name (see ``KNOWN_ACTIVATIONS``; case-insensitive), any
            elementwise torch callable (``torch.tanh``, ``nn.GELU()``, a lambda), or an
            :class:`Activation`.

    Returns:
        The activation, with an exact derivative when one is registered.

    Raises:
        ValueError: For an unknown name; the message lists the known ones.
        TypeError: For anything that is neither a string nor callable.

    Example:
        >>> resolve_activation("SiLU").name
        'swish'
    """
    if isinstance(spec, Activation):
        return spec
    if isinstance(spec, str):
        key = spec.strip().lower().replace("-", "_")
        key = _ALIASES.get(key, key)
        if key not in _REGISTRY:
            raise ValueError(
                f"unknown activation {spec!r}; known names: {', '.join(KNOWN_ACTIVATIONS)} "
                "(or pass any elementwise torch callable)"
            )
        return _REGISTRY[key]
    if callable(spec):
        label = getattr(spec, "__name__", None) or type(spec).__name__
        return Activation(spec, None, str(label).lower())
    raise TypeError(f"activation must be a name or a torch callable, not {type(spec).__name__}")


def activation_from_module(module: nn.Module) -> Activation | None:
    """Map one torch activation module to an :class:`Activation`, or ``None``.

    Registered modules with default settings map to their name (so relu keeps its
    closed form); modules with non-default settings (``nn.LeakyReLU(0.2)``,
    ``nn.Softplus(beta=2)``, ``nn.GELU("tanh")``) are used as callables themselves.

    Args:
        module: Any module; only activation modules are recognised.

    Returns:
        The activation, or ``None`` when ``module`` is not an activation.

    Example:
        >>> from torch import nn
        >>> activation_from_module(nn.Tanh()).name
        'tanh'
        >>> activation_from_module(nn.Linear(2, 2)) is None
        True
    """
    plain = {
        nn.Tanh: "tanh",
        nn.ReLU: "relu",
        nn.Sigmoid: "sigmoid",
        nn.SELU: "selu",
        nn.SiLU: "swish",
        nn.Identity: None,
    }
    for cls, name in plain.items():
        if type(module) is cls:
            return None if name is None else _REGISTRY[name]
    if type(module) is nn.GELU:
        return _REGISTRY["gelu"] if module.approximate == "none" else _as_callable(module)
    if type(module) is nn.ELU:
        return _REGISTRY["elu"] if module.alpha == 1.0 else _as_callable(module)
    if type(module) is nn.Softplus:
        default = module.beta == 1.0 and module.threshold == 20.0
        return _REGISTRY["softplus"] if default else _as_callable(module)
    if type(module) is nn.LeakyReLU:
        return _REGISTRY["leaky_relu"] if module.negative_slope == 0.01 else _as_callable(module)
    others = (
        nn.Hardtanh,
        nn.Softsign,
        nn.Mish,
        nn.Hardswish,
        nn.Hardsigmoid,
        nn.CELU,
        nn.Tanhshrink,
    )
    if isinstance(module, others):
        return _as_callable(module)
    return None


def _as_callable(module: nn.Module) -> Activation:
    return Activation(module, None, repr(module))
