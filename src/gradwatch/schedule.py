"""When the detailed probes run.

Cheap statistics (gradient norms, output sums for the non-finite check, the loss) are
taken on every optimizer step. The detailed ones (backpropagated error, activation
health, update-to-weight ratios, zero-gradient fractions, the spectral radius of
recurrent matrices, at the flush after a detailed step) cost a few extra kernels per
layer, so they run on scheduled steps only: densely during a short warm-up, where
init problems show, then ever more sparsely. The idea follows cockpit's
``track_schedule``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """Run the detailed probes densely at first, then ever more sparsely, up to every ``every`` steps.

    Steps below ``warmup`` are all detailed. After that the period follows the
    step's order of magnitude, capped at ``every``: every 10th step up to 99, every
    100th up to 999, and so on. Init problems show in the first steps, so those are
    watched closely; a long run pays for one detailed step in ``every`` (100 by
    default: on a small CPU model a detailed step costs about as much as a whole
    training step).

    Example:
        >>> schedule = Schedule(every=50, warmup=3)
        >>> [step for step in range(260) if schedule(step)]
        [0, 1, 2, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 150, 200, 250]
    """

    every: int = 100
    warmup: int = 10

    def __post_init__(self) -> None:
        if self.every < 1 or self.warmup < 0:
            raise ValueError(
                f"Schedule needs every >= 1 and warmup >= 0; got every={self.every}, warmup={self.warmup}"
            )

    def __call__(self, step: int) -> bool:
        if step < self.warmup:
            return True
        magnitude = 10 ** max(len(str(step)) - 1, 1)  # 10 for steps below 100, then 100, ...
        return step % min(self.every, magnitude) == 0


def as_schedule(detail: int | Callable[[int], bool] | None) -> Callable[[int], bool]:
    """Turn the user's ``detail=`` argument into a ``step -> bool`` function.

    An int N means ``Schedule(every=N)``: a 10-step warm-up, then at most every N
    steps; 1 means every step; None means the default ``Schedule()``.
    """
    if detail is None:
        return Schedule()
    if isinstance(detail, bool):
        raise TypeError(
            "detail= takes an int (every N steps) or a callable step -> bool, not a bool"
        )
    if isinstance(detail, int):
        return Schedule(every=detail)
    if callable(detail):
        return detail
    raise TypeError(f"detail= takes an int or a callable step -> bool; got {type(detail).__name__}")
