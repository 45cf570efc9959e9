"""Recipes: the YAML files that describe one training run, and their validation.

A recipe is built from layers, merged in this order (later wins):

1. the presets named in its ``defaults:`` list (``method/lora`` is ``configs/method/lora.yaml``; a
   name ending in ``.yaml`` is a file relative to the recipe), each expanded with its own defaults;
2. the recipe file itself;
3. command-line overrides ``key=value`` (dotted keys, values parsed as YAML).

``${...}`` interpolations are then resolved, and the result is checked against the dataclasses
below. Every problem is collected and raised together as one `RecipeError`, each line naming the
dotted path of the offending key.

Switching methods: ``adapter.config`` holds the fields of one method, so each layer's
``adapter.config`` belongs to the method that layer declares in ``adapter.method`` (or, when it
declares none, to the method in force after the layers before it). Only the layers whose method is
the final one contribute ``adapter.config``. So ``adapter.method=seq_bn`` on the command line of a
recipe built on ``method/lora`` drops the LoRA fields and leaves seq_bn's own defaults (which
``adaptercli.methods`` supplies); fields set in the same override layer as the new method are kept,
and a field that does not belong to the method is refused there by the method registry.
"""

from __future__ import annotations

import copy
import difflib
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from adaptercli.assets import OFFLINE_DATASETS
from adaptercli.composition import RECIPE_BLOCKS
from adaptercli.errors import RecipeError
from adaptercli.heads import RECIPE_HEADS
from adaptercli.schema import INVALID, check_section, dataclass_in, did_you_mean, join, spec

TASKS = ("classification", "multilabel", "regression", "tagging", "mlm", "causal_lm", "instruct", "seq2seq")
HEAD_TYPES = tuple(RECIPE_HEADS)
COMPOSITION_TYPES = tuple(RECIPE_BLOCKS)
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
FILE_FORMATS = ("csv", "tsv", "json", "jsonl", "parquet", "conll")
# Compression suffixes that the readers undo transparently, so `x.csv.gz` is a csv file.
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz")




def shipped_folder(name: str) -> Path:
    """``recipes`` or ``configs``: inside the installed package (a wheel puts them there), else the
    source tree's top-level folder (an editable install or a clone)."""
    package = Path(__file__).resolve().parent
    return package / name if (package / name).is_dir() else package.parent / name


CONFIGS_DIR = shipped_folder("configs")
"""The presets that ``defaults:`` names (``method/lora`` is ``CONFIGS_DIR/method/lora.yaml``)."""
LAUNCH_CONFIGS = "accelerate"
"""``CONFIGS_DIR/accelerate/``: `accelerate launch --config_file` files (DDP, FSDP, DeepSpeed), not presets."""
SERVE_CONFIGS = "serve"
"""``CONFIGS_DIR/serve/``: `adapter serve --config` files, not presets."""


@dataclass
class ModelSection:
    """The frozen base model.

    Attributes:
        name_or_path: Hub id, local folder, or an offline short name such as ``minilm``
            (see `adaptercli.assets.resolve_model_path`).
        revision: Hub branch, tag or commit.
        trust_remote_code: allow the model repository's own Python code to run.
        attn_implementation: e.g. ``eager``, ``sdpa``; None lets transformers choose.
        dtype: weights dtype; None keeps the checkpoint's.
        gguf_file: name of a GGUF file inside ``name_or_path`` to dequantize and load.
        quantization: ``4bit`` (NF4, double quantization: QLoRA) or ``8bit`` loads the frozen base
            with bitsandbytes; adapters and head stay in full precision.
        layout: where the layers, attention projections, FFN and residual sites are, for a model
            the architecture table does not know (see `adaptercli.architectures.layout_from_dict`).
    """

    name_or_path: str = MISSING
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    dtype: str | None = spec(None, choices=("auto", "float32", "float16", "bfloat16"))
    gguf_file: str | None = None
    quantization: str | None = spec(None, choices=("4bit", "8bit"))
    layout: dict[str, Any] | None = None


