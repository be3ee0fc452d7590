"""Where runs are stored and read: reused, odd, read-only, damaged or missing paths.

Each test is one bug report: bad input ends in a clear error before any training (never a
traceback from gradwatch), no run is mixed into another or lost, and `gradwatch run`
keeps the script's own view of the world (its exit status, __file__, working directory).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from harness import cli, flat, train_on_noise
from torch import nn
from typer.testing import CliRunner

import gradwatch
from gradwatch.cli import app
from gradwatch.store import RunExistsError, RunStoreError, store_file

SRC = Path(__file__).resolve().parents[1] / "src"

TRAIN = """\
import torch
from torch import nn
torch.manual_seed({seed})
m = nn.Sequential(nn.Linear(4, {width}), nn.Tanh(), nn.Linear({width}, 1))
opt = torch.optim.SGD(m.parameters(), lr=0.1)
for _ in range({steps}):
    loss = m(torch.randn(8, 4)).pow(2).mean(); opt.zero_grad(); loss.backward(); opt.step()
"""


def script(folder: Path, body: str = "", *, steps: int = 3, width: int = 8, seed: int = 0) -> Path:
    path = folder / f"train_{steps}_{width}_{abs(hash(body)) % 10**6}.py"
    path.write_text(TRAIN.format(steps=steps, width=width, seed=seed) + textwrap.dedent(body))
    return path


def watched(run, steps: int = 3, **kwargs) -> gradwatch.Watcher:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    return train_on_noise(model, run, steps, **kwargs)


# ---------------------------------------------------------------- 1. a store holds one run
def test_run_refuses_an_out_that_holds_a_run_and_overwrite_replaces_it(tmp_path):
    out = tmp_path / "run"
    first = cli("run", "--out", out, script(tmp_path, steps=6))
    assert first.exit_code == 0, first.output
    second = cli("run", "--out", out, script(tmp_path, steps=2, width=4))
    assert second.exit_code == 2
    message = flat(second.output)
    assert str(out) in message and "already holds a gradwatch run" in message
    assert "--overwrite" in message
    with gradwatch.open_run(out) as run:  # the first run is untouched
        assert run.steps.tolist() == list(range(6)) and len(run.layers) == 3
    replacement = script(tmp_path, steps=2, width=4)
    third = cli("run", "--overwrite", "--out", out, replacement)
    assert third.exit_code == 0, third.output
    with gradwatch.open_run(out) as run:
        assert run.steps.tolist() == [0, 1]
        assert json.loads(run.meta["command"]) == [str(replacement)]


def test_watch_refuses_a_store_with_steps_unless_told_to_overwrite(tmp_path):
    watched(tmp_path / "run", steps=5)
    with pytest.raises(RunExistsError, match="already holds a gradwatch run") as caught:
        watched(tmp_path / "run", steps=2)
    assert isinstance(caught.value, FileExistsError) and isinstance(caught.value, RunStoreError)
    assert "overwrite=True" in str(caught.value) and str(tmp_path / "run") in str(caught.value)
    assert gradwatch.open_run(tmp_path / "run").steps.tolist() == list(range(5))
    (tmp_path / "run" / "run.sqlite-wal").write_bytes(b"stale")  # left by a crash: goes too
    watched(tmp_path / "run", steps=2, overwrite=True)
    run = gradwatch.open_run(tmp_path / "run")
    assert run.steps.tolist() == [0, 1]
    assert run.meta["status"] == "ok"


def test_overwrite_closes_a_watcher_left_open_on_the_same_run(tmp_path):
    """A notebook cell run again: the first watcher was never closed and still holds the store."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    first = gradwatch.watch(model, opt, run=tmp_path / "run")
    with pytest.raises(RunExistsError, match="overwrite=True to close it"):
        gradwatch.watch(model, opt, run=tmp_path / "run")
    second = gradwatch.watch(model, opt, run=tmp_path / "run", overwrite=True)
    assert first._closed and not second._closed
    with second:
        for _ in range(3):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert gradwatch.open_run(tmp_path / "run").steps.tolist() == [0, 1, 2]


def test_an_empty_store_may_be_reused_and_a_failed_watch_releases_its_store(tmp_path):
    with pytest.raises(TypeError) as caught:  # the traceback keeps the failed Watcher alive
        gradwatch.watch(["not a model"], run=tmp_path / "run")
    watched(tmp_path / "run", steps=2)  # nothing was recorded there: no refusal
    assert caught.value is not None
    assert gradwatch.open_run(tmp_path / "run").steps.tolist() == [0, 1]


