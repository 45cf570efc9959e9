"""Every method beyond the core seven trains from a recipe: a short run on a tiny BERT moves every trained
tensor, leaves the tensors that are saved but never trained (VeRA's shared random matrices, ReFT's
orthogonal base) exactly as they were, and writes an adapter folder that loads back with its head
and gives the trained model's predictions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import write_recipe
from rich.console import Console
from safetensors.torch import load_file

import adaptercli
from adaptercli import train as train_module
from adaptercli.recipe import load_recipe

# Tiny-model settings: the tiny BERT is 32 wide (Compacter's default width would be 1); ReFT also
# edits the last token so that both of its units train, in the first layer only (the head reads the
# first token, which an edit of the last layer's last token cannot reach).
METHODS = {
    "scaled_par_bn": {}, "double_seq_bn_inv": {}, "prefix_tuning_flat": {"prefix_length": 5},
    "compacter": {"reduction_factor": 4}, "compacter++": {"reduction_factor": 4},
    "prompt_tuning": {"prompt_length": 4},
    **{m: {"suffix_positions": 1, "layers": [0]} for m in ("loreft", "noreft", "direft")},
    "vera": {}, "dora": {}, "dvora": {},
    "mam": {"prefix_tuning": {"prefix_length": 5, "bottleneck_size": 32}},
    "unipelt": {"prefix_tuning": {"prefix_length": 5, "bottleneck_size": 32}},
}
NEVER_TRAINED = ("shared_parameters.tiny.lora_", ".parametrizations.weight.0.base")
# One method per new family runs in `make test` (about 8 s each on 2 CPU cores); the rest are slow.
QUICK = {"compacter", "prompt_tuning", "loreft", "dvora", "unipelt"}


@pytest.mark.parametrize("method", [m if m in QUICK else pytest.param(m, marks=pytest.mark.slow) for m in METHODS])
def test_method_trains_from_a_recipe(method: str, tmp_path: Path, tiny_bert_dir: Path, sentiment_csv: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    initial: dict[str, torch.Tensor] = {}
    trained: dict[str, object] = {}
    build = train_module.prepare_model

    def recording(recipe, data):
        model, tokenizer = build(recipe, data)
        state = model.adapter_state
        initial.update({k: p.detach().clone() for k, p in state.adapter_parameters("tiny").items()})
        trained["model"], trained["tokenizer"] = model, tokenizer
        return model, tokenizer

    monkeypatch.setattr(train_module, "prepare_model", recording)
    recipe = write_recipe(tmp_path, tiny_bert_dir, sentiment_csv, method=method, config=METHODS[method],
                          max_steps=12, eval_steps=100, save_steps=100, learning_rate=5e-3)
    final = train_module.train(load_recipe(recipe), console=Console(quiet=True))
    assert final["loss"] == final["loss"], final  # a number, not NaN

    saved = load_file(tmp_path / "run/adapter/adapter.safetensors")
    assert saved.keys() == initial.keys()
    frozen = [k for k in saved if any(part in k for part in NEVER_TRAINED)]
    unmoved = [k for k in saved if k not in frozen and (saved[k] - initial[k]).abs().max() < 1e-6]
    assert not unmoved, f"{len(unmoved)} of {len(saved)} tensors never trained: {unmoved[:3]}"
    for key in frozen:
        assert torch.equal(saved[key], initial[key]), f"{key} must stay frozen"

    model, tokenizer = trained["model"], trained["tokenizer"]
    batch = tokenizer(["great movie number 7", "awful movie"], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    again = adaptercli.AutoAdapterModel.from_pretrained(tiny_bert_dir).eval()
    name = again.load_adapter(tmp_path / "run/adapter", set_active=True)
    assert again.adapter_summary()[0]["method"] == method
    with torch.no_grad():
        logits = again(**batch).logits
    assert name in again.heads and torch.allclose(logits, expected, atol=1e-5)
