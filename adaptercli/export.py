"""Sharing a trained adapter: what a run says about it, and exporting it for other libraries.

`open_source` reads a run folder (``recipe.yaml`` + ``adapter/``; a fusion run too) or a bare
adapter folder into a :class:`Source`: the folder, and the card that describes it (base model by
its Hub id, task, data set, method, head, the run's evaluation, the recipe). `export` writes it:

* ``native``: our folder plus a model card (``README.md``);
* ``hub``: the same, pushed to a Hugging Face Hub repository (`hub.push_folder`);
* ``peft``: a LoRA / IA3 folder for ``peft.PeftModel.from_pretrained`` (head as ``modules_to_save``);
* ``adapterhub``: a folder for AdapterHub ``adapters`` 1.x ``load_adapter``, head included;
* ``merged``: the base model with the LoRA / IA3 adapter merged into its weights, as a plain
  transformers model (``save_pretrained``) with its tokenizer.

Every folder target refuses a ``dest`` that holds files (unless ``force``) and never writes into
the run's own ``adapter/``, ``best/`` or ``checkpoints/``; nothing is written outside ``dest``.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .assets import OFFLINE_MODEL_HUB_IDS, OFFLINE_MODELS, packaged_path
from .errors import AdapterCliError
from .formats import adapterhub, card, peft, read_adapter, task_heads
from .formats.common import LoadedAdapter, LoadedFusion, read_json, write_json, write_text
from .formats.fusion import CONFIG as FUSION_CONFIG
from .formats.fusion import read_fusion
from .formats.setup import fusions_in, is_setup, read_setup
from .heads import recipe_head_type
from .hub import Pushed, download, is_repo_id, push_folder, split_revision
from .index import ADAPTER_FILES, AdapterIndexError, Descriptor, safetensors_parameters, sha256_of
from .locate import locate

TARGETS = ("native", "hub", "peft", "adapterhub", "merged")
DEFAULT_LICENSE = "apache-2.0"
# What the offline and common Hub data sets are about, for AdapterHub-style ids (task/dataset@org).
SHARING_TASKS = {
    "rotten_tomatoes": "sentiment", "vader_movies": "sentiment", "vader_movies_binary": "sentiment",
    "vader_amazon": "sentiment", "vader_tweets": "sentiment", "vader_nyt": "sentiment", "sms_spam": "spam",
    "trec": "question-type", "trec_fine": "question-type", "ner_tweets": "ner", "sst2": "sentiment",
    "imdb": "sentiment", "mrpc": "paraphrase", "qqp": "paraphrase", "rte": "nli", "mnli": "nli", "qnli": "nli",
    "cola": "acceptability", "stsb": "sts",
}
_OWN = ("adapter", "best", "checkpoints")


@dataclasses.dataclass
class Source:
    """What gets exported. folder: the adapter (or fusion) folder; run: its run folder, if any;
    members: a fusion's member folders by the names the fusion uses; card: what it is; setup: a
    fusion or stack run, exported to native and hub as one adapter setup folder."""

    folder: Path
    run: Path | None
    card: card.AdapterCard
    members: dict[str, Path] = dataclasses.field(default_factory=dict)
    num_layers: int | None = None
    base_config_source: tuple[str, dict[str, Any]] | None = None  # where the base model's config is
    setup: bool = False


@dataclasses.dataclass
class ExportResult:
    dest: str
    files: list[tuple[str, int]]  # relative path, size in bytes
    notes: list[str]
    pushed: Pushed | None = None


# -- describing ---------------------------------------------------------------------------------

def base_model_id(name: str | None) -> str | None:
    """The Hub id a base model goes by: an offline short name's (``minilm`` ->
    sentence-transformers/all-MiniLM-L6-v2), the one an installed offline model's folder stands
    for, a Hub id as it is; None for any other local folder."""
    if not name:
        return None
    if name in OFFLINE_MODEL_HUB_IDS:
        return OFFLINE_MODEL_HUB_IDS[name]
    path = Path(name).expanduser()
    for short, asset in OFFLINE_MODELS.items():
        try:
            installed = packaged_path(asset)
        except AdapterCliError:
            continue
        if path.exists() and path.resolve() in (installed.resolve(), installed.resolve().parent):
            return OFFLINE_MODEL_HUB_IDS.get(short)
    if path.exists() or name.startswith((".", "/", "~")):
        return None
    return name if is_repo_id(name) or re.fullmatch(r"[A-Za-z0-9][\w.-]*", name) else None


def _dataset_of(recipe) -> tuple[str | None, list[str]]:
    """(short name, Hub data set ids) of a recipe's data."""
    data = recipe.data
    if data.source == "hub" and data.name:
        short = data.subset or data.name.rstrip("/").split("/")[-1]
        return short, ([] if Path(data.name).exists() else [data.name])
    if data.source and data.source not in ("csv", "tsv", "json", "jsonl", "parquet", "conll"):
        return data.source, []
    if data.train_file:
        path = Path(data.train_file)
        stem = path.name.split(".")[0]
        return (path.parent.name if stem in ("train", "data") and path.parent.name else stem), []
    return None, []


