"""The Watcher: attaches the probes to a model, keeps the step schedule, flushes to the store.

A *step* is one optimizer step. With several optimizers (a GAN, say) it is one round
in which each of them has stepped once; with none (scripts that update
``p.data`` by hand) it is one backward pass. Forward passes under ``torch.no_grad()``
or with the model in ``eval()`` mode are not training and are not counted.

Per step the watcher keeps a handful of device tensors: one fused gradient norm per
(device, dtype) group and one output sum per layer (the sum doubles as the
activation mean and as the non-finite check). On scheduled steps it adds the
detailed probes. Nothing is read back to the host until :meth:`Watcher.flush`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from itertools import chain, repeat
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from . import __version__
from .aggregate import Block, Layout, Tally, relative_spread, tally_steps
from .hooks import OwnHook, ScalerStepHook
from .layers import RECTIFYING, RECURRENT, Layer, discover_layers, named_roots
from .probes.activations import Saturation, output_sum, saturation, unit_max
from .probes.grads import (
    LOW_PRECISION,
    GradNormPlan,
    nonzero_count,
    nonzero_counts,
    vector_norm,
    wide_norm,
)
from .probes.numerics import NonFiniteError
from .probes.recurrent import recurrent_radius
from .probes.scratch import reusable_like
from .probes.updates import UpdateProbe
from .record import PackedStep, StepBuffer, to_host
from .schedule import as_schedule
from .store import MAX_PERIOD, MAX_PERIOD_TEXT, LayerRow, RunWriter, fresh_path

MODES = ("default", "grads", "full")
# The step-buffer codes of an output's moments: what a block shares with the child
# whose output tensor it returns (see Watcher._measured_already).
MOMENTS = ("fsum", "fsq", "shift")
# std / |mean| from which an output's moments are plain float32 sums: the variance
# then loses about 1e-7 * (1 + (mean / std)^2) of itself to cancellation, 2e-7 at most.
# Zero-mean outputs (linear, conv, normalization, tanh) and ReLUs qualify; sigmoids not.
SPREAD_OUT = 1.0


class _Measured(NamedTuple):
    """The output a detailed step measured last (see Watcher._measured_already)."""

    tensor: weakref.ref  # weak: holding the output would keep its autograd graph alive
    version: int  # the tensor's _version then; an in-place change bumps it
    buf: StepBuffer
    moments: list[int]  # positions of its moments in buf
    targets: list[int]  # layers whose error its gradient is


class GradwatchWarning(UserWarning):
    """Something went wrong inside gradwatch; training goes on."""


def default_run_dir(name: str = "run") -> Path:
    """A fresh directory under ./gradwatch-runs named by time and process."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("gradwatch-runs") / f"{stamp}-{name}-{os.getpid()}"


def _compiling() -> bool:
    """Inside a torch.compile trace, hooks stay out: Python-side bookkeeping would break the graph."""
    return torch.compiler.is_compiling()


def _gnorm_keys(plan: GradNormPlan, all_keys: list, order: list[int]) -> list:
    """The keys of gradient norms returned in ``order``.

    With every gradient present (the usual step) ``order`` is the plan's own index list,
    and its keys, built once, serve again.
    """
    return all_keys if order is plan.indices else [("p", i, "gnorm") for i in order]


# The id of the backward pass running now, -1 outside one (and where torch lacks the call).
_graph_task: Callable[[], int] = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def _first_tensor(output: Any) -> torch.Tensor | None:
    # The common cases, a tensor or a tuple that starts with one, without flattening a
    # pytree: that costs 20 µs between two training kernels.
    if type(output) is tuple and output and type(output[0]) is torch.Tensor:
        if output[0].is_floating_point():
            return output[0]
    elif type(output) is torch.Tensor:
        return output if output.is_floating_point() else None
    for leaf in tree_leaves(output):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    return None


