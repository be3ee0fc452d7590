"""``gradwatch theory jacobian FILE.py:FACTORY --input-shape 8,3,32,32``: a thin command
over :mod:`gradwatch.theory.jacobian`.

The lead mounts :func:`jacobian` on the ``theory`` sub-app, for example
``theory_app.command("jacobian")(jacobian)``.
"""

from __future__ import annotations

import importlib.util
import json as jsonlib
import math
import sys
import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn

from gradwatch.theory._linops import EXACT_MAX_BYTES, JacobianOperator
from gradwatch.theory.jacobian import _stats_from_singular_values, singular_values, spectrum_stats

EXIT_USAGE = 2  # the exit status click and typer use for bad usage


def _fail(message: str) -> typer.Exit:
    # soft_wrap: the message stays one line however narrow the terminal.
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"[bold red]error:[/] {escape(message)}"
    )
    return typer.Exit(code=EXIT_USAGE)


def load_factory(target: str) -> nn.Module:
    """Import ``FILE.py`` by path (no pickle) and call its zero-argument ``FACTORY``.

    Args:
        target: ``"path/to/file.py:factory_name"``.

    Returns:
        The module the factory returns.

    Raises:
        ValueError: with a one-line message for a malformed target, a missing file, a
            missing factory (listing the callables the file defines), a factory that
            fails or one that returns something other than an ``nn.Module``.

    Example:
        >>> import pathlib, tempfile
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "m.py").write_text("import torch\\ndef net(): return torch.nn.Tanh()\\n")
        >>> type(load_factory(f"{d / 'm.py'}:net")).__name__
        'Tanh'
    """
    path_text, sep, name = target.rpartition(":")
    if not sep or not path_text or not name:
        raise ValueError(f"expected FILE.py:FACTORY, got {target!r}")
    path = Path(path_text)
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"gradwatch_user_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {path} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))  # let the file import its neighbours
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        raise ValueError(f"importing {path} failed: {type(error).__name__}: {error}") from error
    finally:
        sys.path.remove(str(path.resolve().parent))
    factory = getattr(module, name, None)
    if not callable(factory):
        own = sorted(
            n
            for n, obj in vars(module).items()
            if callable(obj)
            and not n.startswith("_")
            and getattr(obj, "__module__", None) == module.__name__
        )
        listing = ", ".join(own) if own else "none"
        raise ValueError(f"{path} has no callable {name!r}; the callables it defines: {listing}")
    try:
        model = factory()
    except Exception as error:
        raise ValueError(
            f"{name}() failed: {type(error).__name__}: {error} (FACTORY must take no arguments)"
        ) from error
    if not isinstance(model, nn.Module):
        raise ValueError(f"{name}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def parse_shape(text: str) -> tuple[int, ...]:
    """``"8,3,32,32"`` -> ``(8, 3, 32, 32)``; a ``ValueError`` for anything else.

    Example:
        >>> parse_shape("8, 3,32,32")
        (8, 3, 32, 32)
    """
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"--input-shape must be positive integers joined by commas, got {text!r}")
    return shape


def analyse(model: nn.Module, x: torch.Tensor, k: int, method: str = "auto") -> dict:
    """Top-k singular values and isometry measures of ``model`` at ``x``, as a dict.

    On the exact path the Jacobian is formed once and serves both; otherwise
    :func:`singular_values` and :func:`spectrum_stats` each run their iterative method.

    Example:
        >>> import torch
        >>> out = analyse(torch.nn.Tanh(), torch.zeros(1, 3), k=2)
        >>> out["path"], out["top_singular_values"]
        ('exact', [1.0, 1.0])
    """
    start = time.perf_counter()
    op = JacobianOperator(model, x)
    exact = method == "exact" or (method == "auto" and op.nbytes <= EXACT_MAX_BYTES)
    result: dict = {"jacobian_shape": [op.m, op.n]}
    if exact:
        s = torch.linalg.svdvals(op.matrix())
        m1, m2, nv, smax, cond = _stats_from_singular_values(s)
        result |= {
            "path": "exact",
            "top_singular_values": s[:k].tolist(),
            "smallest_singular_values": s.flip(0)[:k].tolist(),
            "m1": m1,
            "m2": m2,
            "normalized_variance": nv,
            "normalized_variance_se": None,
            "sigma_max": smax,
            "condition_number": cond if math.isfinite(cond) else "inf",
        }
    else:
        sv = singular_values(model, x, k=k, method="iterative")
        st = spectrum_stats(model, x, method="iterative")
        result |= {
            "path": "iterative",
            "top_singular_values": sv.values.tolist(),
            "smallest_singular_values": None,
            "m1": st.m1,
            "m2": st.m2,
            "normalized_variance": st.normalized_variance,
            "normalized_variance_se": st.normalized_variance_se,
            "sigma_max": float(sv.values[0]),
            "condition_number": None,
            "converged": sv.converged,
        }
    result["seconds"] = time.perf_counter() - start
    return result


