"""Terminal views of a run store, rendered with rich."""

from __future__ import annotations

import warnings

import numpy as np
from rich.console import Console
from rich.table import Table

from ..store import Run


def _fmt(value: float) -> str:
    if value is None or not np.isfinite(value):
        return "—" if value is None or np.isnan(value) else str(value)
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def _column(run: Run, metric: str) -> np.ndarray | None:
    return run.matrix(metric) if metric in run.metrics else None


def _last(col: np.ndarray | None, j: int) -> float:
    if col is None:
        return float("nan")
    finite = col[:, j][~np.isnan(col[:, j])]
    return float(finite[-1]) if finite.size else float("nan")


def _median(col: np.ndarray | None, j: int) -> float:
    if col is None:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns are expected
        return float(np.nanmedian(col[:, j]))


def layer_table(run: Run) -> Table:
    """One row per layer: gradient and error norms, update ratio and activation health.

    Example:
        >>> from rich.console import Console
        >>> # Console().print(layer_table(gradwatch.open_run("gradwatch-runs/...")))
    """
    cols = {
        m: _column(run, m)
        for m in (
            "grad_norm",
            "error_norm",
            "update_ratio",
            "act_std",
            "saturated_frac",
            "zero_frac",
            "dead_frac",
            "nonfinite",
        )
    }
    table = Table(title=f"{run.path.parent.name}: {len(run.steps)} steps, {len(run.layers)} layers")
    for name, justify in (
        ("layer", "left"),
        ("type", "left"),
        ("grad last", "right"),
        ("grad median", "right"),
        ("error median", "right"),
        ("update ratio", "right"),
        ("act std", "right"),
        ("saturated", "right"),
        ("zero", "right"),
        ("dead", "right"),
        ("non-finite steps", "right"),
    ):
        table.add_column(name, justify=justify)
    for j, info in enumerate(run.layer_info):
        bad = cols["nonfinite"]
        n_bad = int(np.nansum(bad[:, j])) if bad is not None else 0
        table.add_row(
            info.name,
            info.type,
            _fmt(_last(cols["grad_norm"], j)),
            _fmt(_median(cols["grad_norm"], j)),
            _fmt(_median(cols["error_norm"], j)),
            _fmt(_median(cols["update_ratio"], j)),
            _fmt(_median(cols["act_std"], j)),
            _fmt(_median(cols["saturated_frac"], j)),
            _fmt(_median(cols["zero_frac"], j)),
            _fmt(_last(cols["dead_frac"], j)),
            str(n_bad) if n_bad else "",
            style="red" if n_bad else None,
        )
    return table


def summary_lines(run: Run) -> list[str]:
    """A few lines about a run: steps, layers, loss from first to last, non-finite steps."""
    lines = [f"run store: {run.path}", f"steps: {len(run.steps)}   layers: {len(run.layers)}"]
    loss = run.loss[~np.isnan(run.loss)] if run.loss.size else run.loss
    if loss.size:
        lines.append(f"loss: {_fmt(float(loss[0]))} -> {_fmt(float(loss[-1]))}")
    bad = [row for row in run.step_table() if row["nonfinite"]]
    if bad:
        first = bad[0]
        where = first["nonfinite_module"] or ", ".join(first["nonfinite_params"][:3]) or "the loss"
        lines.append(f"non-finite values from step {first['step']} on, first in {where}")
    return lines


def print_show(run: Run, console: Console | None = None) -> None:
    console = console or Console()
    for line in summary_lines(run):
        console.print(line)
    console.print(layer_table(run))


SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def render_report(report) -> object:
    """A rich renderable for a diagnosis :class:`~gradwatch.diagnose.Report`."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.syntax import Syntax
    from rich.text import Text

    run = report.run
    if not report.findings:
        head = Text(
            f"healthy: no findings over {run.get('steps', 0)} steps and {run.get('layers', 0)} layers",
            "green",
        )
        return Group(head)
    verdict = "healthy (only notes)" if report.healthy else "not healthy"
    parts: list = [
        Text(
            f"{verdict}: {len(report.findings)} finding(s) over {run.get('steps', 0)} steps", "bold"
        )
    ]
    for f in report.findings:
        body: list = [Text(f.summary)]
        if f.layers:
            more = f" (+{len(f.layers) - 8} more)" if len(f.layers) > 8 else ""
            body.append(Text(f"layers: {', '.join(f.layers[:8])}{more}", "dim"))
        if f.first_step is not None:
            body.append(Text(f"steps: {f.first_step} to {f.last_step}", "dim"))
        for i, cause in enumerate(f.causes[:3], 1):
            body.append(Text(f"why ({i}): {cause.text}"))
        for i, rem in enumerate(f.remedies[:3], 1):
            body.append(Text(f"fix ({i}) [{rem.id}]: {rem.text}", "green"))
            if i == 1:
                body.append(
                    Syntax(rem.code, "python", theme="ansi_dark", background_color="default")
                )
        title = f"[{SEVERITY_STYLE[f.severity]}]{f.severity}[/]: {f.kind}"
        parts.append(Panel(Group(*body), title=title, title_align="left"))
    return Group(*parts)
