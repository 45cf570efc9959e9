"""What every adapter method shares: its typed config and the interface a method family implements.

A *family* is one way of changing the model (bottleneck modules around sub-layers, low-rank or
scaling deltas on linear layers, prefixes joined to attention). A *method* is a named preset of a
family's config (``seq_bn`` and ``par_bn`` are both bottleneck presets; ``ia3`` is a LoRA preset in
"scale" mode), matching AdapterHub's names and defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from ..errors import AdapterCliError

if TYPE_CHECKING:
    from ..model import AdapterState


class ConfigError(AdapterCliError):
    """An adapter config that names an unknown method or field, or has a bad value."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1)
    return f", did you mean '{match[0]}'?" if match else ""


@dataclasses.dataclass
class MethodConfig:
    """Base of the method configs. Field names and defaults follow AdapterHub's config classes so
    that their ``adapter_config.json`` files read back unchanged."""

    family: ClassVar[str] = ""
    # Fields AdapterHub writes that we read but whose only supported value is the default.
    foreign_defaults: ClassVar[dict[str, Any]] = {}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, method: str = "") -> MethodConfig:
        names = cls.field_names()
        kwargs, problems = {}, []
        for key, value in values.items():
            if key in names:
                kwargs[key] = value
            elif key in cls.foreign_defaults:
                if value != cls.foreign_defaults[key]:
                    problems.append(f"{key}={value!r} is not supported (only {cls.foreign_defaults[key]!r})")
            elif key not in ("architecture",):
                problems.append(f"unknown field '{key}' for method '{method or cls.family}'{did_you_mean(key, names)}")
        if problems:
            raise ConfigError("; ".join(problems))
        config = cls(**kwargs)
        config.validate()
        return config

    def replace(self, **changes: Any) -> MethodConfig:
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(self.foreign_defaults)
        return data

    def validate(self) -> None:
        """Raise ConfigError for values the method cannot use."""


class MethodFamily:
    """How one family of methods attaches to a model. Subclasses implement these hooks; each
    receives the model's :class:`~adaptercli.model.AdapterState` (backbone, architecture table
    entry, hidden size) and works on the unmodified Hugging Face modules."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig

    def add(self, state: AdapterState, name: str, config: MethodConfig) -> None:
        """Create the adapter's modules (registered inside the model, so they move with .to())."""
        raise NotImplementedError

    def delete(self, state: AdapterState, name: str) -> None:
        """Remove the adapter's modules."""
        for module in list(state.backbone.modules()):
            for container in self.containers:
                holder = getattr(module, container, None)
                if isinstance(holder, nn.ModuleDict) and name in holder:
                    del holder[name]

    containers: ClassVar[tuple[str, ...]] = ()

    def activate(self, state: AdapterState, names: list[str]) -> list[RemovableHandle]:
        """Install the forward hooks that run ``names`` (in order); return their handles. Only
        active adapters get hooks, so inactive ones cost nothing per forward."""
        raise NotImplementedError

    def merge(self, state: AdapterState, name: str) -> None:
        raise ConfigError(f"adapters of the '{self.name}' family cannot be merged into the weights")

    def unmerge(self, state: AdapterState, name: str) -> None:
        raise ConfigError(f"adapters of the '{self.name}' family cannot be merged into the weights")
