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

# What each method is, in a line, and the paper it comes from (the docs' method reference shows both;
# a method without an entry fails the docs generator).
_UNIFIED_VIEW = "https://arxiv.org/abs/2110.04366"  # He et al. 2022: parallel adapters, MAM
_MAD_X = "https://arxiv.org/abs/2005.00052"
_COMPACTER = "https://arxiv.org/abs/2106.04647"
_DORA = "https://arxiv.org/abs/2402.09353"
_REFT = "https://arxiv.org/abs/2404.03592"
_PREFIX = "https://arxiv.org/abs/2101.00190"
DESCRIPTIONS: dict[str, tuple[str, str]] = {
    "seq_bn": ("a bottleneck adapter after the FFN (Pfeiffer)", "https://arxiv.org/abs/2005.00247"),
    "double_seq_bn": ("bottleneck adapters after the attention and after the FFN (Houlsby)",
                      "https://arxiv.org/abs/1902.00751"),
    "par_bn": ("a bottleneck adapter beside the FFN, reading its input, output scaled by 4 (parallel)", _UNIFIED_VIEW),
    "scaled_par_bn": ("par_bn with a learned output scaling", _UNIFIED_VIEW),
    "seq_bn_inv": ("seq_bn plus an invertible adapter on the token embeddings (MAD-X)", _MAD_X),
    "double_seq_bn_inv": ("double_seq_bn plus an invertible adapter on the token embeddings", _MAD_X),
    "compacter": ("Houlsby-placed adapters whose projections are PHM layers", _COMPACTER),
    "compacter++": ("Compacter after the FFN only (Pfeiffer placement)", _COMPACTER),
    "lora": ("low-rank deltas B A on the attention's q and v projections", "https://arxiv.org/abs/2106.09685"),
    "ia3": ("learned per-channel scaling of the keys, the values and the FFN", "https://arxiv.org/abs/2205.05638"),
    "dora": ("LoRA whose adapted rows are renormalised to learned magnitudes", _DORA),
    "vera": ("frozen random low-rank matrices shared by all layers, with trained scalings",
             "https://arxiv.org/abs/2310.11454"),
    "dvora": ("DoRA's magnitudes over VeRA's delta", _DORA),
    "prefix_tuning": ("trained key and value prefixes in every attention, made by an MLP", _PREFIX),
    "prefix_tuning_flat": ("prefix tuning without the MLP: the prefixes are trained directly", _PREFIX),
    "prompt_tuning": ("trained embeddings before the input", "https://arxiv.org/abs/2104.08691"),
    "loreft": ("low-rank orthogonal edits of the hidden states at the first tokens (LoReFT)", _REFT),
    "noreft": ("LoReFT without the orthogonality constraint", _REFT),
    "direft": ("ReFT edits added without the projection subtracted (DiReFT)", _REFT),
    "mam": ("prefix tuning plus a parallel adapter (Mix-and-Match)", _UNIFIED_VIEW),
    "unipelt": ("gated prefix tuning, bottleneck adapter and LoRA under one name", "https://arxiv.org/abs/2110.07577"),
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
    "ALIASES", "BnConfig", "DESCRIPTIONS", "ConfigError", "FAMILIES", "LoRAConfig", "METHODS", "Method", "MethodConfig",
    "PrefixTuningConfig", "PromptTuningConfig", "ReftConfig", "UnionConfig", "family_config", "family_of",
    "get_method", "method_name", "resolve_config",
]
