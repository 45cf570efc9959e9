"""Every flexible head: forward, loss, and a save/load round trip with its adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ADD_HEAD as ADD
from conftest import batch, tiny_model

import adaptercli


def _labels(kind: str, ids: torch.Tensor) -> torch.Tensor:
    if kind == "classification":
        return torch.tensor([0, 2])
    if kind == "multilabel":
        return torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    if kind == "regression":
        return torch.tensor([0.5, -1.0])
    if kind == "tagging":
        return torch.randint(0, 3, ids.shape)
    if kind == "qa":
        return torch.tensor([[1, 3], [2, 4]])
    return ids.clone()  # masked / causal LM


@pytest.mark.parametrize("kind", list(ADD))
def test_head_forward_loss_and_round_trip(kind: str, tmp_path: Path) -> None:
    arch = "gpt2" if kind == "causal_lm" else "bert"
    model = adaptercli.AdapterModel(tiny_model(arch))
    model.add_adapter("a", "seq_bn_inv" if kind in ("mlm", "causal_lm") else "lora")
    ADD[kind](model)
    model.train_adapter("a")
    ids, mask = batch()
    labels = _labels(kind, ids)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.heads["a"].parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert grads or kind == "causal_lm"  # a causal LM head is only the tied (frozen) decoder
    if kind in ("mlm", "causal_lm"):  # the decoder is tied to the frozen input embeddings
        assert model.heads["a"][-1].weight is model.base_model.get_input_embeddings().weight
        assert not model.heads["a"][-1].weight.requires_grad
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_adapter(tmp_path / "a", "a")
    fresh = adaptercli.AdapterModel(tiny_model(arch))
    fresh.load_adapter(tmp_path / "a", set_active=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-6)


def test_decoder_classification_reads_the_last_real_token() -> None:
    model = adaptercli.AdapterModel(tiny_model("gpt2"))
    model.add_classification_head("a", num_labels=2)
    model.eval()
    ids, mask = batch()
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits[1]
        trimmed = model(input_ids=ids[1:, :-3], attention_mask=mask[1:, :-3]).logits[0]
    assert torch.allclose(padded, trimmed, atol=1e-5)
