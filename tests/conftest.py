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


def _run_all(folder: Path, out: Path) -> dict:
    from scenarios import run_scenario

    return {s.name: run_scenario(s, out) for s in sorted(folder.glob("*.py"))}


@pytest.fixture(scope="session")
def scenario_runs(shared_dir: Path, tmp_path_factory) -> dict:
    """Every shared scenario run once through `gradwatch run`, with its reference counts."""
    return _run_all(shared_dir / "scenarios", tmp_path_factory.mktemp("scenarios"))


@pytest.fixture(scope="session")
def own_scenario_runs(tmp_path_factory) -> dict:
    """Every scenario of ours (./scenarios) run once through `gradwatch run`."""
    return _run_all(ROOT / "scenarios", tmp_path_factory.mktemp("own-scenarios"))