def _table(target: str, shape: tuple[int, ...], out: dict, plus_minus: str = "±") -> Table:
    # escape: the target is a path, and a '[' in it is not markup.
    table = Table(title=f"Jacobian spectrum of {escape(target)} at one input of shape {shape}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    m, n = out["jacobian_shape"]
    table.add_row("Jacobian", f"{m} x {n} (output x input)")
    table.add_row("path", out["path"])
    for i, s in enumerate(out["top_singular_values"], 1):
        table.add_row(f"sigma_{i}", f"{s:.6g}")
    table.add_row("m1 = mean s^2", f"{out['m1']:.6g}")
    nv = f"{out['normalized_variance']:.6g}"
    if out["normalized_variance_se"] is not None:
        nv += f" {plus_minus} {out['normalized_variance_se']:.2g}"
    table.add_row("var/mean^2 of s^2", nv)
    cond = out["condition_number"]
    table.add_row(
        "condition number",
        "n/a (iterative)" if cond is None else (cond if isinstance(cond, str) else f"{cond:.4g}"),
    )
    table.add_row("time", f"{out['seconds']:.2f} s")
    return table


def jacobian(
    target: Annotated[
        str, typer.Argument(help="FILE.py:FACTORY, a zero-argument function returning a module.")
    ],
    input_shape: Annotated[
        str,
        typer.Option(
            "--input-shape",
            help="Input shape with its batch dimension, e.g. 8,3,32,32. The Jacobian is "
            "taken at the first sample only (batch of 1): a batch's Jacobian is "
            "block-diagonal (its spectrum joins the per-sample ones) and costs B^2 times more. "
            "The sample drawn does not depend on the batch size.",
        ),
    ],
    k: Annotated[int, typer.Option("--k", min=1, help="How many singular values to list.")] = 10,
    method: Annotated[
        str,
        typer.Option(
            "--method", help="auto (exact when the Jacobian fits in 64 MiB), exact or iterative."
        ),
    ] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random N(0, 1) input.")] = 0,
    json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Singular values of a model's input-output Jacobian at a random input.

    The model runs in eval() mode (no dropout, BatchNorm on its running statistics).

    Example:
        gradwatch theory jacobian net.py:make --input-shape 8,3,32,32 --json
    """
    try:
        model = load_factory(target)
        shape = parse_shape(input_shape)
        if method not in ("auto", "exact", "iterative"):
            raise ValueError(f"--method must be auto, exact or iterative, not {method!r}")
        if not -(2**63) <= seed < 2**64:  # what torch's generators take
            raise ValueError(f"--seed must fit in 64 bits, got {seed}")
    except ValueError as error:
        raise _fail(str(error)) from None
    model.eval()
    # Only the first sample is drawn: the batch may be far larger than memory, and the
    # input is then the same for any batch size.
    try:
        x = torch.randn((1, *shape[1:]), generator=torch.Generator().manual_seed(seed))
    except RuntimeError as error:  # one sample larger than memory
        raise _fail(
            f"--input-shape {input_shape}: one sample does not fit in memory: {error}"
        ) from None
    try:
        out = analyse(model, x, k, method)
    except ValueError as error:
        raise _fail(f"{error} (check --input-shape)") from None
    out = {"target": target, "input_shape": list(x.shape), **out}
    if json:
        typer.echo(jsonlib.dumps(out, indent=2))
    else:
        console = Console()
        # A terminal that cannot print "±" (PYTHONIOENCODING=ascii) gets "+/-".
        plus_minus = "±" if console.encoding.lower().startswith("utf") else "+/-"
        console.print(_table(target, tuple(x.shape), out, plus_minus))


__all__ = ["analyse", "jacobian", "load_factory", "parse_shape"]
