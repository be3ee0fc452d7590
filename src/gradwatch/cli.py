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
from .store import (
    MAX_PERIOD,
    MAX_PERIOD_TEXT,
    RunStoreError,
    check_new_store,
    fresh_path,
    open_run,
    store_file,
)

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


# --json - writes the report to stdout.
STDOUT = Path("-")
MAX_DEMO_STEPS = 100_000


def _json_target(
    path: Path | None, protected: dict[Path, str] | None = None, made: Path | None = None
) -> Path | None:
    """The absolute path of a --json file, checked before any work: its directory exists.

    ``-`` stays ``-``: the report goes to stdout. ``protected`` maps files the report must
    not replace (the run store, the script) to what they are; ``made`` is a directory
    that the command creates, with its parents, before it writes the report (the run
    directory).
    """
    if path is None or path == STDOUT:
        return path
    target = path.resolve()
    for kept, what in (protected or {}).items():
        if target == kept.resolve():
            raise fail(f"--json {path} is {what}: the report would replace it; name another file")
    if target.is_dir():
        raise fail(f"--json {path} is a directory; give a file name")
    folder = target.parent
    if not folder.is_dir() and not (made is not None and folder in (made, *made.parents)):
        raise fail(f"--json {path}: no such directory {folder}")
    while not folder.exists():  # a directory the command makes: its first existing parent
        folder = folder.parent
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise fail(f"--json {path}: not writable")
    return target


def _store_files(run_path: Path) -> dict[Path, str]:
    """The run store behind ``run_path`` and its SQLite sidecars, as files not to replace."""
    file = store_file(run_path)
    sidecars = [file.with_name(file.name + end) for end in ("-wal", "-shm", "-journal")]
    return {
        f: "the run store" if f == file else "a file of the run store" for f in [file, *sidecars]
    }


def _write_json(target: Path, data: dict) -> bool:
    text = json.dumps(json_ready(data), indent=2, allow_nan=False)
    if target == STDOUT:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        return True
    try:
        target.write_text(text)
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
        Path | None,
        typer.Option("--json", help="Write the report as JSON to this file (- for stdout)."),
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
    if not (1 <= every <= MAX_PERIOD and 1 <= detail_every <= MAX_PERIOD):
        raise fail(f"--every and --detail-every must be at least 1 and at most {MAX_PERIOD_TEXT}")
    # Absolute, since the script may change the working directory.
    run_dir = (out or fresh_path(default_run_dir(script.stem))).resolve()
    json_out = _json_target(
        json_out,
        {**_store_files(run_dir), script: "the training script"},
        made=store_file(run_dir).parent,
    )
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
                err.print(line, markup=False, soft_wrap=True)  # a path may hold '[' ... ']'
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
    # A script that failed before its first step may have choked on our options; one that
    # trained has options of its own, which may share our names.
    if result.exit_code and not watcher.steps_recorded:
        _hint_misplaced_options(args or [])
    raise typer.Exit(result.exit_code)


# gradwatch run's own options: after SCRIPT they are the script's (see _hint_misplaced_options).
_RUN_OPTIONS = ("--out", "--every", "--detail-every", "--mode", "--json", "--overwrite")


def _hint_misplaced_options(args: list[str]) -> None:
    """After a failed script, point at gradwatch options that went to it by their place."""
    given = list(dict.fromkeys(a.split("=", 1)[0] for a in args))
    given = [a for a in given if a in _RUN_OPTIONS]
    if given:
        it = "it" if len(given) == 1 else "them"
        err.print(
            f"note: {', '.join(given)} came after SCRIPT, so the script got {it}, not "
            "gradwatch; gradwatch's options go before SCRIPT",
            soft_wrap=True,
            highlight=False,
        )


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
        Path | None,
        typer.Option(
            "--json",
            help="Also write the report as JSON to this file; - writes it to stdout "
            "(and the text to stderr).",
        ),
    ] = None,
) -> None:
    """Diagnose a recorded run: which layer fails, since when, why, and what to change."""
    from .report.terminal import status_line

    json_out = _json_target(json_out, _store_files(run_path))
    try:
        with open_run(run_path) as stored:
            report = diagnose(stored)
            status = status_line(stored)
    except RunStoreError as exc:
        raise fail(str(exc)) from None
    console = err if json_out == STDOUT else Console()
    if status:
        console.print(status, soft_wrap=True, highlight=False)
    console.print(report)
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
    if steps > MAX_DEMO_STEPS:  # 300 take well under a minute; this many, hours
        raise fail(f"--steps must be at most {MAX_DEMO_STEPS}")
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
