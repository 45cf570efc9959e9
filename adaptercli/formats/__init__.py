"""Reading and writing adapter folders: our native format, AdapterHub's and PEFT's.

``load_adapter`` detects the format from ``adapter_config.json``, converts the weights to
backbone-relative keys, checks that they fit the model (hidden size, architecture, every key and
shape) and only then adds the adapter. ``save_adapter`` writes atomically and creates parents.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..methods import LoRAConfig
from . import adapterhub, native, peft
from .common import AdapterFileError, LoadedAdapter, LoadedFusion, read_json
from .fusion import read_fusion, write_fusion

if TYPE_CHECKING:
    from ..model import ModelAdaptersMixin

__all__ = ["AdapterFileError", "load_adapter", "load_adapter_fusion", "save_adapter", "save_adapter_fusion"]


def _resolve_folder(path: Path) -> Path:
    if path.is_dir():
        return path
    if path.exists():
        raise AdapterFileError(f"{path}: expected an adapter folder, found a file")
    text = str(path)
    from ..hub import download_adapter, is_repo_id

    if is_repo_id(text):  # a Hub repository id (org/name[@revision]): download it (fails fast offline)
        return download_adapter(text)
    raise AdapterFileError(f"{path}: adapter folder not found")


def read_adapter(path: Path, with_head: bool = True, backbone_prefix: str = "") -> LoadedAdapter:
    folder = _resolve_folder(path)
    if not (folder / "adapter_config.json").exists():
        raise AdapterFileError(
            f"{folder}: not an adapter folder (no adapter_config.json; adaptercli, AdapterHub and PEFT folders have one)"
        )
    meta = read_json(folder / "adapter_config.json")
    if peft.is_peft(meta):
        return peft.read(folder, meta, backbone_prefix)
    if native.is_native(meta):
        return native.read(folder, meta, with_head)
    if adapterhub.is_adapterhub(meta, folder):
        return adapterhub.read(folder, meta, with_head)
    raise AdapterFileError(f"{folder / 'adapter_config.json'}: not a format adaptercli knows (adaptercli, AdapterHub, PEFT)")


def _rename(weights: dict[str, torch.Tensor], old: str, new: str, containers: str) -> dict[str, torch.Tensor]:
    pattern = re.compile(rf"(^|\.)({containers})\.{re.escape(old)}\.")
    return {pattern.sub(lambda m: f"{m.group(1)}{m.group(2)}.{new}.", k): v for k, v in weights.items()}


def load_adapter(model: ModelAdaptersMixin, path: Path, load_as: str | None, with_head: bool) -> str:
    state = model._adapter_state
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
    weights = _rename(upgraded, loaded.saved_name, name,
                      "adapters|loras|prefix_tunings|prefix_gates|invertible_adapters|shared_parameters|refts|prompt_tunings")
    model.add_adapter(name, loaded.config)
    state.adapters[name].base_model = loaded.model_name
    try:
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


def _load_head(model: ModelAdaptersMixin, loaded: LoadedAdapter | LoadedFusion, name: str, path: Path) -> None:
    heads = getattr(model, "heads", None)
    if loaded.head_is_static or heads is None:
        if heads is not None and loaded.head_is_static:
            raise AdapterFileError(f"{path}: the head was saved from a transformers task model; load it into the same model class")
        if heads is None and not loaded.head_is_static:
            raise AdapterFileError(f"{path}: has a flexible head; load it into an AdapterModel (AutoAdapterModel) or pass with_head=False")
        _copy_into(model._head_parameters(name), loaded.head_weights, path, "head")
        return
    model.add_head(name, loaded.head_config, overwrite_ok=True)
    weights = _rename(loaded.head_weights, loaded.head_name or loaded.saved_name, name, "heads")
    _copy_into(model._head_parameters(name), weights, path, "head")


def save_adapter(model: ModelAdaptersMixin, folder: Path, name: str, with_head: bool, format: str) -> None:
    state = model._adapter_state
    record = state.record(name)
    if name in state.merged:
        raise AdapterFileError(f"adapter '{name}' is merged into the weights; unmerge_adapter('{name}') before saving it")
    weights = state.adapter_parameters(name)
    model_name = str(getattr(model.config, "_name_or_path", "") or "")
    if format == "peft":
        config = record.config
        if not isinstance(config, LoRAConfig) or config.composition_mode != "add" or state.arch and state.arch.fused_qkv and not config.target_modules:
            raise AdapterFileError(f"adapter '{name}' ({record.method}) cannot be written as PEFT LoRA; "
                                   "PEFT export supports LoRA adapters on separate q/k/v projections or target_modules")
        prefix = "" if state.backbone is model or hasattr(model, "heads") else f"{state.backbone.base_model_prefix}."
        fan_in_fan_out = any(type(m).__name__ == "Conv1D" for m in state.backbone.modules() if hasattr(m, "loras"))
        peft.write(folder, weights, {"r": config.r, "alpha": config.alpha, "dropout": config.dropout,
                                     "use_rslora": config.use_rslora, "fan_in_fan_out": fan_in_fan_out,
                                     "model_name": model_name}, prefix)
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


def load_adapter_fusion(model: ModelAdaptersMixin, path: Path, load_as: str | None, with_head: bool) -> str:
    """Read an AdapterFusion folder (ours or AdapterHub's), check it fits, add it; its members
    must already be on the model."""
    state = model._adapter_state
    loaded = read_fusion(_resolve_folder(path), with_head)
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
        weights = _rename(upgraded, loaded.saved_name, name, "adapter_fusion_layer")
        _copy_into(state.fusion_parameters(name), weights, path, "fusion")
        if with_head and (loaded.head_weights or loaded.head_config):
            _load_head(model, loaded, load_as or loaded.head_name or name, path)
    except Exception:
        model.delete_adapter_fusion(name)  # never leave a half-loaded fusion behind
        raise
    return name


def save_adapter_fusion(model: ModelAdaptersMixin, folder: Path, name: str, with_head: bool | str) -> None:
    state = model._adapter_state
    record = state.fusion(name)
    meta = {"name": name, "adapter_names": record.members, "config": record.config.to_dict(),
            "model_type": state.model_type, "hidden_size": state.hidden_size, "num_layers": state.num_layers,
            "model_name": str(getattr(model.config, "_name_or_path", "") or ""),
            "model_class": type(model).__name__.removesuffix("WithAdapters")}
    head = None
    if with_head:
        head_name = with_head if isinstance(with_head, str) else name
        heads = getattr(model, "heads", None)
        if heads is None or head_name not in heads:
            raise AdapterFileError(f"no head named '{head_name}' to save with fusion '{name}' "
                                   f"(heads: {', '.join(heads or []) or 'none'})")
        head = ({"name": head_name, "model_type": state.model_type, "hidden_size": state.hidden_size,
                 "config": heads[head_name].config.to_dict()}, dict(model._head_parameters(head_name)))
    write_fusion(folder, meta, dict(state.fusion_parameters(name)), head)