@dataclass
class AdapterSection:
    """The adapter to train.

    Attributes:
        name: name the adapter is added and saved under.
        method: a method of the `adaptercli.methods` registry, e.g. ``lora``, ``seq_bn``.
        config: the method's fields; validated by the method registry, not here.
        load: path or Hub id of a pretrained adapter to load (and train) instead of adding a new one.
        freeze: keep the loaded adapter's weights and train only a new head on top (a linear probe
            of a pretrained adapter; needs ``load``).
    """

    name: str = "default"
    method: str = "lora"
    config: dict[str, Any] = spec(factory=dict)
    load: str | None = None
    freeze: bool = False


@dataclass
class HeadSection:
    """The prediction head on top of the model.

    Attributes:
        type: one of `HEAD_TYPES`; defaults to ``data.task``.
        num_labels: None infers it from the data.
        layers: number of linear layers.
        activation: activation between the layers.
        dropout: dropout before each layer.
    """

    type: str | None = spec(None, choices=HEAD_TYPES)
    num_labels: int | None = spec(None, ge=1)
    layers: int = spec(2, ge=1)
    activation: str = "tanh"
    dropout: float = spec(0.1, ge=0, lt=1)


@dataclass
class CompositionSection:
    """How several adapters combine (AdapterHub composition blocks).

    Attributes:
        type: one of `COMPOSITION_TYPES`.
        adapters: names or paths of the adapters to combine.
        kwargs: extra arguments of the block, e.g. ``splits`` for ``split``.
    """

    type: str = spec(MISSING, choices=COMPOSITION_TYPES)
    adapters: list[str] = spec(factory=list)
    kwargs: dict[str, Any] = spec(factory=dict)


@dataclass
class DataSection:
    """Where the examples come from and how their columns map to text and labels.

    Attributes:
        source: an offline data set name (`adaptercli.assets.OFFLINE_DATASETS`), ``hub``, or a file
            format (`FILE_FORMATS`); None infers the format from ``train_file``'s suffix.
        name: Hub dataset id (or a local folder laid out like a Hub dataset repo), for ``hub``.
        subset: Hub configuration name, e.g. ``mrpc`` of ``nyu-mll/glue``.
        train_file: training file, relative to the working directory.
        validation_file: validation file; when there is no validation set, ``validation_split``
            of the training set is held out (seeded with ``train.seed``).
        test_file: test file.
        text_column: column with the text (a list of words for tagging); None tries common names.
        text_pair_column: second text column for sentence-pair tasks.
        label_column: column with the labels; None tries common names.
        label_map: maps raw label values to label names (or ids).
        labels: label names in id order; None takes them from the data.
        validation_split: fraction of the training set held out when there is no validation set.
        max_train_samples: keep at most this many training examples (seeded sample).
        max_eval_samples: keep at most this many validation and test examples (seeded sample).
        task: one of `TASKS`; None means the offline data set's task, else classification.
            ``instruct`` trains a causal LM on conversations (a ``messages`` column, or prompt and
            response columns) rendered with the tokenizer's chat template, with the loss on the
            answers only. ``seq2seq`` trains an encoder-decoder (T5, BART, ...) with its own LM
            head to write the target text from the source text (summarization, translation).
        prompt_column: for ``instruct``, the column with the prompt; None tries common names.
        response_column: for ``instruct``, the column with the answer; None tries common names.
        source_column: for ``seq2seq``, the column with the source text; None tries common pairs
            (document/summary, article/highlights, text/summary, source/target, ...).
        target_column: for ``seq2seq``, the column with the text to write; None tries common pairs.
        source_lang: for ``seq2seq`` on a ``translation`` column of ``{language: text}`` rows (WMT,
            OPUS), the language to translate from, e.g. ``en``.
        target_lang: the language to translate into, e.g. ``fr``.
        source_prefix: put before every source text, e.g. T5's ``"summarize: "`` or
            ``"translate English to French: "``; ``adapter generate`` and ``predict`` add it too.
    """

    source: str | None = None
    name: str | None = None
    subset: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    label_map: dict[Any, Any] | None = None
    labels: list[str] | None = None
    validation_split: float = spec(0.1, gt=0, lt=1)
    max_train_samples: int | None = spec(None, ge=1)
    max_eval_samples: int | None = spec(None, ge=1)
    task: str | None = spec(None, choices=TASKS)
    prompt_column: str | None = None
    response_column: str | None = None
    source_column: str | None = None
    target_column: str | None = None
    source_lang: str | None = None
    target_lang: str | None = None
    source_prefix: str = ""


