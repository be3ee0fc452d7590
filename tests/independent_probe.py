"""An independent measurement of a training script, made with torch's own global hooks.

It does not import gradwatch: it is the reference the scenario labels are checked against.
While the script runs as ``__main__`` it records, keyed by backward pass (``Probe.step``
counts ``Tensor.backward`` calls on scalars):

* for every module output that needs a gradient, the backpropagated error dL/d(output) as a
  norm per sample (Frobenius norm / sqrt(batch size)), from a tensor hook that a global
  forward hook registers;
* for Tanh/Sigmoid outputs, the fraction whose derivative is below 1% of its maximum; for
  ReLU outputs, the fraction of units that are zero for every sample of the batch;
* the first non-finite value: in a module output, the loss, an error or a parameter gradient;
* per optimizer step, each module's gradient norm and update-to-weight ratio;
* every scalar that ``.backward()`` is called on (the loss).

Inside a ``torch.compile``d module the forward hook does nothing: measuring there would break
the graph (or make dynamo recompile until it gives up and runs eagerly), so a compiled model
is seen only through its losses, gradients and updates.

Module names are those of ``named_modules()`` of the model an optimizer trains: the largest
``nn.Module`` among the script's globals whose parameters contain the optimizer's (prefixed
with its index when optimizers train different models). All hooks are removed at the end.

``python tests/independent_probe.py scenarios/*.py`` prints the evidence for each script.
"""

from __future__ import annotations

import math
import runpy
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    return []


def saturated_fraction(module: nn.Module, y: torch.Tensor) -> float:
    """Fraction of outputs whose derivative is below 1% of the activation's maximum slope."""
    y = y.detach().float()
    if isinstance(module, nn.Tanh):
        return ((1 - y * y) < 0.01).float().mean().item()  # tanh' = 1 - y^2, max 1
    return ((y * (1 - y)) < 0.0025).float().mean().item()  # sigmoid' = y(1 - y), max 1/4


def dead_fraction(y: torch.Tensor) -> float:
    """Fraction of units (channels of a 4-d map, else the last dim) that are 0 for the whole batch."""
    y = y.detach()
    units = y.transpose(0, 1).flatten(1) if y.dim() == 4 else y.reshape(-1, y.shape[-1]).T
    return (units == 0).all(dim=1).float().mean().item()


