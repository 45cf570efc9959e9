"""Folders saved by AdapterHub ``adapters`` 1.x (and adapter-transformers): ``adapter_config.json`` +
``pytorch_adapter.bin`` (read with ``weights_only=True``) or ``adapter.safetensors``; heads in
``head_config.json`` + ``pytorch_model_head.bin`` / ``model_head.safetensors``.

Their keys are the module paths of the model they were saved from, so they may carry the model's
prefix (``bert.``); prefix-tuning pools are repeated under every layer, and we keep one copy.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..architectures import Architecture, architecture_for
from ..heads import HeadConfig
from ..methods import resolve_config
from .common import (
    AdapterFileError,
    LoadedAdapter,
    LoadedFusion,
    LoadedHead,
    atomic_write,
    read_json,
    read_weights,
    write_json,
    write_weights,
)
from .task_heads import backbone_class, base_model_prefix

WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")
HEAD_WEIGHTS = ("model_head.safetensors", "head.safetensors", "pytorch_model_head.bin")

# `...prefix_tuning.prefix_tunings.NAME.<location>.X` -> `prefix_tunings.NAME.X`, from the pool's
# top-level copy; the per-layer copies (`...prefix_tuning.pool...`) are the same tensors.
_PREFIX = re.compile(r"^prefix_tuning\.prefix_tunings\.([^.]+)\.((?:\w+_)?(?:self_prefix|self|encoder_prefix|cross_prefix))\.(.+)$")


def is_adapterhub(meta: dict[str, Any], folder: Path) -> bool:
    version = str(meta.get("version", ""))
    return version.startswith(("adapters.", "adapter-transformers")) or (folder / "pytorch_adapter.bin").exists()


def _strip_model_prefix(key: str) -> str:
    """Drop a leading model prefix (``bert.``, ``roberta.``, ``transformer.``, ``model.`` ...):
    adapter keys inside a backbone start with a backbone attribute we know."""
    head, _, rest = key.partition(".")
    if rest and head not in ("encoder", "embeddings", "transformer", "h", "layers", "invertible_adapters", "prefix_tuning",
                             "shared_parameters", "prompt_tuning", "decoder"):
        return rest
    if head == "transformer" and rest.startswith(("h.", "prefix_tuning", "invertible_adapters")):
        return rest  # GPT-2's AdapterModel prefix; DistilBERT's `transformer.layer` stays
    if head == "model" and rest:
        return rest
    return key


def convert_keys(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone-relative keys. A prefix pool read from one place keeps no place in its key; an
    encoder-decoder's pools (encoder_prefix, self_prefix, cross_prefix) keep theirs."""
    places: dict[str, set[str]] = {}
    for key in weights:
        match = _PREFIX.match(_strip_model_prefix(key))
        if match:
            places.setdefault(match.group(1), set()).add(match.group(2))
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        key = _strip_model_prefix(key)
        if ".prefix_tuning.pool." in key:
            continue
        match = _PREFIX.match(key)
        if match:
            name, place, rest = match.groups()
            key = f"prefix_tunings.{name}.{place}.{rest}" if len(places[name]) > 1 else f"prefix_tunings.{name}.{rest}"
        if ".adapter_norm_before." in key:
            continue  # the same module is also registered as adapter_down.0
        out[key] = value
    return out


def read(folder: Path, meta: dict[str, Any], with_head: bool) -> LoadedAdapter:
    if "config" not in meta or "name" not in meta:
        raise AdapterFileError(f"{folder / 'adapter_config.json'}: missing 'config' or 'name'")
    # AdapterHub writes the config in full, or by identifier ("direft", "pfeiffer", "lora[r=16]"),
    # which its loader resolves to that config's defaults; the registry knows the same names.
    config = resolve_config(meta["config"] if isinstance(meta["config"], str) else dict(meta["config"]))
    loaded = LoadedAdapter(config, convert_keys(read_weights(folder, *WEIGHTS)), meta["name"],
                           meta.get("model_type"), meta.get("hidden_size"), model_name=meta.get("model_name") or None)
    if with_head:
        read_head(folder, loaded, meta["name"])
    return loaded


def read_head(folder: Path, loaded: LoadedAdapter | LoadedFusion | LoadedHead, default_name: str) -> None:
    """Fill ``loaded``'s head fields from ``head_config.json`` + the head weights, if present."""
    if (folder / "head_config.json").exists():
        head_meta = read_json(folder / "head_config.json")
        if head_meta.get("config") is None:  # what adapters 1.3.0 writes for a model without heads (plugin models)
            return
        loaded.head_config = HeadConfig.from_dict(head_meta["config"])
        loaded.head_name = head_meta.get("name", default_name)
        loaded.head_weights = {_strip_model_prefix(k) if not k.startswith("heads.") else k: v
                               for k, v in read_weights(folder, *HEAD_WEIGHTS).items()}


