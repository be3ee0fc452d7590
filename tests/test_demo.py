"""`gradwatch demo`, the README's main job: a vanishing sigmoid net, diagnosed, treated, healthy."""

from __future__ import annotations

import numpy as np
from typer.testing import CliRunner

import gradwatch
from gradwatch.cli import app


def test_demo_diagnoses_treats_and_verifies(tmp_path):
    tmp_path = tmp_path / "demo[/]out"  # a path that rich would read as markup
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    before = gradwatch.diagnose(tmp_path / "before")
    after = gradwatch.diagnose(tmp_path / "after")
    assert "vanishing_gradient" in {f.kind for f in before.findings}
    assert after.healthy, [(f.kind, f.summary) for f in after.findings]
    loss_before = gradwatch.open_run(tmp_path / "before").loss
    loss_after = gradwatch.open_run(tmp_path / "after").loss
    assert np.mean(loss_after[-20:]) < 0.5 * np.mean(loss_before[-20:])
    assert "relu" in result.output and "he_init" in result.output
    assert "Did it help?" in result.output
    # Every path and finding is printed whole, not cut to fit an 80-column table.
    assert f"gradwatch show {tmp_path / 'before'}" in result.output
    assert "loss_plateau" in result.output and "vanishing_gradient" in result.output
    assert "…" not in result.output


def test_demo_data_loads_without_scikit_learn(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("pretend scikit-learn is absent")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    from gradwatch.demo import load_digits

    x, y, source = load_digits()
    assert x.shape == (1797, 64) and float(x.max()) == 1.0
    assert sorted(set(y.tolist())) == list(range(10))
    assert "bundled" in source
