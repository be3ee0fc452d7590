"""From raw per-step scalars to per-layer metrics, vectorized over steps that measured alike.

Each packed step holds scalars under keys ``(scope, index, code)`` (see
:mod:`gradwatch.record`). Steps whose probes fired in the same order share a
:class:`Layout`: the mapping from their scalars to metrics, worked out once. It is
then applied to all of those steps at once, as a few numpy reductions over a
(steps x scalars) matrix, so a flush costs a handful of array operations rather
than a Python loop over every scalar of every step.

How the scalars combine, when a module runs several times in one step (several
forwards, micro-batches): sums and counts add up; norms combine as the root of
summed squares; the variance pools the calls' own sums of squared deviations
(Chan et al.'s parallel formula). Each call's sum and norm are float32 sums on the
device, taken about a shift (one of the output's own entries) where the output's
spread is small next to its mean, so that they do not cancel; see
``Watcher._record_output``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .record import Key

# Codes whose values are L2 norms: repeated calls combine as the root of summed squares.
NORMS = frozenset({"gnorm", "err", "unorm", "wnorm", "fsq"})


class Grouping:
    """Sums the columns of a matrix that share a label; exact with inf and NaN.

    (A product with a 0/1 matrix would not be: ``0 * inf`` is NaN.)

    Example:
        >>> g = Grouping(np.array([3, 1, 3]))
        >>> g.labels.tolist(), g.sum(np.array([[1.0, 2.0, np.inf]])).tolist()
        ([1, 3], [[2.0, inf]])
    """

    def __init__(self, labels: np.ndarray) -> None:
        self.order = np.argsort(labels, kind="stable")
        ordered = labels[self.order]
        self.starts = (
            np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if len(labels) else []
        )
        self.labels = ordered[self.starts] if len(labels) else labels
        # for each input column, the output column its label went to
        self.position = np.searchsorted(self.labels, labels) if len(labels) else labels

    def sum(self, matrix: np.ndarray) -> np.ndarray:
        if not len(self.labels):
            return np.zeros((matrix.shape[0], 0))
        return np.add.reduceat(matrix[:, self.order], self.starts, axis=1)


@dataclass
class Block:
    """One metric over a group of steps: ``values[s, j]`` is its value at step s for id ``ids[j]``.

    ``mask`` (same shape, or None for all-true) marks the entries that were measured.
    """

    metric: str
    ids: np.ndarray
    values: np.ndarray
    mask: np.ndarray | None = None


@dataclass
class Tally:
    """The metrics of a group of steps that shared a layout."""

    steps: list[int]
    detail: list[bool]
    loss: list[float | None]
    layer: list[Block] = field(default_factory=list)
    param: list[Block] = field(default_factory=list)
    bad_layers: Block | None = None  # nonfinite forward output, error or gradient
    bad_params: Block | None = None  # nonfinite gradient

    def layer_block(self, metric: str) -> Block | None:
        return next((b for b in self.layer if b.metric == metric), None)


def _safe_div(num: np.ndarray, den: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mask = den > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mask, num / np.where(mask, den, 1.0), np.nan), mask


class Layout:
    """How the scalars of steps that measured alike turn into metrics.

    Args:
        keys: the steps' keys, in the order of their values.
        param_layer: the layer of each parameter index.
        param_numel: the size of each parameter.
        moment_derivatives: layer -> ``(sum of y, sum of y^2, n) -> sum of the
            derivative``, for activations whose derivative is a polynomial in y.
    """

    def __init__(
        self,
        keys: Sequence[Key],
        param_layer: Sequence[int],
        param_numel: Sequence[int],
        moment_derivatives: Mapping[int, Callable] | None = None,
    ) -> None:
        self.moment_derivatives = dict(moment_derivatives or {})
        slot_of: dict[Key, int] = {}
        entry_slot = np.array([slot_of.setdefault(k, len(slot_of)) for k in keys], dtype=np.int64)
        self.squared = np.array([k[2] in NORMS for k in keys], dtype=bool)
        self.slots = Grouping(entry_slot)
        slot_keys = list(slot_of)
        self.loss_cols = [i for i, k in enumerate(keys) if k == ("s", 0, "loss")]
        self.scaled_cols = [i for i, k in enumerate(keys) if k == ("s", 0, "sloss")]
        scale = [i for i, k in enumerate(keys) if k == ("s", 0, "scale")]
        self.scale_col = scale[-1] if scale else None

        def slots(scope: str, code: str) -> tuple[np.ndarray, np.ndarray]:
            pos = [j for j, k in enumerate(slot_keys) if k[0] == scope and k[2] == code]
            return np.array(pos, dtype=np.int64), np.array(
                [slot_keys[j][1] for j in pos], dtype=np.int64
            )

        self.by_code = {
            code: slots(scope, code)
            for scope, codes in (
                ("l", ("fsum", "sat", "dsum", "nonzero", "err")),
                ("p", ("gnorm", "gnonzero", "unorm", "wnorm")),
            )
            for code in codes
        }
        layer_of = np.asarray(param_layer, dtype=np.int64)
        numel = np.asarray(param_numel, dtype=np.float64)
        self.param_groups = {
            code: Grouping(layer_of[self.by_code[code][1]])
            for code in ("gnorm", "gnonzero", "unorm", "wnorm")
        }
        gnorm_params = self.by_code["gnorm"][1]
        self.grad_numel = (
            Grouping(layer_of[gnorm_params]).sum(numel[gnorm_params][None, :])[0]
            if len(gnorm_params)
            else np.zeros(0)
        )
        # error_rms divides by the size of the layer's output: its fsum count (-1: none).
        fsum_at = {idx: j for j, idx in enumerate(self.by_code["fsum"][1].tolist())}
        self.err_fsum = np.array(
            [fsum_at.get(i, -1) for i in self.by_code["err"][1].tolist()], dtype=np.int64
        )
        # Each count-based activation statistic's layer, as a column of the fsum block:
        # a NaN output compares false everywhere, and would count as unsaturated and nonzero.
        self.count_fsum = {
            code: np.array(
                [fsum_at.get(i, -1) for i in self.by_code[code][1].tolist()], dtype=np.int64
            )
            for code in ("sat", "dsum", "nonzero")
        }
        # Each "fsq" entry (the norm of one call's deviations from its "shift") and
        # each "shift" pair with the "fsum" entry of the same call: the last one before
        # them for that layer.
        last_sum: dict[int, int] = {}
        dev_cols, pair_cols, dev_layers, shift_cols, shifted_cols = [], [], [], [], []
        for i, (scope, idx, code) in enumerate(keys):
            if scope == "l" and code == "fsum":
                last_sum[idx] = i
            elif code == "fsq" and idx in last_sum:
                dev_cols.append(i)
                pair_cols.append(last_sum[idx])
                dev_layers.append(idx)
            elif code == "shift" and idx in last_sum:
                shift_cols.append(i)
                shifted_cols.append(last_sum[idx])
        self.dev_cols, self.pair_cols = dev_cols, pair_cols
        self.shift_cols, self.shifted_cols = shift_cols, shifted_cols
        self.dev_groups = Grouping(np.array(dev_layers, dtype=np.int64))

    def apply(
        self,
        steps: Sequence[int],
        detail: Sequence[bool],
        values: np.ndarray,
        counts: np.ndarray,
        host_losses: Sequence[Sequence[float]],
    ) -> Tally:
        """Metrics for a (steps x scalars) matrix of values and one of counts."""
        with np.errstate(over="ignore", invalid="ignore"):
            return self._apply(steps, detail, values, counts, host_losses)

    def _apply(self, steps, detail, values, counts, host_losses) -> Tally:
        n = len(steps)
        # Sums taken about a shift (one of the output's own entries) hold the
        # deviations' sum, which the variance needs; everything else wants sum(y).
        deviations = values[:, self.pair_cols]
        if self.shift_cols:
            values = values.copy()
            values[:, self.shifted_cols] += (
                counts[:, self.shifted_cols] * values[:, self.shift_cols]
            )
        scale = values[:, self.scale_col] if self.scale_col is not None else np.ones(n)
        scale = np.where(scale > 0, scale, 1.0)
        tally = Tally(list(steps), list(detail), self._losses(values, scale, host_losses))
        sums = self.slots.sum(np.where(self.squared, values * values, values))
        sizes = self.slots.sum(counts)

        def code(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            pos, ids = self.by_code[name]
            return ids, sums[:, pos], sizes[:, pos]

        bad: list[tuple[np.ndarray, np.ndarray]] = []
        ids, total, size = code("fsum")
        mean, measured = _safe_div(total, size)
        tally.layer.append(Block("act_mean", ids, mean, measured))
        bad.append((ids, ~np.isfinite(total)))
        output_nan = np.isnan(total)

        def unknown(name: str, frac: np.ndarray) -> np.ndarray:
            """NaN where the layer's output held a NaN: its counts say nothing then."""
            cols = self.count_fsum[name]
            if not len(cols) or not output_nan.any():
                return frac
            nan = np.where(cols >= 0, output_nan[:, np.maximum(cols, 0)], False)
            return np.where(nan, np.nan, frac)

        for name, metric in (("sat", "saturated_frac"), ("dsum", "act_derivative")):
            ids, total, size = code(name)
            if len(ids):
                frac, ok = _safe_div(total, size)
                tally.layer.append(Block(metric, ids, unknown(name, frac), ok))
        ids, nonzero, size = code("nonzero")
        if len(ids):
            frac, ok = _safe_div(nonzero, size)
            tally.layer.append(Block("zero_frac", ids, unknown("nonzero", 1.0 - frac), ok))
        if len(self.dev_cols):
            tally.layer.extend(self._moments(values, counts, deviations))
        ids, total, _ = code("err")
        if len(ids):
            norm = np.sqrt(total) / scale[:, None]
            tally.layer.append(Block("error_norm", ids, norm))
            fsum_slots = self.by_code["fsum"][0]
            size = (
                np.where(
                    self.err_fsum >= 0, sizes[:, fsum_slots[np.maximum(self.err_fsum, 0)]], 0.0
                )
                if len(fsum_slots)
                else np.zeros_like(norm)
            )
            rms, ok = _safe_div(norm, np.sqrt(size))
            tally.layer.append(Block("error_rms", ids, rms, ok))
            bad.append((ids, ~np.isfinite(norm)))
        self._params(tally, code, bad)
        tally.bad_layers = _union(bad, n)
        return tally

    def _losses(self, values, scale, host_losses) -> list[float | None]:
        parts = [values[:, self.loss_cols], values[:, self.scaled_cols] / scale[:, None]]
        logged = np.concatenate(parts, axis=1)
        out: list[float | None] = []
        for row, extra in zip(logged.tolist(), host_losses, strict=True):
            every = row + list(extra)
            out.append(sum(every) / len(every) if every else None)
        return out

    def _moments(
        self, values: np.ndarray, counts: np.ndarray, deviations: np.ndarray
    ) -> list[Block]:
        """act_std per layer, pooled over its calls; act_derivative where moments give it.

        ``deviations`` are each call's sums of its entries' deviations from a shift,
        whose squared norms are the "fsq" values: the shift keeps the float32 sums on
        the device from cancelling (a variance of 1e-12 about a mean of 1 survives).
        """
        size = counts[:, self.dev_cols]
        total = values[:, self.pair_cols]
        # each call's sum of squared deviations from its own mean
        squares = values[:, self.dev_cols] ** 2 - deviations * deviations / np.where(
            size > 0, size, 1.0
        )
        g = self.dev_groups
        n_layer = g.sum(size)
        sum_layer = g.sum(total)
        mean_layer, _ = _safe_div(sum_layer, n_layer)
        call_mean, _ = _safe_div(total, size)
        spread = size * (call_mean - mean_layer[:, g.position]) ** 2
        var, ok = _safe_div(g.sum(squares) + g.sum(spread), n_layer)
        blocks = [Block("act_std", g.labels, np.sqrt(np.maximum(var, 0.0)), ok)]
        at = [j for j, idx in enumerate(g.labels.tolist()) if idx in self.moment_derivatives]
        if at:
            second = (np.maximum(var, 0.0) + mean_layer * mean_layer) * n_layer  # sum of y^2
            derivative = np.stack(
                [
                    self.moment_derivatives[int(g.labels[j])](
                        sum_layer[:, j], second[:, j], n_layer[:, j]
                    )
                    for j in at
                ],
                axis=1,
            )
            frac, ok_d = _safe_div(derivative, n_layer[:, at])
            blocks.append(Block("act_derivative", g.labels[at], frac, ok_d))
        return blocks

    def _params(self, tally: Tally, code, bad: list) -> None:
        ids, grad_sq, _ = code("gnorm")
        if not len(ids):
            return
        norm = np.sqrt(grad_sq)
        tally.param.append(Block("grad_norm", ids, norm))
        tally.bad_params = Block("nonfinite", ids, ~np.isfinite(norm))
        groups = self.param_groups
        layer_sq = groups["gnorm"].sum(grad_sq)
        tally.layer.append(Block("grad_norm", groups["gnorm"].labels, np.sqrt(layer_sq)))
        bad.append((groups["gnorm"].labels, ~np.isfinite(layer_sq)))
        nonzero_ids, nonzero, _ = code("gnonzero")
        if len(nonzero_ids):
            layers = groups["gnonzero"].labels
            numel = self.grad_numel[np.searchsorted(groups["gnorm"].labels, layers)]
            frac = 1.0 - groups["gnonzero"].sum(nonzero) / numel
            tally.layer.append(Block("grad_zero_frac", layers, frac))
        upd_ids, upd_sq, _ = code("unorm")
        w_ids, w_sq, _ = code("wnorm")
        if len(w_ids):
            tally.param.append(Block("weight_norm", w_ids, np.sqrt(w_sq)))
            layer_w = groups["wnorm"].sum(w_sq)
            tally.layer.append(Block("weight_norm", groups["wnorm"].labels, np.sqrt(layer_w)))
        if len(upd_ids):
            tally.param.append(Block("update_norm", upd_ids, np.sqrt(upd_sq)))
        if len(upd_ids) and len(w_ids):
            layer_u = groups["unorm"].sum(upd_sq)
            at = np.searchsorted(groups["wnorm"].labels, groups["unorm"].labels)
            ratio, ok = _safe_div(layer_u, layer_w[:, at])
            tally.layer.append(Block("update_ratio", groups["unorm"].labels, np.sqrt(ratio), ok))