def _run_metrics(run: Path, recipe) -> tuple[dict[str, float], int | None]:
    """The evaluation of the checkpoint in ``adapter/``: the best one by ``metric_for_best`` (as
    training picks it), else the last."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return {}, None
    evals = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    evals = [e for e in evals if e.get("eval")]
    if not evals:
        return {}, None
    chosen = evals[-1]
    key = recipe.train.metric_for_best
    if key and all(key in e for e in evals):
        best = (max if recipe.train.greater_is_better else min)(e[key] for e in evals)
        chosen = next(e for e in evals if e[key] == best)  # the first of equals, as training keeps it
    metrics = {k: float(v) for k, v in chosen.items() if k not in ("step", "eval", "epoch") and isinstance(v, int | float)}
    return metrics, chosen.get("step")


def _portable_recipe(recipe, base_id: str | None) -> str:
    """The recipe as YAML with the base model by its Hub id and local files by their names."""
    from .recipe import recipe_to_yaml

    shown = copy.deepcopy(recipe)
    if base_id:
        shown.model.name_or_path = base_id
    elif Path(shown.model.name_or_path).exists():
        shown.model.name_or_path = Path(shown.model.name_or_path).name
    for key in ("train_file", "validation_file", "test_file"):
        value = getattr(shown.data, key)
        if value:
            setattr(shown.data, key, Path(value).name)
    if shown.data.name and Path(shown.data.name).exists():
        shown.data.name = Path(shown.data.name).name
    if shown.adapter.load and Path(shown.adapter.load).exists():
        shown.adapter.load = Path(shown.adapter.load).name
    if shown.composition is not None:
        shown.composition.adapters = [a if is_repo_id(a) else Path(a).name for a in shown.composition.adapters]
    shown.output_dir = Path(shown.output_dir).name
    return recipe_to_yaml(shown)


def _parameters(loaded: LoadedAdapter | LoadedFusion) -> int:
    return sum(v.numel() for v in loaded.weights.values())


def open_source(path: str | Path, *, base_model: str | None = None, task: str | None = None,
                dataset: str | None = None, license: str | None = DEFAULT_LICENSE) -> Source:
    """Read a run folder, an adapter (or fusion) folder or an adapter setup folder and describe it for a card."""
    path = Path(path)
    if is_setup(path):
        return _setup_source(path, base_model=base_model, task=task, dataset=dataset, license=license)
    run = path if (path / "recipe.yaml").is_file() and (path / "adapter").is_dir() else None
    folder = path / "adapter" if run else path
    is_fusion = (folder / FUSION_CONFIG).is_file()
    if not is_fusion and not (folder / "adapter_config.json").is_file():
        raise AdapterCliError(f"{path}: not a run folder (recipe.yaml + adapter/), an adapter folder "
                              "(adapter_config.json) nor an adapter setup folder (adapter_setup.json)")
    recipe = None
    if run:
        from .recipe import load_recipe

        recipe = load_recipe(run / "recipe.yaml")
    meta = read_json(folder / (FUSION_CONFIG if is_fusion else "adapter_config.json"))
    loaded: LoadedAdapter | LoadedFusion = read_fusion(folder) if is_fusion else read_adapter(folder)
    recorded = recipe.model.name_or_path if recipe else meta.get("model_name")
    base_id = base_model or base_model_id(recorded)
    short, hub_datasets = _dataset_of(recipe) if recipe else (None, [])
    dataset = dataset or short
    task_type = recipe.data.task if recipe else None
    head = loaded.head_config
    about = card.AdapterCard(
        name=recipe.adapter.name if recipe else loaded.saved_name,
        method="fusion" if is_fusion else str(meta.get("method") or _method(loaded)),
        config=dict(loaded.config) if is_fusion else loaded.config.to_dict(),
        model_type=loaded.model_type, hidden_size=loaded.hidden_size, base_model=base_id,
        kind="fusion" if is_fusion else "adapter", task=task or SHARING_TASKS.get(dataset or "") or task_type,
        task_type=task_type or _task_of_head(head), dataset=dataset, datasets=hub_datasets,
        labels=[head.id2label[i] for i in sorted(head.id2label)] if head is not None and head.id2label else None,
        head_type=head.head_type if head is not None else None, parameters=_parameters(loaded), license=license,
        recipe=_portable_recipe(recipe, base_id) if recipe else None,
        members=list(loaded.members) if is_fusion else [])
    if run:
        about.metrics, about.step = _run_metrics(run, recipe)
    source = Source(folder, run, about, num_layers=meta.get("num_layers"))
    if recipe is not None:
        source.base_config_source = (recipe.model.name_or_path, {"revision": recipe.model.revision,
                                                                  "gguf_file": recipe.model.gguf_file})
    elif recorded and (Path(recorded).expanduser() / "config.json").is_file():  # an adapter folder made here
        source.base_config_source = (str(recorded), {})
    if is_fusion:
        source.members = _member_folders(recipe, loaded.members) if recipe else {}
    source.setup = recipe is not None and recipe.composition is not None and recipe.composition.type in ("stack", "fuse")
    return source


def _setup_source(path: Path, *, base_model: str | None, task: str | None, dataset: str | None,
                  license: str | None) -> Source:
    """A setup folder (``save_adapter_setup``, ours or AdapterHub's) described by its members."""
    setup = read_setup(path).adapter_setup
    members = {name: read_adapter(path / name, with_head=False) for name in setup.flatten()}
    fusions = [read_fusion(path / fuse.name, with_head=False) for fuse in fusions_in(setup)]
    last = members[setup.last()]
    about = card.AdapterCard(
        name=path.resolve().name, method="fusion" if fusions else _method(last), config=setup.to_dict(),
        model_type=last.model_type, hidden_size=last.hidden_size, base_model=base_model or base_model_id(last.model_name),
        task=task or SHARING_TASKS.get(dataset or ""), dataset=dataset, license=license, setup=repr(setup),
        members=list(members), parameters=sum(map(_parameters, [*members.values(), *fusions])))
    return Source(path, None, about, setup=True)


def _method(loaded: LoadedAdapter) -> str:
    from .methods import method_name

    return method_name(loaded.config)


def _task_of_head(head) -> str | None:
    return None if head is None else recipe_head_type(head.head_type)


def _member_folders(recipe, names: list[str]) -> dict[str, Path]:
    """A fusion run's members as folders (Hub ids downloaded), by the names the fusion uses."""
    sources = recipe.composition.adapters if recipe.composition else []
    return {name: locate(src) for name, src in zip(names, sources, strict=False)}


# -- writing ------------------------------------------------------------------------------------

def check_dest(source: Source, dest: Path, force: bool) -> None:
    """Never write into a run's own folders; never mix an export into a folder that holds files."""
    target = dest.resolve()
    if source.run is not None:
        for own in _OWN:
            folder = (source.run / own).resolve()
            if target == folder or folder in target.parents:
                raise AdapterCliError(f"--dest: {dest} is inside the run's own {own}/ folder; export somewhere else")
        if target == source.run.resolve():
            raise AdapterCliError(f"--dest: {dest} is the run folder itself; export somewhere else")
    folder = source.folder.resolve()
    if target == folder or folder in target.parents:
        raise AdapterCliError(f"--dest: {dest} is inside the adapter folder being exported; export somewhere else")
    if target.is_file() or (target.is_dir() and any(target.iterdir()) and not force):
        raise AdapterCliError(f"--dest: {dest} already holds files; choose an empty folder or pass --force")


def _copy_adapter_files(folder: Path, dest: Path, base_id: str | None) -> None:
    """The folder's files (not temporary ones), with the base model recorded by its Hub id."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in sorted(folder.iterdir()):
        if item.is_file() and not item.name.startswith("."):
            shutil.copyfile(item, dest / item.name)
    for config in ("adapter_config.json", FUSION_CONFIG):
        if (dest / config).is_file() and "model_name" in (meta := read_json(dest / config)):
            write_json(dest / config, {**meta, "model_name": base_id})


def _write_native(source: Source, dest: Path, about: card.AdapterCard) -> list[str]:
    _copy_adapter_files(source.folder, dest, about.base_model)
    notes = []
    for name, folder in source.members.items():
        _copy_adapter_files(folder, dest / "members" / name, about.base_model)
    if about.kind == "fusion" and not source.members:
        notes.append("the fused adapters are not included (no run recipe names them); share them beside it")
    about.notes = notes
    card.write(dest, about)
    return notes


def _base_config(source: Source) -> Any | None:
    """The base model's config, when the run names the model and it can be read (None otherwise)."""
    if source.base_config_source is None:
        return None
    from transformers import AutoConfig

    from .assets import resolve_model_path
    from .hub import hub_access

    name, kwargs = source.base_config_source
    try:
        with hub_access():
            return AutoConfig.from_pretrained(resolve_model_path(name), **{k: v for k, v in kwargs.items() if v})
    except (OSError, ValueError):
        return None


def _tied_embeddings(source: Source, config: Any | None) -> bool:
    """Whether the base model's output embeddings are its input embeddings (a causal LM head);
    ``config``: the base model's (`_base_config`)."""
    if source.base_config_source is None:
        return True
    return config is not None and bool(getattr(config.get_text_config(), "tie_word_embeddings", True))


def _backbone_module_names(config: Any | None) -> list[str] | None:
    """Every module name of the bare base model (built on the meta device: no weights are read),
    so a PEFT export can name its target modules as PEFT does; None when the config is unknown."""
    if config is None:
        return None
    import torch
    from transformers import AutoModel

    try:
        with torch.device("meta"):
            backbone = AutoModel.from_config(config)
    except (ValueError, KeyError, OSError):
        return None
    return [name for name, _ in backbone.named_modules() if name]


def _require_adapter(source: Source, target: str) -> LoadedAdapter:
    if source.setup and source.run is None:
        raise AdapterCliError(f"--to {target}: {source.folder} is an adapter setup; setups export --to native or hub")
    if source.card.kind == "fusion":
        raise AdapterCliError(f"--to {target}: {source.folder} is an AdapterFusion; fusions export --to native or hub")
    return read_adapter(source.folder)


def _write_merged(source: Source, dest: Path) -> tuple[list[str], str]:
    """Merge the active LoRA / IA3 adapters into the base model's weights and save it (with the
    head, where a transformers task model has the same one) and the tokenizer."""
    import torch
    import transformers

    from .runs import load_run

    if source.run is None:
        raise AdapterCliError("--to merged: give the run folder (its recipe names the base model and tokenizer)")
    _require_adapter(source, "merged")
    _, model, tokenizer, name = load_run(source.run)
    state = model.adapter_state
    active = model.active_adapters.flatten() if model.active_adapters else [name]
    for adapter in active:
        method = state.adapters[adapter].method
        if state.adapters[adapter].config.family != "lora":
            raise AdapterCliError(f"--to merged: adapter '{adapter}' is {method}; only LoRA and IA3 merge into the "
                                  "weights (export it --to native, hub or adapterhub)")
        model.merge_adapter(adapter)
    backbone = model.base_model
    adapter_keys = {k for a in state.adapters for k in state.adapter_parameters(a)}
    weights = {k: v for k, v in backbone.state_dict().items() if k not in adapter_keys}
    config = copy.deepcopy(backbone.config)
    config._name_or_path = source.card.base_model or ""
    notes: list[str] = []
    head_config = model.heads[name].config if name in model.heads else None
    layout = task_heads.task_head(state.model_type, head_config, bool(getattr(config, "tie_word_embeddings", True))) \
        if head_config is not None else "there is no head"
    if isinstance(layout, str):
        notes.append(f"head not included (the folder is the bare {type(backbone).__name__}): {layout}")
        target, prefix, auto_class = transformers.AutoModel.from_config(config), "", "AutoModel"
    else:
        for key, value in layout.config.items():
            setattr(config, key, value)
        auto_class = layout.auto_class
        target = getattr(transformers, auto_class).from_config(config)
        prefix = target.base_model_prefix + "."
        weights = {prefix + k: v for k, v in weights.items()}
        weights.update(peft.map_head({k: v.detach() for k, v in model._head_parameters(name).items()}, layout))
    missing, unexpected = target.load_state_dict(weights, strict=False)
    target.tie_weights()
    untied = [k for k in missing if not _is_tied(target, k)]
    if untied or unexpected:
        raise AdapterCliError(f"--to merged: the merged weights do not fit {type(target).__name__} "
                              f"(missing {untied[:3]}, unexpected {unexpected[:3]})")
    target.to(next(backbone.parameters()).dtype).eval()
    with torch.no_grad():
        target.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return notes, auto_class


def _is_tied(model, key: str) -> bool:
    """A weight that was left out because it is the same tensor as another one (e.g. lm_head)."""
    try:
        param = model.get_parameter(key)
    except AttributeError:
        return False
    return any(param is other for name, other in model.named_parameters(remove_duplicate=False) if name != key)


def _write_setup(source: Source, dest: Path, about: card.AdapterCard) -> list[str]:
    """A fusion or stack run as one adapter setup folder (``load_adapter_setup`` reads it): its
    members, fusion, head and composition, saved from the model as the run loads it."""
    from .runs import load_run

    if source.run is None:  # a setup folder already: its files as they are
        shutil.copytree(source.folder, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*", "README.md"))
        _record_base_model(dest, about.base_model)
        card.write(dest, about)
        return []
    _, model, _, name = load_run(source.run)
    setup = model.active_adapters
    has_head = name in (getattr(model, "heads", None) or {})
    model.save_adapter_setup(dest, setup, head_setup=name if has_head else None)
    _record_base_model(dest, about.base_model)
    state = model.adapter_state
    weights = [*(state.adapter_parameters(n) for n in setup.flatten()), *(state.fusion_parameters(f.name) for f in fusions_in(setup))]
    about.parameters = sum(p.numel() for named in weights for p in named.values())
    about.setup, about.members = repr(setup), setup.flatten()
    card.write(dest, about)
    return []


def _record_base_model(folder: Path, base_id: str | None) -> None:
    """Every member's and fusion's config names the base model by its Hub id, as for one adapter."""
    for config in [*folder.rglob("adapter_config.json"), *folder.rglob(FUSION_CONFIG)]:
        write_json(config, {**read_json(config), "model_name": base_id})


def _listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def export(source: Source, to: str, dest: str, *, force: bool = False, private: bool = False,
           revision: str | None = None, commit_message: str | None = None, dry_run: bool = False) -> ExportResult:
    """Write ``source`` as ``to`` (one of `TARGETS`) to ``dest`` (a folder, or a Hub repo id for
    ``hub``). ``dry_run`` (hub) lists what would be uploaded without pushing."""
    if to not in TARGETS:
        raise AdapterCliError(f"--to: '{to}' is not one of {', '.join(TARGETS)}")
    if not dest:
        raise AdapterCliError("--dest: give the Hub repository id, e.g. user/my-adapter" if to == "hub"
                              else "--dest: give the folder to write")
    about = dataclasses.replace(source.card, notes=[])
    if to == "hub":
        repo_id, at = split_revision(dest)
        revision = revision or at
        if not is_repo_id(repo_id):
            raise AdapterCliError(f"--dest: '{dest}' is not a Hub repository id (user/name)")
        about.format, about.location = "native", repo_id + (f"@{revision}" if revision else "")
        with tempfile.TemporaryDirectory(prefix="adaptercli-push-") as tmp:
            notes = (_write_setup if source.setup else _write_native)(source, Path(tmp), about)
            files = _listing(Path(tmp))
            pushed = None if dry_run else push_folder(
                Path(tmp), repo_id, private=private, revision=revision,
                commit_message=commit_message or f"Upload {about.name} ({about.method}) with adaptercli")
        return ExportResult(dest, files, notes, pushed)
    folder = Path(dest)
    check_dest(source, folder, force)
    about.format, about.location = to, None
    if to == "native":
        notes = (_write_setup if source.setup else _write_native)(source, folder, about)
        return ExportResult(dest, _listing(folder), notes)
    if to == "merged":
        notes, about.auto_class = _write_merged(source, folder)
    else:
        loaded = _require_adapter(source, to)
        if to == "peft":
            config = _base_config(source)  # read once: for tied embeddings and the module names
            tied = _tied_embeddings(source, config) if about.head_type == "causal_lm" else True
            notes, layout = peft.write_adapter(folder, loaded, about.base_model, tied_embeddings=tied,
                                               module_names=_backbone_module_names(config))
            about.auto_class = layout.auto_class if layout is not None else "AutoModel"
        else:
            notes = adapterhub.write(folder, loaded, about.base_model, source.num_layers)
    about.notes = notes
    card.write(folder, about)
    return ExportResult(dest, _listing(folder), notes)


# -- the adapter index's write side -------------------------------------------------------------

def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "-", text).strip("-") or "x"


def descriptor_place(source: Source, org: str = "local") -> tuple[Path, str]:
    """Where ``source``'s descriptor goes in an index: the folder ``<task>/<dataset>/<org>``
    (relative to the index) and the file stem ``<model>_<method>`` (its files' folder, if kept beside it)."""
    about = source.card
    model = about.base_model or about.model_type or "model"
    folder = Path(_slug(about.task or "task")) / _slug(about.dataset or "data") / _slug(org)
    return folder, f"{_slug(model.replace('/', '--'))}_{about.method}"


def add_to_index(index: Path, source: Source, *, org: str = "local", repo: str | None = None, revision: str | None = None,
        description: str = "", force: bool = False) -> tuple[Path, Descriptor]:
    """Write a descriptor for ``source`` into the index folder ``index`` (the index's write side).
    With ``repo``, its files are that Hub repository's at ``revision`` (pinned to the commit; its
    weights must be byte-identical to ``source``'s); without, a native export (card included) is
    kept beside the descriptor. Returns the descriptor's path and the descriptor."""
    about = source.card
    if source.setup and (source.run is None or repo):
        raise AdapterIndexError("an adapter setup cannot be indexed yet; index its members, and share the setup "
                                "with `adapter export --to hub`")
    if about.kind == "fusion":
        raise AdapterIndexError("an AdapterFusion cannot be indexed yet; index its members, and share the fusion "
                                "with `adapter export --to hub`")
    place, stem = descriptor_place(source, org)
    task, dataset, org = place.parts
    model = about.base_model or about.model_type or "model"
    folder = index / place
    path = folder / f"{stem}.yaml"
    if path.exists() and not force:
        raise AdapterIndexError(f"{path} exists (an adapter for {task}/{dataset}@{org} on {model} with "
                                f"{about.method}); pass --force to replace it")
    if repo:
        files_at, commit = download(repo, revision, allow_patterns=list(ADAPTER_FILES))
        for name in ("adapter.safetensors", "head.safetensors"):
            local, remote = source.folder / name, files_at / name
            if local.is_file() and (not remote.is_file() or sha256_of(local) != sha256_of(remote)):
                raise AdapterIndexError(f"{repo}@{commit}: {name} differs from {source.folder}; push this adapter "
                                        "first (adapter export --to hub)")
        location: dict[str, Any] = {"repo": repo, "revision": commit}
    else:
        files_at = folder / stem
        if files_at.exists():
            shutil.rmtree(files_at)
        export(dataclasses.replace(source, setup=False), "native", str(files_at))  # the run's own adapter
        location = {"path": stem}
    names = sorted(p.name for p in files_at.iterdir() if p.is_file() and p.name in ADAPTER_FILES)
    files = {**location, "format": "adaptercli", "sha256": {n: sha256_of(files_at / n) for n in names},
             "size": {n: (files_at / n).stat().st_size for n in names}}
    parameters = {part: safetensors_parameters(files_at / f"{part}.safetensors") for part in ("adapter", "head")
                  if (files_at / f"{part}.safetensors").is_file()}
    head = {"type": about.head_type, "labels": about.labels} if about.head_type else None
    descriptor = Descriptor(
        task=task, dataset=dataset, org=org, name=about.name,
        model={"name": about.base_model, "type": about.model_type, "hidden_size": about.hidden_size},
        method=about.method, config=about.config, files=files, head=head,
        metrics={k: round(v, 6) for k, v in about.metrics.items()}, description=description,
        added=datetime.date.today().isoformat(), parameters=parameters)
    folder.mkdir(parents=True, exist_ok=True)
    write_text(path, yaml.safe_dump(descriptor.to_dict(), sort_keys=False, allow_unicode=True))
    descriptor.path = path
    return path, descriptor
