"""Read-only views of a run that the rules share: matrices, windows, depth profiles, trends."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ..store import Run

# A step must be followed by this many recorded steps before a spike counts (a short grace).
WARMUP_STEPS = 5
BLOWN_UP = 10.0  # early losses an order of magnitude above the first: updates, not noise


def theil_sen_slope(x: np.ndarray, y: np.ndarray) -> float:
    """Median of pairwise slopes: a line fit that one outlier (a head layer, say) cannot tilt."""
    i, j = np.triu_indices(len(x), k=1)
    dx = x[j] - x[i]
    keep = dx != 0
    return float(np.median((y[j] - y[i])[keep] / dx[keep])) if keep.any() else 0.0


def nanmedian(values: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices are expected
        return np.nanmedian(values, axis=axis)


def loss_start(loss: np.ndarray) -> float:
    """Where a run's loss started: the median of its first five values, unless they blew up.

    The median of five is robust to one odd batch, but a blow-up in the first steps
    (27 after a start at 1.4) becomes the start, and a run that ends where it began
    reads as progress. The first loss is taken before any update, so no learning rate
    can have raised it; when the median is ``BLOWN_UP`` times above it, no batch noise
    put it there, and the first loss is the start. Short of that, a first batch that
    happened to score low does not set the bar.
    """
    first, median = float(loss[0]), float(np.median(loss[:5]))
    return first if first > 0 and median > BLOWN_UP * first else median


@dataclass
class DepthProfile:
    """How the backpropagated error changes along a model's parametrised layers at one step.

    ``log_rms`` holds log10 of the error RMS of each layer in ``layers`` (execution order,
    input side first). ``trend`` is the robust change in orders of magnitude from the
    first layer to the last (slope x (n - 1)); positive means the error grows towards
    the output, i.e. it shrinks on its way back to the input. ``zeros`` holds the
    layers whose error RMS was exactly 0: they have no logarithm, so the fit leaves
    them out, and the rules decide what a zero means.
    """

    step: int
    layers: list[int]
    log_rms: np.ndarray
    trend: float
    span: float
    largest_jump: float
    zeros: list[int] = field(default_factory=list)

    @property
    def gain_per_layer(self) -> float:
        """Average factor by which the error changes per layer on its way back to the input."""
        return float(10 ** (-self.trend / max(len(self.layers) - 1, 1)))


class RunView:
    """The run as the rules see it. Missing metrics read as all-NaN."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.steps = run.steps
        self.info = run.layer_info
        self.names = run.layers
        self._matrices: dict[str, np.ndarray] = {}
        self.memo: dict = {}  # results that several rules share (see depth.depth_episodes)

    def m(self, metric: str) -> np.ndarray:
        if metric not in self._matrices:
            if metric in self.run.metrics:
                self._matrices[metric] = self.run.matrix(metric)
            else:
                self._matrices[metric] = np.full((len(self.steps), len(self.names)), np.nan)
        return self._matrices[metric]

    @cached_property
    def step_rows(self) -> list[dict]:
        return self.run.step_table()

    @cached_property
    def first_nonfinite_row(self) -> int | None:
        """Row of the first step with an inf/NaN output, gradient or loss that is not a mask."""
        for i, row in enumerate(self.step_rows):
            if (row["nonfinite"] or row.get("loss_nonfinite")) and i not in self.masked_rows:
                return i
        return None

    @cached_property
    def masked_rows(self) -> set[int]:
        """Rows whose only inf/NaN is -inf in module outputs, while the loss and gradients stay finite.

        Setting the logits of invalid actions or tokens to -inf is an idiom: softmax
        gives them zero probability, and the loss, every error and every gradient stay
        finite. Judged only where a loss was logged; an inf error or a NaN is never a mask.
        """
        flags, act, err = self.m("nonfinite"), self.m("act_mean"), self.m("error_norm")
        rows = set()
        for i, row in enumerate(self.step_rows):
            if not row["nonfinite"] or row.get("loss_nonfinite") or row["nonfinite_params"]:
                continue
            cols = np.flatnonzero(flags[i] == 1)
            if (
                row["loss"] is not None
                and cols.size
                and np.isneginf(act[i, cols]).all()
                and not np.isinf(err[i, cols]).any()
            ):
                rows.add(i)
        return rows

    @cached_property
    def optimizers(self) -> int:
        """Optimizers that stepped (0 for hand-written updates, or if the run did not end cleanly)."""
        return int(self.run.meta.get("optimizers", "0") or 0)

    @cached_property
    def finite_rows(self) -> np.ndarray:
        """Rows before anything turned non-finite: the window in which profiles are judged."""
        end = len(self.steps) if self.first_nonfinite_row is None else self.first_nonfinite_row
        return np.arange(end)

    @cached_property
    def models(self) -> list[str]:
        return sorted({info.model or "" for info in self.info})

    def param_layers(self, model: str) -> list[int]:
        """Columns of the parametrised layers of one model that ran, in execution order."""
        return [
            j
            for j, info in enumerate(self.info)
            if (info.model or "") == model and info.n_params and info.exec_order is not None
        ]

    def depth_profile(self, row: int, columns: list[int]) -> DepthProfile | None:
        """The error profile over depth at one step, or None when fewer than 3 layers carry one."""
        rms = self.m("error_rms")[row, columns]
        keep = np.isfinite(rms) & (rms > 0)
        if keep.sum() < 3:
            return None
        layers = [c for c, k in zip(columns, keep, strict=True) if k]
        logs = np.log10(rms[keep])
        pos = np.arange(len(logs), dtype=float)
        trend = theil_sen_slope(pos, logs) * (len(logs) - 1)
        jumps = np.diff(logs)
        largest = float(jumps.max() if trend >= 0 else -jumps.min())
        zeros = [c for c, r in zip(columns, rms, strict=True) if r == 0]
        return DepthProfile(
            int(self.steps[row]), layers, logs, trend, float(logs[-1] - logs[0]), largest, zeros
        )

    @cached_property
    def loss(self) -> np.ndarray:
        return self.run.loss

    def finite_loss(self) -> np.ndarray:
        loss = self.loss
        return loss[np.isfinite(loss)]
