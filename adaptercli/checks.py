"""What `adapter validate` and `adapter train` check before any training starts.

`load_recipe` checks a recipe's shape (keys, types, bounds, method config). `preflight` checks
what the recipe points at: the model folder holds a config and weights (an encoder-decoder for
seq2seq), the data files parse into text and labels (sources and targets), ``metric_for_best`` is a metric of the task, composition members exist
and fit the base model, the output folder can be written, and the trackers and bitsandbytes
that the recipe asks for are installed. Every problem is reported at once,
each naming its recipe key, so a bad recipe fails in seconds rather than after the first
training steps.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .assets import resolve_model_path
from .composition import RECIPE_BLOCKS, CompositionError, check_support
from .errors import AdapterCliError, RecipeError
from .formats import read_adapter
from .locate import local_folder, looks_local
from .methods import FAMILIES, get_method, method_name
from .metrics import METRIC_NAMES
from .recipe import Recipe

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


@dataclass
class Preflight:
    """What the checks learnt on the way, so training need not read it again.

    Attributes:
        data: the loaded data (`adaptercli.data.LoadedData`), or None when it was not loaded.
        notes: things that could not be checked here (e.g. a Hub data set while validating).
    """

    data: Any = None
    notes: list[str] | None = None


def preflight(recipe: Recipe, *, load_hub_data: bool = True) -> Preflight:
    """Check everything a recipe points at; raise `RecipeError` listing every problem.

    Args:
        recipe: a recipe from `adaptercli.recipe.load_recipe`.
        load_hub_data: also load a Hub data set (training does; ``validate`` only notes it).
    """
    problems: list[str] = []
    notes: list[str] = []
    base_config = _check_model(recipe, problems)
    _check_encoder_decoder(recipe, base_config, problems)
    data = _check_data(recipe, problems, notes, load_hub_data)
    _check_metric(recipe, data, problems)
    _check_composition(recipe, base_config, problems)
    _check_output_dir(Path(recipe.output_dir), problems)
    _check_optional_packages(recipe, problems)
    if problems:
        raise RecipeError(problems)
    return Preflight(data, notes)


def _check_model(recipe: Recipe, problems: list[str]) -> dict[str, Any] | None:
    """A local model folder must hold config.json and weights; returns the config when readable."""
    m = recipe.model
    try:
        path = Path(resolve_model_path(m.name_or_path)).expanduser()
    except AdapterCliError as error:
        problems.append(f"model.name_or_path: {error}")
        return None
    if not path.exists():
        if looks_local(m.name_or_path):
            problems.append(f"model.name_or_path: folder not found: {m.name_or_path}")
        return None  # a Hub id: checked when it downloads
    if not path.is_dir():
        problems.append(f"model.name_or_path: {path} is a file; give the model's folder")
        return None
    if m.gguf_file:
        if not (path / m.gguf_file).is_file():
            problems.append(f"model.gguf_file: {m.gguf_file} not found in {path}")
        return None  # the GGUF file carries the config
    if not (path / "config.json").is_file():
        problems.append(f"model.name_or_path: {path} holds no config.json (not a transformers model folder)")
        return None
    if not any(p.name.endswith(_WEIGHT_SUFFIXES) for p in path.iterdir()):
        problems.append(f"model.name_or_path: {path} holds no weights (model.safetensors or pytorch_model.bin)")
    try:
        return json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        problems.append(f"model.name_or_path: {path / 'config.json'} is not valid JSON ({error})")
        return None


def _check_encoder_decoder(recipe: Recipe, base_config: dict[str, Any] | None, problems: list[str]) -> None:
    """A seq2seq recipe writes text with an encoder-decoder's own LM head (AutoModelForSeq2SeqLM)."""
    if recipe.data.task == "seq2seq" and base_config is not None and not base_config.get("is_encoder_decoder"):
        problems.append(f"model.name_or_path: data.task seq2seq needs an encoder-decoder model (T5, BART, mBART, "
                        f"...); {recipe.model.name_or_path} is a {base_config.get('model_type', 'decoder or encoder')} "
                        "model")


