"""PEFT folders: ``adapter_config.json`` + ``adapter_model.safetensors``.

* LoRA (``peft_type: LORA``): keys ``base_model.model.<module path>.lora_A.weight`` [r, in] /
  ``lora_B.weight`` [out, r]; scaling ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).
  With ``use_dora``, ``<module path>.lora_magnitude_vector`` [out] is DoRA's m (our
  ``dora_norm: peft``: PEFT leaves the bias out of the renormalisation and scales the delta in the
  norm; AdapterHub's DoRA does neither).
* IA3 (``peft_type: IA3``): ``base_model.model.<module path>.ia3_l`` [out, 1] multiplies the
  layer's output, bias included (our IA3's ``alpha * lora_B``); on the ``feedforward_modules``
  (PEFT's default for BERT: ``output.dense``, Llama: ``down_proj``) ``ia3_l`` is [1, in] and
  scales the layer's input (our IA3's ``feedforward_modules``).

A head is saved through ``modules_to_save`` as the task model's own modules
(``base_model.model.classifier.weight``), in a folder for ``AutoModelForSequenceClassification``
(see `task_heads`) whose backbone keys carry its prefix (``base_model.model.bert.encoder...``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..architectures import architecture_for
from ..methods import LoRAConfig
from ..methods.lora import names_module
from . import task_heads
from .common import AdapterFileError, LoadedAdapter, read_weights, write_json, write_weights

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_ROOT = "base_model.model."
_IA3 = ".ia3_l"
_MAGNITUDE = ".lora_magnitude_vector"  # DoRA's m, [out] (PEFT >= 0.12 writes it under this name)


def _named(module: str, names: str | list[str]) -> bool:
    """Whether PEFT's ``feedforward_modules`` names ``module``: a regular expression matched
    against the whole path, or names the path equals or ends with (``.name``)."""
    if isinstance(names, str):
        return re.fullmatch(names, module) is not None
    return names_module(module, names)


def is_peft(meta: dict[str, Any]) -> bool:
    return "peft_type" in meta


def read(folder: Path, meta: dict[str, Any], backbone_prefix: str) -> LoadedAdapter:
    kind = meta["peft_type"]
    if kind not in ("LORA", "IA3"):
        raise AdapterFileError(f"{folder}: PEFT '{kind}' adapters are not supported (only LORA and IA3)")
    if meta.get("layer_replication"):
        raise AdapterFileError(f"{folder}: PEFT LoRA with layer_replication is not supported")
    raw = read_weights(folder, WEIGHTS, "adapter_model.bin")
    for key in raw:  # what PEFT can save that we have no place for: one clear refusal, not a head mismatch
        if ".lora_embedding_" in key or key.endswith(".base_layer.weight"):
            module = re.split(r"\.(?:lora_embedding_|base_layer\.)", key.removeprefix(_ROOT))[0]
            raise AdapterFileError(f"{folder}: PEFT LoRA on an embedding layer ({module}) is not supported "
                                   "(only linear layers)")
        if meta.get("bias", "none") != "none" and (key.endswith(".bias") and ".lora_" not in key
                                                   and not key.removeprefix(_ROOT).startswith(tuple(meta.get("modules_to_save") or ()))):
            raise AdapterFileError(f"{folder}: PEFT LoRA with bias='{meta['bias']}' trained the layers' biases "
                                   f"({key.removeprefix(_ROOT)}); that is not supported")
    weights, head, modules, inputs = {}, {}, [], []
    feedforward = meta.get("feedforward_modules") or []
    for key, value in raw.items():
        path = key.removeprefix(_ROOT)
        if path.startswith(backbone_prefix + "."):
            path = path[len(backbone_prefix) + 1 :]
        for suffix, ours in ((".lora_A.weight", "lora_A"), (".lora_B.weight", "lora_B"), (_IA3, "lora_B"),
                             (_MAGNITUDE, "m.weight")):
            if path.endswith(suffix):
                module = path[: -len(suffix)]
                if suffix == _IA3 and _named(module, feedforward) and module not in inputs:
                    inputs.append(module)  # PEFT scales this layer's input: ia3_l is [1, in]
                weights[f"{module}.loras.peft.{ours}"] = value.reshape(-1, 1) if suffix in (_IA3, _MAGNITUDE) else value
                if module not in modules:
                    modules.append(module)
                break
        else:
            if backbone_prefix and f"{_ROOT}{backbone_prefix}.{key.removeprefix(_ROOT)}" in raw:
                continue  # the bare backbone's copy of a task model's module (see `write`)
            head[key.removeprefix(_ROOT)] = value
    if kind == "IA3":
        config = LoRAConfig(r=1, alpha=1, composition_mode="scale", init_weights="ia3", target_modules=modules,
                            feedforward_modules=inputs)
    else:
        config = LoRAConfig(
            r=int(meta["r"]), alpha=float(meta.get("lora_alpha", 8)), dropout=float(meta.get("lora_dropout", 0.0)),
            use_rslora=bool(meta.get("use_rslora", False)), target_modules=modules, init_weights="lora",
            use_dora=bool(meta.get("use_dora", False)), dora_norm="peft",
            rank_pattern=dict(meta.get("rank_pattern") or {}), alpha_pattern=dict(meta.get("alpha_pattern") or {}),
        )
    loaded = LoadedAdapter(config, weights, "peft", None, None, model_name=meta.get("base_model_name_or_path") or None)
    if head:
        loaded.head_weights, loaded.head_is_static = head, True
    return loaded


# PEFT's rule for the layer a module sits in when ``layers_to_transform`` is set and no
# ``layers_pattern`` is (peft.tuners.tuners_utils.check_target_module_exists).
_LAYER_INDEX = re.compile(r".*\.[^.]*\.(\d+)\.")


def _selects(names: list[str], targets: list[str], layers: list[int] | None) -> set[str]:
    """The modules PEFT wraps for a ``target_modules`` list (a name equal to an entry or ending in
    ``.entry``) and ``layers_to_transform``."""
    chosen = {n for n in names if names_module(n, targets)}
    if layers is not None:
        chosen = {n for n in chosen if (m := _LAYER_INDEX.match(n)) and int(m.group(1)) in layers}
    return chosen


def targets_for(adapted: set[str], module_names: list[str] | None) -> dict[str, Any]:
    """``target_modules`` and ``layers_to_transform`` that make PEFT wrap exactly the ``adapted``
    modules (backbone-relative paths), written as PEFT writes them: module names (``query``,
    ``value``), plus the layers when only some are adapted, so the folder loads on the bare backbone
    and on a task model whose backbone sits under a prefix (``bert.``). ``module_names``: every
    module of the backbone, to check that the names select nothing else; without them, or when no
    names select exactly the adapted modules, a regex that matches exactly their paths under any prefix."""
    layer_of = {p: m for p in adapted if (m := _LAYER_INDEX.match(p + "."))}
    layers = sorted({int(m.group(1)) for m in layer_of.values()}) if len(layer_of) == len(adapted) else None
    names = sorted({p.rsplit(".", 1)[-1] for p in adapted})
    inside_layer = sorted({p[layer_of[p].end():] if p in layer_of else p for p in adapted})  # attention.self.query
    for targets in (names, inside_layer) if module_names is not None else ():
        for subset in (None, layers) if layers else (None,):
            if _selects(module_names, targets, subset) == adapted:
                return {"target_modules": targets, "layers_to_transform": subset}
    exact = "|".join(re.escape(p) for p in sorted(adapted))
    return {"target_modules": rf"(.*\.)?({exact})", "layers_to_transform": None}


def write(folder: Path, weights: dict[str, torch.Tensor], meta: dict[str, Any], root_prefix: str,
          head: tuple[dict[str, torch.Tensor], task_heads.TaskHead] | None = None,
          module_names: list[str] | None = None) -> None:
    """``weights``: ``<module path>.loras.<name>.lora_A|lora_B`` keys (backbone-relative); ``meta``:
    r, alpha, dropout, use_rslora, fan_in_fan_out, model_name (the base model's Hub id or None),
    and ``ia3: True`` for IA3 (``lora_B`` already multiplied by alpha, [out, 1], or [1, in] for the
    modules listed under ``feedforward``, whose input it scales); ``head``: weights
    keyed by the task model's module paths, and that task model; ``module_names``: every module of
    the backbone (see `targets_for`). With a ``root_prefix`` (a task model's ``bert.``), every weight
    under it is written a second time without it: PEFT looks weights up by the names of the model it
    is given, so the one folder then loads on the task model and on the bare backbone alike."""
    out, modules = {}, set()
    for key, value in weights.items():
        module, _, rest = key.partition(".loras.")
        part = rest.split(".", 1)[-1].removesuffix(".weight")  # lora_A, lora_B, m (DoRA's magnitude)
        suffix = _IA3 if meta.get("ia3") else _MAGNITUDE if part == "m" else f".{part}.weight"
        out[f"{_ROOT}{root_prefix}{module}{suffix}"] = value.reshape(-1) if part == "m" else value
        modules.add(module)
    if head is not None:
        out.update({_ROOT + k: v for k, v in head[0].items()})
    if root_prefix:  # also under the bare backbone's names: one folder loads on the task model and on the backbone
        bare = _ROOT + root_prefix
        out.update({_ROOT + k.removeprefix(bare): v.clone() for k, v in list(out.items()) if k.startswith(bare)})
    targets = targets_for(modules, module_names)
    common = {
        "target_modules": targets["target_modules"], "layers_to_transform": targets["layers_to_transform"],
        "layers_pattern": None, "fan_in_fan_out": meta["fan_in_fan_out"],
        "base_model_name_or_path": meta["model_name"], "revision": None, "inference_mode": True,
        "task_type": head[1].peft_task_type if head else None,
        "modules_to_save": (head[1].modules_to_save or None) if head else None,
    }
    if meta.get("ia3"):
        inputs = meta.get("feedforward") or []
        # A regex over their paths under any prefix (PEFT fullmatches a string; a list it would
        # require to be a subset of target_modules, which name modules, not paths).
        feedforward = rf"(.*\.)?({'|'.join(re.escape(p) for p in sorted(inputs))})" if inputs else []
        config = {"peft_type": "IA3", **common, "feedforward_modules": feedforward, "init_ia3_weights": True}
    else:
        config = {
            "peft_type": "LORA", **common, "r": meta["r"], "lora_alpha": meta["alpha"], "lora_dropout": meta["dropout"],
            "use_rslora": meta["use_rslora"], "bias": "none", "init_lora_weights": True,
            "rank_pattern": meta.get("rank_pattern") or {}, "alpha_pattern": meta.get("alpha_pattern") or {},
            "use_dora": bool(meta.get("dora")),
        }
    write_weights(folder / WEIGHTS, out)
    write_json(folder / CONFIG, config)


def write_adapter(folder: Path, loaded: LoadedAdapter, base_model: str | None, with_head: bool = True,
                  tied_embeddings: bool = True, module_names: list[str] | None = None,
                  ) -> tuple[list[str], task_heads.TaskHead | None]:
    """Write an adapter read from one of our folders as a PEFT LoRA or IA3 folder (with its head
    as ``modules_to_save`` where a transformers task model has the same head); returns notes on
    what was left out, and the task model the folder goes with (None: the bare backbone)."""
    config, model_type = loaded.config, loaded.model_type or ""
    if not isinstance(config, LoRAConfig):
        raise AdapterFileError(
            f"adapter '{loaded.saved_name}' is {type(config).__name__.removesuffix('Config')}; PEFT folders hold LoRA "
            "and IA3 adapters only (export it --to native, hub or adapterhub)")
    weights = peft_tensors(config, loaded.weights, model_type, loaded.saved_name)
    notes, head, prefix = [], None, ""
    if with_head and loaded.head_is_static:
        notes.append("head not included: it is a transformers task model's own head; save it with that model")
    elif with_head and loaded.head_config is not None:
        layout = task_heads.task_head(model_type, loaded.head_config, tied_embeddings)
        if isinstance(layout, str):
            notes.append(f"head not included: PEFT saves a head only as a transformers task model's module, and {layout}")
        else:
            head = (map_head(loaded.head_weights, layout), layout)
            prefix = task_heads.base_model_prefix(model_type) + "."
    write(folder, weights, peft_meta(config, weights, model_type == "gpt2", base_model), prefix, head, module_names)
    return notes, head[1] if head else None


def peft_meta(config: LoRAConfig, weights: dict[str, torch.Tensor], fan_in_fan_out: bool,
              base_model: str | None) -> dict[str, Any]:
    """``write``'s ``meta`` for a LoRA / IA3 config and its ``peft_tensors``."""
    return {"r": config.r, "alpha": config.alpha, "dropout": config.dropout, "use_rslora": config.use_rslora,
            "fan_in_fan_out": fan_in_fan_out, "model_name": base_model, "ia3": config.composition_mode == "scale",
            "dora": config.use_dora, "rank_pattern": dict(config.rank_pattern), "alpha_pattern": dict(config.alpha_pattern),
            "feedforward": sorted({k.partition(".loras.")[0] for k in weights
                                   if _named(k.partition(".loras.")[0], config.feedforward_modules)})}


def peft_tensors(config: LoRAConfig, adapter_weights: dict[str, torch.Tensor], model_type: str,
                 saved_name: str) -> dict[str, torch.Tensor]:
    """Our LoRA / IA3 tensors (``<module>.loras.<name>.lora_A|lora_B``) as PEFT holds them: IA3's
    ``alpha * l`` over the full output ([out, 1]) or input ([1, in], ``feedforward_modules``).
    Refuses LoRA on a fused q/k/v layer, which PEFT has no equivalent of."""
    if config.use_dora and config.dora_norm != "peft" or config.use_gating or config.vera_d is not None or config.vera_b is not None:
        kind = ("DoRA as AdapterHub renormalises it (the bias included, the delta unscaled in the norm)"
                if config.use_dora and config.dora_norm != "peft" else "gated LoRA" if config.use_gating else "VeRA")
        raise AdapterFileError(f"adapter '{saved_name}' is {kind}, which PEFT's LoRA does not compute "
                               "(export it --to native, hub or adapterhub)")
    arch = architecture_for(model_type, required=False)
    fused = arch is not None and arch.fused_qkv and not config.target_modules
    slots = [m in config.attn_matrices for m in ("q", "k", "v")] if fused else None
    weights: dict[str, torch.Tensor] = {}
    for key, value in adapter_weights.items():
        module = key.partition(".loras.")[0]
        on_fused = fused and module.endswith("." + arch.q)
        if config.composition_mode == "scale":  # IA3: PEFT's ia3_l is our alpha * l over the full output
            value = value.reshape(-1) * config.alpha
            if on_fused and not all(slots):
                parts, i, third = [], 0, value.shape[0] // sum(slots)
                for on in slots:
                    parts.append(value[i * third : (i + 1) * third] if on else value.new_ones(third))
                    i += on
                value = torch.cat(parts)
            # ia3_l: [out, 1] where PEFT scales the output, [1, in] where it scales the input
            weights[key] = value.reshape(1, -1) if _named(module, config.feedforward_modules) else value.reshape(-1, 1)
        elif on_fused:
            raise AdapterFileError(
                f"adapter '{saved_name}' is LoRA on {model_type}'s fused q/k/v layer; PEFT has no equivalent "
                "(train it with target_modules, or export it --to native, hub or adapterhub)")
        else:
            weights[key] = value
    return weights


def map_head(head_weights: dict[str, torch.Tensor], layout: task_heads.TaskHead) -> dict[str, torch.Tensor]:
    """``heads.<name>.<i>.weight`` -> ``<task model module>.weight`` (tied weights have no key)."""
    out = {}
    for key, value in head_weights.items():
        index, param = key.split(".")[2:4]
        if int(index) not in layout.modules:
            raise AdapterFileError(f"head weight {key} has no place in {layout.auto_class}")
        out[f"{layout.modules[int(index)]}.{param}"] = value
    return out