@dataclass
class TrainSection:
    """Optimisation, evaluation and checkpointing.

    Attributes:
        learning_rate: peak learning rate of AdamW.
        batch_size: the global batch: under ``accelerate launch`` each process takes its share.
        eval_batch_size: batch size of evaluation and prediction; None uses ``batch_size``.
        max_steps: optimizer steps; -1 trains for ``num_epochs`` instead.
        num_epochs: passes over the training set when ``max_steps`` is -1 (fractions allowed).
        warmup_ratio: fraction of the steps over which the learning rate rises from 0 (used when
            ``warmup_steps`` is 0).
        warmup_steps: steps over which the learning rate rises from 0; overrides ``warmup_ratio``.
        lr_scheduler: how the learning rate falls after the warmup: ``linear`` to 0, ``cosine`` to 0,
            or ``constant``.
        weight_decay: AdamW's decoupled weight decay.
        gradient_accumulation_steps: batches whose gradients add up to one optimizer step.
        max_grad_norm: clip the gradients' global norm to this; 0 turns clipping off.
        mixed_precision: ``fp16`` or ``bf16`` autocast on GPUs (``bf16`` also on the CPU); ``no``
            trains in fp32.
        seed: seeds the new adapter and head weights, the data order, the held-out validation split
            and dropout.
        eval_steps: evaluate every this many steps; None evaluates at the end of each epoch.
        save_steps: write a checkpoint (for ``--resume``) every this many steps, and at the end.
        save_total_limit: checkpoints kept; older ones are deleted.
        logging_steps: log the training loss and learning rate every this many steps.
        metric_for_best: metric that selects the best checkpoint, e.g. ``accuracy``; None uses
            the evaluation loss (lower is better).
        greater_is_better: whether a higher ``metric_for_best`` is better.
        early_stopping_patience: stop after this many evaluations without improvement.
        max_seq_length: texts are cut to this many tokens (``seq2seq``: the source texts).
        gradient_checkpointing: recompute each layer's activations in the backward pass instead
            of keeping them (less memory, ~30% more compute).
        compile: run the adapted model through ``torch.compile`` (TorchInductor; the first steps
            and each new batch shape take a while to compile). Same results as eager, within
            floating-point reordering.
        report_to: experiment trackers that also receive the metrics (through Accelerate):
            tensorboard, wandb, mlflow, trackio; ``metrics.jsonl`` is always written.
        max_target_length: ``seq2seq``: target texts are cut to this many tokens, and evaluation
            generates at most this many (``max_seq_length`` cuts the source texts).
        generation_num_beams: ``seq2seq``: beams of the beam search that evaluation generates with
            (1: greedy).
    """

    learning_rate: float = spec(1e-4, gt=0)
    batch_size: int = spec(32, ge=1)
    eval_batch_size: int | None = spec(None, ge=1)
    max_steps: int = spec(-1, ge=-1)
    num_epochs: float = spec(3.0, gt=0)
    warmup_ratio: float = spec(0.0, ge=0, le=1)
    warmup_steps: int = spec(0, ge=0)
    lr_scheduler: str = spec("linear", choices=("linear", "cosine", "constant"))
    weight_decay: float = spec(0.0, ge=0)
    gradient_accumulation_steps: int = spec(1, ge=1)
    max_grad_norm: float = spec(1.0, ge=0)
    mixed_precision: str = spec("no", choices=("no", "fp16", "bf16"))
    seed: int = 42
    eval_steps: int | None = spec(None, ge=1)
    save_steps: int = spec(500, ge=1)
    save_total_limit: int = spec(2, ge=1)
    logging_steps: int = spec(10, ge=1)
    metric_for_best: str | None = None
    greater_is_better: bool = True
    early_stopping_patience: int | None = spec(None, ge=1)
    max_seq_length: int = spec(128, ge=1)
    gradient_checkpointing: bool = False
    compile: bool = False
    report_to: list[str] = spec(factory=list, choices=TRACKERS)
    max_target_length: int = spec(128, ge=1)
    generation_num_beams: int = spec(1, ge=1)