# -- writing: a folder that `adapters` 1.x `load_adapter` reads ------------------------------------

WRITTEN_VERSION = "adapters.1.3.0"
# The head config keys `adapters` passes to each head class; our regression head is its
# classification head with one label.
_HEAD_FIELDS = {
    "classification": ("num_labels", "layers", "activation_function", "label2id", "use_pooler", "bias", "dropout_prob"),
    "multilabel_classification": ("num_labels", "layers", "activation_function", "label2id", "use_pooler", "bias",
                                  "dropout_prob"),
    "tagging": ("num_labels", "layers", "activation_function", "label2id", "dropout_prob"),
}


def _config_dict(loaded: LoadedAdapter) -> dict[str, Any]:
    config = loaded.config.to_dict()
    if loaded.config.family == "lora":
        extras = {k: config.pop(k) for k in _LORA_ONLY_OURS}
        if extras["dora_norm"] == "adapterhub" or not loaded.config.use_dora:
            extras["dora_norm"] = None  # AdapterHub's own (or no DoRA): nothing it lacks
        used = next((k for k in _LORA_ONLY_OURS if extras[k]), None)
        if used:
            raise AdapterFileError(f"adapter '{loaded.saved_name}' uses {used}, which AdapterHub's LoRA does not have "
                                   "(export it --to peft or native)")
        if "o" in loaded.config.attn_matrices and loaded.config.selfattn_lora:
            raise AdapterFileError(f"adapter '{loaded.saved_name}' has LoRA on the attention output ('o' in "
                                   "attn_matrices), which AdapterHub 1.3.0 does not place (export it --to peft or native)")
        config["architecture"] = "lora"
    elif loaded.config.family in ("prefix_tuning", "prompt_tuning", "reft"):  # unions carry their own
        config["architecture"] = loaded.config.family
    for member in config.get("configs", []):  # a union's LoRA has no keys AdapterHub's lacks (all unset)
        if member.get("architecture") == "lora":
            for key in _LORA_ONLY_OURS:
                member.pop(key, None)
    return config


# Our LoRAConfig's keys that AdapterHub's lacks (PEFT's): a config that sets one cannot be written.
_LORA_ONLY_OURS = ("target_modules", "use_rslora", "feedforward_modules", "dora_norm", "rank_pattern", "alpha_pattern")


def _head_config(head: HeadConfig) -> dict[str, Any] | str:
    """AdapterHub's ``head_config.json`` ``config`` for our head, or why there is none."""
    kind = "classification" if head.head_type == "regression" else head.head_type
    if kind not in _HEAD_FIELDS:
        return f"{head.head_type} heads are laid out differently in AdapterHub"
    if kind == "tagging" and not head.bias:
        return "AdapterHub's tagging head always has a bias"
    values = head.to_dict()
    return {"head_type": kind, **{k: values[k] for k in _HEAD_FIELDS[kind]}}


def _adapter_keys(loaded: LoadedAdapter, prefix: str, num_layers: int | None) -> dict[str, torch.Tensor]:
    """Our backbone-relative keys as `adapters` names them (``prefix``: the model's, e.g. ``bert.``;
    module paths renamed to transformers 4.x's where the table says so). Its
    ``adapter_norm_before`` is the same module as ``adapter_down.0``."""
    arch = architecture_for(loaded.model_type or "", required=False)
    out: dict[str, torch.Tensor] = {}
    pools = {k: v for k, v in loaded.weights.items() if k.startswith("prefix_tunings.")}
    if pools:
        if arch is None:
            architecture_for(loaded.model_type or "", what="AdapterHub prefix-tuning export")  # raises
        out.update(_prefix_pool_keys(loaded, arch, pools, num_layers or 0))
    for key, value in loaded.weights.items():
        if key in pools:
            continue
        out[key] = value
        if getattr(loaded.config, "ln_before", False) and ".adapter_down.0." in key:
            out[key.replace(".adapter_down.0.", ".adapter_norm_before.")] = value.clone()
    renamed = {}
    for key, value in out.items():
        for pattern, replacement in arch.adapterhub_keys if arch is not None else ():
            key = re.sub(pattern, replacement, key)
        renamed[prefix + key] = value
    return renamed


