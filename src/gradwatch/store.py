"""The run store: one SQLite file per run, written in batches, read back as numpy arrays.

The file is ``run.sqlite`` inside the run directory (see :func:`store_file`). It uses
write-ahead logging and one transaction per flush, so after a crash or ``kill -9`` it
holds every step up to the last flush. Open it with the stdlib ``sqlite3`` or with
:func:`open_run`. A store holds one run: :class:`RunWriter` refuses a store that already
has steps or layers unless told to overwrite it.

Schema (version 2):

``meta(key TEXT PRIMARY KEY, value TEXT)``
    schema_version, gradwatch and torch versions, mode, command line, status.
``layers(id, name, type, kind, exec_order, fan_in, n_params, model)``
    One row per measured module; ``model`` names the watched model it belongs to
    ("" when only one model is watched). ``kind`` is its activation family (sigmoid, tanh,
    relu, ...) or NULL; ``exec_order`` the rank of its first call in a training
    forward pass (NULL if never called).
``params(id, name, layer_id, shape, numel)``
    Each parameter once, under the layer that owns it.
``steps(step, loss, detail, partial, nonfinite, nonfinite_module, nonfinite_params)``
    One row per optimizer step. ``detail`` is 1 where the detailed probes ran;
    ``partial`` is 1 for a step cut short by an exception; ``nonfinite_module`` is the
    first module, in execution order, whose forward output was inf or NaN;
    ``nonfinite_params`` a JSON list of parameters whose gradient was;
    ``loss_nonfinite`` is 1 when the logged loss was inf or NaN (SQLite stores NaN as
    NULL, so ``loss`` alone cannot tell a NaN loss from a missing one).
``layer_metrics(step, layer_id, metric, value)``
    Long format. Metrics: grad_norm, grad_zero_frac, error_norm, error_rms (the error
    norm over the square root of the output's size), act_mean, act_std,
    saturated_frac, act_derivative (mean derivative over its maximum, for saturating
    activations), zero_frac, dead_frac, update_ratio, weight_norm, nonfinite and,
    for recurrent layers, recurrent_radius. Every step has grad_norm, and act_mean
    for each layer that can originate an inf or NaN (see
    ``layers.FINITE_PRESERVING``); the rest come on detailed steps. ``nonfinite``
    rows are written only where a layer's forward output, error or gradient was inf
    or NaN (value 1); :meth:`Run.matrix` fills in 0 wherever the layer was measured
    at that step and NaN elsewhere.
``param_metrics(step, param_id, metric, value)``
    grad_norm, update_norm and weight_norm, on detailed steps and non-finite ones.

Version 1 stores wrote explicit ``nonfinite`` 0 rows and per-parameter grad_norm on
every step; they read the same way.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 2
FILE_NAME = "run.sqlite"
# A path with one of these suffixes names the store file itself, not a run directory.
STORE_SUFFIXES = (".sqlite", ".sqlite3", ".db")
# Rows per INSERT statement: 100 rows of at most 8 columns stay under SQLite's oldest
# limit on bound variables (999).
ROWS_PER_INSERT = 100
# Steps are SQLite integers (int64): a storing or detail period past this overflows the
# arithmetic on step numbers. Written out for messages as MAX_PERIOD_TEXT.
MAX_PERIOD = 2**62
MAX_PERIOD_TEXT = "2**62"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS layers (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, type TEXT, kind TEXT,
    exec_order INTEGER, fan_in INTEGER, n_params INTEGER, model TEXT);
CREATE TABLE IF NOT EXISTS params (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, layer_id INTEGER, shape TEXT, numel INTEGER);
CREATE TABLE IF NOT EXISTS steps (
    step INTEGER PRIMARY KEY, loss REAL, detail INTEGER, partial INTEGER DEFAULT 0,
    nonfinite INTEGER DEFAULT 0, nonfinite_module TEXT, nonfinite_params TEXT,
    loss_nonfinite INTEGER DEFAULT 0);
CREATE TABLE IF NOT EXISTS layer_metrics (
    step INTEGER, layer_id INTEGER, metric TEXT, value REAL,
    PRIMARY KEY (metric, step, layer_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS param_metrics (
    step INTEGER, param_id INTEGER, metric TEXT, value REAL,
    PRIMARY KEY (metric, step, param_id)) WITHOUT ROWID;
"""


