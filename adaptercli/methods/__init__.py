"""The method registry: one entry per named method, mapping it to a family and its preset.

``resolve_config`` turns what a user writes (``"lora"``, ``"lora[r=16,alpha=32]"``, a dict with a
``method`` key, or a config object) into a typed config. Adding a method = one ``Method(...)`` line
here plus, for a new family, one module beside this file.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from .base import ConfigError, MethodConfig, did_you_mean, family_config
from .bottleneck import PRESETS as _BN_PRESETS
from .bottleneck import BnConfig, BottleneckFamily
from .bottleneck import identify as _identify_bn
from .family import MethodFamily
from .lora import IA3_PRESET, LoRAConfig
from .lora_variants import LoRAVariantsFamily, is_vera
from .prefix_tuning import PrefixTuningConfig, PrefixTuningFamily
from .prompt_tuning import PromptTuningConfig, PromptTuningFamily
from .reft import PRESETS as _REFT_PRESETS
from .reft import ReftConfig, ReftFamily
from .reft import identify as _identify_reft
from .union import PRESETS as _UNION_PRESETS
from .union import UnionConfig, UnionFamily
from .union import identify as _identify_union


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    family: MethodFamily
    defaults: dict[str, Any]

    def make_config(self, overrides: dict[str, Any] | None = None) -> MethodConfig:
        return self.family.config_class.from_dict({**self.defaults, **(overrides or {})}, method=self.name)


# Family order is activation order: prompt tuning's embeddings hook runs after the invertible adapter's.
FAMILIES: dict[str, MethodFamily] = {f.name: f for f in (
    BottleneckFamily(), LoRAVariantsFamily(), PrefixTuningFamily(), PromptTuningFamily(), ReftFamily())}
FAMILIES["union"] = UnionFamily(FAMILIES)

_VERA = {"vera_d": 0.1, "vera_b": 0.0, "init_weights": "vera"}

METHODS: dict[str, Method] = {
    **{name: Method(name, FAMILIES["bottleneck"], preset) for name, preset in _BN_PRESETS.items()},
    "lora": Method("lora", FAMILIES["lora"], {}),
    "ia3": Method("ia3", FAMILIES["lora"], IA3_PRESET),
    "dora": Method("dora", FAMILIES["lora"], {"use_dora": True}),
    "vera": Method("vera", FAMILIES["lora"], _VERA),
    "dvora": Method("dvora", FAMILIES["lora"], {**_VERA, "use_dora": True}),
    "prefix_tuning": Method("prefix_tuning", FAMILIES["prefix_tuning"], {}),
    "prefix_tuning_flat": Method("prefix_tuning_flat", FAMILIES["prefix_tuning"], {"flat": True}),
    "prompt_tuning": Method("prompt_tuning", FAMILIES["prompt_tuning"], {}),
    **{name: Method(name, FAMILIES["reft"], preset) for name, preset in _REFT_PRESETS.items()},
    **{name: Method(name, FAMILIES["union"], preset) for name, preset in _UNION_PRESETS.items()},
}

# Names AdapterHub accepts for the same presets.
ALIASES = {"pfeiffer": "seq_bn", "houlsby": "double_seq_bn", "parallel": "par_bn", "pfeiffer+inv": "seq_bn_inv",
           "scaled_parallel": "scaled_par_bn", "houlsby+inv": "double_seq_bn_inv"}


def get_method(name: str) -> Method:
    name = ALIASES.get(name, name)
    if name == "union":  # any union of members given in full (not a preset, so not listed)
        return Method("union", FAMILIES["union"], {})
    if name not in METHODS:
        raise ConfigError(f"unknown adapter method '{name}'{did_you_mean(name, METHODS)}; known: {', '.join(METHODS)}")
    return METHODS[name]


def family_of(config: MethodConfig) -> MethodFamily:
    return FAMILIES[config.family]


def method_name(config: MethodConfig) -> str:
    """The registry name that best describes a config (``ia3`` for a LoRA config in scale mode)."""
    if isinstance(config, BnConfig):
        return _identify_bn(config)
    if isinstance(config, LoRAConfig):
        if config.composition_mode == "scale":
            return "ia3"
        if is_vera(config):
            return "dvora" if config.use_dora else "vera"
        return "dora" if config.use_dora else "lora"
    if isinstance(config, ReftConfig):
        return _identify_reft(config)
    if isinstance(config, UnionConfig):
        return _identify_union(config)
    if isinstance(config, PromptTuningConfig):
        return "prompt_tuning"
    return "prefix_tuning_flat" if isinstance(config, PrefixTuningConfig) and config.flat else "prefix_tuning"


def _split_top_level(text: str, separator: str) -> list[str]:
    """Split on ``separator`` outside brackets and braces."""
    depth, part, parts = 0, "", []
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == separator and depth == 0:
            parts.append(part)
            part = ""
        else:
            part += ch
    return [*parts, part]


def _parse_string(spec: str) -> tuple[str, dict[str, Any]]:
    """``"lora[r=16,alpha=32]"`` -> ("lora", {"r": 16, "alpha": 32}); values are read as YAML."""
    name, _, rest = spec.partition("[")
    overrides: dict[str, Any] = {}
    if rest:
        if not rest.endswith("]"):
            raise ConfigError(f"cannot read adapter config '{spec}': expected NAME[key=value,...]")
        # Split on commas outside brackets so lists like attn_matrices=[q,k,v] and mappings survive.
        for item in filter(None, (p.strip() for p in _split_top_level(rest[:-1], ","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise ConfigError(f"cannot read '{item}' in adapter config '{spec}': expected key=value")
            try:
                overrides[key.strip()] = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"{key.strip()}: cannot read the value {value!r} as YAML") from None
    return name.strip(), overrides


def resolve_config(config: str | dict | MethodConfig | None = None, **overrides: Any) -> MethodConfig:
    """A typed method config from a name, a ``name[k=v]`` string, a dict or a config object.

    A dict names its method with ``method`` (ours) or ``architecture`` (AdapterHub's files);
    without either, a dict with bottleneck fields is a bottleneck config.
    """
    if config is None:
        config = "seq_bn"
    if isinstance(config, MethodConfig):
        return config.replace(**overrides) if overrides else config
    if isinstance(config, str):
        parts = _split_top_level(config, "|")
        if len(parts) > 1:  # AdapterHub's union syntax: "prefix_tuning[bottleneck_size=800]|par_bn"
            return UnionConfig.from_dict({"configs": [resolve_config(part.strip()) for part in parts], **overrides})
        name, parsed = _parse_string(config)
        return get_method(name).make_config({**parsed, **overrides})
    if isinstance(config, dict):
        values = {**config, **overrides}
        name = values.pop("method", None)
        if name is not None:
            return get_method(name).make_config(values)
        family = values.pop("architecture", None) or "bottleneck"
        if family not in FAMILIES:
            raise ConfigError(f"unknown adapter architecture '{family}'{did_you_mean(family, FAMILIES)}")
        return FAMILIES[family].config_class.from_dict(values)
    raise ConfigError(f"an adapter config must be a name, a dict or a config object, not {type(config).__name__}")


__all__ = [
    "ALIASES", "BnConfig", "ConfigError", "FAMILIES", "LoRAConfig", "METHODS", "Method", "MethodConfig",
    "PrefixTuningConfig", "PromptTuningConfig", "ReftConfig", "UnionConfig", "family_config", "family_of",
    "get_method", "method_name", "resolve_config",
]
