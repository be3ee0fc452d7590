"""Our own labelled scenarios (./scenarios), diagnosed end to end through `gradwatch run --json`.

tests/test_own_scenario_labels.py verifies each label with an independent measurement;
this test checks that the diagnosis agrees with it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from labels import label_problems

import gradwatch

FOLDER = Path(__file__).resolve().parents[1] / "scenarios"
LABELS = json.loads((FOLDER / "labels.json").read_text())
NAMES = sorted(k for k in LABELS if not k.startswith("_"))


def test_there_are_at_least_twelve_labelled_scenarios():
    assert len(NAMES) >= 12
    assert sorted(p.name for p in FOLDER.glob("*.py")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_own_scenario_is_diagnosed_as_labelled(own_scenario_runs, name):
    result = own_scenario_runs[name]
    assert result.exit_code == 0, result.output[-2000:]
    run = gradwatch.open_run(result.run_dir)
    assert run.steps.tolist() == list(range(result.rounds))
    summary = [(f["kind"], f["severity"], f["layers"][:5]) for f in result.report["findings"]]
    assert label_problems(result.report, LABELS[name]) == [], f"{name}: {summary}"
