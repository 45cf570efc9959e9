"""``python -m adaptercli`` runs the `adapter` command (also under ``accelerate launch -m adaptercli``)."""

from adaptercli.cli import app

app(prog_name="adapter")
