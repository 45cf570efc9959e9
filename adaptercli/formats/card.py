"""Model cards: the ``README.md`` that travels with a shared adapter.

The YAML front matter is what the Hugging Face Hub indexes (``base_model``, ``library_name``,
``tags``, ``datasets``, ``license``, ``pipeline_tag`` and the evaluation as ``model-index``); the
text says what the adapter is, how to load it in the library its folder is for, and the recipe it
was trained with. Cards are built from plain data (:class:`AdapterCard`); the base model is
named by its Hub id, never by a local path.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from .common import write_text

CARD = "README.md"
# The library each exported folder is for, as the Hub names it.
LIBRARIES = {"native": "adaptercli", "peft": "peft", "adapterhub": "adapter-transformers", "merged": "transformers"}
PIPELINE_TAGS = {"classification": "text-classification", "multilabel": "text-classification",
                 "regression": "text-classification", "tagging": "token-classification", "qa": "question-answering",
                 "mlm": "fill-mask", "causal_lm": "text-generation"}


@dataclasses.dataclass
class AdapterCard:
    """What a card says about one adapter (or fusion).

    name: the adapter's name; kind: "adapter" or "fusion"; format: the folder's format (a key of
    `LIBRARIES`); base_model: Hub id of the base model (None: a local model); task: what it does
    (``sentiment``), task_type: the recipe's task (``classification``), dataset: a short name,
    datasets: Hub data set ids; metrics: the run's evaluation (``split``, ``step``); location: how
    the usage snippet names the folder (a Hub repo id or a path); setup: the composition of an
    adapter setup folder (``Fuse('a', 'b', name='t')``), whose members ``members`` lists.
    """

    name: str
    method: str
    config: dict[str, Any]
    model_type: str | None = None
    hidden_size: int | None = None
    base_model: str | None = None
    kind: str = "adapter"
    format: str = "native"
    task: str | None = None
    task_type: str | None = None
    dataset: str | None = None
    datasets: list[str] = dataclasses.field(default_factory=list)
    labels: list[str] | None = None
    head_type: str | None = None
    parameters: int | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    split: str = "validation"
    step: int | None = None
    license: str | None = None
    recipe: str | None = None
    members: list[str] = dataclasses.field(default_factory=list)
    setup: str | None = None
    location: str | None = None
    auto_class: str | None = None  # the transformers class a PEFT or merged folder goes with
    notes: list[str] = dataclasses.field(default_factory=list)


def metadata(card: AdapterCard) -> dict[str, Any]:
    """The card's YAML front matter."""
    data: dict[str, Any] = {}
    if card.base_model:
        data["base_model"] = card.base_model
    data["library_name"] = LIBRARIES[card.format]
    if card.license:
        data["license"] = card.license
    tags = ["adaptercli", "adapter" if card.format != "merged" else "merged-adapter", card.method]
    tags += ["adapter-setup"] if card.setup else []
    tags += [t for t in (card.model_type, card.task and f"task:{card.task}", card.dataset and f"dataset:{card.dataset}")
             if t]
    data["tags"] = list(dict.fromkeys(tags))
    if card.datasets:
        data["datasets"] = list(card.datasets)
    pipeline = PIPELINE_TAGS.get(card.task_type or "")
    if pipeline:
        data["pipeline_tag"] = pipeline
    if card.metrics and pipeline:
        dataset = {"name": card.dataset or "data", "type": card.datasets[0] if card.datasets else card.dataset or "data",
                   "split": card.split}
        data["model-index"] = [{"name": card.name, "results": [{
            "task": {"type": pipeline, "name": pipeline.replace("-", " ").capitalize()},
            "dataset": dataset,
            "metrics": [{"type": k, "value": round(float(v), 4), "name": k} for k, v in card.metrics.items()],
        }]}]
    return data


