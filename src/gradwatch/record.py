"""Per-step measurements: gathered on the device during a step, turned into rows at flush.

Probes append 0-d device tensors to the open :class:`StepBuffer`, each under a key
``(scope, index, code)``: scope "p" is a parameter, "l" a layer, "s" the step itself.
A plain CPU step's gradient norms come as one 1-D row for all their keys.
Nothing is read back while training runs. At the end of a step the scalars are
stacked into one tensor per device (:meth:`StepBuffer.pack`; a plain step on the
CPU keeps them as they are); at flush all packed steps cross to the host in one
copy per device (:func:`to_host`), and
:func:`aggregate` combines them into per-layer metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

Key = tuple[str, int, str]


class StepBuffer:
    """What the open optimizer step has measured so far."""

    def __init__(self, step: int, detail: bool) -> None:
        self.step = step
        self.detail = detail
        self.keys: list[Key] = []
        self.values: list[torch.Tensor] = []
        self.counts: list[int] = []
        self.host_losses: list[float] = []
        self.forward_seen = False
        self.backward_done = False
        self.stepped = False
        # Gradients read at the end of a backward pass, used only when no optimizer steps.
        self.backward_grads: tuple[list[Key], list[torch.Tensor]] | None = None
        # (position in keys, backward pass) of each error, and the passes that accumulated
        # into the watched parameters' gradients (detailed steps only).
        self.error_passes: list[tuple[int, int]] = []
        self.accumulating: set[int] = set()
        # Layers whose output summed to -inf, in order (read only with stop_on_nonfinite).
        self.neginf: list[int] = []

    def add(self, key: Key, value: torch.Tensor, count: int = 0) -> None:
        self.keys.append(key)
        self.values.append(value)
        self.counts.append(count)

    def add_row(self, keys: Sequence[Key], row: torch.Tensor) -> None:
        """The values of ``keys`` as the entries of one 1-D tensor, in order.

        Only on plain steps: detailed ones look values up by their key's position.
        """
        self.keys.extend(keys)
        self.values.append(row)
        self.counts.extend([0] * len(keys))

    def extend(self, keys: Sequence[Key], values: Sequence[torch.Tensor]) -> None:
        self.keys.extend(keys)
        self.values.extend(values)
        self.counts.extend([0] * len(keys))

    def drop_errors_of_other_passes(self) -> None:
        """Keep only the errors of backward passes that accumulated into the parameters.

        Gradients that ``torch.autograd.grad`` computed through a layer's output (a
        gradient penalty, say) are not the loss's error there. When no pass accumulated
        (every watched parameter frozen), every error is kept.
        """
        if not self.accumulating or not self.error_passes:
            return
        drop = {k for k, task in self.error_passes if task not in self.accumulating}
        if drop:
            keep = [k for k in range(len(self.keys)) if k not in drop]
            self.keys = [self.keys[k] for k in keep]
            self.values = [self.values[k] for k in keep]
            self.counts = [self.counts[k] for k in keep]
        self.error_passes = []

    @property
    def has_grads(self) -> bool:
        return self.stepped or self.backward_grads is not None

    def pack(self) -> PackedStep:
        """Close this step: stack its scalars into one small tensor (no sync).

        Stacking now rather than at flush frees a detailed step's hundreds of 0-d
        tensors at once: held across a flush window, they fragment the heap, and a
        20-layer MLP's peak memory grew by a fifth. A plain step's few CPU tensors (a
        row of gradient norms and the loss) are kept as they are and read at the
        flush, in one warm loop: read here, between two training kernels, they cost
        twice as much.
        """
        if not self.stepped and self.backward_grads is not None:
            self.extend(*self.backward_grads)
        if not self.detail and all(v.is_cpu for v in self.values):
            return PackedStep(
                self.step,
                self.detail,
                self.keys,
                self.counts,
                list(self.values),
                list(self.host_losses),
                on_host=True,
            )
        scalars = [_stack_scalars(self.values)] if self.values else []
        return PackedStep(
            self.step, self.detail, self.keys, self.counts, scalars, list(self.host_losses)
        )


def _read_entries(tensors: Sequence[torch.Tensor], into: list[float]) -> None:
    """Append the entries of small CPU tensors to ``into``, read one tensor at a time."""
    for t in tensors:
        if t.ndim:  # a row of gradient norms (GradNormPlan.norms_row), or a late loss
            into.extend(t.tolist())
        else:
            into.append(t.item())


def _stack_scalars(values: list[torch.Tensor]) -> torch.Tensor:
    if all(v.is_cpu for v in values):
        # Nothing to wait for on the CPU, and reading each value costs a sixth of
        # stacking them (stack converts mixed dtypes one tensor at a time). Read
        # exactly: float64 holds every float32 and every count below 2**53.
        entries: list[float] = []
        _read_entries(values, entries)
        return torch.from_numpy(np.array(entries, dtype=np.float64))
    try:  # 0-d values on one device (the usual case); stack promotes their dtypes
        return torch.stack(values)
    except RuntimeError:  # a model spread over devices, or a row among them (rare)
        return torch.cat([t.reshape(-1).to(values[0].device) for t in values])


@dataclass
class PackedStep:
    step: int
    detail: bool
    keys: list[Key]
    counts: list[int]
    # Tensors whose entries, in order, are the values of ``keys``: the step's stack
    # (1-D, on its device), or with ``on_host`` its CPU tensors themselves (0-d values
    # and rows of norms);
    # then any loss logged after the step closed.
    scalars: list[torch.Tensor]
    host_losses: list[float]
    values: np.ndarray | None = None
    on_host: bool = False


def to_host(steps: Sequence[PackedStep], extra: Sequence[torch.Tensor] = ()) -> list[np.ndarray]:
    """Copy every packed step's values to the host in one copy (per device).

    Steps packed ``on_host`` are read value by value, in one loop for all of them.
    ``extra`` are further tensors (dead-unit peaks, spectral radii) that ride along in
    the same copy; their host copies are returned in order, flattened.
    """
    on_host = [s for s in steps if s.on_host]
    if on_host:  # small CPU tensors: reading each costs less than stacking them
        entries: list[float] = []
        ends = []
        for s in on_host:
            _read_entries(s.scalars, entries)
            ends.append(len(entries))
        read = np.array(entries, dtype=np.float64)
        for s, start, end in zip(on_host, [0, *ends], ends, strict=False):
            s.values = read[start:end]
        steps = [s for s in steps if not s.on_host]
    pieces = [t.reshape(-1) for s in steps for t in s.scalars] + [e.reshape(-1) for e in extra]
    if not pieces:
        for s in steps:
            s.values = np.zeros(0)
        return []
    device = pieces[0].device
    # Host sync: the one place per flush where device statistics are read back.
    flat = torch.cat([p.to(device) for p in pieces]).cpu().numpy().astype(np.float64)
    cursor = 0
    for s in steps:
        n = sum(t.numel() for t in s.scalars)
        s.values = flat[cursor : cursor + n]
        cursor += n
    out = []
    for e in extra:
        out.append(flat[cursor : cursor + e.numel()])
        cursor += e.numel()
    return out
