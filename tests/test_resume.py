"""Checkpoints and --resume, in-process on a tiny BERT: a resumed run continues from the
checkpoint's weights (a perturbed checkpoint moves the result; an untouched one ends bit-identical
to an uninterrupted run); a checkpoint write cut off midway leaves the previous checkpoint intact
and resumable; and with ``metric_for_best`` the ``adapter/`` folder holds the best evaluation's
weights, not the last ones. (tests/test_cli.py kills a real process with SIGKILL.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_recipe
from rich.console import Console
from safetensors.torch import load_file, save_file

from adaptercli import checkpoints as checkpoint_module
from adaptercli import train as train_module
from adaptercli.assets import resolve_model_path
from adaptercli.recipe import load_recipe

QUIET = Console(quiet=True)
# 8 steps, checkpoints after steps 4 and 8; dropout is on (tiny BERT's default 0.1), so the RNG
# state must travel with the checkpoint too.
SETTINGS = dict(max_steps=8, save_steps=4, eval_steps=4, save_total_limit=5, learning_rate=1e-2)


def _train(folder: Path, model_dir: Path, train_file: Path, resume: bool = False, **settings: object) -> Path:
    recipe = write_recipe(folder, model_dir, train_file, **{**SETTINGS, **settings})
    train_module.train(load_recipe(recipe), resume=resume, console=QUIET)
    return folder / "run"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def _identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_bert_dir: Path, sentiment_csv: Path) -> Path:
    """An uninterrupted run (the reference every resumed run must reproduce)."""
    return _train(tmp_path_factory.mktemp("straight"), tiny_bert_dir, sentiment_csv)


def _as_killed_after_step_4(run: Path, dest: Path) -> Path:
    """A copy of a finished run folder as a run killed between steps 4 and 8 leaves it."""
    shutil.copytree(run, dest / "run")
    for leftover in ("adapter", "best", "checkpoints/step-8"):
        shutil.rmtree(dest / "run" / leftover, ignore_errors=True)
    (dest / "run/checkpoints/latest.json").write_text(json.dumps({"checkpoint": "step-4", "step": 4}))
    return dest


def test_resume_continues_from_the_checkpoint_weights(straight: Path, tmp_path: Path, tiny_bert_dir: Path,
                                                      sentiment_csv: Path) -> None:
    expected = _tensors(straight / "adapter/adapter.safetensors")

    untouched = _as_killed_after_step_4(straight, tmp_path / "untouched")
    resumed = _train(untouched, tiny_bert_dir, sentiment_csv, resume=True)
    assert _identical(_tensors(resumed / "adapter/adapter.safetensors"), expected)
    assert _identical(_tensors(resumed / "adapter/head.safetensors"), _tensors(straight / "adapter/head.safetensors"))

    perturbed = _as_killed_after_step_4(straight, tmp_path / "perturbed")
    checkpoint = perturbed / "run/checkpoints/step-4/trainable.safetensors"
    weights = _tensors(checkpoint)
    key = next(k for k in weights if ".adapters.tiny.adapter_up.weight" in k)
    weights[key] = weights[key] + 0.05
    save_file(weights, checkpoint)
    resumed = _train(perturbed, tiny_bert_dir, sentiment_csv, resume=True)
    moved = _tensors(resumed / "adapter/adapter.safetensors")
    assert moved.keys() == expected.keys()
    changed = [k for k in expected if not torch.equal(moved[k], expected[k])]
    assert changed, "a resumed run must start from the checkpoint's weights"
    # Four more steps of AdamW cannot undo the perturbation (each moves a weight by ~lr = 0.01).
    assert (moved[key.removeprefix("bert.")] - expected[key.removeprefix("bert.")]).abs().max() > 0.01


class Interrupted(Exception):
    """Stands in for the process dying in the middle of a write."""


def test_interrupted_checkpoint_write_leaves_the_previous_checkpoint(straight: Path, tmp_path: Path,
                                                                     tiny_bert_dir: Path, sentiment_csv: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    write = checkpoint_module.write_weights

    def dies_writing_step_8(path: Path, weights, *args, **kwargs):
        if path.name == "optimizer.safetensors" and path.parent.name.endswith("step-8"):
            path.write_bytes(b"half a file")  # what a kill midway would leave
            raise Interrupted
        return write(path, weights, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "write_weights", dies_writing_step_8)
    with pytest.raises(Interrupted):
        _train(tmp_path, tiny_bert_dir, sentiment_csv)
    monkeypatch.undo()

    checkpoints = tmp_path / "run/checkpoints"
    assert json.loads((checkpoints / "latest.json").read_text())["checkpoint"] == "step-4"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-4"], "no half-written step-8 folder"
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        assert _identical(_tensors(checkpoints / "step-4" / name), _tensors(straight / "checkpoints/step-4" / name))

    resumed = _train(tmp_path, tiny_bert_dir, sentiment_csv, resume=True)
    assert _identical(_tensors(resumed / "adapter/adapter.safetensors"),
                      _tensors(straight / "adapter/adapter.safetensors"))
    assert not list(checkpoints.glob(".tmp-*")), "the resumed run cleans the half-written folder away"


def test_adapter_folder_holds_the_best_evaluation_not_the_last(tmp_path: Path, sentiment_csv: Path) -> None:
    # Validation labels are the training labels flipped: the better the model learns the training
    # set, the worse its validation loss, so the best evaluation (lowest loss) is an early one.
    flipped = tmp_path / "validation.csv"
    flipped.write_text(sentiment_csv.read_text().replace(",pos", ",tmp").replace(",neg", ",pos").replace(",tmp", ",neg"))
    run = _train(tmp_path, Path(resolve_model_path("minilm")), sentiment_csv, max_steps=6, save_steps=2,
                 eval_steps=2, learning_rate=5e-3, metric_for_best="loss", greater_is_better=False,
                 data={"validation_file": str(flipped)})
    evals = [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e.get("eval")]
    assert [e["step"] for e in evals] == [2, 4, 6]
    best = min(evals, key=lambda e: e["loss"])["step"]
    assert best != 6, f"the test needs a best evaluation before the last one: {evals}"

    saved = {**_tensors(run / "adapter/adapter.safetensors"),
             **_tensors(run / "adapter/head.safetensors")}

    def checkpoint(step: int) -> dict[str, torch.Tensor]:
        trainable = _tensors(run / f"checkpoints/step-{step}/trainable.safetensors")
        # checkpoint keys are model paths (`bert.encoder...`, `heads.tiny...`); adapter files'
        # are backbone paths (`encoder...`) and `heads.tiny...`
        return {k if k.startswith("heads.") else k.split(".", 1)[1]: v for k, v in trainable.items()}

    assert _identical(saved, checkpoint(best))
    assert not _identical(saved, checkpoint(6))
