"""Per-step measurements: gathered on the device during a step, turned into rows at flush.

Probes append 0-d device tensors to the open :class:`StepBuffer`, each under a key
``(scope, index, code)``: scope "p" is a parameter, "l" a layer, "s" the step itself.
Nothing is read back while training runs. At the end of a step the scalars are
stacked into one tensor per device (:meth:`StepBuffer.pack`); at flush all packed
steps cross to the host in one copy per device (:func:`to_host`), and
:func:`aggregate` combines them into per-layer metrics.
"""

from __future__ import annotations

from collections import defaultdict
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

    def add(self, key: Key, value: torch.Tensor, count: int = 0) -> None:
        self.keys.append(key)
        self.values.append(value)
        self.counts.append(count)

    def extend(self, keys: Sequence[Key], values: Sequence[torch.Tensor]) -> None:
        self.keys.extend(keys)
        self.values.extend(values)
        self.counts.extend([0] * len(keys))

    @property
    def has_grads(self) -> bool:
        return self.stepped or self.backward_grads is not None

    def pack(self) -> PackedStep:
        """Stack this step's scalars into one tensor per device (one kernel each, no sync)."""
        if not self.stepped and self.backward_grads is not None:
            self.extend(*self.backward_grads)
        if not self.values:
            return PackedStep(self.step, self.detail, [], [], [], list(self.host_losses))
        try:  # the common case: every scalar on one device; stack promotes dtypes
            tensors = [torch.stack(self.values)]
            keys, counts = self.keys, self.counts
        except RuntimeError:  # several devices, or a logged loss that is not 0-d
            keys, counts, tensors = self._pack_by_device()
        return PackedStep(self.step, self.detail, keys, counts, tensors, list(self.host_losses))

    def _pack_by_device(self) -> tuple[list[Key], list[int], list[torch.Tensor]]:
        groups: dict[torch.device, list[int]] = defaultdict(list)
        for i, value in enumerate(self.values):
            groups[value.device].append(i)
        order: list[int] = []
        tensors: list[torch.Tensor] = []
        for idx in groups.values():
            order.extend(idx)
            scalars = [self.values[i].reshape(()) for i in idx]
            tensors.append(torch.stack(scalars))
        return [self.keys[i] for i in order], [self.counts[i] for i in order], tensors


@dataclass
class PackedStep:
    step: int
    detail: bool
    keys: list[Key]
    counts: list[int]
    tensors: list[torch.Tensor]
    host_losses: list[float]
    values: np.ndarray | None = None


def to_host(steps: Sequence[PackedStep], extra: Sequence[torch.Tensor] = ()) -> list[np.ndarray]:
    """Copy every packed step's values to the host: one concatenation and one copy per device.

    ``extra`` are further 1-D tensors (for example dead-unit fractions) that ride along;
    their host copies are returned in order.
    """
    by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    filled: dict[torch.device, int] = defaultdict(int)
    slots: list[tuple[torch.device, int, int]] = []
    for tensor in [t for s in steps for t in s.tensors] + list(extra):
        by_device[tensor.device].append(tensor)
        slots.append((tensor.device, filled[tensor.device], tensor.numel()))
        filled[tensor.device] += tensor.numel()
    # Host sync: the one place per flush where device statistics are read back.
    # (cat promotes the scalars' mixed dtypes; float64 on the host.)
    host = {
        dev: torch.cat(chunks).cpu().numpy().astype(np.float64) for dev, chunks in by_device.items()
    }
    pieces = [host[dev][start : start + n] for dev, start, n in slots]
    cursor = 0
    for s in steps:
        n = len(s.tensors)
        s.values = np.concatenate(pieces[cursor : cursor + n]) if n else np.zeros(0)
        cursor += n
    return pieces[cursor:]
