"""Our native adapter folder: ``adapter_config.json`` + ``adapter.safetensors`` (+ ``head_config.json``
+ ``head.safetensors``). Weight keys are module paths inside the backbone, AdapterHub's layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..heads import HeadConfig
from ..methods import resolve_config
from .common import (
    LoadedAdapter,
    LoadedFusion,
    LoadedHead,
    read_json,
    read_weights,
    write_json,
    write_weights,
)

FORMAT = "adaptercli"
VERSION = "adaptercli.0.1"
CONFIG, WEIGHTS, HEAD_CONFIG, HEAD_WEIGHTS = "adapter_config.json", "adapter.safetensors", "head_config.json", "head.safetensors"


def is_native(meta: dict[str, Any]) -> bool:
    return meta.get("format") == FORMAT


def write(folder: Path, meta: dict[str, Any], weights: dict[str, torch.Tensor],
          head: tuple[dict[str, Any], dict[str, torch.Tensor]] | None) -> None:
    # Weights first, config last: a folder whose config exists is complete.
    write_weights(folder / WEIGHTS, weights)
    write_head(folder, head)
    write_json(folder / CONFIG, {"format": FORMAT, "version": VERSION, **meta})


def write_head(folder: Path, head: tuple[dict[str, Any], dict[str, torch.Tensor]] | None) -> None:
    """``head_config.json`` + ``head.safetensors``; without a head, remove a stale one (it would
    load with whatever is saved beside it)."""
    if head is not None:
        head_meta, head_weights = head
        write_weights(folder / HEAD_WEIGHTS, head_weights)
        write_json(folder / HEAD_CONFIG, {"format": FORMAT, "version": VERSION, **head_meta})
    elif (folder / HEAD_CONFIG).exists():
        (folder / HEAD_CONFIG).unlink()


def read(folder: Path, meta: dict[str, Any], with_head: bool) -> LoadedAdapter:
    config = resolve_config({"method": meta.get("method"), **meta["config"]} if meta.get("method") else meta["config"])
    loaded = LoadedAdapter(config, read_weights(folder, WEIGHTS), meta["name"], meta.get("model_type"),
                           meta.get("hidden_size"), model_name=meta.get("model_name") or None)
    if with_head:
        read_head(folder, loaded, meta["name"])
    return loaded


def read_head(folder: Path, loaded: LoadedAdapter | LoadedFusion | LoadedHead, default_name: str) -> None:
    """Fill ``loaded``'s head fields from ``head_config.json`` + ``head.safetensors``, if present."""
    if (folder / HEAD_CONFIG).exists():
        head_meta = read_json(folder / HEAD_CONFIG)
        loaded.head_is_static = bool(head_meta.get("static"))
        loaded.head_config = None if loaded.head_is_static else HeadConfig.from_dict(head_meta["config"])
        loaded.head_weights = read_weights(folder, HEAD_WEIGHTS)
        loaded.head_name = head_meta.get("name", default_name)
