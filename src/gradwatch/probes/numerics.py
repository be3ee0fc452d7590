"""Non-finite values: the error raised when the user asks to stop at the first one."""

from __future__ import annotations


class NonFiniteError(FloatingPointError):
    """A watched module produced inf or NaN and ``stop_on_nonfinite=True`` was set.

    Attributes:
        module: dotted name of the module (or parameter) where it was seen.
        step: the optimizer step.
        where: "forward output" or "gradient".
    """

    def __init__(self, module: str, step: int, where: str) -> None:
        self.module, self.step, self.where = module, step, where
        super().__init__(
            f"non-finite {where} in '{module}' at step {step}. "
            "gradwatch stopped because stop_on_nonfinite=True; pass stop_on_nonfinite=False "
            "to keep training and find the origin in the run store instead."
        )
