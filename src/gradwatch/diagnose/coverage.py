"""Coverage: say so when the forward passes went unseen, so silence is not read as health.

The activation, error and non-finite probes run in forward hooks. A model compiled with
``torch.compile`` runs its hooks inside the compiled graph, where gradwatch does not
measure, and a training forward under ``no_grad`` or in eval mode is not watched. Then
only gradient norms and updates are recorded, and the rules that read errors along the
depth (vanishing, exploding) have nothing to judge.
"""

from __future__ import annotations

from .findings import Finding
from .profile import RunView


def check(view: RunView) -> list[Finding]:
    if not len(view.steps) or view.run.meta.get("mode") == "grads":
        return []
    if any(info.exec_order is not None for info in view.info):
        return []
    summary = (
        f"No forward pass was measured over {len(view.steps)} steps: only gradient norms and "
        "updates were recorded, so vanishing and exploding errors along the depth could not be "
        "judged. A torch.compile'd model runs its hooks inside the compiled graph; watch the "
        "model uncompiled to diagnose it."
    )
    steps = view.steps
    evidence = {"layers": len(view.info), "steps": len(steps)}
    return [Finding("unmeasured", "info", [], int(steps[0]), int(steps[-1]), summary, evidence)]
