"""The run store's writer: what goes in comes out, row for row, in batches of any size."""

from __future__ import annotations

import sqlite3

import pytest

from gradwatch.store import ROWS_PER_INSERT, RunWriter


@pytest.mark.parametrize("n", [0, 1, ROWS_PER_INSERT - 1, ROWS_PER_INSERT, 2 * ROWS_PER_INSERT + 7])
def test_every_row_is_written_once_and_unchanged(tmp_path, n):
    rows = [(step, step % 5, "grad_norm", step * 0.25 - 3.0) for step in range(n)]
    steps = [(s, 1.5 * s, s % 2, 0, 0, None, None, 0) for s in range(n)]
    writer = RunWriter(tmp_path)
    writer.write([], [], steps, iter(rows), (r for r in rows))  # lists and generators alike
    writer.close()
    db = sqlite3.connect(tmp_path / "run.sqlite")
    assert db.execute("SELECT * FROM layer_metrics ORDER BY step").fetchall() == rows
    assert db.execute("SELECT * FROM param_metrics ORDER BY step").fetchall() == rows
    assert db.execute("SELECT * FROM steps ORDER BY step").fetchall() == steps


def test_a_later_row_with_the_same_key_replaces_the_earlier(tmp_path):
    first = [(0, i, "grad_norm", 1.0) for i in range(ROWS_PER_INSERT)]
    again = [(0, 3, "grad_norm", 2.0)]
    writer = RunWriter(tmp_path)
    writer.write([], [], [], first + again, [])
    writer.close()
    db = sqlite3.connect(tmp_path / "run.sqlite")
    values = dict(db.execute("SELECT layer_id, value FROM layer_metrics").fetchall())
    assert len(values) == ROWS_PER_INSERT and values[3] == 2.0 and values[4] == 1.0
