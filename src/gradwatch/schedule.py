"""When the detailed probes run.

Cheap statistics (gradient norms, output sums for the non-finite check, the loss) are
taken on every optimizer step. The detailed ones (backpropagated error, activation
health, update-to-weight ratios, zero-gradient fractions) cost a few extra kernels per
layer, so they run on scheduled steps only: densely during a short warm-up, where
init problems show, then every ``every`` steps. The idea follows cockpit's
``track_schedule``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """Run the detailed probes on the first ``warmup`` steps, then every ``every`` steps.

    Example:
        >>> schedule = Schedule(every=10, warmup=3)
        >>> [step for step in range(25) if schedule(step)]
        [0, 1, 2, 10, 20]
    """

    every: int = 10
    warmup: int = 10

    def __post_init__(self) -> None:
        if self.every < 1 or self.warmup < 0:
            raise ValueError(
                f"Schedule needs every >= 1 and warmup >= 0; got every={self.every}, warmup={self.warmup}"
            )

    def __call__(self, step: int) -> bool:
        return step < self.warmup or step % self.every == 0


def as_schedule(detail: int | Callable[[int], bool] | None) -> Callable[[int], bool]:
    """Turn the user's ``detail=`` argument into a ``step -> bool`` function.

    An int N means every N steps after a 10-step warm-up; 1 means every step; None
    means the default ``Schedule()``.
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
