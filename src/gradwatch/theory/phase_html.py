"""An offline HTML phase diagram (plotly, with its JavaScript embedded in the file).

plotly is optional (``pip install 'gradwatch[html]'``), so the examples here are not
run as doctests; tests/theory/test_theory_cli.py runs the same code when it is installed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._extras import require
from .meanfield import PhaseDiagram

__all__ = ["phase_figure", "write_phase_html"]

# Colour scale cap for xi_c: it diverges on the critical line.
_XI_CAP = 100.0


def phase_figure(diagram: PhaseDiagram):  # -> plotly.graph_objects.Figure (optional dependency)
    """Two heatmaps, chi1 and xi_c over (sigma_w2, sigma_b2), with the chi1 = 1 line drawn.

    Args:
        diagram: The result of :func:`~gradwatch.theory.meanfield.phase_diagram`.

    Returns:
        A ``plotly.graph_objects.Figure``.

    Raises:
        ImportError: If plotly (the ``gradwatch[html]`` extra) is missing.

    Example:
        >>> import numpy as np
        >>> from gradwatch.theory.meanfield import phase_diagram
        >>> pd = phase_diagram("tanh", np.linspace(0.5, 4, 5), np.linspace(0, 1, 4))
        >>> len(phase_figure(pd).data)  # doctest: +SKIP
        4
    """
    go = require("plotly.graph_objects", "html")
    subplots = require("plotly.subplots", "html")
    x, y = diagram.sigma_w2, diagram.sigma_b2
    fig = subplots.make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("chi1 (per-layer gradient factor)", "xi_c (correlation depth scale)"),
        horizontal_spacing=0.12,
    )
    fig.add_trace(
        go.Heatmap(
            x=x,
            y=y,
            z=diagram.chi1,
            colorscale="RdBu_r",
            zmid=1.0,
            colorbar={"x": 0.44, "title": {"text": "chi1"}},
            hovertemplate="sigma_w2=%{x:.3g}<br>sigma_b2=%{y:.3g}<br>chi1=%{z:.4g}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    xi = np.where(np.isfinite(diagram.xi_c), np.minimum(diagram.xi_c, _XI_CAP), _XI_CAP)
    fig.add_trace(
        go.Heatmap(
            x=x,
            y=y,
            z=xi,
            colorscale="Viridis",
            colorbar={"title": {"text": f"xi_c (capped at {_XI_CAP:g})"}},
            hovertemplate="sigma_w2=%{x:.3g}<br>sigma_b2=%{y:.3g}<br>xi_c=%{z:.4g}<extra></extra>",
        ),
        row=1,
        col=2,
    )
    for col in (1, 2):
        fig.add_trace(
            go.Contour(
                x=x,
                y=y,
                z=diagram.chi1,
                contours={"start": 1.0, "end": 1.0, "size": 1.0, "coloring": "lines"},
                line={"color": "black", "width": 2},
                showscale=False,
                name="chi1 = 1",
                hoverinfo="skip",
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(title_text="sigma_w2", row=1, col=col)
        fig.update_yaxes(title_text="sigma_b2", row=1, col=col)
    fig.update_layout(
        title=f"Mean-field phase diagram of {diagram.activation} (black line: edge of chaos)",
        width=1100,
        height=480,
    )
    return fig


def write_phase_html(diagram: PhaseDiagram, path: str | Path) -> Path:
    """Write :func:`phase_figure` to a self-contained HTML file (no network needed to view).

    Args:
        diagram: The phase diagram.
        path: Where to write.

    Returns:
        The path written.

    Raises:
        ImportError: If plotly (the ``gradwatch[html]`` extra) is missing.

    Example:
        >>> import numpy as np, tempfile, pathlib
        >>> from gradwatch.theory.meanfield import phase_diagram
        >>> pd = phase_diagram("tanh", np.linspace(0.5, 4, 5), np.linspace(0, 1, 4))
        >>> out = write_phase_html(pd, pathlib.Path(tempfile.mkdtemp()) / "phase.html")  # doctest: +SKIP
        >>> out.stat().st_size > 1_000_000  # doctest: +SKIP
        True
    """
    path = Path(path)
    phase_figure(diagram).write_html(path, include_plotlyjs=True, full_html=True)
    return path
