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
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from . import __version__
from .layers import RECTIFYING, RECURRENT, Layer, discover_layers, named_roots
from .probes.activations import SATURATION_LEVEL, moments, output_sum, relative_derivative, unit_max
from .probes.grads import grad_norms, vector_norm, zero_counts
from .probes.numerics import NonFiniteError
from .probes.recurrent import recurrent_radius
from .probes.updates import UpdateProbe
from .record import PackedStep, StepBuffer, aggregate, to_host
from .schedule import as_schedule
from .store import LayerRow, RunWriter

MODES = ("default", "grads", "full")


class GradwatchWarning(UserWarning):
    """Something went wrong inside gradwatch; training goes on."""


def default_run_dir(name: str = "run") -> Path:
    """A fresh directory under ./gradwatch-runs named by time and process."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("gradwatch-runs") / f"{stamp}-{name}-{os.getpid()}"


def _compiling() -> bool:
    """Inside a torch.compile trace, hooks stay out: Python-side bookkeeping would break the graph."""
    return torch.compiler.is_compiling()


def _first_tensor(output: Any) -> torch.Tensor | None:
    if type(output) is torch.Tensor:  # the common case, without flattening a pytree
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
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if every < 1 or flush_every < 1:
            raise ValueError(
                f"every and flush_every must be >= 1; got every={every}, flush_every={flush_every}"
            )
        self.mode = mode
        self.every = every
        self.flush_every = flush_every
        self.stop_on_nonfinite = stop_on_nonfinite
        self._schedule = (lambda step: True) if mode == "full" else as_schedule(detail)
        self.run_dir = Path(run) if run is not None else default_run_dir()
        self._writer: RunWriter | None = RunWriter(self.run_dir)
        self._writer.set_meta(
            {
                "gradwatch_version": __version__,
                "torch_version": torch.__version__,
                "mode": mode,
                "started": datetime.now().isoformat(timespec="seconds"),
                "status": "running",
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
        self._dropped: set[int] = set()
        self.before_first_flush: Callable[[Watcher], None] | None = None
        self._root_of: dict[int, nn.Module] = {}
        self._optimizers: list[torch.optim.Optimizer] = []
        self._expected: set[int] = set()
        self._stepped: set[int] = set()
        self._closure: dict[int, bool] = {}
        self._opt_params: dict[int, tuple[int, list[int]]] = {}
        self._scalers: weakref.WeakSet = weakref.WeakSet()
        self._updates = UpdateProbe()
        self._manual_snapshot = False
        self._callback_queued = False
        self._flush_due = False
        self._alive: dict[int, torch.Tensor] = {}
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
        if scaler is not None:
            self._scalers.add(scaler)
        if model is not None:
            self.add_model(model)
        for opt in _as_list(optimizer):
            self.add_optimizer(opt)

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
                if self.mode != "grads":
                    handles.append(layer.module.register_forward_hook(self._make_layer_hook(layer)))
            handles.append(root.register_forward_pre_hook(self._root_pre_hook))
            handles.append(root.register_forward_hook(self._root_post_hook))
        self._layers_dirty = True

    def drop_model(self, prefix: str) -> None:
        """Stop watching a model (before anything of it was written): hooks off, layers out."""
        for handle in self._root_handles.pop(prefix, []):
            handle.remove()
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
            self._handles.append(optimizer.register_step_pre_hook(self.on_step_begin))
            self._handles.append(optimizer.register_step_post_hook(self.on_step_end))

    def add_scaler(self, scaler: Any) -> None:
        """Tell the watcher about an AMP ``GradScaler`` so it can report unscaled values."""
        self._scalers.add(scaler)

    def owns(self, module: nn.Module) -> bool:
        return any(module is r for r in self._roots.values()) or id(module) in {
            id(layer.module) for layer in self.layers
        }

    # ----------------------------------------------------------------- hooks
    def _is_detail(self, step: int) -> bool:
        return self.mode != "grads" and bool(self._schedule(step))

    def _training(self, root: nn.Module) -> bool:
        return torch.is_grad_enabled() and root.training

    def _root_pre_hook(self, module: nn.Module, args: Any) -> None:
        if self._closed or _compiling() or not self._training(module):
            return
        if self._open.backward_done and not self._optimizers:
            # A hand-written update happened since the last backward: that step is over.
            self._finish_manual_update()
            self._finalize()
        if self._flush_due:
            self._safe_flush()
        self._open.forward_seen = True

    def _root_post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._closed or self._optimizers or _compiling() or not self._training(module):
            return  # with an optimizer, its step marks the step; no need to find backward's end
        out = _first_tensor(output)
        if out is not None and out.requires_grad:
            out.register_hook(self._arm_backward_end)

    def _arm_backward_end(self, grad: torch.Tensor) -> None:
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)

    def _on_backward_end(self) -> None:
        """Runs once each backward pass has finished (queued on the autograd engine)."""
        self._callback_queued = False
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

    def _make_layer_hook(self, layer: Layer) -> Callable:
        index, name, root = layer.index, layer.name, layer.root
        derivative = relative_derivative(layer.module, layer.kind)
        fsum_key = ("l", index, "fsum")
        rectifier = isinstance(layer.module, tuple(RECTIFYING))

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._closed or _compiling() or not torch.is_grad_enabled() or not root.training:
                return
            out = _first_tensor(output)
            if out is None:
                return
            if index not in self._exec_order:
                self._exec_order[index] = len(self._exec_order)
                self._layers_dirty = True
            buf = self._open
            n = out.numel()
            total = output_sum(out)
            buf.keys.append(fsum_key)  # StepBuffer.add, inlined: this runs for every layer call
            buf.values.append(total)
            buf.counts.append(n)
            if self.stop_on_nonfinite and not bool(torch.isfinite(total)):  # host sync, opt-in
                raise NonFiniteError(name, buf.step, "forward output")
            if not buf.detail:
                return
            var, mean = moments(out)
            buf.add(("l", index, "fmean"), mean, n)
            buf.add(("l", index, "fvar"), var, n)
            if derivative is not None:
                slope = derivative(out.detach().float())
                buf.add(("l", index, "sat"), (slope < SATURATION_LEVEL).sum(), n)
                buf.add(("l", index, "dsum"), slope.sum(), n)
            if rectifier:
                buf.add(("l", index, "zero"), (out.detach() == 0).sum(), n)
                self._track_alive(index, out)
            for leaf in tree_leaves(output):
                if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                    leaf.register_hook(self._make_error_hook(index))

        return hook

    def _make_error_hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def on_grad(grad: torch.Tensor) -> None:
            self._open.add(("l", index, "err"), vector_norm(grad))

        return on_grad

    def _track_alive(self, index: int, out: torch.Tensor) -> None:
        peak = unit_max(out) > 0
        alive = self._alive.get(index)
        if alive is None or alive.shape != peak.shape:
            self._alive[index] = peak
        else:
            alive.logical_or_(peak)
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

    def _grad_entries(self, indices: Iterable[int]) -> tuple[list, list[torch.Tensor]]:
        idx = [i for i in indices if self._params[i].grad is not None]
        order, norms = grad_norms(idx, [self._params[i].grad for i in idx])
        keys = [("p", i, "gnorm") for i in order]
        if self.stop_on_nonfinite and norms:
            bad = ~torch.isfinite(torch.stack(norms))
            if bool(bad.any()):  # host sync, opt-in
                first = order[int(bad.nonzero()[0, 0])]
                raise NonFiniteError(self._param_names[first], self._open.step, "gradient")
        return keys, norms

    def _record_grads(self, indices: list[int]) -> None:
        buf = self._open
        keys, norms = self._grad_entries(indices)
        buf.extend(keys, norms)
        if buf.detail:
            idx = [k[1] for k in keys]
            buf.extend(
                [("p", i, "gzero") for i in idx], zero_counts([self._params[i].grad for i in idx])
            )

    def _add_updates(
        self, indices: list[int], update: list[torch.Tensor], weight: list[torch.Tensor]
    ) -> None:
        self._open.extend([("p", i, "unorm") for i in indices], update)
        self._open.extend([("p", i, "wnorm") for i in indices], weight)

    def _scale_for(self, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
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
        if key in self._stepped:
            self._finalize()  # this optimizer steps again: the last round is complete
        closure = bool(args and args[0] is not None) or kwargs.get("closure") is not None
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
        indices = self._model_params_of(optimizer)
        if self._closure.pop(key, False):
            self._record_grads(indices)
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
        if not (buf.forward_seen or buf.stepped) and self._pending:
            target = self._pending[-1]  # logged after the step closed
            code = "sloss" if scaled else "loss"
            if isinstance(loss, torch.Tensor):
                target.keys.append(("s", 0, code))
                target.counts.append(0)
                target.tensors.append(loss.detach().reshape(1).to(torch.float64))
            else:
                target.host_losses.append(float(loss))
            return
        if isinstance(loss, torch.Tensor):
            buf.add(("s", 0, "sloss" if scaled else "loss"), loss.detach())
        else:
            buf.host_losses.append(float(loss))

    # ----------------------------------------------------------------- steps and flushes
    def _finalize(self, partial: bool = False) -> None:
        buf = self._open
        self._stepped.clear()
        self._updates.discard()
        if buf.has_grads or (partial and buf.forward_seen):
            packed = buf.pack()
            packed.partial = partial  # type: ignore[attr-defined]
            self._pending.append(packed)
            self.step = buf.step + 1
            self.steps_recorded += 1
        self._open = StepBuffer(self.step, self._is_detail(self.step))
        # Flush at the start of the next step, so a loss logged after opt.step() still
        # reaches its step; the first step is flushed early to write the layer table.
        self._flush_due = bool(self._pending) and (
            self.steps_recorded == 1 or len(self._pending) >= self.flush_every
        )

    def flush(self) -> None:
        """Read the pending statistics back (one host sync) and write them to the store."""
        self._flush_due = False
        if self._writer is None or (not self._pending and not self._layers_dirty):
            return
        if self.before_first_flush is not None:
            callback, self.before_first_flush = self.before_first_flush, None
            callback(self)
        dead_layers = [i for i in self._alive if i in self._last_act_step]
        alive = [self._alive[i].float().mean() for i in dead_layers]
        radius = self._recurrent_radii() if self._pending else {}
        extras = to_host(
            self._pending, [torch.stack(t) for t in (alive, list(radius.values())) if t]
        )
        rows = [aggregate(p, self._param_layer, self._param_numel) for p in self._pending]
        by_step = {row.step: row for row in rows}
        if dead_layers:
            for i, frac in zip(dead_layers, extras.pop(0).tolist(), strict=True):
                row = by_step.get(self._last_act_step[i])
                if row is not None:
                    row.layer[(i, "dead_frac")] = 1.0 - frac
        if radius:
            for i, value in zip(radius, extras.pop(0).tolist(), strict=True):
                rows[-1].layer[(i, "recurrent_radius")] = value
        self._alive.clear()
        self._last_act_step.clear()
        self._write(rows, [getattr(p, "partial", False) for p in self._pending])
        self._pending.clear()

    def _model_of(self, layer: Layer) -> str:
        return next((prefix for prefix, root in self._roots.items() if root is layer.root), "")

    def _safe_flush(self) -> None:
        """Flush from inside the user's training loop: a failure of ours must not stop it."""
        try:
            self.flush()
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

    def _write(self, rows: list, partial: list[bool]) -> None:
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
        steps, lm, pm = [], [], []
        order = self._exec_order
        dropped = self._dropped
        for row, cut in zip(rows, partial, strict=True):
            if dropped:
                row.layer = {k: v for k, v in row.layer.items() if k[0] not in dropped}
                row.param = {
                    k: v for k, v in row.param.items() if self._param_layer[k[0]] not in dropped
                }
                row.nonfinite_layers = [i for i in row.nonfinite_layers if i not in dropped]
                row.nonfinite_params = [
                    i for i in row.nonfinite_params if self._param_layer[i] not in dropped
                ]
            forward_bad = [
                i
                for i in row.nonfinite_layers
                if not math.isfinite(row.layer.get((i, "act_mean"), 0.0))
            ]
            first = min(forward_bad, key=lambda i: order.get(i, 1 << 30), default=None)
            bad = bool(row.nonfinite_layers or row.nonfinite_params) or (
                row.loss is not None and not math.isfinite(row.loss)
            )
            if bad:
                self.nonfinite_steps.append(row.step)
            if not bad and not cut and row.step % self.every:
                continue
            steps.append(
                (
                    row.step,
                    row.loss,
                    int(row.detail),
                    int(cut),
                    int(bad),
                    self.layers[first].name if first is not None else None,
                    _json_list([self._param_names[i] for i in row.nonfinite_params]),
                    int(row.loss is not None and not math.isfinite(row.loss)),
                )
            )
            lm.extend((row.step, i, m, v) for (i, m), v in row.layer.items())
            pm.extend((row.step, i, m, v) for (i, m), v in row.param.items())
        self._writer.write(layers, params, steps, lm, pm)

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
            for handle in self._handles + [h for hs in self._root_handles.values() for h in hs]:
                handle.remove()
            self._handles.clear()
            self._root_handles.clear()
            if self._writer is not None:
                status = "ok" if error is None else f"error: {type(error).__name__}"
                self._writer.set_meta(
                    {
                        "status": status,
                        "ended": datetime.now().isoformat(timespec="seconds"),
                        "steps": self.steps_recorded,
                        "optimizers": len(self._optimizers),
                    }
                )
                self._writer.close()
                self._writer = None

    def diagnose(self):
        """Flush and diagnose what has been recorded so far (see :func:`gradwatch.diagnose`)."""
        from .diagnose import diagnose

        if not self._closed:
            self._safe_flush()
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
        detail: when the detailed probes run: an int N (every N steps after a 10-step
            warm-up) or a callable step -> bool. Default: ``Schedule()``.
        mode: "default"; "grads" (gradient norms only, the cheapest); "full" (every
            probe on every step).
        scaler: an AMP GradScaler, so that error norms and losses are reported unscaled.
        stop_on_nonfinite: raise :class:`NonFiniteError` at the first inf/NaN, naming the
            module. This syncs with the device every step.

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
    )
