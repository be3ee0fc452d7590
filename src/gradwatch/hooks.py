"""Hooks that stay with the watched model and leave its copies alone.

``copy.deepcopy(model)`` (a best-model snapshot, an EMA teacher, ``AveragedModel``)
copies the model's hook dicts, and ``torch.save(model)`` pickles them. A bound method
of the watcher would drag the watcher along, open SQLite connection and all, and a
closure cannot be pickled at all; either way the user's copy raised. A copy is not
the watched model, so each hook copies and pickles as one that does nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class InertHook:
    """What a copy of a watched model carries in place of gradwatch's hooks: nothing to do.

    Unpickling one needs gradwatch importable, as any pickled model needs the code of its parts.
    """

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __reduce__(self) -> tuple:
        return (InertHook, ())


class OwnHook:
    """A hook of gradwatch's on a model or optimizer, which copies and pickles as :class:`InertHook`.

    Example:
        >>> import copy, pickle, torch
        >>> calls = []
        >>> model = torch.nn.Linear(2, 2)
        >>> _ = model.register_forward_hook(OwnHook(lambda m, args, out: calls.append(m)))
        >>> _ = model(torch.ones(2)); _ = copy.deepcopy(model)(torch.ones(2))
        >>> len(calls), type(pickle.loads(pickle.dumps(model))._forward_hooks.popitem()[1]).__name__
        (1, 'InertHook')
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> InertHook:
        return InertHook()

    def __reduce__(self) -> tuple:
        return (InertHook, ())


class ScalerStepHook:
    """Wraps one GradScaler's ``step`` so the watcher learns of the steps it skips.

    An AMP GradScaler skips ``optimizer.step()`` when the scaled gradients overflowed
    (routinely, while it calibrates its scale), so no optimizer hook fires; only the
    scaler knows. The wrapper lives in the scaler's ``__dict__`` until :meth:`remove`,
    on top of any earlier one (a script's own watcher under ``gradwatch run``); a copy or
    pickle of the scaler gets its plain ``step`` back.
    """

    def __init__(self, scaler: Any, after_step: Callable[[Any, Any], None]) -> None:
        self.scaler = scaler
        self.after_step = after_step
        self.removed = False
        self._previous = scaler.__dict__.get("step")  # an earlier wrapper, or None
        self._step = scaler.step
        scaler.step = self

    def __call__(self, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        result = self._step(optimizer, *args, **kwargs)
        if not self.removed:
            self.after_step(self.scaler, optimizer)
        return result

    def remove(self) -> None:
        """Unhook; the scaler's ``step`` goes back to the newest wrapper still in use."""
        self.removed = True
        if self.scaler.__dict__.get("step") is not self:
            return  # a later wrapper calls through this one, which now only passes on
        previous = self._previous
        while isinstance(previous, ScalerStepHook) and previous.removed:
            previous = previous._previous
        if previous is None:
            del self.scaler.step
        else:
            self.scaler.step = previous

    def __deepcopy__(self, memo: dict) -> Any:
        copy = memo.get(id(self.scaler))  # the scaler's copy, made before its attributes
        return type(copy).step.__get__(copy) if copy is not None else None

    def __reduce__(self) -> tuple:
        return (getattr, (self.scaler, "step"))
