"""PEFT LoRA folders: ``adapter_config.json`` (``peft_type: LORA``) + ``adapter_model.safetensors``
with keys ``base_model.model.<module path>.lora_A.weight`` [r, in] / ``lora_B.weight`` [out, r].
Classifier heads saved through ``modules_to_save`` appear as ``base_model.model.classifier.weight``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..methods import LoRAConfig
from .common import AdapterFileError, LoadedAdapter, read_weights, write_json, write_weights

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_ROOT = "base_model.model."


def is_peft(meta: dict[str, Any]) -> bool:
    return "peft_type" in meta


def read(folder: Path, meta: dict[str, Any], backbone_prefix: str) -> LoadedAdapter:
    if meta["peft_type"] != "LORA":
        raise AdapterFileError(f"{folder}: PEFT '{meta['peft_type']}' adapters are not supported (only LORA)")
    for key in ("use_dora", "layer_replication"):
        if meta.get(key):
            raise AdapterFileError(f"{folder}: PEFT LoRA with {key} is not supported")
    if meta.get("rank_pattern") or meta.get("alpha_pattern"):
        raise AdapterFileError(f"{folder}: PEFT rank_pattern / alpha_pattern are not supported")
    raw = read_weights(folder, WEIGHTS, "adapter_model.bin")
    weights, head, modules = {}, {}, []
    for key, value in raw.items():
        path = key.removeprefix(_ROOT)
        if path.startswith(backbone_prefix + "."):
            path = path[len(backbone_prefix) + 1 :]
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if path.endswith(suffix):
                module = path[: -len(suffix)]
                weights[f"{module}.loras.peft.{part}"] = value
                if module not in modules:
                    modules.append(module)
                break
        else:
            head[key.removeprefix(_ROOT)] = value
    config = LoRAConfig(
        r=int(meta["r"]), alpha=float(meta.get("lora_alpha", 8)), dropout=float(meta.get("lora_dropout", 0.0)),
        use_rslora=bool(meta.get("use_rslora", False)), target_modules=modules, init_weights="lora",
    )
    loaded = LoadedAdapter(config, weights, "peft", None, None)
    if head:
        loaded.head_weights, loaded.head_is_static = head, True
    return loaded


def write(folder: Path, weights: dict[str, torch.Tensor], meta: dict[str, Any], root_prefix: str) -> None:
    """``weights``: ``<module path>.loras.<name>.lora_A`` keys (backbone-relative)."""
    out, modules = {}, set()
    for key, value in weights.items():
        module, _, rest = key.partition(".loras.")
        part = rest.rsplit(".", 1)[-1]
        out[f"{_ROOT}{root_prefix}{module}.{part}.weight"] = value
        modules.add(root_prefix + module)
    write_weights(folder / WEIGHTS, out)
    write_json(folder / CONFIG, {
        "peft_type": "LORA", "r": meta["r"], "lora_alpha": meta["alpha"], "lora_dropout": meta["dropout"],
        "use_rslora": meta["use_rslora"], "target_modules": sorted(modules), "bias": "none",
        "fan_in_fan_out": meta["fan_in_fan_out"], "base_model_name_or_path": meta["model_name"],
        "task_type": None, "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "use_dora": False, "revision": None,
    })
