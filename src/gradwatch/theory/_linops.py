"""The input-output Jacobian of a function at one input, as a batched linear operator.

Everything here works on the flattened Jacobian ``J`` of shape ``(m, n)``: ``n`` is the
number of elements of the input tensor and ``m`` that of the output tensor. Products
with ``J`` (forward mode, ``torch.func.jvp``) and with ``J^T`` (reverse mode,
``torch.func.vjp``) are batched over many vectors at once with ``torch.func.vmap``.
Blocks of vectors are stored row-wise: a block of ``b`` input-space vectors is ``(b, n)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

# The exact path forms J when it takes at most this many bytes. At 64 MiB a float32
# matrix is 4096 x 4096, whose svdvals took about 9 s on the 2-core CPU of
# bench/THEORY_RESULTS.md (LAPACK needs a few times the matrix again as workspace).
EXACT_MAX_BYTES = 64 * 2**20

# Memory allowed for one vmapped chunk of jvps or vjps: chunk size = budget / bytes per
# vector, where a vector costs about one forward pass worth of saved activations.
CHUNK_BUDGET_BYTES = 512 * 2**20


Method = Literal["auto", "exact", "iterative"]


def describe(f: Callable) -> str:
    """A short name for ``f`` in messages: the module's class or the function's name."""
    if isinstance(f, torch.nn.Module):
        return f"module {type(f).__name__}"
    return f"function {getattr(f, '__qualname__', repr(f))}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def checked_forward(f: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, int]:
    """Run ``f(x)`` once without autograd, turning a failure into a clear ``ValueError``.

    Returns the output and the bytes of every leaf module's output during the call, which
    stands in for the memory one batched jvp or vjp needs per vector (0 when ``f`` calls
    no modules). A global module forward hook counts them, so a plain function that calls
    modules is measured too; the hook is removed before returning, whatever happens.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"the input must be a floating-point tensor, not {type(x).__name__}")
    total = 0

    def count(module: torch.nn.Module, args: tuple, out: object) -> None:
        nonlocal total
        if isinstance(out, Tensor) and next(module.children(), None) is None:
            total += out.numel() * out.element_size()

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        with torch.no_grad():
            out = f(x.detach().clone())  # a clone: in-place modules must not write to x
    except Exception as error:
        raise ValueError(
            f"an input of shape {tuple(x.shape)} does not fit {describe(f)}: {_first_line(error)}"
        ) from error
    finally:
        handle.remove()
    if not isinstance(out, Tensor) or not out.is_floating_point():
        raise TypeError(
            f"{describe(f)} must return one floating-point tensor to have a Jacobian, "
            f"not {type(out).__name__}"
        )
    return out, total