def test_a_script_watching_the_out_of_gradwatch_run_is_refused_not_mixed(tmp_path):
    out = tmp_path / "run"
    own = script(
        tmp_path,
        f"""
        import gradwatch
        with gradwatch.watch(m, opt, run={str(out)!r}, overwrite=True) as w:
            for _ in range(2):
                loss = m(torch.randn(8, 4)).sum(); opt.zero_grad(); loss.backward(); opt.step()
        """,
        steps=4,
    )
    result = CliRunner().invoke(app, ["run", "--out", str(out), str(own)])
    assert result.exit_code == 1  # the script's own failure, reported as Python would
    assert "another watcher in this process is writing" in flat(result.output)
    with gradwatch.open_run(out) as run:
        assert run.steps.tolist() == list(range(4))


def test_default_run_directories_do_not_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # and both made in the same second:
    module = sys.modules["gradwatch.watch"]  # not gradwatch.watch: that is the function
    monkeypatch.setattr(module, "default_run_dir", lambda name="run": Path("runs/same"))
    first, second = watched(None, steps=2), watched(None, steps=3)
    assert first.run_dir != second.run_dir
    assert gradwatch.open_run(first.run_dir).steps.tolist() == [0, 1]
    assert gradwatch.open_run(second.run_dir).steps.tolist() == [0, 1, 2]


def test_demo_refuses_a_reused_out_before_training_and_overwrites_when_told(tmp_path):
    watched(tmp_path / "after", steps=2)
    result = cli("demo", "--steps", "30", "--out", tmp_path)
    assert result.exit_code == 2
    assert "already holds a gradwatch run" in flat(result.output)
    assert "--overwrite" in flat(result.output)
    assert not (tmp_path / "before").exists()  # refused up front, not after the first run
    result = cli("demo", "--steps", "30", "--out", tmp_path, "--overwrite")
    assert result.exit_code == 0, result.output
    for name in ("before", "after"):
        assert gradwatch.open_run(tmp_path / name).steps.tolist() == list(range(30))


# ---------------------------------------------------------------- 2. escaped URIs
@pytest.mark.parametrize("name", ["lr#1", "a?b", "c%20d", "e%"])
def test_stores_under_paths_with_uri_characters_are_read(tmp_path, name):
    watched(tmp_path / name, steps=3)
    assert gradwatch.open_run(tmp_path / name).steps.tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no stray file beside it


# ---------------------------------------------------------------- 3. a script that chdirs
def test_out_and_json_are_where_they_were_given_when_the_script_chdirs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work").mkdir()
    moving = tmp_path / "moving.py"
    moving.write_text("import os\nos.chdir('work')\n" + TRAIN.format(steps=4, width=8, seed=0))
    result = cli("run", "--out", "run1", "--json", "rep.json", moving.name)
    assert result.exit_code == 0, result.output
    assert gradwatch.open_run(tmp_path / "run1").steps.tolist() == [0, 1, 2, 3]
    report = json.loads((tmp_path / "rep.json").read_text())
    assert report["run"]["steps"] == 4
    assert not list((tmp_path / "work").iterdir())


# ---------------------------------------------------------------- 4. damaged stores
def test_incomplete_or_damaged_stores_give_run_store_errors(tmp_path):
    (tmp_path / "meta_only").mkdir()
    db = sqlite3.connect(tmp_path / "meta_only" / "run.sqlite")
    db.execute("CREATE TABLE meta(key TEXT, value TEXT)")
    db.commit()
    db.close()
    with pytest.raises(RunStoreError, match="not a gradwatch run store"):
        gradwatch.open_run(tmp_path / "meta_only")
    for command in ("show", "diagnose"):
        result = cli(command, tmp_path / "meta_only")
        assert result.exit_code == 2 and "not a gradwatch run store" in flat(result.output)
    # A store that opens but fails later, as a damaged page would, in each reader.
    watched(tmp_path / "run", steps=3)
    run = gradwatch.open_run(tmp_path / "run")
    db = sqlite3.connect(tmp_path / "run" / "run.sqlite")
    db.execute("DROP TABLE layer_metrics")
    db.execute("DROP TABLE param_metrics")
    db.execute("DROP TABLE steps")
    db.commit()
    db.close()
    for read in (
        lambda: run.matrix("grad_norm"),
        lambda: run.matrix("nonfinite"),
        lambda: run.param_matrix("grad_norm"),
        run.step_table,
        lambda: gradwatch.diagnose(run),
    ):
        with pytest.raises(RunStoreError, match="cannot read"):
            read()
    run.close()


# ---------------------------------------------------------------- 5. read-only directories
READER = """
import json, os, sys, gradwatch
out = {}
for path in sys.argv[1:]:
    try:
        out[os.path.basename(path)] = gradwatch.open_run(path).steps.tolist()
    except gradwatch.RunStoreError as exc:
        out[os.path.basename(path)] = str(exc)
print(json.dumps(out))
"""


