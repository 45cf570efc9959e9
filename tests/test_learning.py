"""Training learns: for each method family, sixteen steps on a tiny task reach a high accuracy, and
every tensor of the saved adapter has moved away from its initialisation.

The backbone is the real MiniLM (installed offline, 6 x 384): a frozen random backbone carries too
little of the input to its first token for a bottleneck adapter to learn from in a few steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import write_recipe
from rich.console import Console
from safetensors.torch import load_file

from adaptercli import train as train_module
from adaptercli.assets import resolve_model_path
from adaptercli.recipe import load_recipe

# prefix tuning's default pool (30 positions, a 512-wide MLP) is slow on CPU; a small one learns as well.
METHODS = {"seq_bn": {}, "lora": {}, "ia3": {}, "prefix_tuning": {"prefix_length": 10, "bottleneck_size": 64}}


@pytest.mark.parametrize("method", list(METHODS))
def test_sixteen_steps_learn_the_task(method: str, tmp_path: Path, sentiment_csv: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    initial: dict[str, torch.Tensor] = {}
    build = train_module.prepare_model

    def recording_initial_weights(recipe, data):
        model, tokenizer = build(recipe, data)
        adapter = model.adapter_state.adapter_parameters(recipe.adapter.name)
        initial.update({key: p.detach().clone() for key, p in adapter.items()})
        return model, tokenizer

    monkeypatch.setattr(train_module, "prepare_model", recording_initial_weights)
    recipe = write_recipe(tmp_path, resolve_model_path("minilm"), sentiment_csv, method=method,
                          config=METHODS[method], max_steps=16, eval_steps=100, save_steps=100, logging_steps=4,
                          learning_rate=1e-3, lr_scheduler="constant")
    final = train_module.train(load_recipe(recipe), console=Console(quiet=True))

    assert final["accuracy"] >= 0.9, final  # chance is 0.5
    assert final["loss"] < 0.35, final  # chance is ln 2 = 0.69
    saved = load_file(tmp_path / "run/adapter/adapter.safetensors")
    assert initial and saved.keys() == initial.keys()
    unmoved = [key for key in saved if (saved[key] - initial[key]).abs().max() < 1e-5]
    assert not unmoved, f"{len(unmoved)} of {len(saved)} adapter tensors never changed: {unmoved[:3]}"