def _union(parts: list[tuple[np.ndarray, np.ndarray]], n: int) -> Block:
    """Per-layer OR of several (ids, flags) blocks."""
    ids = np.unique(np.concatenate([p[0] for p in parts])) if parts else np.zeros(0, np.int64)
    flags = np.zeros((n, len(ids)), dtype=bool)
    for part_ids, part in parts:
        if len(part_ids):
            flags[:, np.searchsorted(ids, part_ids)] |= part
    return Block("nonfinite", ids, flags)


def relative_spread(tallies: Sequence[Tally]) -> dict[int, float]:
    """Each layer's latest finite act_std / |act_mean| (inf for a zero mean).

    Example:
        >>> t = Tally([0], [True], [None])
        >>> t.layer = [Block("act_mean", np.array([4]), np.array([[2.0]])),
        ...            Block("act_std", np.array([4]), np.array([[0.5]]))]
        >>> relative_spread([t])
        {4: 0.25}
    """
    out: dict[int, float] = {}
    for tally in tallies:
        mean, std = tally.layer_block("act_mean"), tally.layer_block("act_std")
        if mean is None or std is None:
            continue
        column = {int(i): j for j, i in enumerate(mean.ids.tolist())}
        for j, idx in enumerate(std.ids.tolist()):
            if idx not in column:
                continue
            m, s = mean.values[:, column[idx]], std.values[:, j]
            finite = np.flatnonzero(np.isfinite(m) & np.isfinite(s))
            if finite.size:
                last_m, last_s = abs(float(m[finite[-1]])), float(s[finite[-1]])
                out[idx] = last_s / last_m if last_m > 0 else math.inf
    return out


