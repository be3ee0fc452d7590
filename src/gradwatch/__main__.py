"""``python -m gradwatch`` is the ``gradwatch`` command."""

from gradwatch.cli import app

app(prog_name="gradwatch")