@dataclass
class Recipe:
    """One training run: model, adapter, head, optional composition, data, training and output.

    Attributes:
        model: the frozen base model.
        adapter: the adapter to train (its method and the method's config).
        head: the prediction head on top of the model.
        composition: adapters to combine with the trained one (stack, fuse or average); None
            trains a single adapter.
        data: where the examples come from and how their columns map to text and labels.
        train: optimisation, evaluation and checkpointing.
        output_dir: the run folder: ``adapter/``, ``checkpoints/``, ``recipe.yaml``,
            ``metrics.jsonl`` and ``curves.png`` are written there.
    """

    model: ModelSection = spec(factory=ModelSection)
    adapter: AdapterSection = spec(factory=AdapterSection)
    head: HeadSection = spec(factory=HeadSection)
    composition: CompositionSection | None = None
    data: DataSection = spec(factory=DataSection)
    train: TrainSection = spec(factory=TrainSection)
    output_dir: str = MISSING


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load, merge, resolve and validate a recipe file.

    Args:
        path: the recipe YAML.
        overrides: ``key=value`` strings with dotted keys, e.g. ``train.learning_rate=3e-4``;
            values are parsed as YAML (``[q,v]`` is a list, ``null`` is None).

    Returns:
        The typed recipe, with inferred values filled in (data format, task, head type).

    Raises:
        RecipeError: listing every problem found.
    """
    problems: list[str] = []
    path = Path(path).resolve()
    body = _read_yaml(path, problems)
    if problems:  # without the recipe itself, every other message would be noise
        raise RecipeError(problems)
    layers = _expand_defaults(body, path.parent, problems, chain=(path,))
    layers.append((str(path), body))
    layers.append(("overrides", _overrides_layer(overrides, problems)))
    # Keep going after layer problems: the schema checks below may find more to report at once.
    merged = _merge_layers(layers, problems)
    values = _resolve(merged, "", problems)
    checked = check_section(Recipe, values, "", problems, _unknown_key_problem)
    _check_semantics(checked, problems)
    _check_method_config(checked.get("adapter", {}), problems)
    _check_layout(checked.get("model", {}), problems)
    if problems:
        raise RecipeError(problems)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Recipe), checked))


def recipe_to_yaml(recipe: Recipe) -> str:
    """Render a recipe as YAML; loading the text again gives an equal recipe."""
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def available_presets() -> list[str]:
    """Names of the packaged presets usable in ``defaults:``, e.g. ``method/lora``."""
    return sorted(p.relative_to(CONFIGS_DIR).with_suffix("").as_posix() for p in CONFIGS_DIR.rglob("*.yaml")
                  if p.parent.name not in (LAUNCH_CONFIGS, SERVE_CONFIGS))


# --- layers ----------------------------------------------------------------------------------


def _read_yaml(path: Path, problems: list[str], where: str = "") -> DictConfig:
    """Read one YAML mapping; on failure record a problem and return an empty mapping."""
    prefix = f"{where}: " if where else ""
    try:
        loaded = OmegaConf.load(path)
    except FileNotFoundError:
        problems.append(f"{prefix}recipe file not found: {path}")
        return OmegaConf.create()
    except Exception as error:  # YAML syntax errors come in several types; all mean the same
        problems.append(f"{prefix}{path}: cannot parse YAML: {error}")
        return OmegaConf.create()
    if not isinstance(loaded, DictConfig):
        problems.append(f"{prefix}{path}: expected a mapping of sections, got a list")
        return OmegaConf.create()
    return loaded


def _expand_defaults(
    layer: DictConfig, base_dir: Path, problems: list[str], chain: tuple[Path, ...]
) -> list[tuple[str, DictConfig]]:
    """Pop `layer`'s ``defaults`` list and return its presets' named layers, each after its own."""
    defaults = layer.pop("defaults", None)
    if defaults is None:
        return []
    if not isinstance(defaults, ListConfig):
        problems.append("defaults: expected a list of preset names like method/lora")
        return []
    layers: list[tuple[str, DictConfig]] = []
    for index, entry in enumerate(defaults):
        where = f"defaults[{index}]"
        if not isinstance(entry, str):
            problems.append(f"{where}: expected a preset name like method/lora, got {entry!r}")
            continue
        preset_path = _preset_path(entry, base_dir, where, problems)
        if preset_path is None:
            continue
        if preset_path in chain:
            problems.append(f"{where}: preset {entry} includes itself through its defaults")
            continue
        preset = _read_yaml(preset_path, problems, where)
        layers += _expand_defaults(preset, preset_path.parent, problems, chain + (preset_path,))
        layers.append((f"preset {entry}", preset))
    return layers


def _preset_path(entry: str, base_dir: Path, where: str, problems: list[str]) -> Path | None:
    """Locate a preset: a ``.yaml`` path relative to the including file, else a packaged preset."""
    if entry.endswith((".yaml", ".yml")):
        path = (base_dir / entry).resolve()
        if not path.is_file():
            problems.append(f"{where}: preset file not found: {path}")
            return None
        return path
    path = CONFIGS_DIR / f"{entry}.yaml"
    if entry.startswith(f"{LAUNCH_CONFIGS}/"):
        problems.append(f"{where}: {entry} configures `accelerate launch --config_file {path}`, not a recipe")
        return None
    if not path.is_file():
        problems.append(f"{where}: unknown preset '{entry}'{did_you_mean(entry, available_presets())}")
        return None
    return path


def _overrides_layer(overrides: list[str] | tuple[str, ...], problems: list[str]) -> DictConfig:
    """Turn ``key=value`` strings into one layer."""
    layer = OmegaConf.create()
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key.strip():
            problems.append(f"{override}: override must look like key=value, e.g. train.learning_rate=3e-4")
            continue
        try:
            # from_dotlist parses the value with OmegaConf's YAML loader, which reads 1e-4 as a float.
            layer = OmegaConf.merge(layer, OmegaConf.from_dotlist([override]))
        except Exception:  # YAML syntax errors come in several types; all mean the same here
            problems.append(f"{key}: cannot parse the value {value!r} as YAML")
    return layer


def _declared_method(layer: DictConfig) -> str | None:
    """The ``adapter.method`` a layer sets as a plain string, if any."""
    adapter = layer.get("adapter")
    if not isinstance(adapter, DictConfig):
        return None
    method = OmegaConf.to_container(adapter).get("method")  # unresolved: interpolations stay strings
    return method if isinstance(method, str) and "${" not in method and method != MISSING else None


def _merge_layers(layers: list[tuple[str, DictConfig]], problems: list[str]) -> DictConfig:
    """Merge named layers; a layer's ``adapter.config`` is kept only if it belongs to the final method."""
    method = AdapterSection.method
    owners = []
    for _, layer in layers:
        method = _declared_method(layer) or method
        owners.append(method)
    merged = OmegaConf.create()
    for (origin, layer), owner in zip(layers, owners, strict=True):
        adapter = layer.get("adapter")
        if owner != method and isinstance(adapter, DictConfig) and "config" in adapter:
            layer = copy.deepcopy(layer)
            del layer.adapter["config"]
        try:
            merged = OmegaConf.merge(merged, layer)
        except (OmegaConfBaseException, TypeError) as error:  # TypeError: a list merged onto a mapping
            problems.append(f"{origin}: cannot merge onto the layers before it: {error}".splitlines()[0])
    return merged


