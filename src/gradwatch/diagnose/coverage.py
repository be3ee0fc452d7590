"""Coverage: say so when steps or forward passes went unseen, so silence is not read as health.

The activation, error and non-finite probes run in forward hooks. A model compiled with
``torch.compile`` runs its hooks inside the compiled graph, where gradwatch does not
measure, and a training forward under ``no_grad`` or in eval mode is not watched. Then
only gradient norms and updates are recorded, and the rules that read errors along the
depth (vanishing, exploding) have nothing to judge: for the whole model, or for the
layers concerned (reentrant activation checkpointing).
"""

from __future__ import annotations

from .findings import Finding
from .profile import RunView


def check(view: RunView) -> list[Finding]:
    if not len(view.steps):
        return [_no_steps()]
    if view.run.meta.get("mode") == "grads":
        return []
    if any(info.exec_order is not None for info in view.info):
        return _partly(view)
    summary = (
        f"No forward pass was measured over {len(view.steps)} steps: only gradient norms and "
        "updates were recorded, so vanishing and exploding errors along the depth could not be "
        "judged. A torch.compile'd model runs its hooks inside the compiled graph; watch the "
        "model uncompiled to diagnose it."
    )
    steps = view.steps
    evidence = {"layers": len(view.info), "steps": len(steps)}
    return [Finding("unmeasured", "info", [], int(steps[0]), int(steps[-1]), summary, evidence)]


def _no_steps() -> Finding:
    """A run without a single recorded step: silence there is not health.

    A script that exited before training (``--help``, a failed argument check) or that
    never stepped an optimizer nor ran a backward pass leaves an empty store.
    """
    summary = (
        "No training step was recorded, so nothing could be judged: gradwatch counts one step "
        "per optimizer step, or per backward pass where no optimizer steps."
    )
    return Finding("unmeasured", "info", [], None, None, summary, {"steps": 0})


def _partly(view: RunView) -> list[Finding]:
    """Layers that got gradients but whose forward was never measured, beside ones that were.

    Reentrant activation checkpointing runs the real forward under ``no_grad`` and the
    recomputation inside backward, neither of which is a measured training forward.
    """
    grad = view.m("grad_norm")
    missing = [
        j
        for j, info in enumerate(view.info)
        if info.n_params and info.exec_order is None and (grad[:, j] > 0).any()
    ]
    if not missing:
        return []
    names = [view.names[j] for j in missing]
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    summary = (
        f"The forward pass of {shown} was never measured, though they got gradients: their "
        "errors and activations are missing, and the depth rules judged the other layers only. "
        "A forward run under no_grad (reentrant activation checkpointing does) is not measured."
    )
    steps = view.steps
    evidence = {"unmeasured_layers": names}
    return [Finding("unmeasured", "info", names, int(steps[0]), int(steps[-1]), summary, evidence)]
