"""AdapterFusion folders.

* ours: ``adapter_fusion_config.json`` (``"format": "adaptercli"``, ``name``, ``adapter_names``,
  ``config``, ``model_type``, ``hidden_size``) + ``adapter_fusion.safetensors``;
* AdapterHub 1.x: ``adapter_fusion_config.json`` + ``pytorch_model_adapter_fusion.bin`` (read with
  ``weights_only=True``) or ``model_adapter_fusion.safetensors``; keys may carry the model prefix.

Either may hold a head beside it (``head_config.json`` + weights). Weight keys are module paths
inside the backbone: ``encoder.layer.0.output.adapter_fusion_layer.<name>.query.weight``.
Reading gives plain data (:class:`LoadedFusion`); the model applies it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import adapterhub, native
from .common import AdapterFileError, LoadedFusion, read_json, read_weights, write_json, write_weights

CONFIG = "adapter_fusion_config.json"
WEIGHTS = "adapter_fusion.safetensors"
ADAPTERHUB_WEIGHTS = ("model_adapter_fusion.safetensors", "pytorch_model_adapter_fusion.bin")


def read_fusion(folder: Path, with_head: bool = True) -> LoadedFusion:
    if not folder.is_dir():
        raise AdapterFileError(f"{folder}: fusion folder not found")
    if not (folder / CONFIG).exists():
        raise AdapterFileError(f"{folder}: not an AdapterFusion folder (no {CONFIG})")
    meta = read_json(folder / CONFIG)
    for key in ("adapter_names", "config"):
        if key not in meta:
            raise AdapterFileError(f"{folder / CONFIG}: missing '{key}'")
    members = meta["adapter_names"]
    members = members.split(",") if isinstance(members, str) else list(members)
    name = meta.get("name") or ",".join(members)
    if native.is_native(meta):
        weights = read_weights(folder, WEIGHTS)
        head_reader = native.read_head
    else:
        weights = adapterhub.convert_keys(read_weights(folder, *ADAPTERHUB_WEIGHTS))
        head_reader = adapterhub.read_head
    loaded = LoadedFusion(name, members, dict(meta["config"]), weights, meta.get("model_type"), meta.get("hidden_size"))
    if with_head:
        head_reader(folder, loaded, name)
    return loaded


def write_fusion(folder: Path, meta: dict[str, Any], weights: dict[str, torch.Tensor],
                 head: tuple[dict[str, Any], dict[str, torch.Tensor]] | None) -> None:
    # Weights first, config last: a folder whose config exists is complete.
    write_weights(folder / WEIGHTS, weights)
    native.write_head(folder, head)
    write_json(folder / CONFIG, {"format": native.FORMAT, "version": native.VERSION, **meta})
