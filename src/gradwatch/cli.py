"""The ``gradwatch`` command line: thin typer commands over the library."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .diagnose import diagnose
from .diagnose.findings import json_ready
from .store import RunStoreError, open_run

app = typer.Typer(
    help="Find, explain and fix vanishing and exploding gradients in PyTorch training.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


def _mount_theory() -> None:
    from .theory.cli import app as theory_app

    app.add_typer(
        theory_app, name="theory", help="Theory, computed: mean field, phases, Jacobian spectra."
    )


_mount_theory()


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error and return the Exit to raise."""
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


@app.command(
    context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True},
)
def run(
    script: Annotated[Path, typer.Argument(help="The training script, run unchanged as __main__.")],
    args: Annotated[list[str] | None, typer.Argument(help="Arguments for the script.")] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Run directory (default ./gradwatch-runs/<time>-<script>)."),
    ] = None,
    every: Annotated[int, typer.Option(help="Store a step row every N optimizer steps.")] = 1,
    detail_every: Annotated[
        int,
        typer.Option(
            help="Run the detailed probes at most every N steps (densely during the first 100)."
        ),
    ] = 100,
    mode: Annotated[
        str, typer.Option(help="default, grads (cheapest) or full (every probe, every step).")
    ] = "default",
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the report as JSON to this file.")
    ] = None,
) -> None:
    """Run a training script under gradwatch. Everything after SCRIPT belongs to the script."""
    from .report.terminal import summary_lines
    from .runner import run_script
    from .watch import MODES, Watcher, default_run_dir

    if not script.is_file():
        raise fail(f"no such script: {script}")
    if mode not in MODES:
        raise fail(f"--mode must be one of {', '.join(MODES)}")
    if every < 1 or detail_every < 1:
        raise fail("--every and --detail-every must be at least 1")
    run_dir = out or default_run_dir(script.stem)
    watcher = Watcher(
        None,
        run=run_dir,
        every=every,
        detail=detail_every,
        mode=mode,
        meta={"command": json.dumps([str(script), *(args or [])])},
    )
    result = run_script(script, args or [], watcher)
    try:
        with open_run(run_dir) as stored:
            for line in summary_lines(stored):
                err.print(line)
            report = diagnose(stored)
            err.print(report)
            data = report.to_dict()
            data["run"].update(_run_summary(stored, result.exit_code))
    except RunStoreError as exc:
        err.print(f"gradwatch recorded nothing: {exc}")
        data = {
            "healthy": True,
            "findings": [],
            "run": {"steps": 0, "layers": 0, "exit_code": result.exit_code},
        }
    if json_out is not None:
        json_out.write_text(json.dumps(json_ready(data), indent=2, allow_nan=False))
    raise typer.Exit(result.exit_code)


def _run_summary(stored, exit_code: int) -> dict:
    return {
        "path": str(stored.path),
        "steps": int(len(stored.steps)),
        "layers": len(stored.layers),
        "exit_code": exit_code,
    }


@app.command()
def show(
    run_path: Annotated[
        Path, typer.Argument(metavar="RUN", help="A run directory or its run.sqlite.")
    ],
) -> None:
    """Show a run: per layer, gradient and error norms, update ratio and activation health."""
    from .report.terminal import print_show

    try:
        with open_run(run_path) as stored:
            print_show(stored, Console())
    except RunStoreError as exc:
        raise fail(str(exc)) from None


@app.command("diagnose")
def diagnose_command(
    run_path: Annotated[
        Path, typer.Argument(metavar="RUN", help="A run directory or its run.sqlite.")
    ],
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the report as JSON to this file.")
    ] = None,
) -> None:
    """Diagnose a recorded run: which layer fails, since when, why, and what to change."""
    try:
        report = diagnose(run_path)
    except RunStoreError as exc:
        raise fail(str(exc)) from None
    Console().print(report)
    if json_out is not None:
        json_out.write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False))


@app.command()
def demo(
    steps: Annotated[int, typer.Option(help="Training steps for each of the two runs.")] = 300,
    out: Annotated[
        Path | None, typer.Option(help="Where to keep the two run stores (default: a temp dir).")
    ] = None,
) -> None:
    """Diagnose a deep sigmoid MLP on the digits, apply the fix, retrain, and compare."""
    from .demo import run_demo

    if steps < 30:
        raise fail("--steps must be at least 30 for the diagnosis to judge the loss")
    run_demo(steps=steps, out=out, console=Console())


def main() -> None:  # pragma: no cover - the console script calls app directly
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
