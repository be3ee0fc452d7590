"""Gradient norms and zero-gradient fractions, per parameter.

Norms are taken with ``torch._foreach_norm`` over tensors grouped by (device, dtype),
the way ``torch.nn.utils.get_total_norm`` does it, so a whole model costs a few fused
kernels. Low-precision gradients are reduced in float32, so a norm cannot overflow
float16 while every entry is finite.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from .scratch import reusable_like

LOW_PRECISION = (torch.float16, torch.bfloat16)


def norm_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype to reduce in: float32 for half-precision tensors, else their own."""
    return torch.float32 if dtype in LOW_PRECISION else None


# Real dtypes that BLAS's dot takes.
_BLAS_DTYPES = (torch.float32, torch.float64)
# Entries from which BLAS's dot beats ATen's norm kernel on the CPU, call overhead
# included: at 64k entries it takes two thirds of the time, at 256k a third.
BLAS_MIN_NUMEL = 1 << 15


def _plain(tensor: torch.Tensor) -> bool:
    """Not a tensor subclass (a DTensor, a quantized weight): one that dot and out= take as is.

    A subclass keeps to ``_foreach_norm``, which it is likelier to implement.
    """
    return type(tensor) in (torch.Tensor, torch.nn.Parameter)


def vector_norm(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """L2 norm of one tensor as a 0-d device tensor, in ``dtype`` or at least float32.

    A dense float32 or float64 tensor on the CPU (:func:`dense_flat`) is reduced with
    BLAS's dot: it reads the tensor at about twice the speed of ATen's norm kernel,
    which shows on the activations and errors of a detailed step (a fifth less of a
    CNN's), and it is as accurate or more (a 1e7-entry float32 tensor: 4e-6 of the
    float64 norm, against 5e-5). Both overflow alike, above about 1.8e19 in float32.

    Example:
        >>> float(vector_norm(torch.tensor([3.0, 4.0])))
        5.0
    """
    reduce_in = dtype or norm_dtype(tensor.dtype)
    if (
        reduce_in is None
        and tensor.dtype in _BLAS_DTYPES
        and tensor.is_cpu
        and not tensor.requires_grad
        and _plain(tensor)
    ):
        return _blas_norm(tensor)
    return torch.linalg.vector_norm(tensor, dtype=reduce_in)


def wide_norm(tensor: torch.Tensor) -> torch.Tensor:
    """L2 norm of one tensor that reads inf only where some entry or the norm itself does.

    Squares summed in float32 overflow once the norm passes about 1.8e19, every entry
    finite: a layer's error under a GradScaler does once the scale has grown past
    about 2**60. On the CPU the float32 norm is read on the host, which waits for
    nothing there, and only an inf is taken again, in float64 (a copy: 8 times the
    time of BLAS's dot on 2M entries). Elsewhere a read would stall the device, so
    float32 and bfloat16 tensors are reduced in float64. float16 squares cannot
    overflow float32 (65504**2 times 1e28 entries would), nor can float64 ones.

    Example:
        >>> x = torch.full((4,), 2.0**64)  # squares of 2**128 pass float32's max
        >>> float(wide_norm(x)) == 2.0**65, float(vector_norm(x))
        (True, inf)
    """
    if tensor.dtype not in (torch.float32, torch.bfloat16):
        return vector_norm(tensor)
    if tensor.is_cpu and _plain(tensor):
        norm = vector_norm(tensor)
        if not math.isinf(norm.item()):  # host read; on the CPU it waits for nothing
            return norm
    return torch.linalg.vector_norm(tensor, dtype=torch.float64)


def _blas_norm(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU float32 or float64 tensor's norm: dot if it is dense, read in place, else ATen's."""
    flat = dense_flat(tensor)  # contiguous, channels-last, transposed
    if flat is None:
        return torch.linalg.vector_norm(tensor)
    return torch.dot(flat, flat).sqrt_()


def dense_flat(tensor: torch.Tensor) -> torch.Tensor | None:
    """A 1-D view of every entry of ``tensor``, in memory order, or None if there is none.

    A norm does not care about order, so a channels-last gradient or a transposed one
    (dense, not contiguous) is read where it lies instead of copied by ``reshape``:
    10 µs against 44 µs for two channels-last 3x3 conv weights of 64 and 128 channels.
    A tensor with overlapping or gapped entries (an expanded one, a slice) has no such
    view.

    Example:
        >>> t = torch.arange(6.0).reshape(2, 3).t()
        >>> dense_flat(t).tolist(), dense_flat(t[::2]) is None
        ([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], True)
    """
    if tensor.is_contiguous():
        return tensor.view(-1)
    order = sorted(range(tensor.dim()), key=tensor.stride, reverse=True)
    permuted = tensor.permute(order)
    return permuted.view(-1) if permuted.is_contiguous() else None


def sum_of_squares(tensor: torch.Tensor) -> torch.Tensor:
    """The squared L2 norm of a CPU float32 or float64 tensor, by BLAS's dot where it can."""
    flat = dense_flat(tensor)
    if flat is None:
        return torch.linalg.vector_norm(tensor).square_()
    return torch.dot(flat, flat)


def blas_norms(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """L2 norms of CPU float32 or float64 tensors with BLAS's dot (see :func:`vector_norm`).

    For tensors known to qualify, without :func:`vector_norm`'s checks per tensor;
    a dense one is read in place (:func:`dense_flat`), any other by ATen's norm.

    Example:
        >>> [float(n) for n in blas_norms([torch.ones(4), torch.full((3, 3), 2.0)])]
        [2.0, 6.0]
    """
    with torch.no_grad():  # a gradient made with create_graph=True needs no graph here
        return [_blas_norm(t) for t in tensors]


def grad_norms(
    indices: Sequence[int], grads: Sequence[torch.Tensor]
) -> tuple[list[int], list[torch.Tensor]]:
    """L2 norm of each gradient, returned with the caller's index of each.

    Example:
        >>> g = [torch.ones(4), torch.full((2,), 3.0)]
        >>> idx, norms = grad_norms([7, 9], g)
        >>> idx, [round(float(n), 4) for n in norms]
        ([7, 9], [2.0, 4.2426])
    """
    out_idx: list[int] = []
    out: list[torch.Tensor] = []
    dense = [(i, g) for i, g in zip(indices, grads, strict=True) if not g.is_sparse]
    for i, g in zip(indices, grads, strict=True):
        if g.is_sparse:  # foreach kernels take dense tensors only
            out_idx.append(i)
            out.append(vector_norm(g.coalesce().values()))
    if not dense:
        return out_idx, out
    positions, tensors = zip(*dense, strict=True)
    grouped = _group_tensors_by_device_and_dtype([list(tensors)], with_indices=True)
    for (_device, dtype), ([group], where) in grouped.items():
        norms = torch._foreach_norm(group, 2, dtype=norm_dtype(dtype))
        out_idx.extend(positions[w] for w in where)
        out.extend(norms)
    return out_idx, out


class GradNormPlan:
    """Per-parameter gradient norms for a fixed set of parameters, grouped once.

    Grouping by (device, dtype) costs more Python than the norms themselves on a
    small model, and a parameter's device and dtype (its gradient's too) do not
    change from step to step; so the groups and their keys are built once. Large
    float32 and float64 tensors on the CPU form groups of their own, reduced with
    BLAS's dot (:func:`blas_norms`): ``_foreach_norm`` there runs ATen's norm kernel
    tensor by tensor, at a third of dot's speed on a 512x512 weight.

    Example:
        >>> params = [torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(9))]
        >>> for p in params:
        ...     p.grad = torch.ones_like(p)
        >>> plan = GradNormPlan([0, 1], params)
        >>> idx, norms = plan.norms(params)
        >>> idx, [float(n) for n in norms]
        ([0, 1], [2.0, 3.0])
    """

    def __init__(self, indices: Sequence[int], params: Sequence[torch.Tensor]) -> None:
        groups: dict[tuple[torch.device, torch.dtype, bool], list[int]] = {}
        for i in indices:
            p = params[i]
            blas = (
                _plain(p) and p.is_cpu and p.dtype in _BLAS_DTYPES and p.numel() >= BLAS_MIN_NUMEL
            )
            groups.setdefault((p.device, p.dtype, blas), []).append(i)
        # (positions, dtype to reduce in, whether BLAS's dot reduces them)
        self.groups = [(idx, norm_dtype(dtype), blas) for (_, dtype, blas), idx in groups.items()]
        self.indices = [i for idx, _, _ in self.groups for i in idx]
        # One dtype for every norm, all on the CPU: they can share one 1-D tensor (norms_row).
        # A complex tensor's norm is real: complex64 gives float32.
        result = {
            (reduce_in or params[idx[0]].dtype).to_real() for idx, reduce_in, _ in self.groups
        }
        plain = all(_plain(params[i]) and params[i].is_cpu for i in self.indices)
        self.row_dtype = result.pop() if len(result) == 1 and plain else None
        self._built_for = [(params[i].dtype, params[i].device) for i in self.indices]

    def stale(self, params: Sequence[torch.Tensor], full: bool = False) -> bool:
        """Whether a parameter changed dtype or device since the plan was built.

        ``model.half()`` or ``model.to(device)`` after the plan was made converts the
        parameters in place: a group planned as float32 would then be reduced in
        float16, where a norm above 256 reads inf through BLAS's dot. Without ``full``
        only each group's first parameter is looked at, a check of a few hundred
        nanoseconds that a whole-model conversion cannot pass; ``full`` looks at every one.

        Example:
            >>> p = [torch.nn.Parameter(torch.ones(4))]
            >>> plan = GradNormPlan([0], p)
            >>> stale_before = plan.stale(p)
            >>> p[0].data = p[0].data.half()
            >>> stale_before, plan.stale(p)
            (False, True)
        """
        built = self._built_for
        if full:
            return any(
                params[i].dtype != dt or params[i].device != dev
                for i, (dt, dev) in zip(self.indices, built, strict=True)
            )
        start = 0
        for idx, _, _ in self.groups:
            dt, dev = built[start]
            p = params[idx[0]]
            if p.dtype != dt or p.device != dev:
                return True
            start += len(idx)
        return False

    def norms_row(self, params: Sequence[torch.Tensor]) -> tuple[list[int], torch.Tensor] | None:
        """(parameter indices, every gradient norm in one new 1-D tensor, in that order).

        Parameters without a gradient (frozen ones that an optimizer holds) are skipped;
        when none is, the indices are ``self.indices`` itself, as from :meth:`norms`.
        None when a row cannot be: a sparse gradient, norms of several dtypes, or off
        the CPU. Held until a flush, one tensor per step instead of one per parameter
        leaves the heap less fragmented, and reads back in one call.

        Example:
            >>> params = [torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(9))]
            >>> for p in params:
            ...     p.grad = torch.ones_like(p)
            >>> idx, row = GradNormPlan([0, 1], params).norms_row(params)
            >>> idx, row.tolist()
            ([0, 1], [2.0, 3.0])
        """
        if self.row_dtype is None:
            return None
        order: list[int] = []
        parts = []
        for idx, reduce_in, blas in self.groups:
            grads = [params[i].grad for i in idx]
            if any(g is None for g in grads):
                idx = [i for i, g in zip(idx, grads, strict=True) if g is not None]
                grads = [g for g in grads if g is not None]
            if any(g.is_sparse for g in grads):
                return None
            if grads:
                order.extend(idx)
                parts.append((grads, reduce_in, blas))
        if not order:
            return None
        row = torch.empty(len(order), dtype=self.row_dtype)
        start = 0
        with torch.no_grad():  # out= refuses a gradient made with create_graph=True
            for grads, reduce_in, blas in parts:
                end = start + len(grads)
                dest = row[start:end]
                if blas:
                    torch.stack([sum_of_squares(g) for g in grads], out=dest).sqrt_()
                else:
                    torch.stack(torch._foreach_norm(grads, 2, dtype=reduce_in), out=dest)
                start = end
        return (self.indices if len(order) == len(self.indices) else order), row

    def norms(self, params: Sequence[torch.Tensor]) -> tuple[list[int], list[torch.Tensor]]:
        """(parameter indices, their gradient norms), skipping parameters without a gradient.

        When every parameter has a dense gradient (the usual step), the indices
        returned are ``self.indices`` itself, so callers may cache what they derive.
        """
        out_idx: list[int] = []
        out: list[torch.Tensor] = []
        every = True
        for idx, dtype, blas in self.groups:
            grads = [params[i].grad for i in idx]
            if any(g is None or g.is_sparse for g in grads):
                every = False
                have = [(i, g) for i, g in zip(idx, grads, strict=True) if g is not None]
                some_idx, some = grad_norms([i for i, _ in have], [g for _, g in have])
                out_idx.extend(some_idx)
                out.extend(some)
            else:
                out_idx.extend(idx)
                out.extend(group_norms(grads, dtype, blas))
        return (self.indices if every else out_idx), out


def group_norms(
    tensors: Sequence[torch.Tensor], dtype: torch.dtype | None, blas: bool
) -> list[torch.Tensor] | tuple[torch.Tensor, ...]:
    """The norms of one :class:`GradNormPlan` group: dense tensors of one device and dtype."""
    return blas_norms(tensors) if blas else torch._foreach_norm(tensors, 2, dtype=dtype)


# Integer types as wide as each float type: the bits of |x| are all zero exactly where x is +-0.
_SAME_WIDTH_INT = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def nonzero_count(tensor: torch.Tensor, scratch: dict | None = None) -> torch.Tensor:
    """Number of nonzero entries (NaN counts as nonzero), as a 0-d device tensor.

    On the CPU a float tensor is counted on the bits of its absolute value: ATen's
    float kernel compares entry by entry and takes ten times as long on a 2 MiB
    tensor whose zeros fall at random (a ReLU's output). Below 16k entries the extra
    kernel costs more than it saves.

    With ``scratch`` (see :mod:`.scratch`), |x| is written to a tensor reused from
    call to call instead of fresh memory.

    Example:
        >>> int(nonzero_count(torch.tensor([0.0, -0.0, 1.5, -2.0, float("nan")])))
        3
    """
    bits = _SAME_WIDTH_INT.get(tensor.dtype)
    if bits is None or not tensor.is_cpu or tensor.numel() < 1 << 14:
        return torch.count_nonzero(tensor)
    magnitude = torch.abs(tensor.detach(), out=reusable_like(scratch, tensor))
    return torch.count_nonzero(magnitude.view(bits))


def nonzero_counts(
    grads: Sequence[torch.Tensor], scratch: dict | None = None
) -> list[torch.Tensor]:
    """Number of nonzero entries of each gradient (0-d tensors); see :func:`nonzero_count`."""
    return [nonzero_count(g.coalesce().values() if g.is_sparse else g, scratch) for g in grads]
