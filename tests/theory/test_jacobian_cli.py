"""The ``theory jacobian`` command on a throwaway typer app, as the lead will mount it."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from gradwatch.theory.jacobian_cli import jacobian


@pytest.fixture(autouse=True)
def _one_thread():
    """These matrices are small: one thread is as fast, and immune to the 10-100x
    slowdowns of a 2-thread pool on a CI runner shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


USER_FILE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def make_cnn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(),
                             nn.Dropout(0.5), nn.Linear(4 * 8 * 8, 10))

    def make_number():
        return 3

    def needs_argument(width):
        return nn.Linear(width, width)

    class Helper:
        pass
    """
)


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    theory = typer.Typer()
    theory.command("jacobian")(jacobian)
    app.add_typer(theory, name="theory")
    return app


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "models.py"
    path.write_text(USER_FILE)
    return path


def run(app: typer.Typer, *args: str):
    return CliRunner().invoke(app, ["theory", "jacobian", *args])


def test_json_output_matches_the_library(app, user_file):
    result = run(app, f"{user_file}:make_cnn", "--input-shape", "4,3,8,8", "--k", "3", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["path"] == "exact"
    assert out["input_shape"] == [1, 3, 8, 8]  # the first sample only
    assert out["jacobian_shape"] == [10, 192]
    assert len(out["top_singular_values"]) == 3
    # Independent reference: the same model and input, jacrev + svdvals.
    ns: dict = {}
    exec(USER_FILE, ns)
    model = ns["make_cnn"]().eval()
    x = torch.randn((4, 3, 8, 8), generator=torch.Generator().manual_seed(0))[:1]
    with torch.no_grad():
        jac = torch.func.jacrev(lambda v: model(v.reshape(x.shape)).reshape(-1))(x.reshape(-1))
    s = torch.linalg.svdvals(jac).double()
    assert out["top_singular_values"] == pytest.approx(s[:3].tolist(), rel=1e-5)
    assert out["m1"] == pytest.approx(float((s**2).mean()), rel=1e-5)
    assert out["condition_number"] == pytest.approx(float(s[0] / s[-1]), rel=1e-4)


def test_table_output(app, user_file):
    result = run(app, f"{user_file}:make_cnn", "--input-shape", "2,3,8,8")
    assert result.exit_code == 0, result.output
    for text in ("sigma_1", "sigma_10", "var/mean^2", "condition number", "exact", "10 x 192"):
        assert text in result.stdout


def test_iterative_method_from_the_command_line(app, user_file):
    result = run(
        app,
        f"{user_file}:make_cnn",
        "--input-shape",
        "1,3,8,8",
        "--method",
        "iterative",
        "--k",
        "2",
        "--json",
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["path"] == "iterative" and out["condition_number"] is None
    assert out["normalized_variance_se"] > 0


@pytest.mark.parametrize(
    ("target", "shape", "expected"),
    [
        ("{dir}/missing.py:make", "1,3,8,8", "file not found"),
        (
            "{file}:nope",
            "1,3,8,8",
            "no callable 'nope'; the callables it defines: Helper, make_cnn, make_number, needs_argument",
        ),
        ("{file}:make_number", "1,3,8,8", "returned int, not a torch.nn.Module"),
        ("{file}:needs_argument", "1,3,8,8", "must take no arguments"),
        ("{file}", "1,3,8,8", "expected FILE.py:FACTORY"),
        ("{file}:make_cnn", "1,3,9,8", "input of shape (1, 3, 9, 8) does not fit"),
        ("{file}:make_cnn", "1,3,x", "--input-shape must be positive integers"),
    ],
)
def test_friendly_one_line_errors_exit_2(app, user_file, target, shape, expected):
    target = target.format(dir=user_file.parent, file=user_file)
    result = run(app, target, "--input-shape", shape)
    assert result.exit_code == 2
    message = " ".join(result.stderr.split())  # rich may wrap long lines
    assert expected in message
    assert "Traceback" not in result.output
