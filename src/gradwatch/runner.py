"""Run an unchanged training script under a Watcher.

The script runs as ``__main__`` with its own ``sys.argv``. gradwatch finds what to
watch through torch's global hooks:

* a module called at the top level (not inside another module) in a training
  forward pass is a candidate model; after the first step, candidates whose
  parameters got no gradient and belong to no optimizer (a frozen teacher that
  makes targets, say) are dropped;
* every optimizer that steps is watched through the global optimizer step hooks; one
  over parameters that an earlier one holds replaces it (an LR restart);
* a scalar tensor whose ``.backward()`` is called is taken as the loss (divided by
  the GradScaler's scale when it came from ``scaler.scale(loss)``).

While the script runs, ``torch.Tensor.backward``, ``GradScaler.scale`` and ``os._exit``
(which flushes the record first) are wrapped; all are restored when it ends, however it
ends. So are SIGTERM and SIGHUP, where the script leaves them at their default: they stop
the script with an exception, so that the record is flushed and the diagnosis shown before
gradwatch exits with 128 + the signal.
"""

from __future__ import annotations

import builtins
import gc
import importlib.machinery
import io
import os
import pkgutil
import runpy
import signal
import sys
import threading
import traceback
import types
import weakref
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager, suppress
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
        self._stepping: list[int] = []  # ids of the optimizers inside their step(), innermost last
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
        params = self.watcher._model_params_of(optimizer)
        if not params:
            self._unwatched_opts.add(optimizer)
            return False
        self._retire_replaced(set(params))
        self.watcher.add_optimizer(optimizer, hooks=False)
        return True

    def _retire_replaced(self, params: set[int]) -> None:
        """Forget the optimizers a new one over the same parameters replaces (an LR restart).

        A step ends once every watched optimizer has stepped: one replaced would be waited
        for in vain, merging steps, and kept alive with all its state. One inside its step
        is not replaced: it wraps the new one (a Lookahead steps its base optimizer).
        """
        watcher = self.watcher
        for old in list(watcher._optimizers):
            if id(old) not in self._stepping[:-1] and params.intersection(
                watcher._model_params_of(old)
            ):
                watcher._optimizers[:] = [o for o in watcher._optimizers if o is not old]
                watcher._expected.discard(id(old))
                watcher._opt_params.pop(id(old), None)  # keyed by id, which a new one may reuse

    def _opt_pre(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._stepping.append(id(optimizer))
        if not self._scanned:
            self._find_all()
        if self._adopt(optimizer):
            self.watcher.on_step_begin(optimizer, args, kwargs)

    def _opt_post(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if id(optimizer) in self._stepping:
            self._stepping.remove(id(optimizer))
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


class Terminated(BaseException):
    """The script was stopped by SIGTERM or SIGHUP (see :func:`run_script`)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


@contextmanager
def _signals_raise():
    """SIGTERM and SIGHUP raise :class:`Terminated` in the main thread while the script runs.

    Only where their handler is the default (which kills the process before anything is
    flushed): a handler the caller installed, or an ignored SIGHUP (``nohup``), is kept.
    The previous handlers are restored on exit. A process forked meanwhile (a DataLoader
    worker) dies of the signal as it would have.
    """
    saved: dict[int, Any] = {}
    pid = os.getpid()

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Terminated(signum)

    if threading.current_thread() is threading.main_thread():
        for name in ("SIGTERM", "SIGHUP"):
            signum = getattr(signal, name, None)
            if signum is not None and signal.getsignal(signum) == signal.SIG_DFL:
                saved[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, previous in saved.items():
            signal.signal(signum, previous)


def run_script(script: str | Path, args: Sequence[str], watcher: Watcher) -> ScriptResult:
    """Run ``script`` as ``__main__`` with ``sys.argv = [script, *args]`` under ``watcher``.

    As with ``python script``, ``sys.argv[0]`` is the path as given and ``__file__`` the
    absolute path. The watcher is always closed (flushed) afterwards, also on exceptions,
    Ctrl-C, SIGTERM and SIGHUP. The exit code is the process exit status ``python script``
    would have: 0, its ``sys.exit`` code (modulo 256), 1 on an uncaught exception (whose
    traceback is printed, as Python would, through the script's own ``sys.excepthook`` if
    it set one), 130 on Ctrl-C, or 128 + the signal number when SIGTERM or SIGHUP stopped it.
    As Python does before it exits, it waits for the threads the script started and left
    running (not daemons). ``os._exit`` in the script flushes the record before it exits.
    """
    script = Path(script)
    saved_argv, saved_path, saved_hook = sys.argv[:], sys.path[:], sys.excepthook
    streams = sys.stdout, sys.stderr
    threads = set(threading.enumerate())
    sys.argv = [str(script), *args]
    sys.path.insert(0, str(script.resolve().parent))
    error: BaseException | None = None
    code = 0
    try:
        with (
            _signals_raise(),
            ScriptDiscovery(watcher).installed(),
            _flushed_before_os_exit(watcher),
        ):
            try:
                _run_as_main(script)
            except BaseException as exc:
                error, code = _ended_by(exc, script, saved_hook, streams)
            _wait_for_threads(threads)  # they may still train; hooks stay on meanwhile
    except BaseException as exc:  # Ctrl-C or a signal while waiting for the threads
        error, code = _ended_by(exc, script, saved_hook, streams)
    finally:
        _usable_streams(streams)
        sys.argv, sys.path[:], sys.excepthook = saved_argv, saved_path, saved_hook
        try:
            watcher.close(error=error)
        except Exception as exc:  # noqa: BLE001 - a handler of the script's raised inside it
            # A DataLoader's SIGCHLD handler raises when its workers die of the same SIGTERM;
            # the store is flushed by then, and the diagnosis still follows.
            print(f"gradwatch: closing the run was interrupted: {exc}", file=sys.stderr)
    return ScriptResult(code, watcher, error)


def _ended_by(
    exc: BaseException, script: Path, hook: Any, streams: tuple[Any, Any]
) -> tuple[BaseException | None, int]:
    """Print what ``python script`` prints when ``exc`` ends it; the error and exit status."""
    _usable_streams(streams)  # the script may have closed the stream it set as sys.stderr
    if isinstance(exc, SystemExit):
        return None, _exit_code(exc.code)
    if isinstance(exc, Terminated):
        print(f"gradwatch: the script was stopped by {exc}", file=sys.stderr)
        return exc, 128 + exc.signum
    tb = _from_script(exc.__traceback__, script)
    if sys.excepthook is hook:
        traceback.print_exception(type(exc), exc, tb)
    else:  # the script set its own hook (to log the crash, say): Python would call it
        try:
            sys.excepthook(type(exc), exc, tb)
        except BaseException as failure:  # noqa: BLE001 - reported as Python reports it
            print("Error in sys.excepthook:", file=sys.stderr)
            traceback.print_exception(type(failure), failure, failure.__traceback__)
            print("\nOriginal exception was:", file=sys.stderr)
            traceback.print_exception(type(exc), exc, tb)
    # Python prints a KeyboardInterrupt's traceback too, then dies of SIGINT (130).
    return exc, 130 if isinstance(exc, KeyboardInterrupt) else 1


def _usable_streams(saved: tuple[Any, Any]) -> None:
    """Flush the script's stdout and stderr, so its output comes before the report, and
    put ours back where the script left a closed one (or None), so the report can show."""
    for name, ours in zip(("stdout", "stderr"), saved, strict=True):
        stream = getattr(sys, name)
        with suppress(AttributeError, ValueError, OSError):  # None, closed or broken
            stream.flush()
        if stream is None or getattr(stream, "closed", False):
            setattr(sys, name, ours)


def _wait_for_threads(before: set[threading.Thread]) -> None:
    """Join the threads the script started and left running, as Python does before it exits.

    Thread-pool workers are left alone: Python wakes them at exit, which has not come yet,
    so waiting here for an executor the script never shut down would never end.
    """
    pools = getattr(sys.modules.get("concurrent.futures.thread"), "_threads_queues", {})
    for thread in threading.enumerate():
        if thread in before or thread.daemon or thread in pools:
            continue
        if thread is not threading.current_thread():
            thread.join()


@contextmanager
def _flushed_before_os_exit(watcher: Watcher):
    """``os._exit`` skips every ``finally``: flush and close the record before it ends us.

    Only in this process: a forked DataLoader worker inherits the wrapper and exits with it.
    """
    pid, original = os.getpid(), os._exit

    def _exit(status: int) -> None:
        if os.getpid() == pid:
            try:
                watcher.close()
                print(
                    f"gradwatch: the script called os._exit({status}); its record is in "
                    f"{watcher.run_dir} (gradwatch diagnose {watcher.run_dir})",
                    file=sys.stderr,
                    flush=True,
                )
            except Exception:  # noqa: BLE001 - from another thread, say: exit regardless
                pass
        original(status)

    os._exit = _exit
    try:
        yield
    finally:
        os._exit = original


def _run_as_main(script: Path) -> None:
    """Run ``script`` as ``__main__`` the way ``python script`` does.

    ``__file__`` (and the code's file name, in tracebacks) is the absolute path, while
    ``sys.argv[0]`` stays as given; ``runpy.run_path`` would set both to one path. A
    zipapp or a compiled file goes to ``runpy.run_path``.
    """
    path = os.path.abspath(script)
    if path.endswith((".pyc", ".pyo")) or pkgutil.get_importer(path) is not None:
        runpy.run_path(str(script), run_name="__main__")
        return
    with io.open_code(path) as f:
        code = compile(f.read(), path, "exec", dont_inherit=True)
    main = types.ModuleType("__main__")
    loader = importlib.machinery.SourceFileLoader("__main__", path)  # as python script sets it
    main.__dict__.update(__file__=path, __cached__=None, __builtins__=builtins, __loader__=loader)
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = main
    try:
        exec(code, main.__dict__)
    finally:
        if saved is not None:
            sys.modules["__main__"] = saved


def _from_script(tb: types.TracebackType | None, script: Path) -> types.TracebackType | None:
    """A traceback from the script's first frame on, as ``python script`` prints it."""
    path = os.path.abspath(script)
    while tb is not None and tb.tb_frame.f_code.co_filename != path:
        tb = tb.tb_next
    return tb


def _exit_code(code: object) -> int:
    """The process exit status Python gives ``sys.exit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):  # bool too: True is 1
        if os.name != "posix":
            return int(code)
        return int(code) & 0xFF if -(2**63) <= code < 2**63 else 255  # as CPython's C long
    print(code, file=sys.stderr)
    return 1