def _check_data(recipe: Recipe, problems: list[str], notes: list[str], load_hub_data: bool) -> Any:
    """Load the data (files parse, columns and labels found); returns it, or None."""
    from .data import load_data

    d = recipe.data
    if d.source == "hub" and not load_hub_data and not Path(d.name or "").is_dir():
        notes.append(f"data: Hub data set {d.name} not loaded here; `adapter train` loads it first")
        return None
    try:
        return load_data(d, seed=recipe.train.seed)
    except AdapterCliError as error:
        message = str(error)
        problems.append(message if message.startswith("data") else f"data: {message}")
        return None


def _check_metric(recipe: Recipe, data: Any, problems: list[str]) -> None:
    metric = recipe.train.metric_for_best
    task = data.task if data is not None else recipe.data.task
    if metric is None or task not in METRIC_NAMES:
        return
    names = [*METRIC_NAMES[task], "loss"]
    if metric not in names:
        problems.append(f"train.metric_for_best: '{metric}' is not a metric of task {task} (it reports: {', '.join(names)})")


def _check_composition(recipe: Recipe, base_config: dict[str, Any] | None, problems: list[str]) -> None:
    """Each composition member is an adapter folder (or a Hub id) made for the same base model."""
    if recipe.composition is None:
        return
    configs = {}
    for index, source in enumerate(recipe.composition.adapters):
        where = f"composition.adapters[{index}]"
        member = local_folder(source)
        if member is None and not looks_local(source):
            continue  # a Hub or index id: fetched when the run starts
        try:
            loaded = read_adapter(member or Path(source).expanduser(), with_head=False)
        except AdapterCliError as error:
            problems.append(f"{where}: {error}")
            continue
        configs[f"{loaded.saved_name}_{index}"] = loaded.config
        if base_config is None:
            continue
        base_type = base_config.get("model_type")
        base_hidden = base_config.get("hidden_size") or base_config.get("dim") or base_config.get("n_embd")
        if loaded.hidden_size and base_hidden and loaded.hidden_size != base_hidden:
            problems.append(f"{where}: {member} was made for hidden size {loaded.hidden_size}; "
                            f"the base model {recipe.model.name_or_path} has {base_hidden}")
        elif loaded.model_type and base_type and loaded.model_type != base_type:
            problems.append(f"{where}: {member} was made for a {loaded.model_type} model; "
                            f"the base model {recipe.model.name_or_path} is {base_type}")
    if not problems and len(configs) == len(recipe.composition.adapters):
        _check_block(recipe, configs, problems)


def _check_block(recipe: Recipe, configs: dict[str, Any], problems: list[str]) -> None:
    """The members' methods (and the trained adapter's) can run in the recipe's block."""

    kind, names = recipe.composition.type, list(configs)
    if kind == "stack" and not recipe.adapter.load:
        configs = {**configs, recipe.adapter.name: get_method(recipe.adapter.method).make_config(recipe.adapter.config)}
        names = list(configs)
    block = RECIPE_BLOCKS[kind](*names)
    try:
        check_support(block, lambda n: method_name(configs[n]), lambda n: configs[n].family,
                      {family.name: family.blocks for family in FAMILIES.values()})
    except CompositionError as error:
        problems.append(f"composition.type: {error}")


def _check_output_dir(out: Path, problems: list[str]) -> None:
    """The output folder, or its nearest existing parent, must be a writable folder."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        problems.append(f"output_dir: {existing} is a file, not a folder")
        return
    try:  # write a probe file: permissions, read-only mounts and full disks all show here
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        problems.append(f"output_dir: cannot write to {existing} ({error.strerror or error})")


# What each optional feature imports, and how to install it.
_TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "pip install tensorboard"),
                     "wandb": ("wandb", "pip install wandb"),
                     "mlflow": ("mlflow", "pip install mlflow"),
                     "trackio": ("trackio", "pip install trackio")}


def _check_optional_packages(recipe: Recipe, problems: list[str]) -> None:
    """Trackers in ``train.report_to`` and bitsandbytes for ``model.quantization`` are installed."""
    import importlib.util

    for index, tracker in enumerate(recipe.train.report_to):
        module, install = _TRACKER_PACKAGES[tracker]
        if importlib.util.find_spec(module) is None:
            problems.append(f"train.report_to[{index}]: {tracker} is not installed ({install}), or remove it "
                            "(metrics.jsonl is always written)")
    if recipe.model.quantization and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(f"model.quantization: {recipe.model.quantization} loading needs bitsandbytes "
                        "(pip install bitsandbytes)")