def _resolve(node: Any, path: str, problems: list[str]) -> Any:
    """Resolve interpolations leaf by leaf into plain Python values, recording each failure."""
    if isinstance(node, DictConfig):
        items = ((key, join(path, str(key))) for key in node.keys())
    elif isinstance(node, ListConfig):
        items = ((index, f"{path}[{index}]") for index in range(len(node)))
    else:
        return node
    resolved: dict[Any, Any] = {}
    for key, child_path in items:
        if OmegaConf.is_missing(node, key):
            resolved[key] = MISSING
            continue
        try:
            child = node[key]
        except OmegaConfBaseException as error:
            problems.append(f"{child_path}: cannot resolve interpolation: {error.msg.splitlines()[0]}")
            resolved[key] = INVALID
            continue
        resolved[key] = _resolve(child, child_path, problems)
    return list(resolved.values()) if isinstance(node, ListConfig) else resolved


# --- schema checks ---------------------------------------------------------------------------


def _schema_paths(schema: type, path: str = "") -> list[str]:
    """All dotted leaf and section paths of a dataclass schema."""
    paths = []
    for item in fields(schema):
        item_path = join(path, item.name)
        paths.append(item_path)
        nested = dataclass_in(typing.get_type_hints(schema)[item.name])
        if nested is not None:
            paths += _schema_paths(nested, item_path)
    return paths


