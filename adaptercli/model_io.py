"""Loading and saving adapters and fusions on a model: the formats read a folder into plain data
(:mod:`adaptercli.formats`); this module checks that the data fits the model (hidden size, model
type, every key and shape) and only then adds it, and turns a model's adapter back into data to write.

The functions take a model that has the adapter API (``init`` or ``AdapterModel``); the model's
``load_adapter`` / ``save_adapter`` (and the fusion ones) call them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from .composition import CompositionBlock
from .formats import AdapterFileError, adapterhub, native, peft, read_adapter
from .formats.common import LoadedAdapter, LoadedFusion
from .formats.fusion import read_fusion, write_fusion
from .formats.setup import HeadSetup, fusions_in, head_names, read_head, read_setup, write_head, write_setup
from .methods import LoRAConfig
from .methods.family import FUSION_CONTAINER, key_pattern

# ``model`` below: a transformers model with the adapter API (``ModelAdaptersMixin``), typed as Any
# because model.py imports this module.


def _rename(weights: dict[str, torch.Tensor], old: str, new: str, containers: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The weights of adapter ``old`` under the name ``new``."""
    pattern = key_pattern(containers, old)
    return {pattern.sub(lambda m: f"{m.group(1)}{m.group(2)}.{new}.", k): v for k, v in weights.items()}


def load_adapter(model: Any, path: Path, load_as: str | None, with_head: bool) -> str:
    state = model.adapter_state
    loaded = read_adapter(path, with_head, getattr(state.backbone, "base_model_prefix", "") or "")
    name = load_as or loaded.saved_name
    if loaded.hidden_size and loaded.hidden_size != state.hidden_size:
        raise AdapterFileError(
            f"{path}: adapter was saved for a {loaded.model_type} model with hidden size {loaded.hidden_size}; "
            f"this {state.model_type} model has hidden size {state.hidden_size}"
        )
    if loaded.model_type and loaded.model_type != state.model_type:
        raise AdapterFileError(f"{path}: adapter was saved for a {loaded.model_type} model; this model is {state.model_type}")
    upgraded = state.arch.upgrade_keys(loaded.weights) if state.arch is not None else loaded.weights
    weights = _rename(upgraded, loaded.saved_name, name, state.containers)
    model.add_adapter(name, loaded.config)
    state.adapters[name].base_model = loaded.model_name
    try:
        for family in state.families.values():
            weights = family.migrate(state, name, weights)
        _copy_into(state.adapter_parameters(name), weights, path, "adapter")
        if with_head and (loaded.head_weights or loaded.head_config):
            _load_head(model, loaded, name, path)
    except Exception:
        model.delete_adapter(name)  # never leave a half-loaded adapter behind
        raise
    return name


