"""Terminal views of a run store, rendered with rich."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..store import FILE_NAME, Run

# A layer or type name wider than this folds onto more lines rather than widen the table.
_NAME_WIDTH = 24
# Spaces between two columns of a layer table (padding, rule, padding).
_GAP = 3
NOT_MEASURED = "—"


def _fmt(value: float, missing: str = NOT_MEASURED) -> str:
    if value is None or not np.isfinite(value):
        return missing if value is None or np.isnan(value) else str(value)
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


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


# header, metric, how a layer's steps reduce to one number, shown even when never measured
_METRICS: tuple[tuple[str, str, Callable[[np.ndarray | None, int], float], bool], ...] = (
    ("grad last", "grad_norm", _last, True),
    ("grad median", "grad_norm", _median, True),
    ("error median", "error_norm", _median, False),
    ("update ratio", "update_ratio", _median, False),
    ("act std", "act_std", _median, False),
    ("saturated", "saturated_frac", _median, False),
    ("zero", "zero_frac", _median, False),
    ("dead", "dead_frac", _last, False),
)


def _run_name(run: Run) -> str:
    """The run directory's name, or the store file's own name when it is not run.sqlite."""
    return run.path.parent.name if run.path.name == FILE_NAME else run.path.name


def _cells(
    run: Run, missing: str = NOT_MEASURED
) -> tuple[list[str], list[list[str]], list[str | None]]:
    """Headers, the cells of each column and each row's style; empty columns left out.

    A metric column no layer has a value for is left out (the gradient norms stay). The
    non-finite column, shown when some layer had inf/NaN, counts a layer's steps with a
    non-finite value out of the steps it was measured on: layers that cannot start an
    inf or NaN are measured on detailed steps only.
    """
    n = len(run.layer_info)
    headers = ["layer", "type"]
    columns = [[info.name for info in run.layer_info], [info.type or "" for info in run.layer_info]]
    matrices = {m: _column(run, m) for _, m, _, _ in _METRICS}
    for header, metric, reduce, always in _METRICS:
        values = [reduce(matrices[metric], j) for j in range(n)]
        if always or any(not np.isnan(v) for v in values):
            headers.append(header)
            columns.append([_fmt(v, missing) for v in values])
    bad = _column(run, "nonfinite")
    styles: list[str | None] = [None] * n
    if bad is not None and np.nansum(bad) > 0:
        cells = []
        for j in range(n):
            n_bad = int(np.nansum(bad[:, j]))
            n_measured = int(np.count_nonzero(~np.isnan(bad[:, j])))
            cells.append(f"{n_bad}/{n_measured}" if n_bad else "")
            styles[j] = "red" if n_bad else None
        headers.append("non-finite steps (of measured)")
        columns.append(cells)
    return headers, columns, styles


def _need(header: str, cells: list[str], cap: int | None = None) -> int:
    """The narrowest a column can be without cutting a value or a word of its header."""
    width = max([len(c) for c in cells] + [len(w) for w in header.split()])
    return min(width, cap) if cap is not None else width


def _table(
    title: str | None,
    headers: list[str],
    columns: list[list[str]],
    styles: list[str | None],
    names: int = 2,
) -> Table:
    """A compact table; the first ``names`` columns hold names, the others numbers.

    Names and the title are plain text: a '[' in a layer name or run path is not markup.
    """
    table = Table(
        title=Text(title) if title is not None else None,
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )
    for k, (header, cells) in enumerate(zip(headers, columns, strict=True)):
        if k < names:  # a long name folds onto more lines rather than being cut
            table.add_column(header, justify="left", overflow="fold")
        else:  # a number keeps its full width: only the names give way to a narrow terminal
            table.add_column(header, justify="right", overflow="fold", width=_need(header, cells))
    for row in range(len(styles)):
        table.add_row(*(Text(col[row]) for col in columns), style=styles[row])
    return table


def _step_total(run: Run) -> int:
    """The steps taken (written when the watcher closed), else the steps stored."""
    total = str(run.meta.get("steps") or "")
    return int(total) if total.isdigit() else len(run.steps)


def _stored_of(run: Run) -> str:
    """The ", 5 of them stored" of a run that stored a row every few steps, else ""."""
    if _step_total(run) != len(run.steps):
        return f", {len(run.steps)} of them stored"
    return ""


def _title(run: Run) -> str:
    return (
        f"{_run_name(run)}: {_plural(_step_total(run), 'step')}{_stored_of(run)}, "
        f"{_plural(len(run.layers), 'layer')}"
    )


def layer_table(run: Run, missing: str = NOT_MEASURED) -> Table:
    """One row per layer: gradient and error norms, update ratio and activation health.

    Columns no layer has a value for are left out; see :func:`layer_tables` for the
    same table split to fit a terminal's width.

    Example:
        >>> from rich.console import Console
        >>> # Console().print(layer_table(gradwatch.open_run("gradwatch-runs/...")))
    """
    headers, columns, styles = _cells(run, missing)
    return _table(_title(run), headers, columns, styles)


def layer_tables(run: Run, width: int, missing: str = NOT_MEASURED) -> list[Table]:
    """:func:`layer_table` split by columns into tables that fit ``width`` characters.

    Each part repeats the layer names (and their types, where there is room for them);
    no number is cut, however narrow: a long layer name folds onto more lines instead.
    ``missing`` stands for a value not measured.
    """
    headers, columns, styles = _cells(run, missing)
    widest = max((_need(h, c) for h, c in zip(headers[2:], columns[2:], strict=True)), default=0)
    name_width = _need(headers[0], columns[0], _NAME_WIDTH)
    keys = [0, 1]
    key_width = name_width + _GAP + _need(headers[1], columns[1], _NAME_WIDTH)
    if key_width + _GAP + widest > width:  # no room for the types beside a number
        keys, key_width = [0], name_width
    key_width = min(key_width, max(len(headers[0]), width - _GAP - widest))
    groups: list[list[int]] = [[]]
    used = key_width
    for k in range(2, len(headers)):
        need = _GAP + _need(headers[k], columns[k])
        if groups[-1] and used + need > width:
            groups.append([])
            used = key_width
        groups[-1].append(k)
        used += need
    tables = []
    for i, group in enumerate(groups):
        picked = [*keys, *group]
        tables.append(
            _table(
                _title(run) if i == 0 else None,
                [headers[k] for k in picked],
                [columns[k] for k in picked],
                styles,
                names=len(keys),
            )
        )
    return tables


def status_line(run: Run) -> str | None:
    """A line on a run that did not end cleanly (still running, killed, or failed); else None."""
    status = run.meta.get("status")
    if status == "running":
        return (
            "status: running, or its process died without closing the store "
            "(it holds the steps up to the last flush)"
        )
    if status and status != "ok":
        return f"status: the run ended with {status}"
    return None


def summary_lines(run: Run) -> list[str]:
    """A few lines about a run: status, steps, layers, loss from first to last, non-finite steps."""
    lines = [f"run store: {run.path}"]
    status = status_line(run)
    if status:
        lines.append(status)
    lines.append(f"steps: {_step_total(run)}{_stored_of(run)}   layers: {len(run.layers)}")
    rows = run.step_table()
    loss = run.loss[~np.isnan(run.loss)]  # NaN: not logged, or NaN (SQLite keeps no NaN)
    if loss.size:
        lines.append(f"loss: {_fmt(float(loss[0]))} -> {_fmt(float(loss[-1]))}")
    elif rows and any(row.get("loss_nonfinite") for row in rows):
        lines.append("loss: no finite value (inf or NaN wherever it was logged)")
    bad = [row for row in rows if row["nonfinite"]]
    if bad:
        first = bad[0]
        where = first["nonfinite_module"] or ", ".join(first["nonfinite_params"][:3]) or "the loss"
        types = {info.name: info.type for info in run.layer_info}
        if first["nonfinite_module"] and types.get(where):
            where = f"{where} ({types[where]})"
        lines.append(f"non-finite values from step {first['step']} on, first in {where}")
    return lines


def print_show(run: Run, console: Console | None = None) -> None:
    """Print :func:`summary_lines` and the layer table, split to fit the console's width."""
    console = console or Console()
    for line in summary_lines(run):
        console.print(line, soft_wrap=True, markup=False)  # a path may hold '[' ... ']'
    if not run.layers:
        console.print("no layers recorded: the run stored no step of a watched model")
        return
    # A terminal that cannot print an em dash (PYTHONIOENCODING=ascii) gets a hyphen.
    missing = NOT_MEASURED if console.encoding.lower().startswith("utf") else "-"
    for i, table in enumerate(layer_tables(run, console.width, missing)):
        if i:
            console.print()
        console.print(table)
    console.print(f"{missing}: not measured, or not finite", style="dim")


SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def render_report(report) -> object:
    """A rich renderable for a diagnosis :class:`~gradwatch.diagnose.Report`."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.syntax import Syntax
    from rich.text import Text

    run = report.run
    steps, layers = run.get("steps", 0), run.get("layers", 0)
    if not steps:  # the one finding there can be is coverage's note saying the same
        return Group(
            Text(
                "nothing to diagnose: no training step was recorded "
                "(gradwatch counts one per optimizer step, or per backward pass without one)",
                "yellow",
            )
        )
    if not report.findings:
        head = Text(
            f"healthy: no findings over {_plural(steps, 'step')} and {_plural(layers, 'layer')}",
            "green",
        )
        return Group(head)
    verdict = "healthy (only notes)" if report.healthy else "not healthy"
    parts: list = [
        Text(
            f"{verdict}: {_plural(len(report.findings), 'finding')} over {_plural(steps, 'step')}",
            "bold",
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
                # word_wrap: a code line wider than the panel wraps instead of being cut.
                body.append(
                    Syntax(
                        rem.code,
                        "python",
                        theme="ansi_dark",
                        background_color="default",
                        word_wrap=True,
                    )
                )
        title = f"[{SEVERITY_STYLE[f.severity]}]{f.severity}[/]: {f.kind}"
        parts.append(Panel(Group(*body), title=title, title_align="left"))
    return Group(*parts)
