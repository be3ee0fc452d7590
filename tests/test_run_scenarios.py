"""Every shared scenario runs under `gradwatch run` with one stored row per optimizer step."""

from __future__ import annotations

import json

import pytest

import gradwatch


def test_every_scenario_runs_and_stores_one_row_per_optimizer_step(scenario_runs):
    assert len(scenario_runs) >= 10
    for name, result in scenario_runs.items():
        assert result.exit_code == 0, (name, result.output[-2000:])
        run = gradwatch.open_run(result.run_dir)
        assert result.optimizer_steps > 0, name
        assert run.steps.tolist() == list(range(result.optimizer_steps)), name
        assert result.report["run"]["steps"] == result.optimizer_steps, name


def test_nan_in_module_names_the_first_nonfinite_module_at_its_step(scenario_runs):
    result = scenario_runs["nan_in_module.py"]
    assert result.first_nonfinite is not None
    ref_step, ref_module = result.first_nonfinite
    assert ref_module == "2.logprob"
    rows = gradwatch.open_run(result.run_dir).step_table()
    first_bad = next(r for r in rows if r["nonfinite"])
    assert first_bad["step"] == ref_step
    assert first_bad["nonfinite_module"] == "2.logprob"


def test_frozen_teacher_models_are_not_watched(scenario_runs):
    run = gradwatch.open_run(scenario_runs["sigmoid_deep_mlp.py"].run_dir)
    assert run.layers[0] == "0" and len(run.layers) == 25


@pytest.mark.parametrize("args", [["--lr", "0.1"], ["-x", "--", "y"]])
def test_arguments_after_the_script_belong_to_it(tmp_path, args):
    from typer.testing import CliRunner

    from gradwatch.cli import app

    script = tmp_path / "echo_args.py"
    script.write_text(
        "import sys, json\nopen(sys.argv[0] + '.out', 'w').write(json.dumps(sys.argv[1:]))\n"
    )
    result = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "r"), str(script), *args])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "echo_args.py.out").read_text()) == args


@pytest.mark.parametrize(
    ("body", "code"), [("raise SystemExit(3)", 3), ("raise ValueError('x')", 1), ("pass", 0)]
)
def test_the_exit_status_is_the_scripts_own(tmp_path, body, code):
    from typer.testing import CliRunner

    from gradwatch.cli import app

    script = tmp_path / "s.py"
    script.write_text(
        "import torch\nm = torch.nn.Linear(2, 1)\nopt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "for _ in range(2):\n    l = m(torch.randn(4, 2)).sum(); opt.zero_grad(); l.backward(); opt.step()\n"
        f"{body}\n"
    )
    result = CliRunner().invoke(
        app, ["run", "--out", str(tmp_path / "r"), "--json", str(tmp_path / "o.json"), str(script)]
    )
    assert result.exit_code == code
    run = gradwatch.open_run(tmp_path / "r")
    assert run.steps.tolist() == [0, 1]
    assert json.loads((tmp_path / "o.json").read_text())["run"]["steps"] == 2


def test_missing_script_is_a_clear_error(tmp_path):
    from typer.testing import CliRunner

    from gradwatch.cli import app

    result = CliRunner().invoke(app, ["run", str(tmp_path / "nope.py")])
    assert result.exit_code == 2
    assert "no such script" in result.output


def test_show_prints_a_table(scenario_runs):
    from typer.testing import CliRunner

    from gradwatch.cli import app

    result = CliRunner().invoke(app, ["show", str(scenario_runs["nan_in_module.py"].run_dir)])
    assert result.exit_code == 0, result.output
    assert "2.logprob" in result.output and "non-finite" in result.output


def test_a_script_that_dies_of_a_nan_still_gets_the_nonfinite_finding(tmp_path):
    from typer.testing import CliRunner

    from gradwatch.cli import app

    script = tmp_path / "dies.py"
    script.write_text(
        "import torch\nfrom torch import nn\n"
        "class LogOf(nn.Module):\n    def forward(self, x):\n        return torch.log(x)\n"
        "torch.manual_seed(0)\n"
        "model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), LogOf(), nn.Linear(8, 1))\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "for step in range(50):\n"
        "    if step == 5:\n"
        "        model[0].bias.data.fill_(-1e4)\n"
        "    loss = model(torch.randn(16, 4)).pow(2).mean()\n"
        "    if not torch.isfinite(loss):\n"
        "        raise FloatingPointError(f'loss is {loss.item()} at step {step}')\n"
        "    opt.zero_grad(); loss.backward(); opt.step()\n"
    )
    out = tmp_path / "report.json"
    result = CliRunner().invoke(
        app, ["run", "--out", str(tmp_path / "r"), "--json", str(out), str(script)]
    )
    assert result.exit_code == 1
    assert "FloatingPointError" in result.output
    report = json.loads(out.read_text())
    nonfinite = [f for f in report["findings"] if f["kind"] == "nonfinite"]
    assert nonfinite and nonfinite[0]["layers"] == ["2"] and nonfinite[0]["first_step"] == 5
    assert "log_of_zero" in nonfinite[0]["cause_ids"]
    assert "nonfinite" in result.output and "2 (LogOf)" in result.output