class Watcher:
    """Records per-layer gradient and activation health of a training run.

    Use :func:`watch` to make one. See the module docstring for what a step is.

    Attributes:
        run_dir: the run directory; its ``run.sqlite`` is the store.
        layers: the measured layers, in discovery order.
        step: the index of the step now open (the number of steps completed).
    """

    def __init__(
        self,
        model: nn.Module | Iterable[nn.Module] | Mapping[str, nn.Module] | None,
        optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
        *,
        run: str | os.PathLike | None = None,
        every: int = 1,
        flush_every: int = 50,
        detail: int | Callable[[int], bool] | None = None,
        mode: str = "default",
        scaler: Any = None,
        stop_on_nonfinite: bool = False,
        meta: Mapping[str, object] | None = None,
        overwrite: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if not (1 <= every <= MAX_PERIOD and flush_every >= 1):
            raise ValueError(
                f"every must be between 1 and {MAX_PERIOD_TEXT} and flush_every >= 1; "
                f"got every={every}, flush_every={flush_every}"
            )
        self.mode = mode
        self.every = every
        self.flush_every = flush_every
        self.stop_on_nonfinite = stop_on_nonfinite
        self._schedule = (lambda step: True) if mode == "full" else as_schedule(detail)
        # A store holds one run: an existing one is replaced only with overwrite=True.
        self.run_dir = Path(run) if run is not None else fresh_path(default_run_dir())
        self._writer: RunWriter | None = RunWriter(self.run_dir, overwrite=overwrite)
        self._writer.on_evict = self.close
        self._writer.set_meta(
            {
                "gradwatch_version": __version__,
                "torch_version": torch.__version__,
                "mode": mode,
                "started": datetime.now().isoformat(timespec="seconds"),
                "status": "running",
                # "float16" or "bfloat16" once a watched output is (see diagnose.causes).
                "low_precision": "0",
                **(meta or {}),
            }
        )
        self.layers: list[Layer] = []
        self._roots: dict[str, nn.Module] = {}
        self._params: list[nn.Parameter] = []
        self._param_names: list[str] = []
        self._param_index: dict[int, int] = {}
        self._param_layer: list[int] = []
        self._param_numel: list[int] = []
        self._exec_order: dict[int, int] = {}
        self._handles: list[Any] = []
        self._root_handles: dict[str, list[Any]] = {}
        self._root_names: dict[str, str] = {}
        # Layer hooks attached only while needed, by model: "check" hooks the layers
        # that can originate inf/NaN (every step where checks are not deferred, see
        # _defers_checks), "detail" the rest (detailed steps only).
        self._optional_hooks: dict[str, dict[str, list[tuple[nn.Module, Callable]]]] = {
            "check": {},
            "detail": {},
        }
        self._attached: dict[str, dict[str, list[Any]]] = {}  # group -> model -> handles
        self._accumulation_handles: list[Any] = []  # see _watch_accumulation
        # The open forward passes of watched models (a stack: they may nest), each with
        # the CPU random state at its start when its check is deferred, else None.
        self._forwards: list[tuple[nn.Module, torch.Tensor | None]] = []
        self._ordered: set[int] = set()  # models whose layers' execution order is known
        self._undeferrable: set[int] = set()  # models whose output is not a CPU float tensor
        self._replaying = False
        self._low_precision: set[torch.dtype] = set()
        self._dropped: set[int] = set()
        self.before_first_flush: Callable[[Watcher], None] | None = None
        self._root_of: dict[int, nn.Module] = {}
        self._optimizers: list[torch.optim.Optimizer] = []
        self._expected: set[int] = set()
        self._stepped: set[int] = set()
        self._closure: dict[int, bool] = {}
        self._step_depth: dict[int, int] = {}
        self._opt_params: dict[int, tuple[int, list[int]]] = {}
        # per parameter set: its norm plan and the keys of its norms
        self._grad_plans: dict[tuple[int, ...], tuple[GradNormPlan, list]] = {}
        # Layers whose mean derivative follows from their output's moments (sigmoid, tanh).
        self._moment_derivatives: dict[int, Callable] = {}
        self._layouts: dict[tuple, Layout] = {}
        self._layouts_for = 0
        self._scalers: weakref.WeakSet = weakref.WeakSet()
        self._updates = UpdateProbe()
        self._manual_snapshot = False
        self._callback_queued: int | None = None  # the backward pass it is queued in
        self._flush_due = False
        self._unit_peak: dict[int, torch.Tensor] = {}
        # Temporaries of a detailed step's probes, reused from layer to layer and freed
        # after the step (see probes.scratch).
        self._scratch: dict = {}
        self._last_measured: _Measured | None = None
        # Layers whose outputs spread widely about their mean, when last measured: their
        # moments need no shift (see _record_output).
        self._spread_out: set[int] = set()
        self._last_act_step: dict[int, int] = {}
        self._pending: list[PackedStep] = []
        self._written_layers = 0
        self._written_params = 0
        self._layers_dirty = True
        self.step = 0
        self.steps_recorded = 0
        self._open = StepBuffer(0, self._is_detail(0))
        self._closed = False
        self.nonfinite_steps: list[int] = []
        # Layers whose -inf output a completed step absorbed: masks (see _stop_at_nonfinite).
        self._known_masks: set[int] = set()
        self.scaler_skips = 0  # iterations whose optimizer step a GradScaler skipped
        self._loss_of_skipped = False  # a loss logged now belongs to a skipped iteration
        try:
            if scaler is not None:
                self.add_scaler(scaler)
            if model is not None:
                self.add_model(model)
            for opt in _as_list(optimizer):
                self.add_optimizer(opt)
        except BaseException:
            # A failed watch() leaves no hook behind, nor its store open for writing.
            self._closed = True
            self._remove_hooks()
            self._writer.close()
            self._writer = None
            raise

    # ----------------------------------------------------------------- attaching
    def add_model(
        self,
        model: nn.Module | Iterable[nn.Module] | Mapping[str, nn.Module],
        name: str | None = None,
    ) -> None:
        """Watch one more model (or several). Its layers join the store at the next flush.

        ``name`` prefixes the layer names of a single model; the first model watched
        alone keeps unprefixed names, as ``named_modules()`` gives them.
        """
        roots = {
            k: getattr(m, "_orig_mod", m) for k, m in named_roots(model).items()
        }  # torch.compile wrapper
        if name is not None and len(roots) == 1:
            roots = {("" if not self._roots else name): next(iter(roots.values()))}
        elif self._roots:  # names must stay unique once a second model joins
            roots = {(k or type(m).__name__.lower()): m for k, m in roots.items()}
        for prefix, root in roots.items():
            if any(root is r for r in self._roots.values()):
                continue
            self._roots[prefix] = root
            self._root_names[prefix] = name or prefix
            new = discover_layers({prefix: root}, len(self.layers), set(self._param_index))
            handles = self._root_handles.setdefault(prefix, [])
            for layer in new:
                self.layers.append(layer)
                for pname, p in layer.params:
                    self._param_index[id(p)] = len(self._params)
                    self._params.append(p)
                    self._param_names.append(pname)
                    self._param_layer.append(layer.index)
                    self._param_numel.append(p.numel())
                if self.mode == "grads":
                    continue
                sat = saturation(layer.module, layer.kind)
                if sat is not None and sat.from_moments is not None:
                    self._moment_derivatives[layer.index] = sat.from_moments
                hook = OwnHook(self._make_layer_hook(layer, sat))
                if self.mode == "full":
                    handles.append(layer.module.register_forward_hook(hook))
                else:
                    group = "check" if layer.checked_every_step else "detail"
                    self._optional_hooks[group].setdefault(prefix, []).append((layer.module, hook))
            handles.append(
                root.register_forward_pre_hook(OwnHook(self._root_pre_hook), with_kwargs=True)
            )
            handles.append(
                root.register_forward_hook(
                    OwnHook(self._root_post_hook), with_kwargs=True, always_call=True
                )
            )
        # A model's first forward runs hooked (_defers_checks); it may be under way
        # already, when `gradwatch run` adds the model from a global pre-hook.
        self._set_optional_hooks("check", True)
        self._set_optional_hooks("detail", self._open.detail)
        self._watch_accumulation(False)  # the next forward attaches it to the new parameters too
        self._layers_dirty = True

    def drop_model(self, prefix: str) -> None:
        """Stop watching a model (before anything of it was written): hooks off, layers out."""
        for handle in self._root_handles.pop(prefix, []):
            handle.remove()
        self._detach_optional_hooks()
        for hooks in self._optional_hooks.values():
            hooks.pop(prefix, None)
        root = self._roots.pop(prefix)
        self._dropped.update(layer.index for layer in self.layers if layer.root is root)

    def name_models(self) -> None:
        """Give layer names a model prefix exactly when more than one model is watched."""
        if len(self._roots) == 1:
            prefix = next(iter(self._roots))
            if prefix:
                self._rename_model(prefix, "")
        elif "" in self._roots:
            root = self._roots[""]
            self._rename_model("", self._root_names.get("") or type(root).__name__.lower())

    def _rename_model(self, old: str, new: str) -> None:
        root = self._roots.pop(old)
        self._roots[new] = root
        self._root_names[new] = self._root_names.pop(old, new)
        self._root_handles[new] = self._root_handles.pop(old, [])
        for by_model in (*self._optional_hooks.values(), *self._attached.values()):
            if old in by_model:
                by_model[new] = by_model.pop(old)

        def rename(name: str) -> str:
            bare = name[len(old) + 1 :] if old else name
            if bare == old or bare == "(root)":
                bare = ""
            return ".".join(part for part in (new, bare) if part) or "(root)"

        for layer in self.layers:
            if layer.root is root:
                layer.name = rename(layer.name)
        for i, layer_index in enumerate(self._param_layer):
            if self.layers[layer_index].root is root:
                self._param_names[i] = rename(self._param_names[i])
        self._layers_dirty = True

    def models(self) -> dict[str, nn.Module]:
        """The watched models by name prefix."""
        return dict(self._roots)

    def add_optimizer(self, optimizer: torch.optim.Optimizer, hooks: bool = True) -> None:
        """Watch an optimizer's steps. ``hooks=False`` when a global hook forwards them already."""
        if any(optimizer is o for o in self._optimizers):
            return
        self._optimizers.append(optimizer)
        self._expected.add(id(optimizer))
        if hooks:
            self._handles.append(optimizer.register_step_pre_hook(OwnHook(self.on_step_begin)))
            self._handles.append(optimizer.register_step_post_hook(OwnHook(self.on_step_end)))

    def pin_store(self) -> None:
        """Keep this watcher's store from being taken over: ``overwrite=True`` elsewhere is refused."""
        if self._writer is not None:
            self._writer.on_evict = None

    def add_scaler(self, scaler: Any) -> None:
        """Tell the watcher about an AMP ``GradScaler``: values are reported unscaled, and
        an iteration whose step the scaler skips (its scaled gradients overflowed) is
        not a step: what it measured is dropped, and so is a loss logged after it.
        """
        if scaler in self._scalers:
            return
        self._scalers.add(scaler)
        if callable(getattr(type(scaler), "step", None)):
            self._handles.append(ScalerStepHook(scaler, self._after_scaler_step))

    def _after_scaler_step(self, scaler: Any, optimizer: torch.optim.Optimizer) -> None:
        state = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer), {})
        found = state.get("found_inf_per_device") if isinstance(state, dict) else None
        # An optimizer not (yet) watched is another's, unless none is: `gradwatch run`
        # adopts an optimizer at its first step, which a skip does not reach.
        if self._closed or not found or (self._optimizers and optimizer not in self._optimizers):
            return
        # Host reads of what the scaler has just read itself to decide: no further wait.
        if not sum(float(v) for v in found.values()):
            return
        self.scaler_skips += 1
        if not self._stepped:  # no optimizer of this round stepped: the iteration is no step
            self._open = StepBuffer(self.step, self._open.detail)
            self._last_measured = None
            self._loss_of_skipped = True

    def owns(self, module: nn.Module) -> bool:
        return any(module is r for r in self._roots.values()) or id(module) in {
            id(layer.module) for layer in self.layers
        }

    # ----------------------------------------------------------------- hooks
    def _is_detail(self, step: int) -> bool:
        return self.mode != "grads" and bool(self._schedule(step))

    def _training(self, root: nn.Module) -> bool:
        """A training forward: autograd on, train mode, and not a recomputation inside backward.

        Activation checkpointing runs the forward again during the backward pass; that
        rerun is not a step, and measured again its outputs would count twice.
        """
        return torch.is_grad_enabled() and root.training and _graph_task() == -1

    def _root_pre_hook(self, module: nn.Module, args: Any, kwargs: dict) -> None:
        if self._closed or self._replaying or _compiling() or not self._training(module):
            return
        if self._open.backward_done and not self._optimizers:
            # A hand-written update happened since the last backward: that step is over.
            self._finish_manual_update()
            self._finalize()
        if self._flush_due:
            self._safe_flush()
        if self._step_depth:  # a step that raised never ran its post-hook; forget it
            self._step_depth = {k: d for k, d in self._step_depth.items() if self._closure.get(k)}
        defer = self._defers_checks(module, args)
        self._set_optional_hooks("check", not defer)
        self._set_optional_hooks("detail", self._open.detail)
        self._watch_accumulation(self._open.detail)
        self._open.forward_seen = True
        self._loss_of_skipped = False
        # 1 µs: the random state lets a replay draw the same dropout masks.
        self._forwards.append((module, torch.get_rng_state() if defer else None))

    def _root_post_hook(self, module: nn.Module, args: Any, kwargs: dict, output: Any) -> None:
        """Runs after every forward of a watched model, also one that raised (``always_call``)."""
        if self._replaying:
            return
        if self._forwards and self._forwards[-1][0] is module:
            rng_state = self._forwards.pop()[1]
            if rng_state is None:
                self._ordered.add(id(module))
            elif (
                output is not None and not self._closed and not self._finite_output(module, output)
            ):
                self._replay(module, args, kwargs, rng_state)
        if self._closed or self._optimizers or _compiling() or not self._training(module):
            return  # with an optimizer, its step marks the step; no need to find backward's end
        out = _first_tensor(output)
        if out is not None and out.requires_grad:
            out.register_hook(self._arm_backward_end)

    def _defers_checks(self, root: nn.Module, args: Any) -> bool:
        """Whether this forward's non-finite check waits for the model's output.

        On plain steps on the CPU, yes: a host read there waits for nothing, so one
        check of the model's output replaces a hook and a sum per layer on every step,
        and only when it fails is the forward replayed to find the first layer (see
        :meth:`_replay`). Detailed steps measure every layer anyway; a model's first
        forward runs hooked to learn its layers' order; and on an accelerator reading
        the output back would stall it, so each layer queues its own sum there instead.
        Mode "grads" hooks no layers, so it has nothing to defer.
        """
        if (
            self.mode == "grads"
            or self._open.detail
            or id(root) not in self._ordered
            or id(root) in self._undeferrable
            or any(state is None for _, state in self._forwards)  # inside a hooked forward
        ):
            return False
        first = _first_tensor(args)
        return first is None or first.is_cpu

    def _finite_output(self, root: nn.Module, output: Any) -> bool:
        """Whether a model's output is finite, read on the host (it is on the CPU).

        An output that is not a CPU float tensor cannot vouch for the layers: the
        model's later forwards run hooked, and this one counts as failed. So do those
        of a model whose output holds -inf and no NaN: logits masked with -inf fail the
        check on every step, and checking each layer costs less than replaying each forward.
        """
        if type(output) is torch.Tensor and output.is_floating_point():
            leaves = [output]  # the common case, without flattening a pytree
        else:
            leaves = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]
            leaves = [t for t in leaves if t.is_floating_point()]
        if not leaves or any(t.device.type != "cpu" for t in leaves):
            self._undeferrable.add(id(root))
            return False
        if all(_finite_on_host(t) for t in leaves):  # host read; CPU, so no wait
            return True
        if not any(bool((t.isnan() | t.isposinf()).any()) for t in leaves):  # host read
            self._undeferrable.add(id(root))  # a mask, most likely
        return False

    def _replay(self, root: nn.Module, args: Any, kwargs: dict, rng_state: torch.Tensor) -> None:
        """Run a forward again with every checked layer hooked, to find where inf/NaN began.

        The replay has the same inputs, parameters and random state as the forward
        whose output failed the check, so it computes the same values; it runs without
        autograd and on copies of the model's buffers, so BatchNorm statistics stay
        as training left them.
        What a later layer absorbs (a -inf that a ReLU zeroes) goes unseen and does no
        harm. A forward that modifies its inputs in place replays differently; one
        that cannot run twice is reported in a warning, and the step keeps its
        gradient checks. The model's own forward pre-hooks run again, since they may
        shape the computation (pruning masks, weight norm); its forward hooks do not,
        since they observe it: one that keeps a feature for an auxiliary loss would
        keep the replay's, which has no gradient, in place of the real one.
        """
        own_hooks = [(module, module._forward_hooks) for module in root.modules()]
        for module, _ in own_hooks:
            module._forward_hooks = OrderedDict()
        hooks = [
            layer.module.register_forward_hook(self._make_replay_hook(layer.index))
            for layer in self.layers
            if layer.root is root and layer.checked_every_step and layer.index not in self._dropped
        ]
        # The replay gets copies of the buffers: writing to the originals, even to
        # restore them, would bump the version of tensors the backward pass needs.
        buffers = [
            (module, name, value)
            for module in root.modules()
            for name, value in module._buffers.items()
            if value is not None
        ]
        self._replaying = True
        try:
            for module, name, value in buffers:
                module._buffers[name] = value.detach().clone()
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.set_rng_state(rng_state)
                root(*args, **kwargs)
        except NonFiniteError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported, never raised into training
            warnings.warn(
                f"gradwatch could not replay the forward pass of step {self._open.step} to find "
                f"the first non-finite layer: {type(exc).__name__}: {exc}",
                GradwatchWarning,
                stacklevel=2,
            )
        finally:
            self._replaying = False
            for handle in hooks:
                handle.remove()
            for module, forward_hooks in own_hooks:
                module._forward_hooks = forward_hooks
            for module, name, value in buffers:
                module._buffers[name] = value

    def _make_replay_hook(self, index: int) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            out = _first_tensor(output)
            if out is not None:
                self._note_order(index)
                self._record_output(index, out)

        return hook

    def _note_order(self, index: int) -> None:
        """Give a layer its execution rank the first time its output is seen."""
        if index not in self._exec_order:
            self._exec_order[index] = len(self._exec_order)
            self._layers_dirty = True

    def _record_output(self, index: int, out: torch.Tensor, moments: bool = False) -> None:
        """Queue a layer output's sum (its mean, and the non-finite check) on the open step.

        With ``moments`` (a float32 or float64 ``out``) its norm is queued too. For an
        output whose std was at least ``SPREAD_OUT`` times its mean when last measured,
        plain float32 sums give the variance to about 1e-7 of itself. Otherwise (and
        before the first flush), the sum and the norm are taken about a shift, one of
        the output's own entries, so that they do not cancel: a std of 2e-6 about a
        mean of 1 survives. The shift costs a pass that writes a copy of the output.
        A layer that collapses is measured plainly until the next flush sees it.
        """
        buf = self._open
        n = out.numel()
        if moments and n and index in self._spread_out:
            total = out.sum()
            buf.add(("l", index, "fsum"), total, n)
            buf.add(("l", index, "fsq"), vector_norm(out), n)
        elif moments and n:
            # A copy (a later in-place op may change out), and finite, so that an
            # output of -inf still sums to -inf.
            shift = out.reshape(-1)[0].nan_to_num(0.0, 0.0, 0.0)
            deviation = torch.sub(out, shift, out=reusable_like(self._scratch, out))
            total = deviation.sum()
            buf.add(("l", index, "fsum"), total, n)
            buf.add(("l", index, "shift"), shift, n)
            buf.add(("l", index, "fsq"), vector_norm(deviation), n)
        else:
            if out.dtype in LOW_PRECISION and out.dtype not in self._low_precision:
                self._note_low_precision(out.dtype)
            total = output_sum(out)
            buf.keys.append(("l", index, "fsum"))  # StepBuffer.add, inlined: a hot path
            buf.values.append(total)
            buf.counts.append(n)
        if self.stop_on_nonfinite:
            self._stop_at_nonfinite(index, total)

    def _stop_at_nonfinite(self, index: int, total: torch.Tensor) -> None:
        """Raise :class:`NonFiniteError` if a layer's output sum is NaN or +inf.

        -inf alone does not stop: logits masked with -inf sum to -inf on every step
        while the loss absorbs them (the diagnosis calls that a mask, too). A -inf
        the loss does not absorb makes the gradients non-finite, which stops the run.
        A NaN or +inf is blamed on the step's first -inf output that is not a known
        mask, if any: log(0) = -inf turns NaN in the next linear layer.
        """
        value = total.item()  # host sync, opt-in
        if math.isfinite(value):
            return
        buf = self._open
        if value == -math.inf:
            buf.neginf.append(index)
            return
        origin = next((i for i in buf.neginf if i not in self._known_masks), index)
        raise NonFiniteError(self.layers[origin].name, buf.step, "forward output")

    def _note_low_precision(self, dtype: torch.dtype) -> None:
        """Mark the run as computing in float16 or bfloat16: an overflow means more there."""
        self._low_precision.add(dtype)
        if self._writer is not None:
            name = "float16" if torch.float16 in self._low_precision else "bfloat16"
            self._writer.set_meta({"low_precision": name})

    def _arm_backward_end(self, grad: torch.Tensor) -> None:
        # A backward pass that raised (a batch skipped on out-of-memory) never runs its
        # callback: one queued in another backward pass than this one is void.
        task = _graph_task()
        if self._callback_queued != task:
            self._callback_queued = task
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)

    def _on_backward_end(self) -> None:
        """Runs once each backward pass has finished (queued on the autograd engine)."""
        self._callback_queued = None
        if self._closed:
            return
        buf = self._open
        buf.backward_done = True
        if self._optimizers or buf.stepped:
            return
        # No optimizer seen (yet): read the gradients now, before a manual update or zero_grad.
        idx = [i for i, p in enumerate(self._params) if p.grad is not None]
        keys, norms = self._grad_entries(idx)
        buf.backward_grads = (keys, norms)
        if buf.detail:
            self._updates.begin(-1, idx, [self._params[i] for i in idx])
            self._manual_snapshot = True

    def _finish_manual_update(self) -> None:
        if self._manual_snapshot:
            self._manual_snapshot = False
            self._add_updates(*self._updates.end(-1))

    def _make_layer_hook(self, layer: Layer, sat: Saturation | None) -> Callable:
        index, root = layer.index, layer.root
        rectifier = isinstance(layer.module, tuple(RECTIFYING))

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._closed or _compiling() or not self._training(root):
                return
            out = _first_tensor(output)
            if out is None:
                return
            self._note_order(index)
            buf = self._open
            if not buf.detail:
                self._record_output(index, out)
                return
            single = type(output) is torch.Tensor
            if single and self._measured_already(index, out, buf):
                return
            start = len(buf.keys)
            n = out.numel()
            y = out.detach()
            if y.dtype in LOW_PRECISION:
                if y.dtype not in self._low_precision:
                    self._note_low_precision(y.dtype)
                y = y.float()
            self._record_output(index, y, moments=True)
            if sat is not None:
                buf.add(("l", index, "sat"), sat.saturated_count(y, self._scratch), n)
                if sat.from_moments is None:  # else it follows from the moments at flush
                    buf.add(("l", index, "dsum"), sat.derivative(y).sum(), n)
            if rectifier:
                buf.add(("l", index, "nonzero"), nonzero_count(y, self._scratch), n)
                self._track_alive(index, y)
            targets = [index]  # layers whose error this output's gradient is
            on_error = self._make_error_hook(targets)
            leaves = (output,) if single else tree_leaves(output)
            for leaf in leaves:
                if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                    leaf.register_hook(on_error)
            if single:  # a tuple's other leaves have errors of their own
                moments = [k for k in range(start, len(buf.keys)) if buf.keys[k][2] in MOMENTS]
                self._last_measured = _Measured(
                    weakref.ref(out), out._version, buf, moments, targets
                )
            else:
                self._last_measured = None

        return hook

    def _measured_already(self, index: int, out: torch.Tensor, buf: StepBuffer) -> bool:
        """Reuse the last measured output's moments and error when ``out`` is that tensor.

        A block (a TransformerEncoderLayer, a whole model) often returns its last
        child's output itself; its hook fires right after the child's. Measured
        again, the same tensor would cost every reduction twice. An in-place
        change since (a ReLU with inplace=True returns its input) bumps the
        tensor's version, and it is measured anew. Only the moments and the error
        carry over: zero and saturation counts belong to the layer's own kind.
        """
        last = self._last_measured
        if (
            last is None
            or last.tensor() is not out
            or last.version != out._version
            or last.buf is not buf
        ):
            return False
        for k in last.moments:
            buf.add(("l", index, buf.keys[k][2]), buf.values[k], buf.counts[k])
        last.targets.append(index)
        return True

    def _set_optional_hooks(self, group: str, on: bool) -> None:
        """Attach (or remove) one group of the layer hooks that are not always on."""
        attached = self._attached.setdefault(group, {})
        if on:
            for prefix, pairs in self._optional_hooks[group].items():
                if prefix not in attached:
                    attached[prefix] = [
                        module.register_forward_hook(hook) for module, hook in pairs
                    ]
        else:
            for handles in attached.values():
                for handle in handles:
                    handle.remove()
            attached.clear()

    def _detach_optional_hooks(self) -> None:
        for group in self._attached:
            self._set_optional_hooks(group, False)

    def _make_error_hook(self, targets: list[int]) -> Callable[[torch.Tensor], None]:
        """The hook that records a gradient's norm as the error of each layer in ``targets``."""

        def on_grad(grad: torch.Tensor) -> None:
            # Scaled by a GradScaler, errors may square past float32's range.
            norm = wide_norm(grad)
            buf, task = self._open, _graph_task()
            for index in targets:
                buf.error_passes.append((len(buf.keys), task))
                buf.add(("l", index, "err"), norm)

        return on_grad

    def _watch_accumulation(self, on: bool) -> None:
        """Note which backward passes accumulate into the watched parameters' ``.grad``.

        A layer's error is dL/d(output) of the passes that train it: ``torch.autograd.grad``
        (a gradient penalty, a PINN's du/dx, a saliency map) runs the same tensor hooks,
        and its gradients are not the loss's (see :meth:`StepBuffer.drop_errors_of_other_passes`).
        """
        if on and not self._accumulation_handles:

            def note(param: torch.Tensor) -> None:
                self._open.accumulating.add(_graph_task())

            hook = OwnHook(note)
            self._accumulation_handles = [
                p.register_post_accumulate_grad_hook(hook) for p in self._params if p.requires_grad
            ]
        elif not on:
            for handle in self._accumulation_handles:
                handle.remove()
            self._accumulation_handles = []

    def _track_alive(self, index: int, out: torch.Tensor) -> None:
        """Keep each unit's largest output over the flush window (a ReLU unit is alive if > 0)."""
        peak = unit_max(out)
        best = self._unit_peak.get(index)
        if best is None or best.shape != peak.shape:
            self._unit_peak[index] = peak
        else:
            torch.maximum(best, peak, out=best)
        self._last_act_step[index] = self._open.step

    # ----------------------------------------------------------------- optimizer steps
    def _model_params_of(self, optimizer: torch.optim.Optimizer) -> list[int]:
        groups = optimizer.param_groups
        size = sum(len(g["params"]) for g in groups)
        cached = self._opt_params.get(id(optimizer))
        if cached is None or cached[0] != size or len(self._params) != cached[2]:
            idx = [
                self._param_index[id(p)]
                for g in groups
                for p in g["params"]
                if id(p) in self._param_index
            ]
            cached = (size, idx, len(self._params))
            self._opt_params[id(optimizer)] = cached
        return cached[1]

    def _grad_plan(self, indices: Sequence[int]) -> tuple[GradNormPlan, list]:
        key = tuple(indices)
        found = self._grad_plans.get(key)
        # A model converted after watch() (model.half(), .to(device)) needs new groups;
        # detailed steps also catch a conversion of part of it.
        if found is None or found[0].stale(self._params, full=self._open.detail):
            plan = GradNormPlan(indices, self._params)
            self._grad_plans[key] = (plan, [("p", i, "gnorm") for i in plan.indices])
        return self._grad_plans[key]

    def _grad_entries(self, indices: Sequence[int]) -> tuple[list, list[torch.Tensor]]:
        plan, all_keys = self._grad_plan(indices)
        order, norms = plan.norms(self._params)
        keys = _gnorm_keys(plan, all_keys, order)
        if self.stop_on_nonfinite and norms:
            bad = ~torch.isfinite(torch.stack(norms))
            if bool(bad.any()):  # host sync, opt-in
                first = order[int(bad.nonzero()[0, 0])]
                raise NonFiniteError(self._param_names[first], self._open.step, "gradient")
        return keys, norms

    def _record_grads(self, indices: list[int]) -> None:
        buf = self._open
        if not buf.detail and not self.stop_on_nonfinite:
            # One tensor per step, held until the flush, instead of one per parameter:
            # 2000 small tensors held over a window of 50 steps fragmented the heap.
            plan, all_keys = self._grad_plan(indices)
            found = plan.norms_row(self._params)
            if found is not None:
                order, row = found
                buf.add_row(_gnorm_keys(plan, all_keys, order), row)
                return
        keys, norms = self._grad_entries(indices)
        buf.extend(keys, norms)
        if buf.detail:
            idx = [k[1] for k in keys]
            grads = [self._params[i].grad for i in idx]
            buf.extend([("p", i, "gnonzero") for i in idx], nonzero_counts(grads, self._scratch))

    def _add_updates(
        self, indices: list[int], update: list[torch.Tensor], weight: list[torch.Tensor]
    ) -> None:
        self._open.extend([("p", i, "unorm") for i in indices], update)
        self._open.extend([("p", i, "wnorm") for i in indices], weight)

    def _scale_for(self, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        if not self._scalers:  # iterating an empty WeakSet costs 30 µs between kernels
            return None
        for scaler in list(self._scalers):
            state = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer))
            scale = getattr(scaler, "_scale", None)
            if (
                state
                and scale is not None
                and getattr(state.get("stage"), "name", "") == "UNSCALED"
            ):
                return scale.detach().reshape(()).clone()
        return None

    def on_step_begin(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        """Optimizer step pre-hook: read gradients, snapshot weights on detailed steps."""
        if self._closed:
            return
        key = id(optimizer)
        # A subclass whose step() calls super().step() fires the hooks once per level.
        self._step_depth[key] = self._step_depth.get(key, 0) + 1
        if self._step_depth[key] > 1:
            return
        if key in self._stepped:
            self._finalize()  # this optimizer steps again: the last round is complete
        # The optimizer's step wrapper passes (optimizer, *step_args) as args.
        user_args = args[1:] if args and args[0] is optimizer else args
        closure = bool(user_args and user_args[0] is not None) or kwargs.get("closure") is not None
        self._closure[key] = closure
        indices = self._model_params_of(optimizer)
        if not closure:
            self._record_grads(indices)
        if self._open.detail:
            live = indices if closure else [i for i in indices if self._params[i].grad is not None]
            self._updates.begin(key, live, [self._params[i] for i in live])
        scale = self._scale_for(optimizer)
        if scale is not None:
            self._open.add(("s", 0, "scale"), scale)

    def on_step_end(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        """Optimizer step post-hook: measure the update; close the step once every optimizer stepped."""
        if self._closed:
            return
        key = id(optimizer)
        self._step_depth[key] = self._step_depth.get(key, 1) - 1
        if self._step_depth[key] > 0:
            return
        if self._closure.pop(key, False):
            self._record_grads(self._model_params_of(optimizer))
        if self._updates.pending(key):
            indices = self._model_params_of(optimizer)
            keep = {i for i in indices if self._params[i].grad is not None}
            self._add_updates(*self._updates.end(key, keep))
        if key not in self._expected:
            self._expected.add(key)
        self._stepped.add(key)
        self._open.stepped = True
        if self._expected <= self._stepped:
            self._finalize()

    # ----------------------------------------------------------------- losses
    def log(self, loss: torch.Tensor | float | None = None, *, scaled: bool = False) -> None:
        """Record the training loss of the current step (no host sync).

        Call it before or after ``optimizer.step()``; after, it belongs to the step
        just completed. ``scaled=True`` marks a loss multiplied by a GradScaler's scale.
        """
        if loss is None or self._closed:
            return
        if isinstance(loss, torch.Tensor) and loss.numel() != 1:
            raise ValueError(
                f"log(loss=...) takes a scalar; got a tensor of shape {tuple(loss.shape)}"
            )
        buf = self._open
        if not (buf.forward_seen or buf.stepped) and self._loss_of_skipped:
            return
        if not (buf.forward_seen or buf.stepped) and self._pending:
            target = self._pending[-1]  # logged after the step closed
            code = "sloss" if scaled else "loss"
            if isinstance(loss, torch.Tensor):
                target.keys.append(("s", 0, code))
                target.counts.append(0)
                target.scalars.append(loss.detach().reshape(1))
            else:
                target.host_losses.append(float(loss))
            return
        if isinstance(loss, torch.Tensor):
            value = loss.detach()
            buf.add(
                ("s", 0, "sloss" if scaled else "loss"), value.reshape(()) if value.dim() else value
            )
        else:
            buf.host_losses.append(float(loss))

    # ----------------------------------------------------------------- steps and flushes
    def _finalize(self, partial: bool = False) -> None:
        buf = self._open
        self._stepped.clear()
        self._updates.discard()
        self._last_measured = None  # it holds the step's buffer
        self._scratch.clear()
        self._set_optional_hooks("detail", False)
        buf.drop_errors_of_other_passes()
        if not partial:  # its gradients were finite (checked with stop_on_nonfinite)
            self._known_masks.update(buf.neginf)
        if buf.has_grads or (partial and buf.forward_seen):
            packed = buf.pack()
            packed.partial = partial  # type: ignore[attr-defined]
            self._pending.append(packed)
            self.step = buf.step + 1
            self.steps_recorded += 1
        self._open = StepBuffer(self.step, self._is_detail(self.step))
        # Kept on from one detailed step to the next (mode "full"): attaching costs 70 µs.
        self._watch_accumulation(self._open.detail)
        # Flush at the start of the next step, so a loss logged after opt.step() still
        # reaches its step; the first step is flushed early to write the layer table.
        self._flush_due = bool(self._pending) and (
            self.steps_recorded == 1 or len(self._pending) >= self.flush_every
        )

    def flush(self) -> None:
        """Read the pending statistics back (one host sync) and write them to the store.

        Between ``optimizer.step()`` and the next forward, a step whose loss has not been
        logged yet stays pending: ``log()`` after the step still gives it its loss.
        """
        self._flush(hold_unlogged=True)

    def _flush(self, hold_unlogged: bool = False) -> None:
        self._flush_due = False
        held = self._pending.pop() if hold_unlogged and self._awaits_loss() else None
        try:
            self._write_pending()
        finally:
            if held is not None:
                self._pending.append(held)

    def _awaits_loss(self) -> bool:
        """Whether the step just closed may still get its loss: no loss yet, no forward since."""
        if not self._pending or self._open.forward_seen or self._open.stepped:
            return False
        last = self._pending[-1]
        return not last.host_losses and not any(k[2] in ("loss", "sloss") for k in last.keys)

    def _write_pending(self) -> None:
        if self._writer is None or (not self._pending and not self._layers_dirty):
            return
        if self.before_first_flush is not None:
            callback, self.before_first_flush = self.before_first_flush, None
            callback(self)
        pending = {p.step for p in self._pending}
        dead_layers = [i for i in self._unit_peak if self._last_act_step.get(i) in pending]
        # An eigendecomposition per recurrent matrix (40 ms for a 2-layer LSTM of 128):
        # measured with the detailed probes, not on every flush, nor in mode "grads".
        detailed = any(p.detail for p in self._pending)
        radius = self._recurrent_radii() if detailed else {}
        # Every unit's peak and each spectral radius ride along with the flush's one copy.
        peaks = [self._unit_peak[i] for i in dead_layers]
        extras = to_host(self._pending, peaks + list(radius.values()))
        if self._layouts_for != len(self._params):  # parameters joined: new layouts
            self._layouts.clear()
            self._layouts_for = len(self._params)
        tallies = tally_steps(
            self._pending,
            self._param_layer,
            self._param_numel,
            self._moment_derivatives,
            self._layouts,
        )
        once: list[tuple[int, int, str, float]] = []  # measured once per flush window
        for i, peak in zip(dead_layers, extras[: len(peaks)], strict=True):
            once.append((self._last_act_step[i], i, "dead_frac", _dead_fraction(peak)))
        if radius:
            last = self._pending[-1].step
            for i, value in zip(radius, extras[len(peaks) :], strict=True):
                once.append((last, i, "recurrent_radius", float(value[0])))
        for i in dead_layers:  # a step held back for its loss keeps its peaks for the next
            del self._unit_peak[i], self._last_act_step[i]
        for index, spread in relative_spread(tallies).items():
            if spread >= SPREAD_OUT:
                self._spread_out.add(index)
            else:
                self._spread_out.discard(index)
        partial = {p.step for p in self._pending if getattr(p, "partial", False)}
        self._write(tallies, partial, once)
        self._pending.clear()

    def _model_of(self, layer: Layer) -> str:
        return next((prefix for prefix, root in self._roots.items() if root is layer.root), "")

    def _safe_flush(self, hold_unlogged: bool = False) -> None:
        """Flush from inside the user's training loop: a failure of ours must not stop it."""
        try:
            self._flush(hold_unlogged)
        except Exception as exc:  # noqa: BLE001 - reported, never raised into training
            lost = len(self._pending)
            self._pending.clear()
            warnings.warn(
                f"gradwatch could not write {lost} step(s) to {self.run_dir}: {type(exc).__name__}: {exc}",
                GradwatchWarning,
                stacklevel=2,
            )

    def _recurrent_radii(self) -> dict[int, torch.Tensor]:
        radii = {}
        for layer in self.layers:
            if isinstance(layer.module, RECURRENT):
                value = recurrent_radius(layer.module)
                if value is not None:
                    radii[layer.index] = value
        return radii

    def _write(self, tallies: list[Tally], partial: set[int], once: list[tuple]) -> None:
        layers = (
            [
                LayerRow(
                    layer.index,
                    layer.name,
                    layer.type,
                    layer.kind,
                    self._exec_order.get(layer.index),
                    layer.fan_in,
                    sum(p.numel() for _, p in layer.params),
                    self._model_of(layer),
                )
                for layer in self.layers
                if layer.index not in self._dropped
            ]
            if self._layers_dirty
            else []
        )
        params = [
            (i, self._param_names[i], self._param_layer[i], "x".join(map(str, p.shape)), p.numel())
            for i, p in enumerate(self._params)
            if i >= self._written_params and self._param_layer[i] not in self._dropped
        ]
        self._written_params = len(self._params)
        self._layers_dirty = False
        steps: list[tuple] = []
        layer_rows: list[Iterable[tuple]] = []
        param_rows: list[Iterable[tuple]] = []
        kept: set[int] = set()
        for tally in tallies:
            keep, keep_params = self._step_rows(tally, partial, steps)
            kept.update(s for s, k in zip(tally.steps, keep.tolist(), strict=True) if k)
            dropped_layer = self._dropped_mask
            for block in tally.layer:
                layer_rows.append(_rows(tally.steps, block, keep, dropped_layer(block.ids)))
            if tally.bad_layers is not None:
                bad = tally.bad_layers
                flagged = Block("nonfinite", bad.ids, np.ones(bad.values.shape), bad.values)
                layer_rows.append(_rows(tally.steps, flagged, keep, dropped_layer(bad.ids)))
            for block in tally.param:
                layer_of = np.asarray(self._param_layer)[block.ids]
                param_rows.append(_rows(tally.steps, block, keep_params, dropped_layer(layer_of)))
        layer_rows.append(r for r in once if r[0] in kept and r[1] not in self._dropped)
        self._writer.write(layers, params, steps, chain(*layer_rows), chain(*param_rows))

    def _dropped_mask(self, layer_ids: np.ndarray) -> np.ndarray | None:
        if not self._dropped:
            return None
        return np.isin(layer_ids, list(self._dropped))

    def _step_rows(
        self, tally: Tally, partial: set[int], out: list[tuple]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Append the steps-table rows of one tally; return which steps keep their metric rows."""
        n = len(tally.steps)
        bad_layers, bad_params = tally.bad_layers, tally.bad_params
        layer_flags = _without(bad_layers, self._dropped_mask(bad_layers.ids), n)
        param_flags = (
            _without(
                bad_params, self._dropped_mask(np.asarray(self._param_layer)[bad_params.ids]), n
            )
            if bad_params is not None
            else np.zeros((n, 0), dtype=bool)
        )
        loss_bad = np.array(
            [x is not None and not math.isfinite(x) for x in tally.loss], dtype=bool
        )
        bad = layer_flags.any(axis=1) | param_flags.any(axis=1) | loss_bad
        steps = np.asarray(tally.steps)
        cut = np.isin(steps, list(partial))
        keep = bad | cut | (steps % self.every == 0)
        detail = np.asarray(tally.detail, dtype=bool)
        act_mean = tally.layer_block("act_mean")
        order = self._exec_order
        for s in np.flatnonzero(keep).tolist():
            first = names = None
            if bad[s]:
                self.nonfinite_steps.append(tally.steps[s])
                forward = set(act_mean.ids[~np.isfinite(act_mean.values[s])].tolist())
                layers = [i for i in bad_layers.ids[layer_flags[s]].tolist() if i in forward]
                first = min(layers, key=lambda i: order.get(i, 1 << 30), default=None)
                if bad_params is not None:
                    names = [self._param_names[i] for i in bad_params.ids[param_flags[s]].tolist()]
            out.append(
                (
                    tally.steps[s],
                    tally.loss[s],
                    int(detail[s]),
                    int(cut[s]),
                    int(bad[s]),
                    self.layers[first].name if first is not None else None,
                    _json_list(names or []),
                    int(loss_bad[s]),
                )
            )
        # Per-parameter rows on detailed steps and non-finite ones; per-layer rows on every kept step.
        return keep, keep & (detail | bad)

    def close(self, *, error: BaseException | None = None) -> None:
        """Remove every hook, record the last step and close the store. Safe to call twice."""
        if self._closed:
            return
        try:
            if self._open.has_grads or (error is not None and self._open.forward_seen):
                self._finish_manual_update()
                self._finalize(partial=error is not None and not self._open.stepped)
            self._safe_flush()
        finally:
            self._closed = True
            self._remove_hooks()
            if self._writer is not None:
                status = "ok" if error is None else f"error: {type(error).__name__}"
                self._writer.set_meta(
                    {
                        "status": status,
                        "ended": datetime.now().isoformat(timespec="seconds"),
                        "steps": self.steps_recorded,
                        "optimizers": len(self._optimizers),
                        "scaler_skips": self.scaler_skips,
                    }
                )
                self._writer.close()
                self._writer = None

    def _remove_hooks(self) -> None:
        self._detach_optional_hooks()
        self._watch_accumulation(False)
        for handle in self._handles + [h for hs in self._root_handles.values() for h in hs]:
            handle.remove()
        self._handles.clear()
        self._root_handles.clear()

    def diagnose(self):
        """Flush and diagnose what has been recorded so far (see :func:`gradwatch.diagnose`)."""
        from .diagnose import diagnose

        if not self._closed:
            self._safe_flush(hold_unlogged=True)
        return diagnose(self.run_dir)

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.close(error=exc)

    def __repr__(self) -> str:
        return f"Watcher(run_dir={str(self.run_dir)!r}, layers={len(self.layers)}, step={self.step}, mode={self.mode!r})"


def _as_list(optimizer: Any) -> list:
    if optimizer is None:
        return []
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    items = list(optimizer)
    for opt in items:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer= takes torch.optim.Optimizer objects; got {type(opt).__name__}"
            )
    return items


def _dead_fraction(peak: np.ndarray) -> float:
    """The fraction of units whose largest output over the window is not above zero.

    A unit whose output was NaN at some step has a NaN peak: neither dead nor alive,
    it is left out (NaN when every unit is), not counted as dead.

    Example:
        >>> _dead_fraction(np.array([0.0, 2.0, np.nan])), _dead_fraction(np.array([np.nan]))
        (0.5, nan)
    """
    known = ~np.isnan(peak)
    if not known.any():
        return math.nan
    return float((peak[known] <= 0).mean())


def _finite_on_host(tensor: torch.Tensor) -> bool:
    """Whether a CPU tensor holds no inf or NaN: its sum, read back.

    The same test as a hooked layer's (:func:`output_sum`, which overflows only past
    float32's range). A torch sum costs less here than a numpy or float64 one:
    between two training kernels, code pays to bring itself back into the caches,
    and torch's is warm.
    """
    return math.isfinite(output_sum(tensor).item())


def _without(block: Block, dropped: np.ndarray | None, n: int) -> np.ndarray:
    """A block's flags with dropped ids cleared."""
    flags = block.values.astype(bool).reshape(n, len(block.ids))
    return flags if dropped is None else flags & ~dropped[None, :]


def _rows(
    steps: Sequence[int], block: Block, keep: np.ndarray, dropped: np.ndarray | None
) -> Iterable[tuple[int, int, str, float]]:
    """(step, id, metric, value) rows of a block, for kept steps, measured entries and live ids."""
    mask = keep[:, None] if block.mask is None else block.mask & keep[:, None]
    if dropped is not None:
        mask = mask & ~dropped[None, :]
    mask = np.broadcast_to(mask, block.values.shape)
    s, j = np.nonzero(mask)
    return zip(
        np.asarray(steps)[s].tolist(),
        block.ids[j].tolist(),
        repeat(block.metric, len(s)),
        block.values[s, j].tolist(),
        strict=True,
    )


def _json_list(items: list[str]) -> str | None:
    return json.dumps(items) if items else None


def watch(
    model: nn.Module | Iterable[nn.Module] | Mapping[str, nn.Module],
    optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
    *,
    run: str | os.PathLike | None = None,
    every: int = 1,
    flush_every: int = 50,
    detail: int | Callable[[int], bool] | None = None,
    mode: str = "default",
    scaler: Any = None,
    stop_on_nonfinite: bool = False,
    overwrite: bool = False,
) -> Watcher:
    """Watch a model's training: per-layer gradients, errors, activations, updates, non-finite values.

    Use it as a context manager (hooks are removed on exit, also when the body
    raises) or call ``.close()`` yourself.

    Args:
        model: the model, a list of models, or a dict name -> model.
        optimizer: one optimizer or several. Without one, each backward pass is a step.
        run: the run directory (default ``./gradwatch-runs/<time>-run-<pid>``).
        every: store a step row every N steps (non-finite steps are always stored).
        flush_every: steps between host syncs / store writes.
        detail: when the detailed probes run: an int N (``Schedule(every=N)``: the
            first 10 steps, every 10th up to step 99, then every N-th) or a callable
            step -> bool. Default: ``Schedule()``, N = 100.
        mode: "default"; "grads" (gradient norms only, the cheapest); "full" (every
            probe on every step).
        scaler: an AMP GradScaler, so that error norms and losses are reported unscaled.
        stop_on_nonfinite: raise :class:`NonFiniteError` at the first NaN or +inf in a
            module's output, naming the module, or at the first inf/NaN gradient, naming
            the parameter. An output with -inf and neither NaN nor +inf does not stop
            training: it is how logits are masked. If the loss does not absorb it, the
            gradients turn non-finite and stop it; a NaN it causes later in the same
            forward names the module that produced the -inf. This syncs with the device
            every step.
        overwrite: replace a run already stored at ``run``. Without it, a store there
            that holds steps or layers raises :class:`gradwatch.RunExistsError`
            (a ``FileExistsError``), so that two runs never mix in one store.

    Returns:
        The :class:`Watcher`.

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> import gradwatch
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> opt = torch.optim.Adam(model.parameters())
        >>> with gradwatch.watch(model, opt, run=tempfile.mkdtemp()) as w:
        ...     for _ in range(5):
        ...         loss = model(torch.randn(32, 4)).pow(2).mean()
        ...         opt.zero_grad(); loss.backward(); opt.step()
        ...         w.log(loss=loss)
        >>> w.steps_recorded
        5
    """
    return Watcher(
        model,
        optimizer,
        run=run,
        every=every,
        flush_every=flush_every,
        detail=detail,
        mode=mode,
        scaler=scaler,
        stop_on_nonfinite=stop_on_nonfinite,
        overwrite=overwrite,
    )
