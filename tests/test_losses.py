"""Each head's loss equals its reference formula, written out here from log-softmax and sigmoid, on
fixed tensors: cross-entropy (classification, tagging and masked LM, ignoring -100), cross-entropy
on labels shifted by one for causal LM, mean squared error for regression, binary cross-entropy
for multilabel, and the mean of the start and end cross-entropies for extractive QA."""

from __future__ import annotations

import pytest
import torch
from conftest import ADD_HEAD as ADD
from conftest import batch, tiny_model

import adaptercli


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the labelled positions (label != -100) of -log softmax(logits)[label]."""
    logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    keep = labels != -100
    log_probs = logits[keep].log_softmax(-1)
    return -log_probs[torch.arange(int(keep.sum())), labels[keep]].mean()


def binary_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits.double())
    return -(targets * p.log() + (1 - targets) * (1 - p).log()).mean().float()


def reference_loss(kind: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if kind == "causal_lm":  # position t predicts token t + 1
        return cross_entropy(logits[:, :-1], labels[:, 1:])
    if kind == "regression":
        return ((logits.reshape(-1) - labels) ** 2).mean()
    if kind == "multilabel":
        return binary_cross_entropy(logits, labels)
    if kind == "qa":  # logits [B, T, 2]: start and end scores over the tokens
        return (cross_entropy(logits[..., 0], labels[:, 0]) + cross_entropy(logits[..., 1], labels[:, 1])) / 2
    return cross_entropy(logits, labels)


def _labels(kind: str, ids: torch.Tensor, mask: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    if kind == "classification":
        return torch.tensor([0, 2])
    if kind == "multilabel":
        return torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    if kind == "regression":
        return torch.tensor([2.5, -1.25])
    if kind == "qa":
        return torch.tensor([[1, 3], [2, 4]])
    labels = torch.randint(0, 3, ids.shape, generator=g) if kind == "tagging" else ids.clone()
    labels[mask == 0] = -100  # padding, as the collators mark it
    if kind != "causal_lm":
        labels[:, 0] = -100  # e.g. [CLS], or an unmasked token
    return labels


@pytest.mark.parametrize("kind", list(ADD))
def test_model_loss_is_the_reference_formula_of_its_logits(kind: str) -> None:
    model = adaptercli.AdapterModel(tiny_model("gpt2" if kind == "causal_lm" else "bert"))
    ADD[kind](model)
    model.eval()
    ids, mask = batch()
    labels = _labels(kind, ids, mask, torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.allclose(out.loss, reference_loss(kind, out.logits, labels), atol=1e-6)


# Fixed logits and labels chosen so that each plausible wrong loss gives another number.
G = torch.Generator().manual_seed(0)
LOGITS = {
    "classification": torch.randn(4, 3, generator=G),
    "tagging": torch.randn(2, 5, 4, generator=G),
    "masked_lm": torch.randn(2, 5, 7, generator=G),
    "causal_lm": torch.randn(2, 5, 7, generator=G),
    "regression": torch.tensor([[0.5], [-2.0], [1.0], [3.0]]),
    "multilabel_classification": torch.randn(3, 4, generator=G),
    "question_answering": torch.randn(2, 6, 2, generator=G),
}
LABELS = {
    "classification": torch.tensor([0, 2, 1, 2]),
    "tagging": torch.tensor([[-100, 1, 3, 0, -100], [-100, 2, 2, -100, -100]]),
    "masked_lm": torch.tensor([[-100, 4, -100, -100, 6], [1, -100, -100, 3, -100]]),
    "causal_lm": torch.tensor([[1, 2, 3, 4, 5], [6, 0, 2, -100, -100]]),
    "regression": torch.tensor([1.0, 0.0, 1.0, 0.5]),  # errors 0.5, 2, 0, 2.5: MSE 2.625, L1 1.25
    "multilabel_classification": torch.tensor([[1.0, 0, 0, 1], [0, 0, 1, 0], [1, 1, 1, 0]]),
    "question_answering": torch.tensor([[0, 3], [2, 5]]),
}
REFERENCE_KIND = {"masked_lm": "mlm", "multilabel_classification": "multilabel", "question_answering": "qa"}


@pytest.mark.parametrize("head_type", list(LOGITS))
def test_head_loss_on_fixed_tensors(head_type: str) -> None:
    kind = REFERENCE_KIND.get(head_type, head_type)
    model = adaptercli.AdapterModel(tiny_model("gpt2" if kind == "causal_lm" else "bert"))
    ADD[kind](model)
    head = model.heads["a"]
    assert head.config.head_type == head_type
    logits, labels = LOGITS[head_type], LABELS[head_type]
    expected = reference_loss(kind, logits, labels)
    assert torch.allclose(head.loss(logits, labels), expected, atol=1e-6)