class RunStoreError(ValueError):
    """The path is not a gradwatch run store, or it cannot be read or written."""


class RunExistsError(RunStoreError, FileExistsError):
    """A run store that already holds a run (or one being written) is at the path."""


def store_file(path: str | Path) -> Path:
    """The SQLite file behind a run path.

    A path is the store file itself when it exists as a file or its name ends in
    ``.sqlite``, ``.sqlite3`` or ``.db`` (and it is not a directory). Any other path is a
    run directory, existing or not, and its store is ``run.sqlite`` inside it: ``runs/lr0.1``
    is the directory ``runs/lr0.1``.
    """
    path = Path(path)
    if path.is_file() or (path.suffix.lower() in STORE_SUFFIXES and not path.is_dir()):
        return path
    return path / FILE_NAME


# Stores open for writing in this process, by resolved path: two watchers writing to
# one store (a script's own watch() under `gradwatch run --out` at the same path) would
# mix their steps.
_writing: weakref.WeakValueDictionary[str, RunWriter] = weakref.WeakValueDictionary()

_STORE_TABLES = {"meta", "layers", "steps"}


def _sidecars(file: Path) -> list[Path]:
    return [file.with_name(file.name + end) for end in ("-wal", "-shm", "-journal")]


def _recorded(file: Path) -> tuple[int, int]:
    """(steps, layers) recorded in an existing store file; (0, 0) for an empty file.

    Raises:
        RunStoreError: if the file is not a readable gradwatch run store.
    """
    if file.stat().st_size == 0:
        return 0, 0
    refused = (
        f"{file} exists and is not a readable gradwatch run store; "
        "remove it yourself or choose another path"
    )
    try:
        db = _connect_readonly(file)
    except RunStoreError:
        raise RunStoreError(refused) from None
    try:
        tables = {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables >= _STORE_TABLES:
            raise RunStoreError(refused)
        steps = db.execute("SELECT COUNT(*) FROM steps").fetchone()[0]
        layers = db.execute("SELECT COUNT(*) FROM layers").fetchone()[0]
    except sqlite3.Error:
        raise RunStoreError(refused) from None
    finally:
        db.close()
    return int(steps), int(layers)


def check_new_store(path: str | Path, *, overwrite: bool = False) -> Path:
    """Check that a new run can be written at ``path`` (a run directory or store file).

    Returns the store file. Nothing is created or removed.

    Raises:
        RunExistsError: a store with recorded steps or layers is there and ``overwrite``
            is false, or another watcher in this process is writing to it (with
            ``overwrite``, that watcher is closed first).
        RunStoreError: the path cannot hold a store (a directory where the file goes, a
            file that is not a gradwatch store, a parent that is a file or not writable).
    """
    file = store_file(path)
    try:
        if file.is_dir():
            raise RunStoreError(f"cannot write a run store at {path}: {file} is a directory")
        ancestor = file.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise RunStoreError(
                f"cannot write a run store at {path}: {ancestor} is not a directory"
            )
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise RunStoreError(f"cannot write a run store at {path}: {ancestor} is not writable")
        other = _writing.get(str(file.resolve()))
        if other is not None and overwrite and other.on_evict is not None:
            # A watcher never closed (a notebook cell run again): its run is being replaced.
            other.evict()
        elif other is not None:
            close = (
                "pass overwrite=True to close it and replace its run"
                if other.on_evict is not None
                else "it is `gradwatch run`'s own: give the script another run directory"
            )
            raise RunExistsError(
                f"another watcher in this process is writing the run store at {path}; "
                f"close it first, {close}, or choose another run directory"
            )
        if not file.exists():
            return file
        steps, layers = _recorded(file)
    except RunStoreError:  # RunExistsError is an OSError too
        raise
    except OSError as exc:
        raise RunStoreError(f"cannot write a run store at {path}: {exc}") from None
    if (steps or layers) and not overwrite:
        raise RunExistsError(
            f"{path} already holds a gradwatch run ({steps} steps, {layers} layers); "
            "to replace it pass --overwrite (overwrite=True from Python), "
            "or choose another run directory"
        )
    return file


def fresh_path(path: str | Path) -> Path:
    """``path``, or ``path-2``, ``path-3``, ... : the first that does not exist yet."""
    path = Path(path)
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


@dataclass
class LayerRow:
    id: int
    name: str
    type: str
    kind: str | None
    exec_order: int | None
    fan_in: int | None
    n_params: int
    model: str = ""


@dataclass
class ParamRow:
    id: int
    name: str
    layer_id: int
    shape: str
    numel: int


class RunWriter:
    """Appends flushed steps to a run store. One transaction per flush.

    Args:
        path: a run directory or a store file (see :func:`store_file`).
        overwrite: replace a store already at ``path`` (its ``run.sqlite`` and the
            ``-wal``/``-shm`` files beside it). Without it, a store that holds steps or
            layers is refused with :class:`RunExistsError`, so that two runs never mix.

    Raises:
        RunExistsError: see ``overwrite``; also while another writer of this process
            has the store open.
        RunStoreError: the store cannot be created or written at ``path``.
    """

    def __init__(self, path: str | Path, *, overwrite: bool = False) -> None:
        self.file = check_new_store(path, overwrite=overwrite)
        self._db: sqlite3.Connection | None = None
        # What closes this store's watcher when another run replaces it (see evict); None
        # pins the store to its watcher (`gradwatch run`'s own).
        self.on_evict: Callable[[], None] | None = None
        try:
            if overwrite and self.file.exists():
                for stale in (self.file, *_sidecars(self.file)):
                    stale.unlink(missing_ok=True)
            self.file.parent.mkdir(parents=True, exist_ok=True)
            # A model may train in a thread other than the one that watched it (a notebook's
            # worker, a GUI): the flush writes from there, one flush at a time (_lock).
            self._db = sqlite3.connect(self.file, check_same_thread=False)
            self._lock = threading.Lock()
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self.set_meta({"schema_version": SCHEMA_VERSION})
            self._key = str(self.file.resolve())
        except (OSError, sqlite3.Error) as exc:
            if self._db is not None:
                self._db.close()
            raise RunStoreError(f"cannot write a run store at {path}: {exc}") from None
        _writing[self._key] = self

    def set_meta(self, values: dict[str, object]) -> None:
        with self._lock, self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in values.items()],
            )

    def write(
        self,
        layers: Iterable[LayerRow],
        params: Iterable[tuple[int, str, int, str, int]],
        steps: Sequence[tuple],
        layer_metrics: Iterable[tuple[int, int, str, float]],
        param_metrics: Iterable[tuple[int, int, str, float]],
    ) -> None:
        """Write one flush: layer and parameter descriptions, then the steps' rows."""
        with self._lock, self._db:
            self._insert(
                "layers",
                8,
                (
                    (r.id, r.name, r.type, r.kind, r.exec_order, r.fan_in, r.n_params, r.model)
                    for r in layers
                ),
            )
            self._insert("params", 5, params)
            self._insert("steps", 8, steps)
            self._insert("layer_metrics", 4, layer_metrics)
            self._insert("param_metrics", 4, param_metrics)

    def _insert(self, table: str, width: int, rows: Iterable[Sequence]) -> None:
        """INSERT OR REPLACE ``rows``, ROWS_PER_INSERT of them per statement.

        Each statement costs a round of binding and stepping; a row inside a multi-row
        statement costs about 1 µs against 1.6 µs alone, and a full-mode flush writes
        some 450 rows per step.
        """
        one = "(" + ", ".join("?" * width) + ")"
        head = f"INSERT OR REPLACE INTO {table} VALUES "
        rows = iter(rows)
        full: list[list] = []
        while len(chunk := list(islice(rows, ROWS_PER_INSERT))) == ROWS_PER_INSERT:
            full.append(list(chain.from_iterable(chunk)))
        if full:
            self._db.executemany(head + ", ".join([one] * ROWS_PER_INSERT), full)
        if chunk:
            self._db.executemany(head + one, chunk)

    def evict(self) -> None:
        """Close the watcher writing here (``on_evict``; None pins the store: nothing to do)."""
        if self.on_evict is not None:
            self.on_evict()

    def close(self) -> None:
        if _writing.get(self._key) is self:
            del _writing[self._key]
        with self._lock:
            self._db.close()


