"""Flexible prediction heads for :class:`~adaptercli.model.AdapterModel`.

A head turns the backbone's hidden states [B, T, H] into task outputs. Layouts and parameter names
follow AdapterHub's heads so that its ``head_config.json`` + head weights load: a classification
head with ``layers=2`` is ``Sequential(Dropout, Linear(H, H), act, Dropout, Linear(H, n))`` and its
weights are ``heads.<name>.1.*`` and ``heads.<name>.4.*``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.activations import get_activation

from .errors import AdapterCliError

# The head types a recipe names (``head.type``, short) and the head type each builds (AdapterHub's
# names, as saved in ``head_config.json``). The one list of head types; the others derive from it.
RECIPE_HEADS = {"classification": "classification", "multilabel": "multilabel_classification",
                "regression": "regression", "tagging": "tagging", "qa": "question_answering", "mlm": "masked_lm",
                "causal_lm": "causal_lm"}
HEAD_TYPES = tuple(RECIPE_HEADS.values())


def recipe_head_type(head_type: str) -> str | None:
    """The recipe's name for a head type (``question_answering`` -> ``qa``); None for an unknown one."""
    return next((short for short, full in RECIPE_HEADS.items() if full == head_type), None)


@dataclass
class HeadConfig:
    """What a head is; saved as ``head_config.json``'s ``config``."""

    head_type: str
    num_labels: int = 2
    layers: int = 2
    activation_function: str | None = "tanh"
    label2id: dict[str, int] | None = None
    use_pooler: bool = False
    bias: bool = True
    dropout_prob: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(data.pop("extra"))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "extra"}
        extra = {k: v for k, v in data.items() if k not in cls.__dataclass_fields__}
        if known.get("head_type") == "multilabel":
            known["head_type"] = "multilabel_classification"
        if known.get("head_type") not in HEAD_TYPES:
            raise AdapterCliError(f"unknown head type '{known.get('head_type')}'; known: {', '.join(HEAD_TYPES)}")
        return cls(**known, extra=extra)

    @property
    def id2label(self) -> dict[int, str] | None:
        return {i: label for label, i in self.label2id.items()} if self.label2id else None


def _mlp(hidden: int, out: int, layers: int, activation: str | None, dropout: float, bias: bool) -> list[nn.Module]:
    modules: list[nn.Module] = []
    for i in range(layers):
        modules.append(nn.Dropout(dropout))
        if i < layers - 1:
            modules += [nn.Linear(hidden, hidden), get_activation(activation) if activation else nn.Identity()]
        else:
            modules.append(nn.Linear(hidden, out, bias=bias))
    return modules


class PredictionHead(nn.Sequential):
    """A head: a Sequential over hidden states plus how it pools and which loss it uses."""

    def __init__(self, config: HeadConfig, hidden_size: int, dropout: float, causal: bool, embeddings: nn.Embedding | None):
        self.config = config
        self.causal = causal
        kind = config.head_type
        p = config.dropout_prob if config.dropout_prob is not None else dropout
        if kind in ("masked_lm", "causal_lm"):
            if embeddings is None:
                raise AdapterCliError("a language-modelling head needs the model's input embeddings")
            vocab = embeddings.num_embeddings
            modules: list[nn.Module] = []
            if kind == "masked_lm":
                modules = [nn.Linear(hidden_size, hidden_size), get_activation("gelu"), nn.LayerNorm(hidden_size)]
            decoder = nn.Linear(hidden_size, vocab, bias=kind == "masked_lm")
            decoder.weight = embeddings.weight  # tied: the head adds no vocabulary-sized weights
            super().__init__(*modules, decoder)
        else:
            out = 2 if kind == "question_answering" else config.num_labels
            super().__init__(*_mlp(hidden_size, out, config.layers, config.activation_function, p, config.bias))

    def same_as(self, other: PredictionHead) -> bool:
        """Whether ``other`` computes what this head computes: the same kind and shape over the very
        same weight tensors (causal-LM heads are the tied input embeddings alone, so every adapter's
        is the same projection)."""
        if other is self:
            return True
        if next(self.parameters(), None) is not next(other.parameters(), None):
            return False  # distinct weights (the common case) refused before listing them all
        mine, theirs = list(self.parameters()), list(other.parameters())
        return (self.config.head_type == other.config.head_type and len(mine) == len(theirs)
                and all(a is b for a, b in zip(mine, theirs, strict=True)) and repr(self) == repr(other))

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Sequence-level heads read the first token (encoders) or the last real token (decoders)."""
        if not self.causal:
            return hidden[:, 0]
        if attention_mask is None:
            return hidden[:, -1]
        last = attention_mask.long().sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def predict(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None,
                inverse: nn.Module | None = None, logits_to_keep: int = 0) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Loss (with ``labels``) and logits. ``logits_to_keep`` > 0: an LM head writes the logits of
        the last that many positions only (a decoder choosing its next token needs one)."""
        kind = self.config.head_type
        if kind in ("classification", "multilabel_classification", "regression"):
            logits = super().forward(self.pool(hidden, attention_mask))
        elif kind in ("masked_lm", "causal_lm"):
            x = hidden[:, -logits_to_keep:] if logits_to_keep and labels is None else hidden
            for module in list(self)[:-1]:
                x = module(x)
            if inverse is not None:  # the invertible adapter's inverse before the vocabulary projection
                x = inverse.inverse(x)
            logits = self[-1](x)
        else:
            logits = super().forward(hidden)
        loss = None if labels is None else self.loss(logits, labels)
        return loss, logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        kind = self.config.head_type
        if kind == "regression":
            return F.mse_loss(logits.view(-1), labels.float().view(-1))
        if kind == "multilabel_classification":
            return F.binary_cross_entropy_with_logits(logits, labels.float())
        if kind == "question_answering":
            start, end = logits.unbind(-1)
            return (F.cross_entropy(start, labels[:, 0]) + F.cross_entropy(end, labels[:, 1])) / 2
        if kind == "causal_lm":
            logits, labels = logits[:, :-1], labels[:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
