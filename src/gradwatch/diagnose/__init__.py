"""Diagnosis: rules over the run store that say which layer fails, since when, why, and what to change.

Each rule lives in its own module and turns a :class:`RunView` into findings. The
rules measure pathologies; :func:`diagnose` then grades them by harm (an ``error``
when the loss stalls, diverges or turns non-finite while the pathology holds, a
``warning`` when the pathology is clear but harm is not shown) and attaches the
remedies that answer each finding's causes, best first. A loss plateau beside healthy
gradients is a note, not harm (see :func:`.loss_plateau.grade`).
"""

from __future__ import annotations

from pathlib import Path

from ..store import Run, open_run
from . import (
    coverage,
    dead_units,
    exploding,
    loss_divergence,
    loss_plateau,
    nonfinite,
    saturation,
    update_ratio,
    vanishing,
)
from .causes import remedies_for
from .findings import Cause, Finding, Remedy, Report
from .profile import RunView

RULES = [
    nonfinite,
    exploding,
    vanishing,
    saturation,
    dead_units,
    update_ratio,
    loss_plateau,
    loss_divergence,
    coverage,
]
HARM = {"loss_plateau", "loss_divergence", "nonfinite"}
PATHOLOGIES = {"vanishing_gradient", "exploding_gradient", "saturation", "dead_units"}


def diagnose(run: Run | str | Path) -> Report:
    """Diagnose a run: a :class:`Report` whose findings say what fails, where, since when and why.

    Args:
        run: an open :class:`Run`, or the path of a run directory or its ``run.sqlite``.

    Example:
        >>> import tempfile, torch, gradwatch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.05)
        >>> x = torch.randn(64, 8); y = x.sum(1, keepdim=True)
        >>> with gradwatch.watch(model, opt, run=tempfile.mkdtemp()) as w:
        ...     for _ in range(40):
        ...         loss = nn.functional.mse_loss(model(x), y)
        ...         opt.zero_grad(); loss.backward(); opt.step(); w.log(loss=loss)
        >>> gradwatch.diagnose(w.run_dir).healthy
        True
    """
    if not isinstance(run, Run):
        with open_run(run) as opened:
            return diagnose(opened)
    view = RunView(run)
    findings = [f for rule in RULES for f in rule.check(view)]
    for plateau in [f for f in findings if f.kind == "loss_plateau"]:
        loss_plateau.grade(plateau, [f for f in findings if f is not plateau], view)
    harmed = {f.kind for f in findings if f.severity != "info"} & HARM
    for finding in findings:
        if finding.kind in PATHOLOGIES:
            finding.severity = "error" if harmed else "warning"
        finding.remedies = remedies_for(finding.causes)
    order = {"error": 0, "warning": 1, "info": 2}
    findings.sort(
        key=lambda f: (order[f.severity], f.first_step if f.first_step is not None else 0)
    )
    summary = {"steps": int(len(run.steps)), "layers": len(run.layers), "path": str(run.path)}
    return Report(findings, summary)


__all__ = ["Cause", "Finding", "Remedy", "Report", "RunView", "diagnose"]
