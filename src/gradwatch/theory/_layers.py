"""Per-layer Jacobian gains along a model's execution order (see :func:`layer_gains`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from gradwatch.theory._jacobian_results import LayerGain
from gradwatch.theory._krylov import block_krylov_top, hutchinson_moments
from gradwatch.theory._linops import JacobianOperator, Method, choose_path

# Layers whose own Jacobian takes at most this many bytes get an exact SVD in
# layer_gains: 4 MiB is a 1024 x 1024 float32 matrix, whose svdvals take about 0.2 s.
LAYER_EXACT_MAX_BYTES = 4 * 2**20

_LeafCall = tuple[str, int, nn.Module, tuple[Callable[[Tensor], Tensor], Tensor]]


def _capture_leaf_calls(model: nn.Module, x: Tensor) -> list[_LeafCall]:
    """Run ``model(x)`` once and return, in execution order, each leaf call's name, call
    number, module, and a function of its (first, floating-point) input with that input."""
    calls: list[_LeafCall] = []
    counts: dict[str, int] = {}
    handles = []

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not args or not isinstance(args[0], Tensor) or not args[0].is_floating_point():
                return
            inp = args[0].detach().clone()  # before the call: in-place modules overwrite it
            rest = tuple(a.detach() if isinstance(a, Tensor) else a for a in args[1:])

            def fn(v: Tensor, module: nn.Module = module, rest: tuple = rest) -> Tensor:
                out = module(v, *rest, **kwargs)
                return out[0] if isinstance(out, (tuple, list)) else out

            calls.append((name, counts.get(name, 0), module, (fn, inp)))
            counts[name] = counts.get(name, 0) + 1

        return hook

    try:
        for name, module in model.named_modules():
            if next(module.children(), None) is None:
                handles.append(
                    module.register_forward_pre_hook(hook_for(name or "<root>"), with_kwargs=True)
                )
        with torch.no_grad():
            try:
                model(x)
            except Exception as error:
                raise ValueError(
                    f"an input of shape {tuple(x.shape)} does not fit module "
                    f"{type(model).__name__}: {type(error).__name__}: {error}"
                ) from error
    finally:
        for handle in handles:
            handle.remove()
    return calls


def layer_gains(
    model: nn.Module,
    x: Tensor,
    *,
    method: Method = "auto",
    probes: int = 32,
    max_iters: int = 200,
    tol: float = 1e-3,
    seed: int = 0,
) -> list[LayerGain]:
    """Per-layer Jacobian gains along the model's execution order.

    Runs ``model(x)`` once with forward pre-hooks on every leaf module (removed again
    even if the model raises) to capture each call's actual input, then measures the
    Jacobian of that call's output with respect to that input: its spectral norm and
    ``||J||_F / sqrt(n_in)``. Their product over layers brackets the end-to-end gain that
    the seeds' product of Jacobians describes. With ``method="auto"`` a layer whose
    Jacobian takes at most 4 MiB gets an exact SVD. Larger layers get power iteration on
    ``J^T J`` from a block of 4 random vectors that keeps every iterate and reads the
    largest value out of all of them by Rayleigh-Ritz (block Lanczos, the Krylov form of
    power iteration: the same products, but it converges in about the square root of the
    steps when the top of the spectrum is clustered, as it is for a tanh or conv layer),
    and a Hutchinson estimate of ``||J||_F^2`` with standard error.

    Leaf calls whose first argument is not a floating-point tensor (an embedding's
    indices) are skipped; other arguments are held fixed; a tuple output counts by its
    first element. The model's train/eval mode is left as it is: BatchNorm in training
    mode would update its running statistics during the capture pass, so call
    ``model.eval()`` first.

    Args:
        model: the network.
        x: its input (the whole tensor is the input vector; pass ``x[:1]`` for one sample).
        method: ``"auto"``, ``"exact"`` or ``"iterative"`` for every layer.
        probes: Hutchinson probes per layer on the iterative path.
        max_iters: most power-iteration steps per layer.
        tol: relative accuracy of ``spectral_norm**2`` at which the iteration stops.
        seed: seed of the random vectors.

    Returns:
        A list of :class:`LayerGain`, one per leaf-module call, in execution order.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> [g.name for g in layer_gains(net, torch.randn(1, 4))]
        ['0', '1']
    """
    gains = []
    gen = torch.Generator().manual_seed(seed)
    for name, call, module, (fn, inp) in _capture_leaf_calls(model, x):
        try:
            op = JacobianOperator(fn, inp)
            path = choose_path(op, method, LAYER_EXACT_MAX_BYTES)
            if path == "exact":
                jac = op.matrix()
                spectral = float(torch.linalg.matrix_norm(jac, ord=2)) if jac.numel() else 0.0
                frob2, frob2_se, settled = float(jac.double().pow(2).sum()), 0.0, True
            else:
                top = block_krylov_top(
                    op.gram,
                    op.d,
                    1,
                    block=4,
                    max_basis=64,
                    tol=tol,
                    max_iters=max_iters,
                    generator=gen,
                )
                spectral, settled = float(top.values[0].clamp_min(0).sqrt()), top.converged
                tm = hutchinson_moments(op.half, op.other_half, op.d, probes, gen)
                frob2, frob2_se = tm.tr1, tm.se1
        except ValueError:
            raise
        except Exception as error:
            raise ValueError(
                f"could not differentiate layer {name!r} ({type(module).__name__}) at its "
                f"input of shape {tuple(inp.shape)}: {type(error).__name__}: {error}. "
                "Modules in training mode that update state (BatchNorm) or draw random "
                "numbers (Dropout) need model.eval() first."
            ) from error
        frob_rms = math.sqrt(max(frob2, 0.0) / op.n)
        # d sqrt(F)/dF = 1 / (2 sqrt(F)): the standard error carried through the root.
        rms_se = frob2_se / (2 * math.sqrt(frob2 * op.n)) if frob2 > 0 else 0.0
        gains.append(
            LayerGain(
                name=name,
                call=call,
                kind=type(module).__name__,
                in_shape=op.in_shape,
                out_shape=op.out_shape,
                spectral_norm=spectral,
                frobenius_rms=frob_rms,
                frobenius_rms_se=rms_se,
                path=path,
                converged=settled,
            )
        )
    return gains