def _prefix_pool_keys(loaded: LoadedAdapter, arch: Architecture, pools: dict[str, torch.Tensor],
                      num_layers: int) -> dict[str, torch.Tensor]:
    """AdapterHub keeps an adapter's prefix pools in one module, shared by the model and by every
    attention module that joins prefixes: its files hold each tensor at the top
    (``prefix_tuning.prefix_tunings.NAME.<place>.*``) and again under each such attention module.
    Places: ``self_prefix``, or in an encoder-decoder ``encoder_prefix`` / ``self_prefix`` /
    ``cross_prefix`` (every one under every attention module, as AdapterHub writes them; the
    layers ``leave_out`` names hold the copies too)."""
    layers = arch.layers.replace("*", "0")  # ALBERT: the released models have one layer group
    if arch.decoder is None:
        attentions = [f"{layers}.{i}.{arch.attention}" for i in range(num_layers)]
    else:
        n_encoder = _encoder_layers(loaded, pools, num_layers)
        decoder = arch.decoder
        attentions = [f"{layers}.{i}.{arch.attention}" for i in range(n_encoder)]
        for j in range(num_layers - n_encoder):
            attentions += [f"{decoder.layers}.{j}.{decoder.attention}", f"{decoder.layers}.{j}.{decoder.cross_attention}"]
    out: dict[str, torch.Tensor] = {}
    for key, value in pools.items():
        name, rest = re.match(r"^prefix_tunings\.([^.]+)\.(.+)$", key).groups()
        if arch.decoder is None:
            rest = f"self_prefix.{rest}"
        out[f"prefix_tuning.prefix_tunings.{name}.{rest}"] = value
        for path in attentions:
            out[f"{path}.prefix_tuning.pool.prefix_tunings.{name}.{rest}"] = value.clone()
    return out


def _encoder_layers(loaded: LoadedAdapter, pools: dict[str, torch.Tensor], num_layers: int) -> int:
    """How many of an encoder-decoder's ``num_layers`` are encoder layers: from the widths of the
    encoder and decoder pools (each holds keys/values for its layers) when ``leave_out`` names none,
    else half (the file does not record the split; T5, BART and Whisper checkpoints are symmetric)."""
    def width(place: str) -> int | None:
        tensors = {k.split(f".{place}.", 1)[1]: v for k, v in pools.items() if f".{place}." in k}
        if "control_trans.2.bias" in tensors:
            return tensors["control_trans.2.bias"].numel()
        return tensors["control_trans"].numel() if "control_trans" in tensors else None

    encoder, decoder = width("encoder_prefix"), width("self_prefix")
    if encoder and decoder and not getattr(loaded.config, "leave_out", None):
        return round(num_layers * encoder / (encoder + decoder))
    return num_layers // 2


def _write_tensors(folder: Path, safetensors_name: str, pickle_name: str, weights: dict[str, torch.Tensor]) -> None:
    """safetensors, plus the plain tensor dictionary `adapters` reads by default (it loads it with
    ``torch.load(weights_only=True)``: tensors only, no code)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    write_weights(folder / safetensors_name, tensors)
    atomic_write(folder / pickle_name, lambda tmp: torch.save(tensors, tmp))


def write(folder: Path, loaded: LoadedAdapter, base_model: str | None, num_layers: int | None,
          with_head: bool = True) -> list[str]:
    """Write an adapter read from one of our folders as an AdapterHub ``adapters`` 1.x folder
    (``AutoAdapterModel.load_adapter(folder)`` loads it, head included); returns notes on what was
    left out. ``base_model``: the base model's Hub id (None: unknown)."""
    notes: list[str] = []
    head = None
    if with_head and loaded.head_is_static:
        notes.append("head not included: it is a transformers task model's own head, not an AdapterHub head")
    elif with_head and loaded.head_config is not None:
        head = _head_config(loaded.head_config)
        if isinstance(head, str):
            notes.append(f"head not included: {head}")
            head = None
    model_type = loaded.model_type or ""
    backbone = backbone_class(model_type).__name__  # e.g. BertModel; with a head, AdapterHub's BertAdapterModel
    prefix = base_model_prefix(model_type) + "." if head is not None else ""
    meta = {"hidden_size": loaded.hidden_size, "model_name": base_model, "model_type": loaded.model_type,
            "model_class": backbone.removesuffix("Model") + "AdapterModel" if head is not None else backbone,
            "name": loaded.saved_name, "version": WRITTEN_VERSION}
    config = _config_dict(loaded)  # before any file: a refusal leaves nothing behind
    _write_tensors(folder, "adapter.safetensors", "pytorch_adapter.bin", _adapter_keys(loaded, prefix, num_layers))
    if head is not None:
        _write_tensors(folder, "model_head.safetensors", "pytorch_model_head.bin", loaded.head_weights)
        write_json(folder / "head_config.json", {**meta, "config": head})
    write_json(folder / "adapter_config.json", {**meta, "config": config})
    return notes