def _copy_into(params: dict[str, torch.nn.Parameter], weights: dict[str, torch.Tensor], path: Path, what: str) -> None:
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing and not unexpected and all(k.startswith("shared_parameters.") for k in missing):
        raise AdapterFileError(
            f"{path}: the folder lacks the adapter's shared tensors ({', '.join(missing)}); adapters 1.3.0's "
            "save_adapter leaves Compacter's shared PHM weights and VeRA's shared matrices out (it draws new ones "
            "when it loads the folder), so the trained adapter cannot be rebuilt from it; save them with it")
    if missing or unexpected:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
            for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys
        )
        raise AdapterFileError(f"{path}: {what} weights do not fit this model ({detail})")
    with torch.no_grad():
        for key, param in params.items():
            value = weights[key]
            if value.shape != param.shape:
                raise AdapterFileError(f"{path}: {key} has shape {tuple(value.shape)}, this model expects {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))


def _load_head(model: Any, loaded: LoadedAdapter | LoadedFusion, name: str, path: Path) -> None:
    heads = getattr(model, "heads", None)
    if loaded.head_is_static or heads is None:
        if heads is not None and loaded.head_is_static:
            raise AdapterFileError(f"{path}: the head was saved from a transformers task model; load it into the same model class")
        if heads is None and not loaded.head_is_static:
            raise AdapterFileError(f"{path}: has a flexible head; load it into an AdapterModel (AutoAdapterModel) or pass with_head=False")
        own = model._head_parameters(name)
        backbone = {n for n, _ in model.adapter_state.backbone.named_parameters()}
        copies = sorted(k for k in loaded.head_weights if k not in own and k in backbone)
        if copies:  # PEFT's modules_to_save can hold trained copies of the model's own layers
            raise AdapterFileError(
                f"{path}: holds trained copies of the model's own layers ({', '.join(copies[:3])}"
                f"{' ...' if len(copies) > 3 else ''}; PEFT's modules_to_save), not an adapter or a task head; "
                "adaptercli loads adapters and heads only")
        _copy_into(own, loaded.head_weights, path, "head")
        return
    model.add_head(name, loaded.head_config, overwrite_ok=True)
    weights = _rename(loaded.head_weights, loaded.head_name or loaded.saved_name, name, ("heads",))
    _copy_into(model._head_parameters(name), weights, path, "head")


def save_adapter(model: Any, folder: Path, name: str, with_head: bool, format: str) -> None:
    state = model.adapter_state
    record = state.record(name)
    if name in state.merged:
        raise AdapterFileError(f"adapter '{name}' is merged into the weights; unmerge_adapter('{name}') before saving it")
    weights = state.adapter_parameters(name)
    model_name = str(getattr(model.config, "_name_or_path", "") or "")
    if format == "peft":
        config = record.config
        if not isinstance(config, LoRAConfig):
            raise AdapterFileError(f"adapter '{name}' ({record.method}) cannot be written as PEFT LoRA or IA3; "
                                   "PEFT export supports LoRA and IA3 adapters")
        prefix = "" if state.backbone is model or hasattr(model, "heads") else f"{state.backbone.base_model_prefix}."
        fan_in_fan_out = any(type(m).__name__ == "Conv1D" for m in state.backbone.modules() if hasattr(m, "loras"))
        tensors = peft.peft_tensors(config, weights, state.model_type, name)
        peft.write(folder, tensors, peft.peft_meta(config, tensors, fan_in_fan_out, model_name), prefix,
                   module_names=[n for n, _ in state.backbone.named_modules() if n])
        return
    if format == "adapterhub":  # our folder first, then the same conversion as `adapter export --to adapterhub`
        with tempfile.TemporaryDirectory() as scratch:
            save_adapter(model, Path(scratch), name, with_head, "native")
            folder.mkdir(parents=True, exist_ok=True)
            adapterhub.write(folder, read_adapter(Path(scratch)), model_name or None, state.num_layers, with_head)
        return
    if format != "native":
        raise AdapterFileError(f"unknown adapter format '{format}' (native, adapterhub or peft)")
    meta = {"name": name, "method": record.method, "config": record.config.to_dict(), "model_type": state.model_type,
            "hidden_size": state.hidden_size, "num_layers": state.num_layers, "model_name": model_name,
            "model_class": type(model).__name__.removesuffix("WithAdapters")}
    head = None
    head_params = model._head_parameters(name) if with_head else {}
    heads = getattr(model, "heads", None)
    if with_head and (head_params or (heads is not None and name in heads)):
        head_meta = {"name": name, "model_type": state.model_type, "hidden_size": state.hidden_size}
        if heads is not None:
            head_meta["config"] = heads[name].config.to_dict()
        else:
            head_meta["static"] = True
        head = (head_meta, dict(head_params))
    native.write(folder, meta, dict(weights), head)


def load_adapter_fusion(model: Any, path: Path, load_as: str | None, with_head: bool) -> str:
    """Read an AdapterFusion folder (ours or AdapterHub's), check it fits, add it; its members
    must already be on the model."""
    state = model.adapter_state
    loaded = read_fusion(path, with_head)
    if loaded.hidden_size and loaded.hidden_size != state.hidden_size:
        raise AdapterFileError(
            f"{path}: fusion was saved for a {loaded.model_type} model with hidden size {loaded.hidden_size}; "
            f"this {state.model_type} model has hidden size {state.hidden_size}")
    if loaded.model_type and loaded.model_type != state.model_type:
        raise AdapterFileError(f"{path}: fusion was saved for a {loaded.model_type} model; this model is {state.model_type}")
    name = load_as or loaded.saved_name
    model.add_adapter_fusion(loaded.members, config=loaded.config, name=name)
    try:
        upgraded = state.arch.upgrade_keys(loaded.weights) if state.arch is not None else loaded.weights
        weights = _rename(upgraded, loaded.saved_name, name, (FUSION_CONTAINER,))
        _copy_into(state.fusion_parameters(name), weights, path, "fusion")
        if with_head and (loaded.head_weights or loaded.head_config):
            _load_head(model, loaded, load_as or loaded.head_name or name, path)
    except Exception:
        model.delete_adapter_fusion(name)  # never leave a half-loaded fusion behind
        raise
    return name


def save_adapter_fusion(model: Any, folder: Path, name: str, with_head: bool | str) -> None:
    state = model.adapter_state
    record = state.fusion(name)
    meta = {"name": name, "adapter_names": record.members, "config": record.config.to_dict(),
            "model_type": state.model_type, "hidden_size": state.hidden_size, "num_layers": state.num_layers,
            "model_name": str(getattr(model.config, "_name_or_path", "") or ""),
            "model_class": type(model).__name__.removesuffix("WithAdapters")}
    head = _named_head(model, with_head if isinstance(with_head, str) else name, f"fusion '{name}'") if with_head else None
    write_fusion(folder, meta, dict(state.fusion_parameters(name)), head)


def _named_head(model: Any, name: str, owner: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A flexible head as data to write: its meta (config) and weights."""
    heads = getattr(model, "heads", None)
    if heads is None or name not in heads:
        raise AdapterFileError(f"no head named '{name}' to save with {owner} (heads: {', '.join(heads or []) or 'none'})")
    state = model.adapter_state
    return ({"name": name, "model_type": state.model_type, "hidden_size": state.hidden_size,
             "config": heads[name].config.to_dict()}, dict(model._head_parameters(name)))


def save_adapter_setup(model: Any, folder: Path, setup: CompositionBlock, head_setup: HeadSetup) -> None:
    """Write ``setup``'s members, fusions and the heads of ``head_setup`` into subfolders named like
    them, then ``adapter_setup.json`` (AdapterHub's layout). Everything is checked before a file is written."""
    state = model.adapter_state
    if head_setup is True:
        raise AdapterFileError("head_setup=True (the one head of a model without named heads) is not supported; "
                               "name the heads of an AdapterModel")
    members, fusions = setup.flatten(), [fuse.name for fuse in fusions_in(setup)]
    for name in members:
        state.record(name)
    for name in fusions:
        state.fusion(name)
    heads = {name: _named_head(model, name, "the setup") for name in head_names(head_setup)}
    for name in members:
        save_adapter(model, folder / name, name, with_head=False, format="native")
    for name in fusions:
        save_adapter_fusion(model, folder / name, name, with_head=False)
    for name, (meta, weights) in heads.items():  # after the members: a head may share a member's folder
        write_head(folder / name, meta, weights)
    write_setup(folder, setup, head_setup)


def load_adapter_setup(model: Any, folder: Path) -> tuple[CompositionBlock, HeadSetup]:
    """Load a setup folder (ours or AdapterHub's): every member under the name the setup uses,
    every fusion, every head of the head setup. On any error, what was loaded is removed again."""
    loaded = read_setup(folder)
    setup, head_setup = loaded.adapter_setup, loaded.head_setup
    if head_setup is True:
        raise AdapterFileError(f"{folder}: its head setup is the one head of a model without named heads "
                               "(AdapterHub's head_setup=True), which adaptercli does not read")
    added: list[str] = []
    fused: list[str] = []
    try:
        for name in setup.flatten():
            added.append(load_adapter(model, folder / name, load_as=name, with_head=False))
        for fuse in fusions_in(setup):
            fused.append(load_adapter_fusion(model, folder / fuse.name, load_as=fuse.name, with_head=False))
        for name in head_names(head_setup):
            if getattr(model, "heads", None) is None:
                raise AdapterFileError(f"{folder}: the setup has heads; load it into an AdapterModel (AutoAdapterModel)")
            _load_head(model, read_head(folder / name, name), name, folder / name)
    except Exception:
        for name in fused:
            model.delete_adapter_fusion(name)
        for name in added:
            model.delete_adapter(name)
        raise
    return setup, head_setup
