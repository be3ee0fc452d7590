"""The shared labelled scenarios, diagnosed end to end through `gradwatch run --json`."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED
from labels import label_problems

LABELS = json.loads((SHARED / "scenarios" / "labels.json").read_text()) if SHARED.is_dir() else {}
NAMES = sorted(k for k in LABELS if not k.startswith("_"))


@pytest.mark.parametrize("name", NAMES)
def test_shared_scenario_is_diagnosed_as_labelled(scenario_runs, name):
    result = scenario_runs[name]
    problems = label_problems(result.report, LABELS[name])
    summary = [(f["kind"], f["severity"], f["layers"][:5]) for f in result.report["findings"]]
    assert problems == [], f"{name}: {problems}; findings: {summary}"


def test_the_label_checker_can_fail():
    label = {
        "healthy": False,
        "must": ["vanishing_gradient"],
        "must_not": ["nonfinite"],
        "where": {"vanishing_gradient": ["0"]},
    }
    wrong = {
        "findings": [
            {"kind": "vanishing_gradient", "severity": "error", "layers": ["9"]},
            {"kind": "nonfinite", "severity": "error", "layers": []},
        ]
    }
    assert len(label_problems(wrong, label)) == 2
    assert label_problems(
        {"findings": [{"kind": "update_ratio", "severity": "warning", "layers": []}]},
        {"healthy": True},
    )
