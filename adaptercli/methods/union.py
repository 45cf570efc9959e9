"""Method unions: several methods under one adapter name, trained, saved and activated together.

* ``mam`` (He et al., 2022, "mix-and-match"): prefix tuning (bottleneck 800) + a parallel
  bottleneck adapter (``par_bn``).
* ``unipelt`` (Mao et al., 2022): prefix tuning (length 10) + ``seq_bn`` + LoRA (r 8, alpha 2),
  each with a learned gate (``use_gating``): sigmoid(linear(x)) averaged over the tokens scales the
  prefix (per row), the bottleneck output and the LoRA delta.

AdapterHub writes a union as ``{"architecture": "union", "configs": [...]}``, one config per
member; that reads back here. Each member runs in its own family exactly as alone (the families
find their member through ``family_config``). Overrides address a member by family:
``mam[prefix_tuning.bottleneck_size=16]`` or, in a recipe, ``config: {bottleneck: {reduction_factor: 8}}``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from torch.utils.hooks import RemovableHandle

from ..composition import CompositionBlock
from .base import ConfigError, MethodConfig, did_you_mean
from .bottleneck import PRESETS as BN_PRESETS
from .bottleneck import BnConfig
from .family import AdapterState, MethodFamily
from .lora import LoRAConfig
from .prefix_tuning import PrefixTuningConfig

MEMBERS: dict[str, type[MethodConfig]] = {"bottleneck": BnConfig, "lora": LoRAConfig, "prefix_tuning": PrefixTuningConfig}


def _member(family: str, values: dict[str, Any]) -> dict[str, Any]:
    """A member's config dict as AdapterHub writes it (bottleneck configs carry no architecture)."""
    data = MEMBERS[family].from_dict(values).to_dict()
    return data if family == "bottleneck" else {"architecture": family, **data}


PRESETS: dict[str, dict[str, Any]] = {
    "mam": {"configs": [_member("prefix_tuning", {"bottleneck_size": 800}), _member("bottleneck", BN_PRESETS["par_bn"])]},
    "unipelt": {"configs": [
        _member("prefix_tuning", {"prefix_length": 10, "use_gating": True}),
        _member("bottleneck", {"reduction_factor": 16, "use_gating": True}),
        _member("lora", {"r": 8, "alpha": 2, "use_gating": True}),
    ]},
}


@dataclasses.dataclass
class UnionConfig(MethodConfig):
    """Members of a union, one per family (see the module docstring).

    Attributes:
        configs: the member configs, at most one per family (bottleneck, lora, prefix_tuning);
            a member's fields are set under its family, e.g. ``prefix_tuning.bottleneck_size``.
    """

    family: ClassVar[str] = "union"

    configs: list[MethodConfig] = dataclasses.field(default_factory=list)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, method: str = "") -> UnionConfig:
        values = dict(values)
        values.pop("architecture", None)
        problems: list[str] = []
        members: list[MethodConfig] = []
        for i, item in enumerate(values.pop("configs", None) or []):
            if isinstance(item, MethodConfig):
                members.append(item)
                continue
            item = dict(item)
            family = item.pop("architecture", None) or "bottleneck"
            if family not in MEMBERS:
                problems.append(f"configs[{i}].architecture: a union holds {', '.join(MEMBERS)}, got {family!r}")
                continue
            try:
                members.append(MEMBERS[family].from_dict(item))
            except ConfigError as exc:
                problems += [f"configs[{i}].{p}" for p in exc.problems]
        overrides: dict[str, Any] = {}
        for key, value in values.items():  # "prefix_tuning.bottleneck_size=16" from a name[k=v] string
            family, dot, field = key.partition(".")
            if dot:
                overrides.setdefault(family, {})[field] = value
            elif isinstance(overrides.get(key), dict) and isinstance(value, dict):
                overrides[key].update(value)
            else:
                overrides[key] = value
        for key, changes in overrides.items():  # family-keyed overrides of a preset's members
            index = next((i for i, m in enumerate(members) if m.family == key), None)
            if key not in MEMBERS:
                problems.append(f"{key}: unknown field for method '{method or 'union'}'; address a member by its "
                                f"family ({', '.join(MEMBERS)}){did_you_mean(key, MEMBERS)}")
            elif index is None:
                problems.append(f"{key}: this union has no {key} member")
            elif not isinstance(changes, dict):
                problems.append(f"{key}: expected a mapping of {key} fields, got {changes!r}")
            else:
                try:
                    members[index] = members[index].replace(**changes)
                except ConfigError as exc:
                    problems += [f"{key}.{p}" for p in exc.problems]
        if problems:
            raise ConfigError(problems)
        config = cls(members)
        config.validate()
        return config

    def validate(self) -> None:
        families = [c.family for c in self.configs]
        if not families:
            raise ConfigError("configs: a union needs at least one member")
        if len(set(families)) < len(families):
            raise ConfigError(f"configs: one member per method family, got {', '.join(families)}")

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": "union",
                "configs": [c.to_dict() if c.family == "bottleneck" else {"architecture": c.family, **c.to_dict()}
                            for c in self.configs]}

    def replace(self, **changes: Any) -> UnionConfig:
        return UnionConfig.from_dict({**self.to_dict(), **changes})


def identify(config: UnionConfig) -> str:
    families = {c.family for c in config.configs}
    if any(getattr(c, "use_gating", False) for c in config.configs):
        return "unipelt"
    return "mam" if families == {"prefix_tuning", "bottleneck"} else "union"


class UnionFamily(MethodFamily):
    """Adds and removes each member with its own family; the families activate them."""

    name = "union"
    config_class = UnionConfig
    # Each member family runs the union's name in a BatchSplit on its own (all three can), so rows of a
    # union and rows of other adapters share a batch (`forward_rows`).
    blocks = ("Stack", "BatchSplit")

    def __init__(self, families: dict[str, MethodFamily]):
        self.families = families

    def add(self, state: AdapterState, name: str, config: UnionConfig) -> None:
        added = []
        try:
            for member in config.configs:
                self.families[member.family].add(state, name, member)
                added.append(member.family)
        except Exception:
            for family in added:
                self.families[family].delete(state, name)
            raise

    def delete(self, state: AdapterState, name: str) -> None:
        for family in MEMBERS:
            self.families[family].delete(state, name)

    def activate(self, state: AdapterState, setup: CompositionBlock | None) -> list[RemovableHandle]:
        return []

    def per_position(self, config: UnionConfig) -> bool:
        return all(self.families[c.family].per_position(c) for c in config.configs)

    def frozen_parameters(self, state: AdapterState, name: str) -> set[str]:
        return set().union(*(self.families[f].frozen_parameters(state, name) for f in MEMBERS))
