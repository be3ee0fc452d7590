"""The commands as people use them: narrow terminals, odd paths, odd numbers, odd runs.

Each test is one bug report: bad input ends in a one-line error and a non-zero status
(never a traceback), no number or path is cut or altered on its way to the terminal, and
what is printed matches the run store read with the stdlib sqlite3.
"""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import cli, flat, train_on_noise
from torch import nn

import gradwatch
from gradwatch.diagnose.findings import Finding, Remedy, Report
from gradwatch.theory.meanfield import phase_diagram

SRC = Path(__file__).resolve().parents[1] / "src"


def watched(run, steps: int = 12, *, act: type[nn.Module] = nn.Tanh, **kwargs) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), act(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    return Path(train_on_noise(model, run, steps, **kwargs).run_dir)


def script(folder: Path, body: str) -> Path:
    path = folder / "train.py"
    path.write_text(textwrap.dedent(body))
    return path


TRAIN = """\
import sys, torch
from torch import nn
torch.manual_seed(0)
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
opt = torch.optim.SGD(m.parameters(), lr=0.1)
for _ in range(steps):
    loss = m(torch.randn(8, 4)).pow(2).mean(); opt.zero_grad(); loss.backward(); opt.step()
"""


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def stored_grad_norms(run_dir: Path) -> dict[str, tuple[str, str]]:
    """Per layer, the last and the median gradient norm, read with the stdlib sqlite3."""
    db = sqlite3.connect(run_dir / "run.sqlite")
    out = {}
    for lid, name in db.execute("SELECT id, name FROM layers"):
        values = [
            v
            for (v,) in db.execute(
                "SELECT value FROM layer_metrics WHERE layer_id = ? AND metric = 'grad_norm' "
                "ORDER BY step",
                (lid,),
            )
            if v is not None
        ]
        if values:
            out[name] = (_fmt(values[-1]), _fmt(statistics.median(values)))
    db.close()
    return out


# ------------------------------------------------ 1. show on an 80- or 40-column terminal
@pytest.mark.parametrize("columns", [80, 40])
def test_show_keeps_every_number_whole_on_a_narrow_terminal(tmp_path, columns):
    """An 80-column terminal (and any pipe) cut every number of the table to '1.2…'."""
    run_dir = watched(tmp_path / "run", steps=12)
    result = cli("show", run_dir, env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    table = [line for line in result.output.splitlines() if not line.startswith("run store:")]
    assert max(len(line) for line in table) <= columns  # the path is left to the terminal
    rows = {}
    for line in result.output.splitlines():
        parts = line.split()
        if parts and parts[0] in ("0", "2", "4") and len(parts) >= 4:
            rows.setdefault(parts[0], parts)  # the first table: name, type, grad last, median
    expected = stored_grad_norms(run_dir)
    assert set(expected) == {"0", "2", "4"}
    for name, (last, median) in expected.items():
        assert rows[name][2:4] == [last, median], (name, rows[name])


def test_show_splits_its_columns_instead_of_cutting_them(tmp_path):
    run_dir = watched(tmp_path / "run", steps=12)
    result = cli("show", run_dir, env={"COLUMNS": "40"})
    text = flat(result.output)
    for header in ("act std", "saturated", "update"):
        assert header.split()[0] in text  # every measured column is there, in some part


# ------------------------------------------------ 2. the remedy's code in a narrow panel
def test_a_remedys_code_wraps_instead_of_being_cut():
    from rich.console import Console

    code = "model = gradwatch.remedies.apply_remedies(model, ['relu'])  # or nn.ReLU() in place"
    finding = Finding(
        kind="vanishing_gradient",
        severity="warning",
        layers=["0"],
        first_step=0,
        last_step=9,
        summary="The error shrinks.",
        remedies=[Remedy("relu", "Use ReLU.", code)],
    )
    console = Console(width=60, record=True, color_system=None)
    console.print(Report([finding], {"steps": 10, "layers": 3}))
    text = console.export_text()
    joined = "".join(line.strip("│ ").strip() for line in text.splitlines())
    assert "in place" in text and code.replace(" ", "") in joined.replace(" ", "")


# ------------------------------------------------ 3. paths and names are not rich markup
@pytest.mark.parametrize("name", ["r[/]x", "r[bold]x"])
def test_a_run_path_with_brackets_is_printed_as_given(tmp_path, name):
    """'[/]' in --out crashed `run` after training (MarkupError); '[bold]' was dropped."""
    train = script(tmp_path, TRAIN)
    out = tmp_path / name
    result = cli("run", "--out", out, train, "3")
    assert result.exit_code == 0, result.output
    assert f"run store: {out / 'run.sqlite'}" in result.output
    shown = cli("show", out)
    assert shown.exit_code == 0
    assert str(out / "run.sqlite") in shown.output and f"{Path(name).name}: 3 steps" in flat(
        shown.output
    )


def test_a_jacobian_target_with_brackets_is_printed_as_given(tmp_path):
    folder = tmp_path / "runs[a]"
    folder.mkdir()
    (folder / "net.py").write_text("from torch import nn\ndef make():\n    return nn.Tanh()\n")
    target = f"{folder / 'net.py'}:make"
    result = cli("theory", "jacobian", target, "--input-shape", "1,3", env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    # The title wraps to the table's width: compare without the breaks.
    assert f"Jacobianspectrumof{target}" in "".join(result.output.split())


# ------------------------------------------------ 4. --json - is stdout
def test_diagnose_json_dash_writes_the_report_to_stdout(tmp_path, monkeypatch):
    """`--json -` wrote a file named '-' and nothing to stdout."""
    run_dir = watched(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    result = cli("diagnose", run_dir, "--json", "-")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["run"]["steps"] == 12 and "healthy" in data
    assert "healthy" in result.stderr  # the words go to stderr, out of the JSON's way
    assert not (tmp_path / "-").exists()


def test_run_json_dash_writes_the_report_to_stdout(tmp_path, monkeypatch):
    train = script(tmp_path, TRAIN)
    monkeypatch.chdir(tmp_path)
    result = cli("run", "--out", tmp_path / "run", "--json", "-", train, "4")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["run"]["steps"] == 4
    assert not (tmp_path / "-").exists()


# ------------------------------------------------ 5. numbers too large for the store
def test_an_every_beyond_int64_is_refused_before_the_script_runs(tmp_path):
    """--every 2**63 ran the script, then lost every step to an OverflowError."""
    marker = tmp_path / "ran"
    train = script(tmp_path, TRAIN + f"open({str(marker)!r}, 'w').close()\n")
    for option in ("--every", "--detail-every"):
        result = cli("run", option, str(2**63), "--out", tmp_path / "run", train)
        assert result.exit_code == 2
        assert "at most 2**62" in flat(result.stderr)
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_demo_refuses_an_endless_number_of_steps(monkeypatch):
    """--steps 10**20 started training for ever."""

    def never(*args, **kwargs):
        raise AssertionError("the demo started training")

    monkeypatch.setattr("gradwatch.demo.run_demo", never)
    result = cli("demo", "--steps", str(10**20))
    assert result.exit_code == 2 and "--steps must be at most" in result.stderr


# ------------------------------------------------ 6. runs with nothing, or cut short
def test_a_run_with_no_steps_is_not_called_healthy(tmp_path):
    train = script(tmp_path, TRAIN)
    result = cli("run", "--out", tmp_path / "run", train, "0")
    assert result.exit_code == 0
    assert "nothing to diagnose" in flat(result.output) and "healthy:" not in result.output
    shown = cli("show", tmp_path / "run")
    assert shown.exit_code == 0 and "no layers recorded" in shown.output
    diagnosed = cli("diagnose", tmp_path / "run")
    assert "nothing to diagnose" in flat(diagnosed.output)


def test_a_run_whose_process_died_says_so(tmp_path):
    """A store left by kill -9 (status 'running') read as if the run had ended well."""
    run_dir = tmp_path / "run"
    code = f"""
        import os, torch
        from torch import nn
        import gradwatch
        m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        w = gradwatch.watch(m, opt, run={str(run_dir)!r}, flush_every=5)
        for _ in range(12):
            loss = m(torch.randn(8, 4)).pow(2).mean(); opt.zero_grad(); loss.backward(); opt.step()
        os._exit(0)  # as kill -9 would: no close, no last flush
    """
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, env=env)
    shown = cli("show", run_dir)
    assert shown.exit_code == 0
    assert "status: running, or its process died" in flat(shown.output)
    diagnosed = cli("diagnose", run_dir)
    assert "status: running, or its process died" in flat(diagnosed.output)


def test_a_run_that_raised_says_so(tmp_path):
    train = script(tmp_path, TRAIN + "raise RuntimeError('boom')\n")
    result = cli("run", "--out", tmp_path / "run", train, "3", script_fails=True)
    assert result.exit_code == 1
    assert "status: the run ended with error: RuntimeError" in flat(
        cli("show", tmp_path / "run").output
    )


def test_a_run_stored_every_few_steps_says_how_many_it_took(tmp_path):
    """--every 5 over 23 steps printed 'steps: 5'."""
    train = script(tmp_path, TRAIN)
    result = cli("run", "--every", "5", "--out", tmp_path / "run", train, "23")
    assert result.exit_code == 0
    assert "steps: 23, 5 of them stored" in result.output
    assert "steps: 23, 5 of them stored" in cli("show", tmp_path / "run").output


def test_non_finite_steps_are_counted_out_of_the_measured_ones(tmp_path):
    """A Tanh after a NaN weight showed 12 non-finite steps beside 30: it is measured 12 times."""
    train = script(
        tmp_path,
        TRAIN.replace(
            "opt = torch.optim",
            "m[0].weight.data.fill_(float('nan'))\nopt = torch.optim",
        ),
    )
    assert cli("run", "--out", tmp_path / "run", train, "30").exit_code == 0
    out = cli("show", tmp_path / "run", env={"COLUMNS": "120"}).output
    db = sqlite3.connect(tmp_path / "run" / "run.sqlite")
    measured = {
        name: n
        for name, n in db.execute(
            "SELECT l.name, COUNT(DISTINCT m.step) FROM layer_metrics m JOIN layers l "
            "ON l.id = m.layer_id GROUP BY l.name"
        )
    }
    db.close()
    assert measured["0"] == 30 and measured["1"] < 30
    assert "30/30" in out and f"{measured['1']}/{measured['1']}" in out
    assert "loss: no finite value" in out


# ------------------------------------------------ 7. options after SCRIPT
def test_a_gradwatch_option_after_script_gets_a_note_when_the_script_fails(tmp_path):
    train = script(tmp_path, TRAIN)
    result = cli("run", train, "--out", tmp_path / "x", script_fails=True)
    assert result.exit_code == 1  # the script's int('--out') failed
    assert "note: --out came after SCRIPT" in flat(result.stderr)


def test_a_script_with_its_own_mode_option_gets_no_note_after_training(tmp_path):
    """A script that trained and then failed has options of its own, which may share our names."""
    train = script(tmp_path, TRAIN + "\nsys.exit(3)\n")
    result = cli("run", "--out", tmp_path / "x", train, "3", "--mode", "fast")
    assert result.exit_code == 3
    assert "note:" not in result.stderr


# ------------------------------------------------ 8. theory
def test_phase_output_is_checked_before_the_grid_is_computed(tmp_path, monkeypatch):
    """-o into a missing directory computed the whole grid, then failed with an OSError."""
    pytest.importorskip("plotly")

    def never(*args, **kwargs):
        raise AssertionError("the grid was computed")

    monkeypatch.setattr("gradwatch.theory.cli.phase_diagram", never)
    missing = cli("theory", "phase", "--points", "5", "-o", tmp_path / "no" / "p.html")
    assert missing.exit_code == 2 and "no such directory" in missing.stderr
    folder = cli("theory", "phase", "--points", "5", "-o", tmp_path)
    assert folder.exit_code == 2 and "is a directory" in folder.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["critical", "--sigma-b2", "nan"], "--sigma-b2 must be a finite number, got nan"),
        (["meanfield", "--sigma-w2", "inf"], "--sigma-w2 must be a finite number, got inf"),
        (["critical", "--sigma-b2", "1e308"], "no order-to-chaos transition"),
    ],
)
def test_theory_extreme_numbers_give_one_line(args, message):
    """1e308 printed three numpy RuntimeWarnings with source lines before its error."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "300"}
    done = subprocess.run(
        [sys.executable, "-m", "gradwatch", "theory", *args],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr


def test_meanfield_table_keeps_names_and_numbers_whole_at_40_columns():
    result = cli("theory", "meanfield", env={"COLUMNS": "40"})
    assert result.exit_code == 0
    assert "trainable_depth" in result.output and "94.746" in result.output


def test_phase_table_shows_fewer_columns_rather_than_cut_numbers():
    result = cli("theory", "phase", "--points", "10", env={"COLUMNS": "40"})
    assert result.exit_code == 0
    assert "…" not in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 40
    diagram = phase_diagram("tanh", np.linspace(0.5, 4.0, 10), np.linspace(0.0, 1.0, 10))
    first_row = next(line for line in result.output.splitlines() if line.startswith("│ 0 "))
    shown = [c.strip() for c in first_row.strip("│").split("│")[1:]]
    assert shown and shown[0] == f"{diagram.xi_c[0, 0]:.3g}"
    assert shown[-1] == f"{diagram.xi_c[0, -1]:.3g}"


def test_jacobian_of_a_huge_batch_draws_only_the_first_sample(tmp_path):
    """--input-shape 10**12,6 tried to allocate the whole batch: a RuntimeError traceback."""
    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\ndef make():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(6, 4), nn.Tanh())\n"
    )
    target = f"{tmp_path / 'net.py'}:make"
    big = cli("theory", "jacobian", target, "--input-shape", f"{10**12},6", "--json")
    assert big.exit_code == 0, big.output
    small = cli("theory", "jacobian", target, "--input-shape", "2,6", "--json")
    a, b = json.loads(big.stdout), json.loads(small.stdout)
    assert a["input_shape"] == [1, 6] and a["top_singular_values"] == b["top_singular_values"]
    huge = cli("theory", "jacobian", target, "--input-shape", f"1,{10**13}")
    assert huge.exit_code == 2 and "does not fit in memory" in flat(huge.stderr)
    seed = cli("theory", "jacobian", target, "--input-shape", "1,6", "--seed", str(10**20))
    assert seed.exit_code == 2 and "--seed must fit in 64 bits" in flat(seed.stderr)


# ------------------------------------------------ 9. a terminal that cannot print '—'
def test_show_and_jacobian_on_an_ascii_terminal(tmp_path):
    """PYTHONIOENCODING=ascii: UnicodeEncodeError on the em dash of `show` and the '±'."""
    run_dir = watched(tmp_path / "run")
    (tmp_path / "net.py").write_text(
        "from torch import nn\ndef make():\n    return nn.Sequential(nn.Linear(6, 4), nn.Tanh())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "PYTHONIOENCODING": "ascii", "COLUMNS": "120"}
    for args in (
        ["show", str(run_dir)],
        [
            "theory",
            "jacobian",
            f"{tmp_path / 'net.py'}:make",
            "--input-shape",
            "1,6",
            "--method",
            "iterative",
            "--k",
            "2",
        ],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "gradwatch", *args], capture_output=True, text=True, env=env
        )
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
    assert "+/-" in done.stdout


# ------------------------------------------------ 10. --json beside the run
def test_json_never_replaces_the_run_store_or_the_script(tmp_path):
    """`diagnose RUN --json RUN/run.sqlite` wrote the report over the run: the run was lost."""
    run_dir = watched(tmp_path / "run")
    for target in (run_dir / "run.sqlite", run_dir / "run.sqlite-wal"):
        result = cli("diagnose", run_dir, "--json", target)
        assert result.exit_code == 2 and "the report would replace it" in flat(result.stderr)
    with gradwatch.open_run(run_dir) as run:
        assert run.steps.tolist() == list(range(12))
    train = script(tmp_path, TRAIN)
    before = train.read_text()
    result = cli("run", "--out", tmp_path / "other", "--json", train, train)
    assert result.exit_code == 2 and "is the training script" in flat(result.stderr)
    assert train.read_text() == before and not (tmp_path / "other").exists()
    result = cli(
        "run", "--out", tmp_path / "third", "--json", tmp_path / "third" / "run.sqlite", train
    )
    assert result.exit_code == 2 and "is the run store" in flat(result.stderr)


def test_run_json_may_go_into_the_run_directory_it_makes(tmp_path):
    """--out runs/x --json runs/x/report.json was refused: 'no such directory runs/x'."""
    train = script(tmp_path, TRAIN)
    out = tmp_path / "runs" / "x"
    result = cli("run", "--out", out, "--json", out / "report.json", train, "3")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "report.json").read_text())["run"]["steps"] == 3
    result = cli("run", "--out", tmp_path / "y", "--json", tmp_path / "z" / "r.json", train)
    assert result.exit_code == 2 and "no such directory" in flat(result.stderr)


def test_meanfield_verdict_takes_its_direction_from_chi1():
    """With q* = inf it always said 'gradients grow', also beside chi1 = 0."""
    result = cli("theory", "meanfield", "--sigma-w2", "1e300", env={"COLUMNS": "200"})
    assert result.exit_code == 0
    data = json.loads(cli("theory", "meanfield", "--sigma-w2", "1e300", "--json").stdout)
    if data["q_star"] is None and data["chi1"] < 1:  # what the library gives today
        assert "grow by" not in result.output and "shrink by chi1" in result.output
    relu = cli("theory", "meanfield", "-a", "relu", "--sigma-w2", "3", "--sigma-b2", "0.1")
    assert "grow by chi1 = 1.5" in flat(relu.output)


def test_a_run_with_no_steps_says_so_in_its_json(tmp_path):
    """A script that never trained got "healthy": true and no finding: a CI gate passed it."""
    train = script(tmp_path, TRAIN)
    result = cli("run", "--out", tmp_path / "run", "--json", tmp_path / "r.json", train, "0")
    assert result.exit_code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert [f["kind"] for f in report["findings"]] == ["unmeasured"]
    assert "No training step was recorded" in report["findings"][0]["summary"]
