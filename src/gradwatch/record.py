"""Per-step measurements: gathered on the device during a step, turned into rows at flush.

Probes append 0-d device tensors to the open :class:`StepBuffer`, each under a key
``(scope, index, code)``: scope "p" is a parameter, "l" a layer, "s" the step itself.
Nothing is read back while training runs. At the end of a step the scalars are
stacked into one tensor per device (:meth:`StepBuffer.pack`); at flush all packed
steps cross to the host in one copy per device (:func:`to_host`), and
:func:`aggregate` combines them into per-layer metrics.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

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
        """Stack this step's scalars into one float64 tensor per device (a few kernels, no sync)."""
        if not self.stepped and self.backward_grads is not None:
            self.extend(*self.backward_grads)
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
        for i, value in enumerate(self.values):
            groups[(value.device, value.dtype)].append(i)
        order: list[int] = []
        tensors: list[torch.Tensor] = []
        for idx in groups.values():
            order.extend(idx)
            # Norms and sums are 0-d already; only a logged loss may need reshaping.
            scalars = [v if v.dim() == 0 else v.reshape(()) for v in (self.values[i] for i in idx)]
            tensors.append(torch.stack(scalars).to(torch.float64))
        keys = [self.keys[i] for i in order]
        counts = [self.counts[i] for i in order]
        return PackedStep(self.step, self.detail, keys, counts, tensors, list(self.host_losses))


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
    slots: list[tuple[torch.device, int, int]] = []
    for tensor in [t for s in steps for t in s.tensors] + [t.to(torch.float64) for t in extra]:
        chunks = by_device[tensor.device]
        start = sum(c.numel() for c in chunks)
        chunks.append(tensor)
        slots.append((tensor.device, start, tensor.numel()))
    # Host sync: the one place per flush where device statistics are read back.
    host = {dev: torch.cat(chunks).cpu().numpy() for dev, chunks in by_device.items()}
    pieces = [host[dev][start : start + n] for dev, start, n in slots]
    cursor = 0
    for s in steps:
        n = len(s.tensors)
        s.values = np.concatenate(pieces[cursor : cursor + n]) if n else np.zeros(0)
        cursor += n
    return pieces[cursor:]


@dataclass
class StepRow:
    """The host-side result of one step: per-layer and per-parameter metrics."""

    step: int
    detail: bool
    loss: float | None = None
    layer: dict[tuple[int, str], float] = field(default_factory=dict)
    param: dict[tuple[int, str], float] = field(default_factory=dict)
    nonfinite_layers: list[int] = field(default_factory=list)
    nonfinite_params: list[int] = field(default_factory=list)


def _pooled_std(parts: list[tuple[int, float, float]]) -> float:
    """Population std of several chunks given (count, mean, variance) of each."""
    total = sum(n for n, _, _ in parts)
    mean = sum(n * m for n, m, _ in parts) / total
    second = sum(n * (v + m * m) for n, m, v in parts) / total
    return math.sqrt(max(second - mean * mean, 0.0))


def aggregate(
    packed: PackedStep, param_layer: Sequence[int], param_numel: Sequence[int]
) -> StepRow:
    """Combine one step's raw scalars into metrics per layer and per parameter.

    Sums and counts add up over repeated calls of a module (several forwards or
    micro-batches in one step); norms combine as the root of summed squares.
    """
    assert packed.values is not None, "to_host() must run before aggregate()"
    row = StepRow(packed.step, packed.detail)
    acc: dict[tuple[str, int, str], float] = defaultdict(float)
    cnt: dict[tuple[int, str], int] = defaultdict(int)
    moments: dict[int, list[tuple[int, float, float]]] = defaultdict(list)
    losses: list[float] = list(packed.host_losses)
    scaled: list[float] = []
    scale = None
    pending_mean: dict[int, tuple[int, float]] = {}
    for (scope, idx, code), count, value in zip(
        packed.keys, packed.counts, packed.values.tolist(), strict=True
    ):
        if scope == "s":
            if code == "loss":
                losses.append(value)
            elif code == "sloss":
                scaled.append(value)
            elif code == "scale":
                scale = value
            continue
        if code in ("gnorm", "err", "unorm", "wnorm"):
            acc[(scope, idx, code)] += value * value
        else:
            acc[(scope, idx, code)] += value
        if scope == "l":
            cnt[(idx, code)] += count
            if code == "fmean":
                pending_mean[idx] = (count, value)
            elif code == "fvar":
                n, m = pending_mean.pop(idx)
                moments[idx].append((n, m, value))
    # Losses caught at backward() under a GradScaler carry its scale factor.
    losses += [v / scale for v in scaled] if scale else scaled
    if losses:
        row.loss = sum(losses) / len(losses)
    _layer_metrics(row, acc, cnt, moments, scale, param_layer, param_numel)
    return row


def _layer_metrics(row, acc, cnt, moments, scale, param_layer, param_numel) -> None:
    grad_sq: dict[int, float] = defaultdict(float)
    grad_zero: dict[int, float] = defaultdict(float)
    grad_numel: dict[int, int] = defaultdict(int)
    upd_sq: dict[int, float] = defaultdict(float)
    w_sq: dict[int, float] = defaultdict(float)
    bad_layers: set[int] = set()
    for (scope, idx, code), value in acc.items():
        if scope == "p":
            layer = param_layer[idx]
            if code == "gnorm":
                norm = math.sqrt(value)
                row.param[(idx, "grad_norm")] = norm
                grad_sq[layer] += value
                grad_numel[layer] += param_numel[idx]
                if not math.isfinite(norm):
                    row.nonfinite_params.append(idx)
                    bad_layers.add(layer)
            elif code == "gzero":
                grad_zero[layer] += value
            elif code == "unorm":
                row.param[(idx, "update_norm")] = math.sqrt(value)
                upd_sq[layer] += value
            elif code == "wnorm":
                row.param[(idx, "weight_norm")] = math.sqrt(value)
                w_sq[layer] += value
            continue
        n = cnt[(idx, code)]
        if code == "fsum" and n:
            row.layer[(idx, "act_mean")] = value / n
            if not math.isfinite(value):
                bad_layers.add(idx)
        elif code == "sat" and n:
            row.layer[(idx, "saturated_frac")] = value / n
        elif code == "dsum" and n:
            row.layer[(idx, "act_derivative")] = value / n
        elif code == "zero" and n:
            row.layer[(idx, "zero_frac")] = value / n
        elif code == "err":
            norm = math.sqrt(value) / (scale or 1.0)
            row.layer[(idx, "error_norm")] = norm
            size = cnt[(idx, "fsum")]
            if size:
                row.layer[(idx, "error_rms")] = norm / math.sqrt(size)
            if not math.isfinite(norm):
                bad_layers.add(idx)
    for idx, parts in moments.items():
        row.layer[(idx, "act_std")] = _pooled_std(parts)
    for layer, sq in grad_sq.items():
        row.layer[(layer, "grad_norm")] = math.sqrt(sq)
        if layer in grad_zero:
            row.layer[(layer, "grad_zero_frac")] = grad_zero[layer] / grad_numel[layer]
    for layer, sq in w_sq.items():
        row.layer[(layer, "weight_norm")] = math.sqrt(sq)
        if layer in upd_sq and sq > 0:
            row.layer[(layer, "update_ratio")] = math.sqrt(upd_sq[layer] / sq)
    measured = {idx for (idx, _m) in row.layer}
    for layer in measured:
        row.layer[(layer, "nonfinite")] = 1.0 if layer in bad_layers else 0.0
    row.nonfinite_layers = sorted(bad_layers)
