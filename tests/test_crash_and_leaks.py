"""The store survives kill -9 up to the last flush; watch/unwatch cycles leak nothing."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import torch
from torch import nn

import gradwatch

SRC = Path(__file__).resolve().parents[1] / "src"


def test_sigkill_leaves_a_readable_store_with_every_flushed_step(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, torch, gradwatch
            from torch import nn
            model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            with gradwatch.watch(model, opt, run={str(tmp_path / "run")!r}, flush_every=10) as w:
                for step in range(10**9):
                    loss = model(torch.randn(16, 8)).pow(2).mean()
                    opt.zero_grad(); loss.backward(); opt.step()
                    if step == 35:
                        print("ready", flush=True)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    run = gradwatch.open_run(tmp_path / "run")
    steps = run.steps.tolist()
    # Flushes happen after step 0 and then every 10 steps: at least steps 0..30 are in.
    assert steps[:31] == list(range(31))
    assert steps == list(range(len(steps)))
    assert run.matrix("grad_norm").shape == (len(steps), 3)


def test_a_thousand_watch_cycles_leave_no_hooks_and_no_growth(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(4, 4)

    def cycle(i):
        with gradwatch.watch(model, opt, run=tmp_path / "runs" / str(i % 3), overwrite=True):
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    for i in range(50):  # warm caches (sqlite, torch dispatch) before measuring
        cycle(i)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i in range(1000):
        cycle(i)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    growth = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert growth < 200_000, f"{growth} bytes more after 1000 cycles"
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