def _unknown_key_problem(key: str, path: str, siblings: list[str]) -> str:
    """Message for an unknown key, suggesting a sibling or else a same-named key elsewhere."""
    full = join(path, key)
    suggestion = difflib.get_close_matches(key, siblings, n=1)
    if suggestion:
        return f"{full}: unknown key, did you mean {join(path, suggestion[0])}?"
    elsewhere = {p.rsplit(".", 1)[-1]: p for p in _schema_paths(Recipe)}
    match = difflib.get_close_matches(key, list(elsewhere), n=1)
    hint = f", did you mean {elsewhere[match[0]]}?" if match else ""
    return f"{full}: unknown key{hint}"


# --- cross-field checks ----------------------------------------------------------------------


def _infer_format(filename: str) -> str | None:
    """The file format that a file name's suffix names, ignoring a compression suffix."""
    name = filename.lower()
    for compression in COMPRESSION_SUFFIXES:
        name = name.removesuffix(compression)
    suffix = Path(name).suffix.removeprefix(".")
    return suffix if suffix in FILE_FORMATS else None


def _check_semantics(recipe: dict[str, Any], problems: list[str]) -> None:
    """Check rules that span fields and fill in inferred values (data source, task, head type)."""
    data = recipe.setdefault("data", {})
    _check_data_source(data, problems)
    source = data.get("source")
    offline_task = OFFLINE_DATASETS[source].task if source in OFFLINE_DATASETS else None
    task = data.setdefault("task", offline_task or "classification")
    # Any data set's texts also serve language modelling (domain-adaptive pretraining).
    if offline_task is not None and task not in (offline_task, "mlm", "causal_lm", INVALID):
        problems.append(f"data.task: data set {source} is for {offline_task}, got {task!r}")

    head = recipe.setdefault("head", {})
    # Instruction tuning trains a causal-LM head; seq2seq keeps the encoder-decoder's own LM head.
    wanted_head = {"instruct": "causal_lm", "seq2seq": None}.get(task, task)
    head_type = head.setdefault("type", wanted_head)
    if task == "seq2seq" and head_type is not None:
        problems.append("head.type: a seq2seq run writes text with the model's own LM head; remove head.type")
    elif INVALID not in (task, head_type) and head_type != wanted_head:
        problems.append(f"head.type: {head_type!r} does not match data.task {task!r}")
    _check_seq2seq(recipe, task, problems)

    if recipe.get("train", {}).get("max_steps") == 0:
        problems.append("train.max_steps: must be -1 (train for num_epochs) or positive, got 0")
    composition = recipe.get("composition")
    if composition is not None:
        _check_composition(composition, problems)
    adapter = recipe.get("adapter", {})
    if recipe.get("model", {}).get("quantization") not in (None, INVALID) and adapter.get("method") == FULL_FINETUNING:
        problems.append("model.quantization: a quantized base cannot be fine-tuned in full; train an adapter on it (QLoRA)")
    if adapter.get("freeze") is True and not adapter.get("load"):
        problems.append("adapter.freeze: only a loaded adapter can be frozen; set adapter.load")


SEQ2SEQ_DATA_KEYS = ("source_column", "target_column", "source_lang", "target_lang", "source_prefix")


def _check_seq2seq(recipe: dict[str, Any], task: Any, problems: list[str]) -> None:
    """The ``data`` keys of seq2seq go with that task alone; what a seq2seq run cannot train."""
    data = recipe.get("data", {})
    if task is INVALID:
        return
    if task != "seq2seq":
        for key in SEQ2SEQ_DATA_KEYS:
            if data.get(key) not in (None, "", INVALID):
                problems.append(f"data.{key}: only for data.task seq2seq (this recipe's task is {task})")
        return
    if (data.get("source_lang") is None) != (data.get("target_lang") is None):
        problems.append("data.source_lang: set both data.source_lang and data.target_lang (the translation "
                        "column's languages to translate from and into), or neither")
    composition = recipe.get("composition") or {}
    if composition.get("type") == "fuse":
        problems.append("composition.type: fuse trains a fusion with a new head; a seq2seq run keeps the "
                        "model's own LM head (use stack or average)")
    if recipe.get("adapter", {}).get("freeze") is True:
        problems.append("adapter.freeze: a seq2seq run has no head of its own to train over a frozen adapter")


FULL_FINETUNING = "full"
"""``adapter.method: full`` trains every weight of the model and no adapter: the baseline that
reproduction jobs compare the adapter methods with."""