class JacobianOperator:
    """``J = d f(x) / d x`` at one input, flattened to ``(m, n)``, applied to blocks.

    The forward pass for reverse mode runs once and its ``vjp`` closure is reused for
    every block. Forward mode uses ``torch.func.jvp``; where an operation has no
    forward-mode rule it falls back to the double-vjp trick (``J v`` is the vjp of the
    linear map ``u -> J^T u``).

    Products run under ``torch.no_grad()``: the results carry no autograd graph back to
    the model's parameters (the transforms still differentiate with respect to ``x``).

    Args:
        f: module or function of one tensor, returning one tensor.
        x: the input at which ``J`` is taken; its whole tensor is the input vector.
        chunk_size: vectors per vmapped call; by default chosen from the activation
            memory so that one chunk stays within ``CHUNK_BUDGET_BYTES``.
    """

    def __init__(
        self, f: Callable[[Tensor], Tensor], x: Tensor, *, chunk_size: int | None = None
    ) -> None:
        out, activation_bytes = checked_forward(f, x)
        self.f = f
        self.in_shape = tuple(x.shape)
        self.out_shape = tuple(out.shape)
        self.n = x.numel()
        self.m = out.numel()
        self.dtype = x.dtype
        self.x = x.detach().reshape(-1)
        per_vector = max(activation_bytes, (self.m + self.n) * x.element_size(), 1)
        self.chunk_size = chunk_size or max(1, CHUNK_BUDGET_BYTES // per_vector)
        self._vjp_fn: Callable | None = None
        self._jvp_mode = "jvp"

    def _g(self, v: Tensor) -> Tensor:
        # clone: a module that works in place on its input must not write into ours.
        return self.f(v.reshape(self.in_shape).clone()).reshape(-1)

    @property
    def nbytes(self) -> int:
        """Bytes the dense ``(m, n)`` Jacobian takes."""
        return self.m * self.n * self.x.element_size()

    def _chunk(self, rows: int) -> int | None:
        return None if rows <= self.chunk_size else self.chunk_size

    @torch.no_grad()
    def _vjp(self) -> Callable:
        if self._vjp_fn is None:
            _, self._vjp_fn = torch.func.vjp(self._g, self.x)
        return self._vjp_fn

    @torch.no_grad()
    def vjp(self, u: Tensor) -> Tensor:
        """``J^T`` applied to each row of ``u`` of shape ``(b, m)``; returns ``(b, n)``."""
        fn = self._vjp()
        u = u.to(self.dtype)
        return torch.func.vmap(lambda c: fn(c)[0], chunk_size=self._chunk(len(u)))(u)

    @torch.no_grad()
    def jvp(self, v: Tensor) -> Tensor:
        """``J`` applied to each row of ``v`` of shape ``(b, n)``; returns ``(b, m)``."""
        v = v.to(self.dtype)
        if self._jvp_mode == "jvp":
            try:
                return torch.func.vmap(
                    lambda t: torch.func.jvp(self._g, (self.x,), (t,))[1],
                    chunk_size=self._chunk(len(v)),
                )(v)
            except NotImplementedError:  # "Trying to use forward AD with ... not implemented"
                self._jvp_mode = "double-vjp"
        fn = self._vjp()
        try:
            _, transpose = torch.func.vjp(lambda c: fn(c)[0], torch.zeros(self.m, dtype=self.dtype))
            return torch.func.vmap(lambda t: transpose(t)[0], chunk_size=self._chunk(len(v)))(v)
        except NotImplementedError as error:
            raise NotImplementedError(
                f"{describe(self.f)} uses an operation with neither a forward-mode rule nor a "
                f"double backward, so J v cannot be computed ({error}). Products with J^T "
                "still work: the exact path needs only them when outputs are fewer than inputs."
            ) from error

    @torch.no_grad()
    def matrix(self) -> Tensor:
        """The dense ``(m, n)`` Jacobian: one vjp per output row when ``m <= n`` (jacrev),
        else one jvp per input column, in chunks of ``chunk_size``."""
        if self.m <= self.n:
            return torch.func.jacrev(self._g, chunk_size=self._chunk(self.m))(self.x)
        cols = torch.empty(self.n, self.m, dtype=self.dtype)
        step = self.chunk_size
        for start in range(0, self.n, step):
            stop = min(start + step, self.n)
            basis = torch.zeros(stop - start, self.n, dtype=self.dtype)
            basis[:, start:stop] = torch.eye(stop - start, dtype=self.dtype)
            cols[start:stop] = self.jvp(basis)
        return cols.T

    # The Gram matrix on the smaller side: G = J^T J (n x n) when n <= m, else J J^T.
    # Its d = min(m, n) eigenvalues are exactly the squared singular values of J.
    @property
    def d(self) -> int:
        """Size of the Gram matrix: ``min(m, n)``."""
        return min(self.m, self.n)

    def half(self, v: Tensor) -> Tensor:
        """``J v`` if the Gram matrix is ``J^T J`` else ``J^T v``: ``||half(v)||^2 = v^T G v``."""
        return self.jvp(v) if self.n <= self.m else self.vjp(v)

    def other_half(self, w: Tensor) -> Tensor:
        """The transpose of ``half``, so that ``G v = other_half(half(v))``."""
        return self.vjp(w) if self.n <= self.m else self.jvp(w)

    def gram(self, v: Tensor) -> Tensor:
        """``G`` applied to each row of ``v`` of shape ``(b, d)``."""
        return self.other_half(self.half(v))


def choose_path(op: JacobianOperator, method: str, max_bytes: int = EXACT_MAX_BYTES) -> str:
    """``"exact"`` or ``"iterative"``: ``auto`` forms J only when it takes at most ``max_bytes``."""
    if method not in ("auto", "exact", "iterative"):
        raise ValueError(f"method must be 'auto', 'exact' or 'iterative', not {method!r}")
    if method == "auto":
        return "exact" if op.nbytes <= max_bytes else "iterative"
    return method
