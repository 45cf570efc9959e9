"""Our native adapter folder: ``adapter_config.json`` + ``adapter.safetensors`` (+ ``head_config.json``
+ ``head.safetensors``). Weight keys are module paths inside the backbone, AdapterHub's layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..heads import HeadConfig
from ..methods import resolve_config
from .common import LoadedAdapter, read_json, read_weights, write_json, write_weights

FORMAT = "adaptercli"
VERSION = "adaptercli.0.1"
CONFIG, WEIGHTS, HEAD_CONFIG, HEAD_WEIGHTS = "adapter_config.json", "adapter.safetensors", "head_config.json", "head.safetensors"


def is_native(meta: dict[str, Any]) -> bool:
    return meta.get("format") == FORMAT


def write(folder: Path, meta: dict[str, Any], weights: dict[str, torch.Tensor],
          head: tuple[dict[str, Any], dict[str, torch.Tensor]] | None) -> None:
    # Weights first, config last: a folder whose config exists is complete.
    write_weights(folder / WEIGHTS, weights)
    if head is not None:
        head_meta, head_weights = head
        write_weights(folder / HEAD_WEIGHTS, head_weights)
        write_json(folder / HEAD_CONFIG, {"format": FORMAT, "version": VERSION, **head_meta})
    elif (folder / HEAD_CONFIG).exists():
        (folder / HEAD_CONFIG).unlink()  # a stale head from an earlier save would load with this adapter
    write_json(folder / CONFIG, {"format": FORMAT, "version": VERSION, **meta})


def read(folder: Path, meta: dict[str, Any], with_head: bool) -> LoadedAdapter:
    config = resolve_config({"method": meta.get("method"), **meta["config"]} if meta.get("method") else meta["config"])
    loaded = LoadedAdapter(config, read_weights(folder, WEIGHTS), meta["name"], meta.get("model_type"), meta.get("hidden_size"))
    if with_head and (folder / HEAD_CONFIG).exists():
        head_meta = read_json(folder / HEAD_CONFIG)
        loaded.head_is_static = bool(head_meta.get("static"))
        loaded.head_config = None if loaded.head_is_static else HeadConfig.from_dict(head_meta["config"])
        loaded.head_weights = read_weights(folder, HEAD_WEIGHTS)
        loaded.head_name = head_meta.get("name", meta["name"])
    return loaded
