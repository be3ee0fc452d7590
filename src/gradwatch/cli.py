"""The ``gradwatch`` command line: thin typer commands over the library."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from .diagnose import diagnose
from .diagnose.findings import json_ready
from .store import RunStoreError, check_new_store, fresh_path, open_run

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
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _json_target(path: Path | None) -> Path | None:
    """The absolute path of a --json file, checked before any work: its directory exists."""
    if path is None:
        return None
    target = path.resolve()
    if target.is_dir():
        raise fail(f"--json {path} is a directory; give a file name")
    if not target.parent.is_dir():
        raise fail(f"--json {path}: no such directory {target.parent}")
    if not os.access(target.parent, os.W_OK) or (
        target.exists() and not os.access(target, os.W_OK)
    ):
        raise fail(f"--json {path}: not writable")
    return target


def _write_json(target: Path, data: dict) -> bool:
    try:
        target.write_text(json.dumps(json_ready(data), indent=2, allow_nan=False))
    except OSError as exc:
        fail(f"could not write --json {target}: {exc}")
        return False
    return True


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
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a run already stored at --out.")
    ] = False,
) -> None:
    """Run a training script under gradwatch. Everything after SCRIPT belongs to the script.

    --out is a run directory (its store is run.sqlite inside), or the store file itself
    when it ends in .sqlite, .sqlite3 or .db.
    """
    from .report.terminal import summary_lines
    from .runner import run_script
    from .watch import MODES, Watcher, default_run_dir

    if str(script).startswith("-"):
        raise fail(
            f"no such option for gradwatch run: {script} (its options go before SCRIPT; "
            f"a script whose name starts with '-' is given as ./{script})"
        )
    if not script.is_file():
        raise fail(f"no such script: {script}")
    if mode not in MODES:
        raise fail(f"--mode must be one of {', '.join(MODES)}")
    if every < 1 or detail_every < 1:
        raise fail("--every and --detail-every must be at least 1")
    json_out = _json_target(json_out)
    # Absolute, since the script may change the working directory.
    run_dir = (out or fresh_path(default_run_dir(script.stem))).resolve()
    try:
        watcher = Watcher(
            None,
            run=run_dir,
            every=every,
            detail=detail_every,
            mode=mode,
            meta={"command": json.dumps([str(script), *(args or [])])},
            overwrite=overwrite,
        )
    except RunStoreError as exc:
        raise fail(str(exc)) from None
    watcher.pin_store()  # the script's own watch(overwrite=True) must not close this one
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
        err.print(f"gradwatch could not read what it recorded: {escape(str(exc))}", soft_wrap=True)
        data = {
            "healthy": True,
            "findings": [],
            "run": {"steps": 0, "layers": 0, "exit_code": result.exit_code},
        }
    if json_out is not None:
        _write_json(json_out, data)  # the exit status stays the script's own
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
    json_out = _json_target(json_out)
    try:
        report = diagnose(run_path)
    except RunStoreError as exc:
        raise fail(str(exc)) from None
    Console().print(report)
    if json_out is not None and not _write_json(json_out, report.to_dict()):
        raise typer.Exit(1)


@app.command()
def demo(
    steps: Annotated[int, typer.Option(help="Training steps for each of the two runs.")] = 300,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Directory for the two runs, DIR/before and DIR/after (default: a temp dir)."
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the runs of an earlier demo at --out.")
    ] = False,
) -> None:
    """Diagnose a deep sigmoid MLP on the digits, apply the fix, retrain, and compare."""
    from .demo import SUB_RUNS, run_demo

    if steps < 30:
        raise fail("--steps must be at least 30 for the diagnosis to judge the loss")
    if out is not None:
        out = out.resolve()
        if out.exists() and not out.is_dir():
            raise fail(f"--out {out} is not a directory; the demo keeps two runs in it")
        try:
            for name in SUB_RUNS:
                check_new_store(out / name, overwrite=overwrite)
        except RunStoreError as exc:
            raise fail(str(exc)) from None
    try:
        run_demo(steps=steps, out=out, console=Console(), overwrite=overwrite)
    except RunStoreError as exc:
        raise fail(str(exc)) from None


def main() -> None:  # pragma: no cover - the console script calls app directly
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
