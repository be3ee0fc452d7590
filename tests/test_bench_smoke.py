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


def test_a_method_that_leaves_work_running_is_timed_in_whole_blocks(monkeypatch):
    """Step by step, its leftovers would land on the twin; whole blocks keep them its own."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from overhead import timed_round
    from peers import PEERS

    calls = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def step(self, x, y):
            calls.append((self.name, x))
            return 1.0

        def block(self, batches):
            return sum(self.step(x, y) for x, y in batches)

    twin, watched = Recorder("twin"), Recorder("watched")
    batches = [(0, None), (1, None), (2, None)]
    assert timed_round([twin, watched], batches) == [3.0, 3.0]
    assert calls == [(name, i) for i in range(3) for name in ("twin", "watched")]
    calls.clear()
    # Each block starts with one untimed step, which absorbs what the block before left.
    assert timed_round([watched, twin], batches, whole_blocks=True) == [3.0, 3.0]
    assert calls == [("watched", i) for i in (0, 0, 1, 2)] + [("twin", i) for i in (0, 0, 1, 2)]
    assert PEERS["tensorboard_histograms"].leaves_work and PEERS["wandb_watch_1"].leaves_work
    assert not any(PEERS[m].leaves_work for m in PEERS if m.startswith("gradwatch"))