def _read_only(folder: Path, names: list[str]) -> dict:
    """Open each store under ``folder`` made read-only: by permissions, or for root (who
    ignores them) by a read-only bind mount in a private mount namespace."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    reader = [sys.executable, "-c", READER, *[str(folder / n) for n in names]]
    for name in names:
        (folder / name).chmod(0o555)
    try:
        permissions_hold = not os.access(folder / names[0], os.W_OK)
        if permissions_hold:
            proc = subprocess.run(reader, capture_output=True, text=True, env=env, timeout=60)
    finally:
        for name in names:
            (folder / name).chmod(0o755)
    if not permissions_hold:  # root
        if shutil.which("unshare") is None:
            pytest.skip("running as root, and no unshare for a read-only mount")
        where = shlex.quote(str(folder))
        mount = f"mount --bind {where} {where} && mount -o remount,bind,ro {where}"
        command = ["unshare", "-m", "sh", "-c", f'{mount} && exec "$@"', "sh", *reader]
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
        if proc.returncode and "mount" in proc.stderr:
            pytest.skip(f"running as root, and a read-only mount failed: {proc.stderr}")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_a_closed_store_in_a_read_only_directory_is_read(tmp_path):
    archive = tmp_path / "archive"
    watched(archive / "closed", steps=4)
    assert not (archive / "closed" / "run.sqlite-wal").exists()
    # A copy taken while the run was still being written: its steps are in the -wal file,
    # which a read that must ignore it (immutable) would lose; that must be an error.
    model = nn.Linear(4, 1)
    writer = gradwatch.watch(model, run=archive / "live", flush_every=1)
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
    (archive / "copied").mkdir()
    for suffix in ("", "-wal"):
        shutil.copy(archive / "live" / f"run.sqlite{suffix}", archive / "copied")
    writer.close()
    read = _read_only(archive, ["closed", "copied"])
    assert read["closed"] == [0, 1, 2, 3]
    assert "read-only" in read["copied"] and "run.sqlite-wal" in read["copied"]


# ---------------------------------------------------------------- 6. output paths
def test_bad_output_paths_are_refused_before_the_script_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "ran"
    body = f"open({str(marker)!r}, 'w').close()\nimport sys\nsys.exit(3)\n"
    train = script(tmp_path, body)
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    cases = [
        (["run", "--out", "r1", "--json", "missing_dir/r.json", train], "no such directory"),
        (["run", "--out", "r2", "--json", ".", train], "is a directory"),
        (["run", "--out", notes, train], "not a readable gradwatch run store"),
        (["run", "--out", notes / "sub", train], "is not a directory"),
        (["run", "--out", "r3", "--bogus", train], "no such option for gradwatch run: --bogus"),
        (["demo", "--steps", "30", "--out", notes], "is not a directory"),
        (["diagnose", "r2", "--json", "missing_dir/x.json"], "no such directory"),
    ]
    if Path("/proc/self").is_dir():
        cases.append((["run", "--out", "/proc/gradwatch-test/run", train], "cannot write"))
    for args, message in cases:
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in flat(result.output), (args, result.output)
        assert not marker.exists(), args
    assert notes.read_text() == "precious"
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_a_json_that_cannot_be_written_at_the_end_keeps_the_scripts_status(tmp_path):
    (tmp_path / "reports").mkdir()
    vanishing = script(
        tmp_path, f"import shutil, sys\nshutil.rmtree({str(tmp_path / 'reports')!r})\nsys.exit(3)\n"
    )
    result = cli(
        "run", "--out", tmp_path / "r", "--json", tmp_path / "reports" / "r.json", vanishing
    )
    assert result.exit_code == 3
    assert "could not write --json" in flat(result.output)
    assert gradwatch.open_run(tmp_path / "r").steps.tolist() == [0, 1, 2]


# ---------------------------------------------------------------- 7. --out names a directory
def test_an_out_with_a_dot_is_a_run_directory(tmp_path):
    result = cli("run", "--out", tmp_path / "runs" / "lr0.1", script(tmp_path))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "lr0.1" / "run.sqlite").is_file()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["lr0.1"]
    result = cli("run", "--out", tmp_path / "single.db", script(tmp_path))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "single.db").is_file()
    assert gradwatch.open_run(tmp_path / "single.db").steps.tolist() == [0, 1, 2]
    assert store_file(tmp_path / "runs" / "exp.v2") == tmp_path / "runs" / "exp.v2" / "run.sqlite"
    assert store_file(tmp_path / "x.SQLITE3") == tmp_path / "x.SQLITE3"
    bare = tmp_path / "old-store.v1"  # a store file written under the old rule still reads
    shutil.copy(tmp_path / "single.db", bare)
    assert store_file(bare) == bare and gradwatch.open_run(bare).steps.tolist() == [0, 1, 2]


# ---------------------------------------------------------------- 8. __file__
def test_file_is_absolute_and_argv0_as_typed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "t.py").write_text(
        "import json, os, sys\n"
        "os.chdir(os.path.dirname(__file__))\n"
        "json.dump([__file__, sys.argv[0]], open('seen.json', 'w'))\n"
    )
    result = cli("run", "--out", "r", "sub/t.py")
    assert result.exit_code == 0, result.output
    seen = json.loads((tmp_path / "sub" / "seen.json").read_text())
    assert seen == [str(tmp_path / "sub" / "t.py"), "sub/t.py"]


def test_a_scripts_traceback_starts_at_the_script(tmp_path):
    (tmp_path / "boom.py").write_text("def f():\n    raise RuntimeError('boom')\nf()\n")
    result = CliRunner().invoke(
        app, ["run", "--out", str(tmp_path / "r"), str(tmp_path / "boom.py")]
    )
    assert result.exit_code == 1
    lines = result.output.splitlines()
    start = lines.index("Traceback (most recent call last):")
    assert lines[start + 1].startswith(f'  File "{tmp_path / "boom.py"}", line 3, in <module>')
    assert "runner.py" not in result.output and "runpy" not in result.output


# ---------------------------------------------------------------- 9. minor
@pytest.mark.parametrize(("code", "status"), [("True", 1), ("300", 44), ("-1", 255), ("2", 2)])
def test_exit_code_is_the_process_exit_status(tmp_path, code, status):
    exits = script(tmp_path, f"import sys\nsys.exit({code})\n")
    result = cli("run", "--out", tmp_path / "r", "--json", tmp_path / "r.json", exits)
    assert result.exit_code == status
    recorded = json.loads((tmp_path / "r.json").read_text())["run"]["exit_code"]
    assert recorded == status and type(recorded) is int


def test_theory_phase_help_names_the_html_extra():
    result = CliRunner().invoke(app, ["theory", "phase", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "gradwatch[html]" in result.output


# ---------------------------------------------------------------- 10. SIGTERM, SIGHUP
@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_terminating_signal_flushes_the_record_and_exits_128_plus_it(tmp_path, name):
    killed = script(
        tmp_path,
        f"import os, signal\nos.kill(os.getpid(), signal.{name})\nprint('survived')\n",
        steps=5,
    )
    before = signal.getsignal(getattr(signal, name))
    result = cli("run", "--out", tmp_path / "r", killed)
    signum = getattr(signal, name)
    assert result.exit_code == 128 + signum
    assert "survived" not in result.output and f"stopped by {name}" in result.output
    assert "no findings" in result.output or "finding" in result.output  # the diagnosis shows
    with gradwatch.open_run(tmp_path / "r") as run:
        assert run.steps.tolist() == list(range(5))
        assert run.meta["status"] == "error: Terminated"
    assert signal.getsignal(signum) == before


def test_a_scripts_own_signal_handler_is_kept(tmp_path):
    own = script(
        tmp_path,
        "import os, signal\n"
        "seen = []\n"
        "signal.signal(signal.SIGTERM, lambda *a: seen.append(1))\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "import time\n"
        "while not seen: time.sleep(0.01)\n"
        "print('handled')\n",
    )
    before = signal.getsignal(signal.SIGTERM)
    result = cli("run", "--out", tmp_path / "r", own)
    assert result.exit_code == 0 and "handled" in result.output
    assert signal.getsignal(signal.SIGTERM) == before


def test_sigterm_from_outside_flushes_a_running_script(tmp_path):
    slow = script(
        tmp_path,
        """
        import sys, time
        for i in range(10**6):
            loss = m(torch.randn(8, 4)).pow(2).mean(); opt.zero_grad(); loss.backward(); opt.step()
            if i == 20:
                print("ready", flush=True)
            time.sleep(0.005)
        """,
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradwatch", "run", "--out", str(tmp_path / "r"), str(slow)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    with gradwatch.open_run(tmp_path / "r") as run:
        assert len(run.steps) >= 3 + 21  # everything done before the signal, not just flushes
        assert run.meta["status"] == "error: Terminated"


def test_a_handler_raising_inside_the_final_close_keeps_the_status_and_report(
    tmp_path, monkeypatch
):
    """SIGTERM to a process group: a DataLoader's SIGCHLD handler raised in our close."""
    real_close = gradwatch.Watcher.close

    def close_interrupted(self, *, error=None):
        real_close(self, error=error)
        raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")

    monkeypatch.setattr(gradwatch.Watcher, "close", close_interrupted)
    own = script(tmp_path, "import sys; sys.exit(3)", steps=4)
    result = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "run"), str(own)])
    assert result.exit_code == 3, result.output
    assert "closing the run was interrupted" in flat(result.output)
    assert "steps: 4" in result.output