# What a recipe's composition trains, and the block arguments each type takes (``composition.kwargs``).
TRAINED_COMPOSITIONS: dict[str, tuple[str, ...]] = {
    "stack": (),                                               # a new adapter over frozen members
    "fuse": ("config",),                                       # an AdapterFusion layer over frozen members
    "average": ("weights", "combine_strategy", "svd_rank"),    # an adapter started from the members' average
}


def _check_composition(composition: dict[str, Any], problems: list[str]) -> None:
    kind, members = composition.get("type"), composition.get("adapters")
    if members == []:
        problems.append("composition.adapters: list the adapters to combine")
    if kind in (INVALID, None):
        return
    if kind not in TRAINED_COMPOSITIONS:
        problems.append(f"composition.type: {kind} runs trained adapters side by side or on parts of the input; "
                        f"a recipe trains {', '.join(TRAINED_COMPOSITIONS)} (use {kind} from Python: "
                        "model.set_active_adapters)")
        return
    allowed = TRAINED_COMPOSITIONS[kind]
    for key in composition.get("kwargs") or {}:
        if key not in allowed:
            takes = f"takes {', '.join(allowed)}" if allowed else "takes none"
            problems.append(f"composition.kwargs.{key}: unknown argument for {kind} ({takes})")
    weights = (composition.get("kwargs") or {}).get("weights")
    if kind == "average" and weights is not None and isinstance(members, list) and (
            not isinstance(weights, list) or len(weights) != len(members)):
        problems.append(f"composition.kwargs.weights: give one weight per adapter ({len(members)}), got {weights!r}")


def _check_layout(model: dict[str, Any], problems: list[str]) -> None:
    """``model.layout`` reads as a layout (its module paths are checked when the model loads)."""
    if not isinstance(model, dict) or not model.get("layout"):
        return
    from adaptercli.architectures import LayoutError, layout_from_dict

    try:
        layout_from_dict(model["layout"])
    except LayoutError as exc:
        problems += [f"model.layout.{p}" for p in exc.problems]


def _check_method_config(adapter: dict[str, Any], problems: list[str]) -> None:
    """Check ``adapter.method`` and ``adapter.config`` with the method registry's own field specs
    (types, bounds, choices), so a recipe reports them like its other keys. A loaded adapter
    brings its own config."""
    from adaptercli.methods import ConfigError, get_method

    method, config = adapter.get("method", AdapterSection.method), adapter.get("config", {})
    if adapter.get("load") or INVALID in (method, config):
        return
    if method == FULL_FINETUNING:
        if config:
            problems.append("adapter.config: full fine-tuning has no adapter config; remove it")
        return
    try:
        entry = get_method(method)
    except ConfigError as error:
        problems += [f"adapter.method: {problem}" for problem in error.problems]
        return
    try:
        entry.make_config(config)
    except ConfigError as error:
        problems += [f"adapter.config.{problem}" for problem in error.problems]


def _check_data_source(data: dict[str, Any], problems: list[str]) -> None:
    """Check that ``data`` names a reachable source, inferring the file format from the suffix."""
    source = data.get("source")
    train_file = data.get("train_file")
    if INVALID in (source, train_file):
        return
    if source is None:
        if train_file is None:
            problems.append(
                "data: set data.source (an offline data set, hub, or a file format) or data.train_file"
            )
            return
        source = _infer_format(train_file)
        if source is None:
            problems.append(
                f"data.train_file: cannot tell the format of {train_file}; set data.source to one of {', '.join(FILE_FORMATS)}"
            )
            return
        data["source"] = source
    known = [*OFFLINE_DATASETS, "hub", *FILE_FORMATS]
    if source not in known:
        problems.append(f"data.source: unknown source {source!r}{did_you_mean(source, known)}")
        return
    if source == "hub" and not data.get("name"):
        problems.append("data.name: the hub source needs a dataset id, e.g. nyu-mll/glue")
    if source in FILE_FORMATS:
        if train_file is None:
            problems.append(f"data.train_file: source {source} needs a training file")
        for key in ("train_file", "validation_file", "test_file"):
            if data.get(key) not in (None, INVALID) and not Path(data[key]).is_file():
                problems.append(f"data.{key}: file not found: {data[key]}")
