"""Every example in the README runs: Python blocks are executed, gradwatch commands invoked."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradwatch.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, re.S)


def gradwatch_commands() -> list[str]:
    commands = []
    for lang, body in BLOCKS:
        if lang == "bash":
            for line in body.splitlines():
                commands += [
                    part.strip()
                    for part in line.split("&&")
                    if part.strip().startswith("gradwatch ")
                ]
    return commands


def test_readme_has_the_two_front_door_commands():
    bash = [body.strip() for lang, body in BLOCKS if lang == "bash"]
    main_job, tests = bash[0], bash[1]
    for line in (main_job, tests):
        assert line.index("pip install torch==2.13.0") < line.index("pip install -e")
    assert "gradwatch " in main_job
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = tests.split("&&")[-1].strip()
    assert test_command in ci


@pytest.mark.parametrize("code", [body for lang, body in BLOCKS if lang == "python"])
def test_python_examples_run(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})


def test_cli_examples_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    commands = gradwatch_commands()
    assert len(commands) >= 3
    for command in commands:
        if command.startswith("gradwatch demo"):
            continue  # tests/test_demo.py runs it and checks what it shows
        args = [str(ROOT / a) if a.startswith("examples/") else a for a in shlex.split(command)[1:]]
        result = CliRunner().invoke(app, args, catch_exceptions=False)
        assert result.exit_code == 0, (command, result.output)
