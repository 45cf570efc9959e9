"""Evaluation of token heads under prompt tuning: the backbone's output has the prompt's positions
in front, so the scored predictions are the ones after them, aligned with the labels (as the
loss aligns them), for both places a prompt joins."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import adaptercli
from adaptercli.evaluation import evaluate
from adaptercli.metrics import compute_metrics


def _collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


@pytest.mark.parametrize("combine", ["prefix", "prefix_after_bos"])
def test_tagging_metrics_read_the_positions_after_the_prompt(combine: str, perturb) -> None:
    model = adaptercli.AdapterModel(tiny_model("bert", attn="sdpa"))
    model.add_adapter("p", {"method": "prompt_tuning", "prompt_length": 3, "combine": combine})
    perturb(model, "p", scale=0.5)
    model.add_tagging_head("p", num_labels=3)
    model.set_active_adapters("p")
    model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (6, 7), generator=g)
    labels = torch.randint(0, 3, (6, 7), generator=g)
    labels[:, 0] = -100  # the first token (a special one) is not scored
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert logits.shape[1] == 10
    split = [{"input_ids": ids[i], "attention_mask": torch.ones(7, dtype=torch.long), "labels": labels[i]}
             for i in range(6)]
    names = ["A", "B", "C"]
    metrics = evaluate(model, split, _collate, "tagging", names, 4, torch.device("cpu"))
    expected = compute_metrics("tagging", logits.argmax(-1)[:, 3:].numpy(), labels.numpy(), names)
    assert metrics["accuracy"] == pytest.approx(expected["accuracy"])
    assert metrics["f1"] == pytest.approx(expected["f1"])
    shifted = compute_metrics("tagging", logits.argmax(-1)[:, :7].numpy(), labels.numpy(), names)
    assert shifted["accuracy"] != pytest.approx(expected["accuracy"])  # reading the prompt's positions would show