class Probe:
    def __init__(self) -> None:
        self.step = 0
        self.losses: list[float] = []
        self.loss_owner: list[int] = []  # index of the optimizer whose step used each loss
        self.order: list[nn.Module] = []  # modules in first-call order
        self._err_sq = defaultdict(lambda: defaultdict(float))
        self._err_n = defaultdict(lambda: defaultdict(int))
        self._saturated = defaultdict(list)
        self._dead = defaultdict(list)
        self.first_nonfinite = None  # (forward|loss|backward|grad, step, module or None)
        self.first_forward_nonfinite = None  # (step, module, dtype)
        self.optimizers: list[torch.optim.Optimizer] = []
        self.initial_params: list[list[torch.Tensor]] = []  # per optimizer, before its 1st step
        self._grad_sq: dict[int, float] = {}
        self._before: dict[int, torch.Tensor] = {}
        self._grad = defaultdict(dict)  # id(param) -> {step: norm}
        self._ratio = defaultdict(dict)  # id(param) -> {step: |dW| / |W|}
        self.opt_steps = 0
        self.compiled_graphs = 0  # graphs torch.compile (dynamo) produced during the run
        self.seconds = 0.0
        self.error: BaseException | None = None
        self.globals: dict = {}
        self.models: list[nn.Module] = []
        self._names: dict[int, str] = {}

    # ------------------------------------------------------------------ hooks
    def _nonfinite(self, where: str, module) -> None:
        if self.first_nonfinite is None:
            self.first_nonfinite = (where, self.step, module)

    def forward_hook(self, module, args, output) -> None:
        if torch.compiler.is_compiling():
            return  # inside a torch.compile graph: observing would break the graph (see above)
        if not torch.is_grad_enabled() or not module.training:
            return  # teachers under no_grad and evaluation passes are not training
        outs = [t for t in _tensors(output) if t.is_floating_point()]
        if not outs:
            return
        if module not in self.order:
            self.order.append(module)
        y = outs[0]
        if not torch.isfinite(y).all():
            self._nonfinite("forward", module)
            if self.first_forward_nonfinite is None:
                self.first_forward_nonfinite = (self.step, module, y.dtype)
        if isinstance(module, (nn.Tanh, nn.Sigmoid)):
            self._saturated[module].append(saturated_fraction(module, y))
        if isinstance(module, nn.ReLU) and y.dim() >= 2:
            self._dead[module].append(dead_fraction(y))
        if y.requires_grad:
            y.register_hook(lambda g, m=module: self._error(m, g))

    def _error(self, module, grad: torch.Tensor) -> None:
        g = grad.detach().float()
        if not torch.isfinite(g).all():
            self._nonfinite("backward", module)
        self._err_sq[module][self.step] += g.pow(2).sum().item()
        self._err_n[module][self.step] += g.shape[0] if g.dim() else 1

    def wrap_backward(self, original):
        def backward(tensor, *args, **kwargs):
            if tensor.numel() != 1:
                return original(tensor, *args, **kwargs)
            value = tensor.detach().float().item()
            if not math.isfinite(value):
                self._nonfinite("loss", None)
            self.losses.append(value)
            self.loss_owner.append(-1)
            try:
                return original(tensor, *args, **kwargs)
            finally:
                self.step += 1

        return backward

    @staticmethod
    def _params(opt) -> list[torch.Tensor]:
        return [p for g in opt.param_groups for p in g["params"]]

    def opt_pre(self, opt, args, kwargs) -> None:
        if not any(opt is o for o in self.optimizers):
            self.optimizers.append(opt)
            self.initial_params.append([p.detach().clone() for p in self._params(opt)])
        index = next(i for i, o in enumerate(self.optimizers) if o is opt)
        for i in range(len(self.loss_owner) - 1, -1, -1):  # the losses since the last step
            if self.loss_owner[i] != -1:
                break
            self.loss_owner[i] = index
        self._grad_sq.clear()
        for p in self._params(opt):
            if p.grad is not None:
                self._before[id(p)] = p.detach().float().clone()
                self._grad_sq[id(p)] = p.grad.detach().float().pow(2).sum().item()
                if not math.isfinite(self._grad_sq[id(p)]):
                    self._nonfinite("grad", None)

    def opt_post(self, opt, args, kwargs) -> None:
        step = self.step - 1  # the backward pass these gradients came from
        for p in self._params(opt):
            if id(p) in self._grad_sq:
                before = self._before.pop(id(p))
                w = before.norm().item()
                self._grad[id(p)][step] = math.sqrt(self._grad_sq[id(p)])
                dw = (p.detach().float() - before).norm().item()
                self._ratio[id(p)][step] = dw / w if w > 0 else math.inf
        self.opt_steps += 1

    # ------------------------------------------------------------------ names
    def resolve_names(self) -> None:
        for opt in self.optimizers:
            wanted = {id(p) for p in self._params(opt)}
            owners = [
                v
                for v in self.globals.values()
                if isinstance(v, nn.Module)
                and not hasattr(v, "_orig_mod")  # a torch.compile wrapper: name what it wraps
                and wanted <= {id(p) for p in v.parameters()}
            ]
            if owners:
                model = max(owners, key=lambda m: sum(p.numel() for p in m.parameters()))
                if not any(model is m for m in self.models):
                    self.models.append(model)
        for i, model in enumerate(self.models):
            prefix = f"{i}:" if len(self.models) > 1 else ""
            for name, module in model.named_modules():
                self._names.setdefault(id(module), prefix + name)

    def name(self, module) -> str | None:
        return None if module is None else self._names.get(id(module))

    # ------------------------------------------------------------------ views
    def layers(self) -> list[nn.Module]:
        """Named modules (not the root) with parameters of their own, in execution order."""
        return [
            m
            for m in self.order
            if self.name(m) and next(m.parameters(recurse=False), None) is not None
        ]

    def error_norm(self) -> dict[str, dict[int, float]]:
        """Per-sample norm of dL/d(output) for each layer, per backward pass."""
        out = {}
        for m in self.layers():
            sq, n = self._err_sq.get(m), self._err_n.get(m)
            if sq:
                out[self.name(m)] = {s: math.sqrt(sq[s] / n[s]) for s in sorted(sq)}
        return out

    def module_series(self, which: str) -> dict[str, dict[int, float]]:
        """Per-layer gradient norm ('grad') or largest update-to-weight ratio ('ratio')."""
        store = self._grad if which == "grad" else self._ratio
        out: dict[str, dict[int, float]] = {}
        for model in self.models:
            for module in model.modules():
                name = self.name(module)
                for p in module.parameters(recurse=False):
                    for s, v in store.get(id(p), {}).items():
                        d = out.setdefault(name, {})
                        d[s] = (
                            math.hypot(d.get(s, 0.0), v)
                            if which == "grad"
                            else max(d.get(s, 0.0), v)
                        )
        return out

    def param_series(self, param: torch.Tensor, which: str = "grad") -> dict[int, float]:
        """One parameter's gradient norm ('grad') or update-to-weight ratio ('ratio') per step."""
        return dict((self._grad if which == "grad" else self._ratio).get(id(param), {}))

    def saturated(self) -> dict[str, list[float]]:
        return {self.name(m): v for m, v in self._saturated.items() if self.name(m) is not None}

    def dead(self) -> dict[str, list[float]]:
        return {self.name(m): v for m, v in self._dead.items() if self.name(m) is not None}


def _dynamo_graphs() -> int:
    dynamo = sys.modules.get("torch._dynamo.utils")  # only if something compiled already
    return dynamo.counters["stats"]["unique_graphs"] if dynamo else 0


