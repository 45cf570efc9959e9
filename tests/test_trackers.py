"""Experiment trackers through Accelerate (``train.report_to``): a tensorboard event file holds the
metrics that metrics.jsonl holds; a tracker that is not installed is a recipe error."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from adaptercli import checks
from adaptercli.cli import app
from adaptercli.recipe import load_recipe
from adaptercli.train import train
from tests.conftest import write_recipe

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}


def test_tensorboard_gets_the_metrics(tmp_path: Path, tiny_bert_dir: Path, sentiment_csv: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_bert_dir, sentiment_csv, max_steps=4, eval_steps=2, logging_steps=1,
                          save_steps=4, report_to=["tensorboard"])
    train(load_recipe(recipe), console=Console(quiet=True))
    events = list((tmp_path / "run/trackers/tiny").glob("events.out.tfevents.*"))
    assert events, "a tensorboard event file under output_dir/trackers/<adapter name>"
    log = EventAccumulator(str(events[0].parent))
    log.Reload()
    scalars = log.Tags()["scalars"]
    assert {"train/loss", "train/lr", "eval/loss", "eval/accuracy"} <= set(scalars)
    written = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    train_losses = {e["step"]: e["loss"] for e in written if not e.get("eval")}
    assert {s.step: s.value for s in log.Scalars("train/loss")} == train_losses  # metrics.jsonl: the source
    assert [s.step for s in log.Scalars("eval/accuracy")] == [e["step"] for e in written if e.get("eval")]


def test_a_tracker_that_is_not_installed_is_a_recipe_error(tmp_path: Path, tiny_bert_dir: Path,
                                                           sentiment_csv: Path, monkeypatch) -> None:
    monkeypatch.setitem(checks._TRACKER_PACKAGES, "wandb", ("no_such_wandb_module", "pip install wandb"))
    recipe = write_recipe(tmp_path, tiny_bert_dir, sentiment_csv)
    for command in ("validate", "train"):
        result = CliRunner().invoke(app, [command, str(recipe), "train.report_to=[tensorboard,wandb]"], env=ENV)
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert "error: train.report_to[1]: wandb is not installed (pip install wandb)" in result.output
    result = CliRunner().invoke(app, ["validate", str(recipe), "train.report_to=[tensorbored]"], env=ENV)
    assert result.exit_code == 1 and "did you mean tensorboard?" in result.output
