"""``train.compile: true`` runs the adapted model through torch.compile (via Accelerate's dynamo
backend): the same recipe trains to the same adapter as eager, within floating-point reordering,
and the saved adapter is the plain module's (no ``_orig_mod.`` prefixes). The eager run comes first
in the same process: the compiled one must not inherit its Accelerate settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_recipe
from rich.console import Console
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from adaptercli import train as train_module
from adaptercli.recipe import load_recipe


@pytest.mark.parametrize("method", ["lora", pytest.param("seq_bn", marks=pytest.mark.slow)])
def test_compiled_training_equals_eager(method: str, tmp_path: Path, tiny_bert_dir: Path, sentiment_csv: Path) -> None:
    # dropout off (model and head): eager and compiled code draw their dropout masks differently
    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.0,
                                                   "attention_probs_dropout_prob": 0.0}))
    runs = {}
    for compiled in (False, True):
        folder = tmp_path / f"compile-{compiled}"
        recipe = write_recipe(folder, model, sentiment_csv, method=method, max_steps=4, save_steps=4,
                              eval_steps=4, compile=compiled, learning_rate=1e-2)
        counters.clear()
        train_module.train(load_recipe(recipe, ["head.dropout=0"]), console=Console(quiet=True))
        assert (counters["stats"]["unique_graphs"] > 0) == compiled  # dynamo really compiled it (or not)
        runs[compiled] = folder / "run"
    eager, compiled = (load_file(runs[c] / "adapter" / "adapter.safetensors") for c in (False, True))
    assert eager.keys() == compiled.keys()
    assert not any("_orig_mod" in k for k in compiled)
    start = load_file(runs[False] / "checkpoints" / "step-4" / "trainable.safetensors")
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in start.values())
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], atol=1e-4, rtol=1e-4)
    losses = [[json.loads(line).get("loss") for line in (runs[c] / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line] for c in (False, True)]
    assert losses[0] and len(losses[0]) == len(losses[1])
    for a, b in zip(*losses, strict=True):
        assert b == pytest.approx(a, abs=1e-4)
