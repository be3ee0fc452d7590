"""The theory CLI, through typer's CliRunner on the app the main CLI mounts."""

from __future__ import annotations

import json
import re
import sys

import pytest
from typer.testing import CliRunner

from gradwatch.theory import MeanField
from gradwatch.theory.cli import app

runner = CliRunner()

MEANFIELD_KEYS = {
    "activation",
    "sigma_w2",
    "sigma_b2",
    "q_star",
    "chi1",
    "c_star",
    "xi_q",
    "xi_c",
    "xi_grad",
    "trainable_depth",
}


def _strict_json(text: str) -> dict:
    def reject(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=reject)


def test_critical_json_reproduces_the_critical_line(validation_cases):
    expected = validation_cases["meanfield_tanh_critical_line"]["expected"]["0.05"]
    result = runner.invoke(
        app, ["critical", "--activation", "tanh", "--sigma-b2", "0.05", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = _strict_json(result.stdout)
    assert set(data) == {"activation", "sigma_b2", "sigma_w2", "q_star"}
    assert data["sigma_w2"] == pytest.approx(expected["sigma_w2"], abs=2e-3)
    assert data["q_star"] == pytest.approx(expected["q_star"], abs=2e-3)


def test_critical_text_names_the_init():
    result = runner.invoke(app, ["critical", "-a", "relu", "--sigma-b2", "0"])
    assert result.exit_code == 0
    assert "critical sigma_w2 = 2" in result.stdout and "fan_in" in result.stdout


def test_meanfield_json_has_exactly_the_attribute_names():
    args = [
        "meanfield",
        "--activation",
        "tanh",
        "--sigma-w2",
        "1.5",
        "--sigma-b2",
        "0.05",
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = _strict_json(result.stdout)
    assert set(data) == MEANFIELD_KEYS
    mf = MeanField("tanh", 1.5, 0.05)
    for key in MEANFIELD_KEYS - {"activation"}:
        assert data[key] == pytest.approx(getattr(mf, key), rel=1e-12), key


def test_meanfield_json_writes_infinity_as_null():
    result = runner.invoke(
        app, ["meanfield", "-a", "linear", "--sigma-w2", "1", "--sigma-b2", "0", "--json"]
    )
    data = _strict_json(result.stdout)  # would raise on Infinity / NaN
    assert data["xi_c"] is None and data["xi_grad"] is None and data["trainable_depth"] is None
    assert data["chi1"] == 1.0


def test_meanfield_table_explains_the_phase():
    result = runner.invoke(app, ["meanfield", "--sigma-w2", "1.0", "--sigma-b2", "0.05"])
    assert result.exit_code == 0
    assert "Ordered phase" in result.stdout and "xi_c" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["meanfield", "--activation", "tanhh"], "unknown activation 'tanhh'; known names"),
        (["meanfield", "--sigma-w2", "-1"], "sigma_w2 is a variance and must be >= 0"),
        (["critical", "--sigma-b2", "-0.5"], "sigma_b2 is a variance and must be >= 0"),
        (["phase", "--activation", "nope", "--points", "5"], "unknown activation 'nope'"),
        (["phase", "--sigma-b2-min", "-1", "--points", "5"], "sigma_b2 grid"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]
    assert "Traceback" not in result.output


def test_phase_terminal_summary():
    result = runner.invoke(app, ["phase", "--points", "12"])
    assert result.exit_code == 0, result.output
    assert "xi_c" in result.stdout and "order-to-chaos line" in result.stdout


def test_phase_html_is_offline_and_self_contained(tmp_path):
    pytest.importorskip("plotly")  # the optional gradwatch[html] extra
    out = tmp_path / "phase.html"
    result = runner.invoke(app, ["phase", "--points", "10", "-o", str(out)])
    assert result.exit_code == 0, result.output
    html = out.read_text()
    assert out.stat().st_size > 1_000_000  # plotly.js is embedded, not linked
    assert "Plotly.newPlot" in html
    assert re.search(r"<script[^>]*\bsrc=", html) is None  # no script loaded from anywhere


def test_phase_html_without_plotly_says_which_extra(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "plotly" or m.startswith("plotly.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "plotly", None)  # makes "import plotly" fail
    result = runner.invoke(app, ["phase", "--points", "5", "-o", str(tmp_path / "x.html")])
    assert result.exit_code == 1
    assert "pip install 'gradwatch[html]'" in result.stderr
    assert not (tmp_path / "x.html").exists()


def test_every_option_is_documented():
    for command in ("critical", "meanfield", "phase"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0
        text = " ".join(result.stdout.split())
        assert "Activation by name" in text
    assert "Bias variance" in " ".join(runner.invoke(app, ["meanfield", "--help"]).stdout.split())
