"""Run an unchanged training script under a Watcher.

The script runs as ``__main__`` with its own ``sys.argv``. gradwatch finds what to
watch through torch's global hooks:

* a module called at the top level (not inside another module) in a training
  forward pass is a candidate model; after the first step, candidates whose
  parameters got no gradient and belong to no optimizer (a frozen teacher that
  makes targets, say) are dropped;
* every optimizer that steps is watched through the global optimizer step hooks;
* a scalar tensor whose ``.backward()`` is called is taken as the loss (divided by
  the GradScaler's scale when it came from ``scaler.scale(loss)``).

While the script runs, ``torch.Tensor.backward`` and ``GradScaler.scale`` are wrapped;
both are restored when it ends, however it ends.
"""

from __future__ import annotations

import gc
import runpy
import sys
import traceback
import weakref
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from .watch import Watcher


@dataclass
class ScriptResult:
    """How the script ended and what was recorded."""

    exit_code: int
    watcher: Watcher
    error: BaseException | None = None


class ScriptDiscovery:
    """Finds the models, optimizers, scalers and losses of a running script."""

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher
        self._depth = 0
        self._owned: set[int] = set()
        self._ignored: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._unwatched_opts: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._scaled: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()
        self._scanned = False
        watcher.before_first_flush = self._settle

    @contextmanager
    def installed(self):
        """Install the global hooks and wrappers; remove them on exit, whatever happens."""
        with ExitStack() as stack:
            for handle in (
                register_module_forward_pre_hook(self._module_pre),
                register_module_forward_hook(self._module_post, always_call=True),
                register_optimizer_step_pre_hook(self._opt_pre),
                register_optimizer_step_post_hook(self._opt_post),
            ):
                stack.callback(handle.remove)
            stack.enter_context(_wrapped(torch.Tensor, "backward", self._wrap_backward))
            scaler_cls = getattr(getattr(torch, "amp", None), "GradScaler", None)
            if scaler_cls is not None:
                stack.enter_context(_wrapped(scaler_cls, "scale", self._wrap_scale))
            yield self

    # ------------------------------------------------------------ models
    def _module_pre(self, module: nn.Module, args: Any) -> None:
        depth = self._depth
        self._depth += 1
        if depth or not torch.is_grad_enabled() or not module.training:
            return
        if id(module) in self._owned or module in self._ignored:
            return
        if next(module.parameters(), None) is None:
            self._ignored.add(module)  # a parameter-free function module called alone
            return
        self.watcher.add_model(module, name=_global_name(module))
        self._owned.update(id(m) for m in module.modules())  # a torch.compile wrapper and its model

    def _module_post(self, module: nn.Module, args: Any, output: Any) -> None:
        self._depth = max(self._depth - 1, 0)

    def _settle(self, watcher: Watcher) -> None:
        """After the first step: drop models that are not trained, then name the rest."""
        trained = set()
        if watcher._pending:
            trained = {idx for (scope, idx, code) in watcher._pending[0].keys if code == "gnorm"}
        for opt in watcher._optimizers:
            trained.update(watcher._model_params_of(opt))
        trained_roots = {id(watcher.layers[watcher._param_layer[i]].root) for i in trained}
        for prefix, root in list(watcher.models().items()):
            if id(root) not in trained_roots and len(watcher.models()) > 1:
                watcher.drop_model(prefix)
                self._ignored.add(root)
                self._owned.difference_update(id(m) for m in root.modules())
        watcher.name_models()

    # ------------------------------------------------------------ optimizers
    def _find_all(self) -> None:
        """Once: look for optimizers and grad scalers the script has built."""
        self._scanned = True
        for obj in gc.get_objects():
            kind = type(obj)  # not isinstance: some lazy modules warn when probed
            if issubclass(kind, torch.optim.Optimizer):
                self._adopt(obj)
            elif kind.__name__ == "GradScaler" and hasattr(obj, "_per_optimizer_states"):
                self.watcher.add_scaler(obj)

    def _adopt(self, optimizer: torch.optim.Optimizer) -> bool:
        if optimizer in self._unwatched_opts:
            return False
        if any(optimizer is o for o in self.watcher._optimizers):
            return True
        if not self.watcher._model_params_of(optimizer):
            self._unwatched_opts.add(optimizer)
            return False
        self.watcher.add_optimizer(optimizer, hooks=False)
        return True

    def _opt_pre(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if not self._scanned:
            self._find_all()
        if self._adopt(optimizer):
            self.watcher.on_step_begin(optimizer, args, kwargs)

    def _opt_post(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if any(optimizer is o for o in self.watcher._optimizers):
            self.watcher.on_step_end(optimizer, args, kwargs)

    # ------------------------------------------------------------ losses
    def _wrap_backward(self, original):
        def backward(tensor: torch.Tensor, *args: Any, **kwargs: Any):
            if tensor.numel() == 1 and tensor.requires_grad:
                self.watcher.log(tensor, scaled=tensor in self._scaled)
            return original(tensor, *args, **kwargs)

        return backward

    def _wrap_scale(self, original):
        def scale(scaler: Any, outputs: Any):
            result = original(scaler, outputs)
            self.watcher.add_scaler(scaler)
            if isinstance(result, torch.Tensor) and getattr(scaler, "_enabled", True):
                self._scaled.add(result)
            return result

        return scale


@contextmanager
def _wrapped(owner: type, attr: str, wrap):
    original = owner.__dict__[attr]
    setattr(owner, attr, wrap(original))
    try:
        yield
    finally:
        setattr(owner, attr, original)


def _global_name(module: nn.Module) -> str:
    """The script's variable name for a model, else its class name in lower case."""
    main = sys.modules.get("__main__")
    for name, value in vars(main).items() if main is not None else ():
        if value is module and not name.startswith("_"):
            return name
    return type(module).__name__.lower()


def run_script(script: str | Path, args: Sequence[str], watcher: Watcher) -> ScriptResult:
    """Run ``script`` as ``__main__`` with ``sys.argv = [script, *args]`` under ``watcher``.

    The watcher is always closed (flushed) afterwards, also on exceptions and Ctrl-C.
    The exit code is the script's own: 0, its ``sys.exit`` code, 1 on an uncaught
    exception (whose traceback is printed, as Python would) or 130 on Ctrl-C.
    """
    script = Path(script)
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [str(script), *args]
    sys.path.insert(0, str(script.resolve().parent))
    error: BaseException | None = None
    code = 0
    try:
        with ScriptDiscovery(watcher).installed():
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except KeyboardInterrupt as exc:
        error, code = exc, 130
    except BaseException as exc:  # the script's own failure: report it as Python would
        error, code = exc, 1
        traceback.print_exc()
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        watcher.close(error=error)
    return ScriptResult(code, watcher, error)


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
