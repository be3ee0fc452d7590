"""Recurrent networks as dynamical systems: recurrent spectra, Lyapunov exponents, BPTT profiles.

For torch's ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU``:

- :func:`spectral_radius` reads the recurrent weight matrices, per layer and gate;
- :func:`rnn_step` turns the module into a step function ``h_{t+1} = f(h_t, x_t)``
  for :func:`~gradwatch.theory.lyapunov.lyapunov_spectrum` (Engelken et al. 2020);
- :func:`gradient_by_lag` measures ``||dL_T / dx_t||`` for every t, the profile of
  vanishing or exploding gradients through time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .lyapunov import lyapunov_spectrum, mean_field_lyapunov

__all__ = [
    "RNNStep",
    "gradient_by_lag",
    "lyapunov_spectrum",
    "mean_field_lyapunov",
    "rnn_step",
    "spectral_radius",
]

# Gate order of torch's stacked recurrent weights (see the nn.LSTM and nn.GRU docs).
_GATES = {"LSTM": ("i", "f", "g", "o"), "GRU": ("r", "z", "n")}


def spectral_radius(module: nn.RNN | nn.LSTM | nn.GRU) -> dict[str, float]:
    """Spectral radii and norms of the recurrent weight matrices, per layer and direction.

    Keys are the parameter names (``weight_hh_l0``, ``weight_hh_l1_reverse``, ...):

    - ``"<name>"`` (nn.RNN): spectral radius max|eig| of the H x H matrix;
    - ``"<name>.<gate>"`` (nn.LSTM gates i, f, g, o; nn.GRU gates r, z, n): spectral
      radius of that gate's H x H block. With ``proj_size > 0`` an LSTM gate block is
      H x P and acts through the projection, so the radius of ``W_gate @ W_hr`` is given;
    - ``"<name>.norm"``: largest singular value of the whole stacked matrix (it is not
      square for gated cells, so it has no eigenvalues; it bounds every gate's radius).

    Args:
        module: An ``nn.RNN``, ``nn.LSTM`` or ``nn.GRU``.

    Returns:
        An ordered dict of name -> float.

    Raises:
        TypeError: For any other module.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> rnn = nn.RNN(3, 4)
        >>> with torch.no_grad():
        ...     _ = rnn.weight_hh_l0.copy_(0.5 * torch.eye(4))
        >>> {k: round(v, 6) for k, v in spectral_radius(rnn).items()}
        {'weight_hh_l0': 0.5, 'weight_hh_l0.norm': 0.5}
    """
    kind = _kind(module)
    out: dict[str, float] = {}
    with torch.no_grad():
        for name, weight in module.named_parameters():
            if not name.startswith("weight_hh"):
                continue
            w = weight.detach().to(torch.float64)
            if kind == "RNN":
                out[name] = _radius(w)
            else:
                projection = getattr(module, name.replace("weight_hh", "weight_hr"), None)
                for gate, block in zip(_GATES[kind], w.chunk(len(_GATES[kind])), strict=True):
                    if projection is not None:
                        block = block @ projection.detach().to(torch.float64)
                    out[f"{name}.{gate}"] = _radius(block)
            out[f"{name}.norm"] = float(torch.linalg.matrix_norm(w, ord=2))
    return out


def _radius(matrix: Tensor) -> float:
    return float(torch.linalg.eigvals(matrix).abs().max())


class RNNStep:
    """One time step of a unidirectional ``nn.RNN``/``nn.LSTM``/``nn.GRU`` on a flat state.

    The state is every layer's hidden state, flattened: ``h`` of shape (L * H_out,)
    for RNN and GRU; ``concat(h, c)`` of shape (L * H_out + L * H,) for LSTM. Calling
    the step runs the module itself on a length-1 sequence, so it is exactly torch's
    cell and works with ``torch.func.jvp``.

    Attributes:
        module: The wrapped module.
        state_size: Length of the flat state.
        input_size: Length of one input vector.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> step = rnn_step(nn.GRU(3, 5, num_layers=2))
        >>> step(torch.zeros(step.state_size), torch.ones(3)).shape
        torch.Size([10])
    """

    def __init__(self, module: nn.RNN | nn.LSTM | nn.GRU) -> None:
        self.kind = _kind(module)
        if module.bidirectional:
            raise ValueError("a bidirectional module has no forward-in-time step function")
        self.module = module
        self.input_size = module.input_size
        layers, hidden = module.num_layers, module.hidden_size
        proj = getattr(module, "proj_size", 0)
        self._h_shape = (layers, 1, proj or hidden)
        self._c_shape = (layers, 1, hidden)
        self._h_size = layers * (proj or hidden)
        self.state_size = self._h_size + (layers * hidden if self.kind == "LSTM" else 0)

    def __call__(self, state: Tensor, x: Tensor | None = None) -> Tensor:
        """Advance the flat state by one step with input ``x`` (zeros when ``None``)."""
        if x is None:
            x = state.new_zeros(self.input_size)
        seq = x.reshape(1, 1, self.input_size)
        h = state[: self._h_size].reshape(self._h_shape)
        if self.kind == "LSTM":
            c = state[self._h_size :].reshape(self._c_shape)
            _, (h_next, c_next) = self.module(seq, (h, c))
            return torch.cat([h_next.reshape(-1), c_next.reshape(-1)])
        _, h_next = self.module(seq, h)
        return h_next.reshape(-1)

    def split(self, state: Tensor) -> tuple[Tensor, Tensor | None]:
        """Unflatten a state into ``(h, c)`` shaped (layers, hidden); c is None unless LSTM.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> step = rnn_step(nn.LSTM(2, 3))
            >>> h, c = step.split(torch.arange(6.0))
            >>> h.tolist(), c.tolist()
            ([[0.0, 1.0, 2.0]], [[3.0, 4.0, 5.0]])
        """
        h = state[: self._h_size].reshape(self._h_shape[0], -1)
        if self.kind != "LSTM":
            return h, None
        return h, state[self._h_size :].reshape(self._c_shape[0], -1)


def rnn_step(module: nn.RNN | nn.LSTM | nn.GRU) -> RNNStep:
    """Build the step function ``h_{t+1} = f(h_t, x_t)`` of a torch recurrent module.

    Args:
        module: A unidirectional ``nn.RNN``, ``nn.LSTM`` or ``nn.GRU`` (any number of
            layers, batch_first or not, LSTM projections included).

    Returns:
        An :class:`RNNStep`, usable as ``step`` in :func:`lyapunov_spectrum`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> rnn = nn.RNN(2, 8).double()
        >>> step = rnn_step(rnn)
        >>> h0 = torch.zeros(step.state_size, dtype=torch.float64)
        >>> lyapunov_spectrum(step, h0, steps=20, k=3).shape
        torch.Size([3])
    """
    return RNNStep(module)


def gradient_by_lag(
    module: nn.RNN | nn.LSTM | nn.GRU,
    inputs: Tensor,
    *,
    hx: Tensor | tuple[Tensor, Tensor] | None = None,
    loss_fn: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``||dL_T / dx_t||`` for every time step t: how much the last step hears each input.

    ``L_T`` is a function of the module's output at the last time step only: by default
    the sum of its entries (for a batch, summed over the batch as well), or
    ``loss_fn(last_output)``. A steep fall of the profile towards early t is the
    vanishing-gradient-through-time signature; a steep rise is the exploding one
    (Bengio, Simard & Frasconi 1994; Pascanu, Mikolov & Bengio 2013). For a batch, the
    norm at t is taken over the batch and feature dimensions together. For a
    bidirectional module the last output also holds the backward direction, which has
    read only x_T at that point.

    Args:
        module: An ``nn.RNN``, ``nn.LSTM`` or ``nn.GRU``; ``batch_first`` is respected.
        inputs: ``(T, input_size)``, or ``(T, B, input_size)`` (``(B, T, input_size)``
            when batch_first).
        hx: Optional initial state, as the module's forward takes it.
        loss_fn: Optional map from the last output to a scalar.

    Returns:
        A 1D tensor of length T (detached, in the inputs' dtype).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> rnn = nn.RNN(3, 16)
        >>> profile = gradient_by_lag(rnn, torch.randn(10, 2, 3))
        >>> profile.shape
        torch.Size([10])
    """
    _kind(module)
    x = inputs.detach().clone().requires_grad_(True)
    out = module(x) if hx is None else module(x, hx)
    output = out[0]
    time_dim = 1 if module.batch_first and x.dim() == 3 else 0
    last = output.select(time_dim, -1)
    loss = last.sum() if loss_fn is None else loss_fn(last)
    if loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
    (grad,) = torch.autograd.grad(loss.reshape(()), x)
    per_step = grad.movedim(time_dim, 0).reshape(grad.shape[time_dim], -1)
    return torch.linalg.vector_norm(per_step, dim=1).detach()


def _kind(module: nn.Module) -> str:
    for cls in (nn.LSTM, nn.GRU, nn.RNN):
        if isinstance(module, cls):
            return cls.__name__
    raise TypeError(f"expected nn.RNN, nn.LSTM or nn.GRU, got {type(module).__name__}")