def _shm_refused(exc: sqlite3.Error) -> bool:
    """Whether a read-only open failed as a WAL store does where its -shm cannot be made."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:  # SQLITE_CANTOPEN (a read-only mount), SQLITE_READONLY_DIRECTORY
        return code & 0xFF == 14 or code == 1544
    return any(m in str(exc) for m in ("unable to open database", "attempt to write a readonly"))


def _connect_readonly(file: Path) -> sqlite3.Connection:
    """A read-only connection, by an escaped URI (a path may hold '#', '?' or '%').

    A WAL store in a directory that cannot be written (an archive, a read-only mount, a
    colleague's directory) fails to open read-only, since SQLite must create its ``-shm``
    file there. Such a store is
    opened as immutable instead, which is safe only because no writer can work in that
    directory, and only when no write-ahead log with unmerged steps lies beside it
    (immutable reads ignore it).
    """
    uri = file.resolve().as_uri()
    try:
        db = sqlite3.connect(f"{uri}?mode=ro", uri=True)
        try:
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            db.close()
            if not _shm_refused(exc) or os.access(file.parent, os.W_OK):
                raise
            wal = _sidecars(file)[0]
            if wal.exists() and wal.stat().st_size > 0:
                raise RunStoreError(
                    f"{file} has steps not yet merged from {wal.name}, and its directory is "
                    "read-only; copy the run directory somewhere writable to read it"
                ) from None
            db = sqlite3.connect(f"{uri}?immutable=1", uri=True)
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return db
    except (sqlite3.Error, OSError) as exc:
        raise RunStoreError(f"cannot open {file} as a run store: {exc}") from None


class Run:
    """A run store opened for reading.

    Attributes:
        path: the SQLite file.
        layers: module names in execution order.
        steps: optimizer step indices, ascending.
        metrics: names of the per-layer metrics present.

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> import gradwatch
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with gradwatch.watch(model, opt, run=tempfile.mkdtemp()) as w:
        ...     for _ in range(3):
        ...         loss = model(torch.randn(16, 4)).pow(2).mean()
        ...         opt.zero_grad(); loss.backward(); opt.step()
        >>> run = gradwatch.open_run(w.run_dir)
        >>> run.layers, run.matrix("grad_norm").shape
        (['0', '1', '2'], (3, 3))
    """

    def __init__(self, path: str | Path) -> None:
        self.path = store_file(path)
        if not self.path.is_file():
            raise RunStoreError(f"no gradwatch run store at {path} (looked for {self.path})")
        self._db = _connect_readonly(self.path)
        try:
            self._read()
        except (sqlite3.Error, RunStoreError) as exc:
            self._db.close()
            raise RunStoreError(
                f"{self.path} is not a gradwatch run store, or it is damaged: {exc}"
            ) from None

    def _read(self) -> None:
        self.meta = {k: v for k, v in self._db.execute("SELECT key, value FROM meta")}
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(layers)")}
        if not columns:
            raise RunStoreError("no layers table")
        model = "model" if "model" in columns else "''"  # stores written before the column existed
        rows = self._db.execute(
            f"SELECT id, name, type, kind, exec_order, fan_in, n_params, {model} FROM layers "
            "ORDER BY exec_order IS NULL, exec_order, id"
        ).fetchall()
        self.layer_info = [LayerRow(*r) for r in rows]
        self.layers = [r.name for r in self.layer_info]
        self._column = {r.id: i for i, r in enumerate(self.layer_info)}
        step_rows = self._db.execute("SELECT step, loss FROM steps ORDER BY step").fetchall()
        self.steps = np.array([r[0] for r in step_rows], dtype=np.int64)
        self.loss = np.array(
            [np.nan if r[1] is None else r[1] for r in step_rows], dtype=np.float64
        )
        self._row = {int(s): i for i, s in enumerate(self.steps)}
        stored = {m for (m,) in self._db.execute("SELECT DISTINCT metric FROM layer_metrics")}
        self.metrics = sorted(stored | {"nonfinite"} if stored else stored)
        self.param_info = [
            ParamRow(*r)
            for r in self._db.execute(
                "SELECT id, name, layer_id, shape, numel FROM params ORDER BY id"
            )
        ]
        self.params = [r.name for r in self.param_info]

    def _query(self, sql: str, args: Sequence = ()) -> list[tuple]:
        """All rows of a query; a damaged store raises RunStoreError, not sqlite3's errors."""
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise RunStoreError(f"cannot read {self.path}, it may be damaged: {exc}") from None

    def matrix(self, metric: str) -> np.ndarray:
        """A (steps x layers) array of one metric, NaN where it was not measured.

        ``nonfinite`` is 1 where the layer's output, error or gradient was inf or NaN,
        0 where the layer was measured and finite, NaN where it was not measured.
        """
        if metric not in self.metrics:
            raise KeyError(f"no metric {metric!r} in this run; it has: {', '.join(self.metrics)}")
        query = "SELECT step, layer_id, value FROM layer_metrics WHERE metric = ?"
        if metric != "nonfinite":
            return self._fill(self._query(query, (metric,)), self._column, len(self.layers))
        measured = self._fill(
            self._query("SELECT DISTINCT step, layer_id, 0.0 FROM layer_metrics"),
            self._column,
            len(self.layers),
        )
        flagged = self._fill(self._query(query, (metric,)), self._column, len(self.layers))
        return np.where(np.isnan(flagged), measured, flagged)

    def param_matrix(self, metric: str) -> np.ndarray:
        """A (steps x params) array of a per-parameter metric (grad_norm, update_norm, weight_norm)."""
        column = {r.id: i for i, r in enumerate(self.param_info)}
        query = "SELECT step, param_id, value FROM param_metrics WHERE metric = ?"
        return self._fill(self._query(query, (metric,)), column, len(column))

    def _fill(self, rows: Iterable[tuple], column: dict[int, int], width: int) -> np.ndarray:
        """Scatter (step, id, value) rows into a (steps x width) array; NULL reads as NaN."""
        out = np.full((len(self.steps), width), np.nan)
        data = np.array(list(rows), dtype=np.float64).reshape(-1, 3)  # None becomes NaN
        if not len(data) or not column:
            return out
        steps, ids = data[:, 0].astype(np.int64), data[:, 1].astype(np.int64)
        lookup = np.full(max(max(column), int(ids.max())) + 1, -1)
        lookup[list(column)] = list(column.values())
        cols = np.where(ids >= 0, lookup[np.clip(ids, 0, None)], -1)
        rows_at = np.searchsorted(self.steps, steps)
        found = (rows_at < len(self.steps)) & (cols >= 0)
        found[found] = self.steps[rows_at[found]] == steps[found]
        out[rows_at[found], cols[found]] = data[found, 2]
        return out

    def step_table(self) -> list[dict]:
        """Every step row as a dict (loss, detail, partial, nonfinite, nonfinite_module, ...)."""
        try:
            cur = self._db.execute("SELECT * FROM steps ORDER BY step")
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, r, strict=True)) for r in cur]
            for row in rows:
                row["nonfinite_params"] = json.loads(row["nonfinite_params"] or "[]")
        except (sqlite3.Error, ValueError) as exc:
            raise RunStoreError(f"cannot read {self.path}, it may be damaged: {exc}") from None
        return rows

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, steps={len(self.steps)}, layers={len(self.layers)})"


def open_run(path: str | Path) -> Run:
    """Open a run store for reading: the run directory or its ``run.sqlite``.

    Raises:
        RunStoreError: if there is no readable store at ``path``.
    """
    return Run(path)
