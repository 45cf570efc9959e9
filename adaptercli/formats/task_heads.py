"""Which transformers task model computes what one of our flexible heads computes.

PEFT keeps a head as ``modules_to_save`` of a transformers task model, and a merged export is a
task model, so a head travels outside adaptercli only where a task model's own head does the
same arithmetic. BERT's ``pooler.dense`` + tanh + ``classifier`` on the first token is our
2-layer tanh classification head; RoBERTa's ``classifier.dense`` / ``out_proj`` likewise;
DistilBERT's ``pre_classifier`` + ReLU + ``classifier`` is our 2-layer ReLU head; the decoders'
``score`` (no bias, last real token) is our 1-layer head without bias; a token-classification
``classifier`` / ``score`` is our 1-layer tagging head; a causal LM with tied embeddings is our
``causal_lm`` head. Anything else is reported, never approximated.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from ..heads import HeadConfig

_SEQUENCE = ("classification", "multilabel_classification", "regression")
_PROBLEM_TYPES = {"classification": "single_label_classification",
                  "multilabel_classification": "multi_label_classification", "regression": "regression"}
_DECODERS = ("gpt2", "llama", "mistral", "qwen2")
# (model types, layers, activation, bias) -> our Sequential index -> module path in the task model
# ("{prefix}" is the backbone attribute, e.g. "bert"), and the top-level modules PEFT must save.
_SEQUENCE_LAYOUTS = (
    (("bert",), 2, "tanh", True, {1: "{prefix}.pooler.dense", 4: "classifier"}, ["classifier", "pooler"]),
    (("roberta", "xlm-roberta"), 2, "tanh", True, {1: "classifier.dense", 4: "classifier.out_proj"}, ["classifier"]),
    (("distilbert",), 2, "relu", True, {1: "pre_classifier", 4: "classifier"}, ["pre_classifier", "classifier"]),
    (_DECODERS, 1, None, False, {1: "score"}, ["score"]),
)


@dataclasses.dataclass(frozen=True)
class TaskHead:
    """A transformers task model whose head equals ours.

    auto_class: e.g. ``AutoModelForSequenceClassification``; peft_task_type: PEFT's ``task_type``;
    modules: our head's Sequential index -> the task model's module with the same weights;
    modules_to_save: what PEFT must save; config: the task model's config changes (labels).
    """

    auto_class: str
    peft_task_type: str
    modules: dict[int, str]
    modules_to_save: list[str]
    config: dict[str, Any]


@functools.cache
def backbone_class(model_type: str) -> type:
    """transformers' base model class of a model type (``bert`` -> ``BertModel``), without
    building a model."""
    from transformers import MODEL_MAPPING, AutoConfig

    return MODEL_MAPPING[type(AutoConfig.for_model(model_type))]


def base_model_prefix(model_type: str) -> str:
    """The attribute under which task models hold the backbone (``bert``, ``transformer``, ``model``)."""
    return backbone_class(model_type).base_model_prefix


def task_head(model_type: str, head: HeadConfig, tied_embeddings: bool = True) -> TaskHead | str:
    """The task model equal to ``head`` on a ``model_type`` backbone, or why there is none."""
    kind, prefix = head.head_type, base_model_prefix(model_type)
    labels = {}
    if head.label2id:
        labels = {"id2label": {int(i): str(label) for label, i in head.label2id.items()},
                  "label2id": {str(label): int(i) for label, i in head.label2id.items()}}
    if kind in _SEQUENCE:
        for types, layers, activation, bias, modules, save in _SEQUENCE_LAYOUTS:
            if model_type not in types:
                continue
            fits = head.layers == layers and head.bias == bias and not head.use_pooler and (
                layers == 1 or head.activation_function == activation)
            if not fits:
                want = f"{layers} layer{'s' if layers > 1 else ''}" + (f", {activation} activation" if layers > 1 else "")
                want += "" if bias else ", no bias"
                return (f"a {model_type} sequence head there has {want}; this head has {head.layers} layer(s), "
                        f"{head.activation_function} activation{'' if head.bias else ', no bias'}")
            return TaskHead("AutoModelForSequenceClassification", "SEQ_CLS",
                            {i: m.format(prefix=prefix) for i, m in modules.items()}, save,
                            {"num_labels": head.num_labels, "problem_type": _PROBLEM_TYPES[kind], **labels})
        return f"no transformers sequence-classification layout is known for {model_type}"
    if kind == "tagging":
        if head.layers != 1 or not head.bias:
            return f"a token-classification head there is 1 layer with bias; this head has {head.layers} layer(s)"
        name = "score" if model_type in ("llama", "mistral", "qwen2") else "classifier"
        return TaskHead("AutoModelForTokenClassification", "TOKEN_CLS", {1: name}, [name],
                        {"num_labels": head.num_labels, **labels})
    if kind == "causal_lm" and model_type in _DECODERS:
        if not tied_embeddings:
            return "this head reuses the input embeddings, but the model's output embeddings are untied"
        return TaskHead("AutoModelForCausalLM", "CAUSAL_LM", {}, [], {})
    return f"{kind} heads have no transformers task-model equivalent here"
