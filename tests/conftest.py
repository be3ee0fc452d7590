"""Shared fixtures: where the project's shared references live, and fixed seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"the shared references are not beside this checkout ({SHARED})")
    return SHARED


@pytest.fixture(scope="session")
def validation_cases(shared_dir: Path) -> dict:
    return json.loads((shared_dir / "validation" / "cases.json").read_text())


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def scenario_runs(shared_dir: Path, tmp_path_factory) -> dict:
    """Every shared scenario run once through `gradwatch run`, with its reference counts."""
    from scenarios import run_scenario

    out = tmp_path_factory.mktemp("scenarios")
    scripts = sorted((shared_dir / "scenarios").glob("*.py"))
    return {s.name: run_scenario(s, out) for s in scripts}