def _usage(card: AdapterCard) -> str:
    where = card.location or "path/to/this/folder"
    base = card.base_model or "path/to/the/base/model"
    if card.format == "native" and card.setup:
        return (f'import adaptercli\n\nmodel = adaptercli.AutoAdapterModel.from_pretrained("{base}")\n'
                f'model.load_adapter_setup("{where}")  # members, fusion and head; the setup made active\nmodel.eval()')
    if card.format == "native" and card.kind == "fusion":
        lines = ["import adaptercli", "", f'model = adaptercli.AutoAdapterModel.from_pretrained("{base}")']
        lines += [f'model.load_adapter("path/to/{m}", with_head=False)  # the fused adapters' for m in card.members]
        return "\n".join(lines + [f'model.load_adapter_fusion("{where}", set_active=True)', "model.eval()"])
    if card.format == "native":
        return (f'import adaptercli\n\nmodel = adaptercli.AutoAdapterModel.from_pretrained("{base}")\n'
                f'model.load_adapter("{where}", set_active=True)\nmodel.eval()')
    if card.format == "peft":
        auto = card.auto_class or "AutoModel"
        labels = f", num_labels={len(card.labels)}" if card.labels and "Classification" in auto else ""
        return (f'from peft import PeftModel\nfrom transformers import {auto}\n\n'
                f'base = {auto}.from_pretrained("{base}"{labels})\nmodel = PeftModel.from_pretrained(base, "{where}")')
    if card.format == "adapterhub":
        return (f'from adapters import AutoAdapterModel\n\nmodel = AutoAdapterModel.from_pretrained("{base}")\n'
                f'model.load_adapter("{where}", set_active=True)\nmodel.eval()')
    auto = card.auto_class or "AutoModel"
    return (f'from transformers import {auto}, AutoTokenizer\n\n'
            f'model = {auto}.from_pretrained("{where}")\ntokenizer = AutoTokenizer.from_pretrained("{where}")')


def render(card: AdapterCard) -> str:
    """The whole ``README.md``."""
    front = yaml.safe_dump(metadata(card), sort_keys=False, allow_unicode=True)
    what = {"native": "adapter", "peft": "PEFT adapter", "adapterhub": "AdapterHub adapter",
            "merged": "model (base model with the adapter merged in)"}[card.format]
    lines = [f"---\n{front}---", "", f"# {card.name}", ""]
    about = f"A {card.method} {what if card.kind == 'adapter' else 'AdapterFusion'}"
    about = f"An adapter setup, `{card.setup}`, with its members" if card.setup else about
    about += f" for **{card.task}**" if card.task else ""
    about += f" on {card.dataset}" if card.dataset else ""
    about += f", trained with adaptercli on `{card.base_model}`" if card.base_model else ""
    lines += [about + ".", ""]
    facts = [("base model", card.base_model or "a local model"), ("model type", card.model_type),
             ("method", card.method), ("parameters", f"{card.parameters:,}" if card.parameters else None),
             ("head", card.head_type), ("labels", ", ".join(card.labels) if card.labels else None),
             ("setup", f"`{card.setup}`" if card.setup else None),
             ("members" if card.setup else "fused adapters", ", ".join(card.members) if card.members else None)]
    lines += [f"- {k}: {v}" for k, v in facts if v] + [""]
    if card.metrics:
        lines += [f"## Evaluation ({card.split}{f', step {card.step}' if card.step is not None else ''})", "",
                  "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {float(v):.4f} |" for k, v in card.metrics.items()] + [""]
    lines += ["## Usage", "", "```python", _usage(card), "```", ""]
    if card.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in card.notes] + [""]
    if card.recipe:
        lines += ["## Recipe", "", "The resolved recipe it was trained with (local files by their names):", "",
                  "```yaml", card.recipe.rstrip(), "```", ""]
    return "\n".join(lines)


def write(folder: Path, card: AdapterCard) -> None:
    text = render(card)
    write_text(folder / CARD, text)
