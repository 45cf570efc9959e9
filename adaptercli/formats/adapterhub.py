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

from ..heads import HeadConfig
from ..methods import resolve_config
from .common import AdapterFileError, LoadedAdapter, read_json, read_weights

WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")
HEAD_WEIGHTS = ("model_head.safetensors", "head.safetensors", "pytorch_model_head.bin")

# `...prefix_tuning.prefix_tunings.NAME.<location>.X` -> `prefix_tunings.NAME.X`, from the pool's
# top-level copy; the per-layer copies (`...prefix_tuning.pool...`) are the same tensors.
_PREFIX = re.compile(r"^prefix_tuning\.prefix_tunings\.([^.]+)\.(?:self_prefix|self|encoder_prefix)\.(.+)$")


def is_adapterhub(meta: dict[str, Any], folder: Path) -> bool:
    version = str(meta.get("version", ""))
    return version.startswith(("adapters.", "adapter-transformers")) or (folder / "pytorch_adapter.bin").exists()


def _strip_model_prefix(key: str) -> str:
    """Drop a leading model prefix (``bert.``, ``roberta.``, ``transformer.``, ``model.`` ...):
    adapter keys inside a backbone start with a backbone attribute we know."""
    head, _, rest = key.partition(".")
    if rest and head not in ("encoder", "embeddings", "transformer", "h", "layers", "invertible_adapters", "prefix_tuning"):
        return rest
    if head == "transformer" and rest.startswith(("h.", "prefix_tuning", "invertible_adapters")):
        return rest  # GPT-2's AdapterModel prefix; DistilBERT's `transformer.layer` stays
    if head == "model" and rest:
        return rest
    return key


def convert_keys(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        key = _strip_model_prefix(key)
        if ".prefix_tuning.pool." in key:
            continue
        match = _PREFIX.match(key)
        if match:
            key = f"prefix_tunings.{match.group(1)}.{match.group(2)}"
        if ".adapter_norm_before." in key:
            continue  # the same module is also registered as adapter_down.0
        out[key] = value
    return out


def read(folder: Path, meta: dict[str, Any], with_head: bool) -> LoadedAdapter:
    if "config" not in meta or "name" not in meta:
        raise AdapterFileError(f"{folder / 'adapter_config.json'}: missing 'config' or 'name'")
    config = resolve_config(dict(meta["config"]))
    loaded = LoadedAdapter(config, convert_keys(read_weights(folder, *WEIGHTS)), meta["name"],
                           meta.get("model_type"), meta.get("hidden_size"))
    if with_head and (folder / "head_config.json").exists():
        head_meta = read_json(folder / "head_config.json")
        loaded.head_config = HeadConfig.from_dict(head_meta["config"])
        loaded.head_name = head_meta.get("name", meta["name"])
        loaded.head_weights = {_strip_model_prefix(k) if not k.startswith("heads.") else k: v
                               for k, v in read_weights(folder, *HEAD_WEIGHTS).items()}
    return loaded
