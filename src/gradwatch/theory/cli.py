"""``gradwatch theory``: thin commands over the mean-field library.

Mounted by the main CLI as ``app.add_typer(theory_app, name="theory")``. Bad input
(an unknown activation, a negative variance) ends with a one-line error and exit
status 2; a missing optional dependency with exit status 1.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from ._extras import require
from .activations import KNOWN_ACTIVATIONS
from .meanfield import MeanField, PhaseDiagram, critical_sigma_w2, phase_diagram

__all__ = ["app"]

app = typer.Typer(
    name="theory",
    help="Mean-field theory of deep random networks: phases, depth scales, the edge of chaos.",
    no_args_is_help=True,
    add_completion=False,
)

Activation = Annotated[
    str,
    typer.Option(
        "--activation",
        "-a",
        help=f"Activation by name: {', '.join(KNOWN_ACTIVATIONS)}.",
    ),
]
SigmaB2 = Annotated[
    float,
    typer.Option("--sigma-b2", help="Bias variance sigma_b^2 (b ~ N(0, sigma_b2)), >= 0."),
]
AsJson = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print one JSON object instead of a table; infinite or undefined values are null.",
    ),
]


@app.command()
def critical(
    activation: Activation = "tanh",
    sigma_b2: SigmaB2 = 0.05,
    as_json: AsJson = False,
) -> None:
    """The order-to-chaos line: the sigma_w2 where chi1 = 1, and q* there."""
    _check_finite(sigma_b2=sigma_b2)
    try:
        with _quiet():
            sigma_w2 = float(critical_sigma_w2(activation, sigma_b2))
            mf = MeanField(activation, sigma_w2, sigma_b2)
    except (ValueError, TypeError) as err:
        _fail(err)
    except ImportError as err:
        _fail(err, code=1)
    values = {
        "activation": mf.activation.name,
        "sigma_b2": sigma_b2,
        "sigma_w2": sigma_w2,
        "q_star": mf.q_star,
    }
    if as_json:
        typer.echo(json.dumps(_finite_or_null(values)))
        return
    Console().print(
        f"[bold]{mf.activation.name}[/] at sigma_b2 = {sigma_b2:g}: critical "
        f"sigma_w2 = [bold]{sigma_w2:.6g}[/], q* = {mf.q_star:.6g}. "
        f"Initialise W ~ N(0, {sigma_w2:.4g} / fan_in)."
    )


@app.command()
def meanfield(
    activation: Activation = "tanh",
    sigma_w2: Annotated[
        float,
        typer.Option(
            "--sigma-w2", help="Weight variance times fan-in, sigma_w^2 = N Var(W_ij), >= 0."
        ),
    ] = 1.5,
    sigma_b2: SigmaB2 = 0.05,
    as_json: AsJson = False,
) -> None:
    """Phase, fixed points and depth scales of a deep random network.

    JSON keys: activation, sigma_w2, sigma_b2, q_star, chi1, c_star, xi_q, xi_c,
    xi_grad, trainable_depth (null: infinite, e.g. a depth scale at criticality).
    """
    _check_finite(sigma_w2=sigma_w2, sigma_b2=sigma_b2)
    try:
        with _quiet():
            mf = MeanField(activation, sigma_w2, sigma_b2)
    except (ValueError, TypeError) as err:
        _fail(err)
    if as_json:
        typer.echo(json.dumps(mf.to_dict()))
        return
    table = Table(title=f"{mf.activation.name}, sigma_w2 = {sigma_w2:g}, sigma_b2 = {sigma_b2:g}")
    # Names and numbers are never cut on a narrow terminal; the meaning wraps instead.
    table.add_column("quantity", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("meaning", overflow="fold")
    rows = [
        ("q_star", mf.q_star, "fixed point of the pre-activation variance"),
        ("chi1", mf.chi1, "per-layer factor of the squared gradient norm"),
        ("c_star", mf.c_star, "fixed point of the correlation of two inputs"),
        ("xi_q", mf.xi_q, "layers for the variance to settle"),
        ("xi_c", mf.xi_c, "layers over which correlations propagate"),
        ("xi_grad", mf.xi_grad, "layers per e-fold change of the gradient norm"),
        ("trainable_depth", mf.trainable_depth, "6 xi_c: trainable up to about this depth"),
    ]
    for name, value, meaning in rows:
        table.add_row(name, f"{value:.6g}", meaning)
    console = Console()
    console.print(table)
    console.print(_verdict(mf))


@app.command()
def phase(
    activation: Activation = "tanh",
    sigma_w2_min: Annotated[float, typer.Option(help="Smallest sigma_w2 of the grid.")] = 0.5,
    sigma_w2_max: Annotated[float, typer.Option(help="Largest sigma_w2 of the grid.")] = 4.0,
    sigma_b2_min: Annotated[float, typer.Option(help="Smallest sigma_b2 of the grid.")] = 0.0,
    sigma_b2_max: Annotated[float, typer.Option(help="Largest sigma_b2 of the grid.")] = 1.0,
    points: Annotated[
        int, typer.Option(min=2, max=1000, help="Grid points along each axis.")
    ] = 100,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write an offline HTML heatmap (plotly, JS embedded) here instead of a "
            "terminal summary. Needs: pip install 'gradwatch\\[html]'.",
        ),
    ] = None,
) -> None:
    """The phase diagram: chi1 and the depth scale xi_c over (sigma_w2, sigma_b2)."""
    _check_finite(
        sigma_w2_min=sigma_w2_min,
        sigma_w2_max=sigma_w2_max,
        sigma_b2_min=sigma_b2_min,
        sigma_b2_max=sigma_b2_max,
    )
    if output is not None:  # before the grid is computed, which may take a minute
        _check_output(output)
    try:
        if sigma_w2_min > sigma_w2_max or sigma_b2_min > sigma_b2_max:
            raise ValueError("each grid minimum must not exceed its maximum")
        with _quiet():
            diagram = phase_diagram(
                activation,
                np.linspace(sigma_w2_min, sigma_w2_max, points),
                np.linspace(sigma_b2_min, sigma_b2_max, points),
            )
    except (ValueError, TypeError) as err:
        _fail(err)
    if output is None:
        with _quiet():
            _print_phase(diagram)
        return
    try:
        from .phase_html import write_phase_html

        write_phase_html(diagram, output)
    except ImportError as err:
        _fail(err, code=1)
    except OSError as err:
        _fail(f"could not write {output}: {err.strerror or err}", code=1)
    typer.echo(f"wrote {output}")


def _check_output(output: Path) -> None:
    """Refuse an --output that cannot be written, and a missing plotly, before any work."""
    try:
        require("plotly", "html")
    except ImportError as err:
        _fail(err, code=1)
    target = output.resolve()
    if target.is_dir():
        _fail(f"--output {output} is a directory; give a file name, e.g. {output / 'phase.html'}")
    if not target.parent.is_dir():
        _fail(f"--output {output}: no such directory {target.parent}")
    if not os.access(target.parent, os.W_OK) or (
        target.exists() and not os.access(target, os.W_OK)
    ):
        _fail(f"--output {output}: not writable")


def _check_finite(**values: float) -> None:
    """A one-line error for a NaN or infinite option (typer parses 'nan' and 'inf' as floats)."""
    for name, value in values.items():
        if not math.isfinite(value):
            _fail(f"--{name.replace('_', '-')} must be a finite number, got {value}")


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence numpy's overflow warnings: extreme variances end in a result or a clear error."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _verdict(mf: MeanField) -> str:
    if math.isinf(mf.q_star):
        # chi1 says which way: it is not always above 1 here (see the extreme sigma_w2).
        direction = "grow" if mf.chi1 > 1 else "shrink" if mf.chi1 < 1 else "keep their size"
        by = "" if mf.chi1 == 1 else f" by chi1 = {mf.chi1:.4g} per layer"
        return (
            f"The pre-activations grow without bound (q* = inf): squared gradient norms "
            f"{direction}{by}."
        )
    if mf.phase == "critical":
        return "At the edge of chaos: signals and gradients propagate through any depth."
    direction = "shrink" if mf.phase == "ordered" else "grow"
    return (
        f"{mf.phase.capitalize()} phase: squared gradient norms {direction} by chi1 = "
        f"{mf.chi1:.4g} per layer (e-fold every {mf.xi_grad:.3g} layers); expect training "
        f"up to about {mf.trainable_depth:.3g} layers."
    )


def _print_phase(diagram: PhaseDiagram) -> None:
    console = Console()
    rows = np.unique(np.linspace(0, diagram.sigma_b2.size - 1, 6).round().astype(int))
    label = "sigma_b2 \\ sigma_w2"
    label_width = max([len(w) for w in label.split()] + [len(f"{b:.3g}") for b in diagram.sigma_b2])

    def cells(j: int) -> list[str]:
        return [f"{diagram.xi_c[i, j]:.3g}" for i in rows]

    def need(j: int) -> int:
        return max(len(c) for c in [f"{diagram.sigma_w2[j]:.3g}", *cells(j)])

    # As many of (up to) 8 sigma_w2 columns as the terminal holds without cutting a number:
    # each column takes its width, two spaces of padding and a rule.
    for n_cols in range(8, 1, -1):
        cols = np.unique(np.linspace(0, diagram.sigma_w2.size - 1, n_cols).round().astype(int))
        if label_width + 4 + sum(need(j) + 3 for j in cols) <= console.width:
            break
    table = Table(
        title=f"{diagram.activation}: correlation depth scale xi_c "
        "([blue]ordered[/], [red]chaotic[/], inf = critical)"
    )
    table.add_column(label, min_width=label_width, overflow="fold")
    for j in cols:
        table.add_column(f"{diagram.sigma_w2[j]:.3g}", justify="right", width=need(j))
    for i in rows:
        cells_i = []
        for j in cols:
            xi, chi = diagram.xi_c[i, j], diagram.chi1[i, j]
            colour = "blue" if chi < 1 else "red"
            cells_i.append(f"[{colour}]{xi:.3g}[/]")
        table.add_row(f"{diagram.sigma_b2[i]:.3g}", *cells_i)
    console.print(table)
    if np.isnan(diagram.xi_c[np.ix_(rows, cols)]).any():
        console.print("nan: no xi_c where q* = inf (the pre-activations grow without bound)")
    line = _critical_line(diagram)
    if line:
        pairs = ", ".join(f"{sw:.4g} at sigma_b2 = {sb:.3g}" for sb, sw in line)
        console.print(f"order-to-chaos line (chi1 = 1): sigma_w2 = {pairs}")


def _critical_line(diagram: PhaseDiagram) -> list[tuple[float, float]]:
    """The critical sigma_w2 at four of the grid's sigma_b2 values (brentq, not the grid)."""
    rows = np.unique(np.linspace(0, diagram.sigma_b2.size - 1, 4).round().astype(int))
    out = []
    for i in rows:
        sb = float(diagram.sigma_b2[i])
        try:
            out.append((sb, float(critical_sigma_w2(diagram.activation, sb))))
        except (ValueError, ImportError):  # no transition, or no scipy: show the table only
            continue
    return out


def _finite_or_null(values: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()
    }


def _fail(err: BaseException, code: int = 2) -> NoReturn:
    typer.echo(f"Error: {err}", err=True)
    raise typer.Exit(code)


def _mount_jacobian() -> None:
    from .jacobian_cli import jacobian

    app.command("jacobian")(jacobian)


_mount_jacobian()
