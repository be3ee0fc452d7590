"""`gradwatch run SCRIPT` behaves as `python SCRIPT` for the ways users write training scripts.

Each test is one pattern where the two differed: the script's output, exit status and
hooks are its own, and every optimizer step it took is in the store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import gradwatch
from gradwatch.cli import app

SRC = Path(__file__).resolve().parents[1] / "src"

TRAIN = """\
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
def train(steps):
    for _ in range(steps):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
"""


def write(folder: Path, body: str, name: str = "train.py") -> Path:
    path = folder / name
    path.write_text(TRAIN + textwrap.dedent(body))
    return path


def run(tmp_path: Path, script: Path, *args: str):
    return CliRunner().invoke(app, ["run", "--out", str(tmp_path / "r"), str(script), *args])


def run_process(tmp_path: Path, script: Path) -> subprocess.CompletedProcess:
    """`gradwatch run` in its own process: stdout buffered as in a pipe, stderr merged in."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = str(SRC)
    cmd = [sys.executable, "-m", "gradwatch", "run", "--out", str(tmp_path / "r"), str(script)]
    return subprocess.run(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, timeout=120
    )


def test_an_optimizer_built_anew_mid_training_replaces_the_old_one(tmp_path):
    """An LR restart: the old optimizer was waited for in vain, so steps merged (11 of 12
    stored, losses shifted) and every old optimizer was kept alive with its state."""
    script = write(
        tmp_path,
        """
        import gc, json, weakref
        olds = []
        for phase in range(3):
            opt = torch.optim.Adam(model.parameters(), lr=0.01 / (phase + 1))
            olds.append(weakref.ref(opt))
            train(3)
            model.eval()
            with torch.no_grad():  # an evaluation between phases is no step
                model(torch.randn(8, 4))
            model.train()
        gc.collect()
        json.dump([r() is not None for r in olds[:-1]], open(__file__ + ".json", "w"))
        """,
    )
    result = run(tmp_path, script)
    assert result.exit_code == 0, result.output
    rows = gradwatch.open_run(tmp_path / "r").step_table()
    assert [r["step"] for r in rows] == list(range(9))
    assert all(r["loss"] is not None for r in rows)
    assert json.loads(Path(str(script) + ".json").read_text()) == [False, False]


def test_an_optimizer_built_but_never_stepped_does_not_shift_the_losses(tmp_path):
    """Both were found at the first step; each step closed one step late, with the next
    step's loss mixed in, and the last step had none."""
    script = write(
        tmp_path,
        """
        spare = [torch.optim.SGD(model.parameters(), lr=0.1)]  # built, never stepped
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        losses = []
        for _ in range(4):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad(); loss.backward(); opt.step()
            losses.append(loss.item())
        """,
    )
    result = run(tmp_path, script)
    assert result.exit_code == 0, result.output
    stored = [r["loss"] for r in gradwatch.open_run(tmp_path / "r").step_table()]
    torch.manual_seed(0)
    plain = {"__name__": "__main__", "__file__": str(script)}
    exec(compile(script.read_text(), str(script), "exec"), plain)
    assert stored == pytest.approx(plain["losses"])


def test_two_optimizers_over_their_own_models_still_make_one_step_together(tmp_path):
    script = write(
        tmp_path,
        """
        critic = nn.Linear(1, 1)
        opt_c = torch.optim.SGD(critic.parameters(), lr=0.1)
        for _ in range(4):
            loss_c = critic(model(torch.randn(8, 4)).detach()).pow(2).mean()
            opt_c.zero_grad(); loss_c.backward(); opt_c.step()
            train(1)
        """,
    )
    result = run(tmp_path, script)
    assert result.exit_code == 0, result.output
    assert gradwatch.open_run(tmp_path / "r").steps.tolist() == [0, 1, 2, 3]


def test_a_scripts_own_excepthook_reports_its_crash(tmp_path):
    script = write(
        tmp_path,
        """
        import sys
        sys.excepthook = lambda kind, exc, tb: print("SCRIPT HOOK", kind.__name__, exc)
        train(2)
        raise RuntimeError("boom")
        """,
    )
    before = sys.excepthook
    result = run(tmp_path, script)
    assert result.exit_code == 1
    assert "SCRIPT HOOK RuntimeError boom" in result.output
    assert "Traceback" not in result.output  # the hook replaces Python's printing
    assert sys.excepthook is before
    assert gradwatch.open_run(tmp_path / "r").steps.tolist() == [0, 1]