def run(path: str | Path, threads: int | None = 1) -> Probe:
    """Run ``path`` as ``__main__`` under a new Probe; always remove every hook and wrapper.

    ``threads`` pins torch's intra-op threads for the run (restored after): the scripts are
    tiny, and on a busy machine spinning worker threads only slow them down.
    """
    probe, path = Probe(), Path(path)
    saved_argv, saved_path, saved_threads = sys.argv[:], sys.path[:], torch.get_num_threads()
    original_backward = torch.Tensor.backward
    handles = [
        register_module_forward_hook(probe.forward_hook),
        register_optimizer_step_pre_hook(probe.opt_pre),
        register_optimizer_step_post_hook(probe.opt_post),
    ]
    start, graphs = time.perf_counter(), _dynamo_graphs()
    try:
        torch.Tensor.backward = probe.wrap_backward(original_backward)
        sys.argv = [str(path)]
        sys.path.insert(0, str(path.parent))
        if threads:
            torch.set_num_threads(threads)
        probe.globals = runpy.run_path(str(path), run_name="__main__")
    except Exception as exc:  # keep what was measured; the caller decides
        probe.error = exc
    finally:
        probe.seconds = time.perf_counter() - start
        probe.compiled_graphs = _dynamo_graphs() - graphs
        torch.Tensor.backward = original_backward
        for h in handles:
            h.remove()
        sys.argv, sys.path[:] = saved_argv, saved_path
        torch.set_num_threads(saved_threads)
    probe.resolve_names()
    return probe


# ---------------------------------------------------------------------- evidence
def median(values) -> float:
    values = [v for v in values if math.isfinite(v)]
    return statistics.median(values) if values else math.nan


def depth_ratio(probe: Probe, first: str | None = None, steps: int = 20) -> float:
    """Median over the first `steps` backward passes of error(first layer) / error(last layer).

    Passes where either error is zero or non-finite are skipped.
    """
    err = probe.error_norm()
    names = list(err)
    a, b = err[first or names[0]], err[names[-1]]
    ratios = [
        a[s] / b[s]
        for s in sorted(set(a) & set(b))[:steps]
        if a[s] > 0 and b[s] > 0 and math.isfinite(a[s] / b[s])
    ]
    return median(ratios)


def depth_spread(probe: Probe, which: str = "error") -> float:
    """Median over backward passes of max/min across layers of the error norm ('error') or,
    where errors cannot be observed (inside a compiled graph), of the gradient norm ('grad')."""
    series = probe.error_norm() if which == "error" else probe.module_series("grad")
    per_step = defaultdict(list)
    for values in series.values():
        for s, v in values.items():
            per_step[s].append(v)
    spreads = [max(v) / min(v) for v in per_step.values() if len(v) > 1 and min(v) > 0]
    return median(spreads)


def grad_spike(probe: Probe, name: str, window: int = 20) -> tuple[float, int | None]:
    """Largest finite gradient norm of `name` over the median of its previous `window` steps."""
    series = sorted(probe.module_series("grad").get(name, {}).items())
    best, at = 0.0, None
    for i in range(3, len(series)):
        base = median([v for _, v in series[max(0, i - window) : i]])
        s, v = series[i]
        if math.isfinite(v) and base > 0 and v / base > best:
            best, at = v / base, s
    return best, at


def loss_drop(probe: Probe, owner: int = 0, k: int = 5) -> float:
    """Mean of the last k losses of one optimizer over the mean of its first k."""
    losses = [v for v, o in zip(probe.losses, probe.loss_owner, strict=True) if o == owner]
    return statistics.fmean(losses[-k:]) / statistics.fmean(losses[:k])


def worst(fractions: dict[str, list[float]]) -> tuple[float, str | None]:
    """The highest per-layer median fraction and its layer."""
    if not fractions:
        return 0.0, None
    name = max(fractions, key=lambda n: median(fractions[n]))
    return median(fractions[name]), name


def evidence(probe: Probe) -> dict:
    """The headline numbers, for a person to read."""
    first, err = probe.first_nonfinite, probe.error_norm()
    spikes = {n: grad_spike(probe, n) for n in probe.module_series("grad")}
    top = max(spikes, key=lambda n: spikes[n][0], default=None)
    return {
        "seconds": round(probe.seconds, 1),
        "steps": probe.opt_steps,
        "loss": (round(probe.losses[0], 4), round(probe.losses[-1], 4)) if probe.losses else None,
        "first_nonfinite": first and (first[0], first[1], probe.name(first[2])),
        "error_first/last": f"{depth_ratio(probe):.3g}" if len(err) > 1 else None,
        "error_spread": f"{depth_spread(probe) if err else depth_spread(probe, 'grad'):.3g}",
        "top_grad_spike": top and (top, f"{spikes[top][0]:.3g}", spikes[top][1]),
        "saturated": worst(probe.saturated()),
        "dead": worst(probe.dead()),
    }


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(Path(arg).name, evidence(run(arg)), flush=True)
