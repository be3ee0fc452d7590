"""An independent reference for the watcher's metrics, built on plain autograd.

It copies every layer output as its hook sees it, catches the gradient of each with
a tensor hook, and clones weights around the optimizer step; then it computes each
metric in float64 with direct tensor math. A copy and a tensor hook, not the tensor
and ``retain_grad()``: a later in-place op (``ReLU(inplace=True)``) changes the
tensor, and ``retain_grad()`` follows it, while a tensor hook registered before the
change gets the gradient of the output the layer produced. It shares no code with
gradwatch: layers and parameter ownership are re-derived here.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

DERIVATIVE_OVER_MAX = {
    nn.Sigmoid: lambda y: y * (1 - y) / 0.25,
    nn.Tanh: lambda y: 1 - y * y,
}


def layer_modules(model: nn.Module) -> dict[str, nn.Module]:
    out, seen = {}, set()
    for name, m in model.named_modules():
        if id(m) in seen:
            continue
        seen.add(id(m))
        if next(m.parameters(recurse=False), None) is not None or next(m.children(), None) is None:
            out[name or "(root)"] = m
    return out


def owned_params(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    seen, out = set(), {}
    for name, m in layer_modules(model).items():
        ps = []
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                ps.append(p)
        out[name] = ps
    return out


class Reference:
    """Per-step reference metrics for one model; call the methods around each step."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = layer_modules(model)
        self.params = owned_params(model)
        # per layer, per call: its first float output as the hook saw it, and its gradients
        self.outputs: dict[str, list[tuple[torch.Tensor, list[torch.Tensor]]]] = defaultdict(list)
        self.rows: list[dict[tuple[str, str], float]] = []
        self._before: dict[str, list[torch.Tensor]] = {}
        self._handles = [m.register_forward_hook(self._keep(n)) for n, m in self.layers.items()]
        self.window_max: dict[str, torch.Tensor] = {}

    def _keep(self, name):
        def hook(module, args, output):
            if not torch.is_grad_enabled() or not self.model.training:
                return
            leaves = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]
            first = next(t for t in leaves if t.is_floating_point())
            grads: list[torch.Tensor] = []
            for t in leaves:
                if t.requires_grad:
                    t.register_hook(grads.append)
            self.outputs[name].append((first.detach().clone(), grads))

        return hook

    def before_step(self, scale: float = 1.0) -> None:
        """Read gradients, errors and activations; snapshot weights. Call right before opt.step()."""
        row: dict[tuple[str, str], float] = {}
        for name, module in self.layers.items():
            grads = [p.grad.double() for p in self.params[name] if p.grad is not None]
            if grads:
                row[(name, "grad_norm")] = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
                row[(name, "grad_zero_frac")] = float(
                    sum((g == 0).sum() for g in grads) / sum(g.numel() for g in grads)
                )
            calls = self.outputs.get(name, [])
            if calls:
                acts = torch.cat([first.detach().double().flatten() for first, _ in calls])
                row[(name, "act_mean")] = float(acts.mean())
                row[(name, "act_std")] = float(acts.std(correction=0))
                row[(name, "act_rms")] = float(acts.pow(2).mean().sqrt())
                slope = next(
                    (f for cls, f in DERIVATIVE_OVER_MAX.items() if isinstance(module, cls)), None
                )
                if slope is not None:
                    row[(name, "saturated_frac")] = float((slope(acts) < 0.01).double().mean())
                    row[(name, "act_derivative")] = float(slope(acts).mean())
                if isinstance(module, nn.ReLU):
                    row[(name, "zero_frac")] = float((acts == 0).double().mean())
                    for first, _ in calls:
                        t = first.detach()
                        dims = (
                            tuple(range(t.dim() - 1)) if t.dim() <= 3 else (0, *range(2, t.dim()))
                        )
                        peak = t.amax(dim=dims)
                        prev = self.window_max.get(name)
                        self.window_max[name] = peak if prev is None else torch.maximum(prev, peak)
                errs = [g.double().pow(2).sum() for _, grads in calls for g in grads]
                if errs:
                    row[(name, "error_norm")] = float(torch.sqrt(sum(errs))) / scale
                    row[(name, "error_rms")] = row[(name, "error_norm")] / acts.numel() ** 0.5
        self.rows.append(row)
        self.outputs.clear()
        self._before = {
            n: [p.detach().clone() for p in ps if p.grad is not None]
            for n, ps in self.params.items()
        }

    def after_step(self) -> None:
        row = self.rows[-1]
        for name, ps in self.params.items():
            before = self._before.get(name)
            if not before:
                continue
            after = [p.detach() for p in ps if p.grad is not None]
            du = torch.sqrt(
                sum(
                    (a.double() - b.double()).pow(2).sum()
                    for a, b in zip(after, before, strict=True)
                )
            )
            w = torch.sqrt(sum(b.double().pow(2).sum() for b in before))
            row[(name, "update_ratio")] = float(du / w)

    def dead_fractions(self) -> dict[str, float]:
        return {n: float((m <= 0).double().mean()) for n, m in self.window_max.items()}

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def compare(run, ref: Reference, metrics, rtol: float = 1e-5) -> list[str]:
    """Mismatches between the run store and the reference, as readable strings."""
    problems = []
    assert len(run.steps) == len(ref.rows), (len(run.steps), len(ref.rows))
    cols = {name: j for j, name in enumerate(run.layers)}
    for metric in metrics:
        if metric not in run.metrics:
            expected = [k for row in ref.rows for k in row if k[1] == metric]
            problems += [f"{metric} missing from the run for {k[0]}" for k in expected[:3]]
            continue
        mat = run.matrix(metric)
        for s, row in enumerate(ref.rows):
            for (name, m), expected in row.items():
                if m != metric:
                    continue
                got = mat[s, cols[name]]
                # The mean is compared against the scale of the activations, since a
                # mean near zero has no meaningful relative error.
                scale = row[(name, "act_rms")] if metric == "act_mean" else abs(expected)
                if not np.isclose(got, expected, rtol=0, atol=rtol * scale + 1e-30):
                    problems.append(f"step {s} {name} {metric}: got {got!r}, expected {expected!r}")
    return problems