def test_a_raised_keyboard_interrupt_prints_its_traceback_and_exits_130(tmp_path):
    script = write(tmp_path, "train(2)\nraise KeyboardInterrupt\n")
    result = run(tmp_path, script)
    assert result.exit_code == 130
    lines = result.output.splitlines()
    start = lines.index("Traceback (most recent call last):")
    assert lines[start + 1].startswith(f'  File "{script}", line 11, in <module>')
    assert "KeyboardInterrupt" in lines[start + 2 :]
    assert gradwatch.open_run(tmp_path / "r").steps.tolist() == [0, 1]


def test_a_stderr_the_script_closed_does_not_lose_the_report(tmp_path):
    script = write(
        tmp_path,
        """
        import sys
        log = open(__file__ + ".log", "w")
        sys.stdout = sys.stderr = log
        train(3)
        print("done")
        log.close()
        """,
    )
    result = run(tmp_path, script)
    assert result.exit_code == 0, result.exception
    assert "steps: 3" in result.output
    assert Path(str(script) + ".log").read_text() == "done\n"


def test_threads_the_script_left_running_finish_before_the_report(tmp_path):
    """Python waits for non-daemon threads before it exits; the report came before them."""
    script = write(
        tmp_path,
        """
        import threading, time
        from concurrent.futures import ThreadPoolExecutor
        pool = ThreadPoolExecutor(1)  # never shut down: Python stops it at exit
        pool.submit(print, "pool ran")
        train(2)
        threading.Thread(target=lambda: (time.sleep(0.3), print("thread done"))).start()
        """,
    )
    result = run(tmp_path, script)
    assert result.exit_code == 0, result.output
    assert 0 <= result.output.index("thread done") < result.output.index("run store:")


def test_the_scripts_module_globals_are_pythons(tmp_path):
    path = tmp_path / "g.py"
    path.write_text(
        "import builtins, json, sys\n"
        "json.dump([__name__, __file__, __spec__, __package__, type(__loader__).__name__,\n"
        "           __loader__.name, __builtins__ is builtins, __doc__, __cached__],\n"
        "          open(sys.argv[1], 'w'))\n"
    )
    subprocess.run([sys.executable, str(path), str(tmp_path / "python.json")], check=True)
    result = run(tmp_path, path, str(tmp_path / "gradwatch.json"))
    assert result.exit_code == 0, result.output
    seen = json.loads((tmp_path / "gradwatch.json").read_text())
    assert seen == json.loads((tmp_path / "python.json").read_text())


def test_stdout_is_flushed_before_the_report(tmp_path):
    """With stdout a pipe (block-buffered), the script's output came after the report."""
    script = write(tmp_path, "train(2)\nprint('final loss 1.5')\n")
    proc = run_process(tmp_path, script)
    assert proc.returncode == 0, proc.stdout
    assert 0 <= proc.stdout.index("final loss 1.5") < proc.stdout.index("run store:")


def test_os_exit_flushes_the_record_before_the_process_ends(tmp_path):
    """os._exit skips every finally: the steps since the last flush were lost (11 of 12)."""
    script = write(tmp_path, "import os\ntrain(12)\nos._exit(5)\n")
    proc = run_process(tmp_path, script)
    assert proc.returncode == 5, proc.stdout
    assert "os._exit(5)" in proc.stdout
    with gradwatch.open_run(tmp_path / "r") as stored:
        assert stored.steps.tolist() == list(range(12))


def test_spawn_workers_load_the_scripts_own_dataset_and_collate(tmp_path):
    """Checked and working: spawn re-imports the script as __mp_main__, by its __file__;
    a class from the script also saves and loads with torch.save / torch.load."""
    path = tmp_path / "spawned.py"
    path.write_text(
        textwrap.dedent(
            """
            import os, sys, torch
            from torch import nn
            from torch.utils.data import DataLoader, Dataset

            class Squares(Dataset):
                def __len__(self):
                    return 16
                def __getitem__(self, i):
                    return torch.full((4,), float(i) / 16)

            class Stack:
                def __call__(self, batch):
                    return torch.stack(batch)

            class Net(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.a = nn.Linear(4, 1)
                def forward(self, x):
                    return self.a(x)

            if __name__ == "__main__":
                model = Net()
                opt = torch.optim.SGD(model.parameters(), lr=0.1)
                loader = DataLoader(Squares(), batch_size=8, num_workers=1, collate_fn=Stack(),
                                    multiprocessing_context="spawn")
                for x in loader:
                    loss = model(x).pow(2).mean(); opt.zero_grad(); loss.backward(); opt.step()
                torch.save(model, sys.argv[1])
                again = torch.load(sys.argv[1], weights_only=False)
                print("loaded", type(again).__module__, type(again).__name__)
            """
        )
    )
    result = run(tmp_path, path, str(tmp_path / "m.pt"))
    assert result.exit_code == 0, result.output
    assert "loaded __main__ Net" in result.output
    assert gradwatch.open_run(tmp_path / "r").steps.tolist() == [0, 1]
