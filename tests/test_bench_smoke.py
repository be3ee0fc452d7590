"""The overhead benchmark runs and writes the JSON its issue describes (no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_overhead_benchmark_writes_valid_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, str(ROOT / "bench" / "overhead.py"), "--quick", "--rounds", "2", "--block", "2",
        "--methods", "gradwatch_default", "gradwatch_grads", "foreach_norm", "lightning_grad_norm",
        "--json", str(out),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    results = json.loads(out.read_text())
    assert set(results) == {"mlp"}
    default = results["mlp"]["gradwatch_default"]
    assert default["ratio"] > 0 and default["spread"] >= 0
    assert "lightning_grad_norm" in results["mlp"]  # measured, or marked not installed


def test_gpu_check_runs_without_a_gpu(tmp_path):
    """The GPU script is tried here on the CPU, so that no GPU time is spent on a broken one."""
    cmd = [
        sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--out", str(tmp_path),
        "--workloads", "mlp", "--steps", "3", "--rounds", "2", "--block", "2",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    syncs = json.loads((tmp_path / "gpu_syncs.json").read_text())
    assert syncs == {
        "mlp": dict.fromkeys(["uninstrumented", "default", "grads", "full"], "no sync")
    }
    table = json.loads((tmp_path / "gpu_overhead.json").read_text())
    assert table["mlp"]["gradwatch_default"]["ratio"] > 0
    assert (tmp_path / "gpu_overhead.md").read_text().startswith("| method | mlp |")