def tally_steps(
    packed: Sequence,
    param_layer: Sequence[int],
    param_numel: Sequence[int],
    moment_derivatives: Mapping[int, Callable] | None = None,
    layouts: dict[tuple, Layout] | None = None,
) -> list[Tally]:
    """Group packed steps by layout and tally each group (``to_host`` must have run).

    ``layouts`` caches layouts between calls of one watcher: they repeat from flush to
    flush, and building one is the costly part. The caller clears it when its
    parameters change.
    """
    layouts = {} if layouts is None else layouts
    groups: dict[tuple, list] = {}
    for p in packed:
        groups.setdefault(tuple(p.keys), []).append(p)
    out = []
    for keys, members in groups.items():
        layout = layouts.get(keys)
        if layout is None:
            if len(layouts) > 64:  # a model whose forward changes shape every step
                layouts.clear()
            layout = layouts[keys] = Layout(keys, param_layer, param_numel, moment_derivatives)
        values = np.stack([p.values for p in members]) if keys else np.zeros((len(members), 0))
        counts = np.array([p.counts for p in members], dtype=np.float64).reshape(len(members), -1)
        out.append(
            layout.apply(
                [p.step for p in members],
                [p.detail for p in members],
                values,
                counts,
                [p.host_losses for p in members],
            )
        )
    return out
