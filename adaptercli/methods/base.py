"""What every adapter method shares: its typed config and the interface a method family implements.

A *family* is one way of changing the model (bottleneck modules around sub-layers, low-rank or
scaling deltas on linear layers, prefixes joined to attention). A *method* is a named preset of a
family's config (``seq_bn`` and ``par_bn`` are both bottleneck presets; ``ia3`` is a LoRA preset in
"scale" mode), matching AdapterHub's names and defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from ..errors import AdapterCliError
from ..schema import check_section
from ..schema import did_you_mean as _did_you_mean

if TYPE_CHECKING:
    from ..composition import CompositionBlock
    from ..model import AdapterState


class ConfigError(AdapterCliError):
    """An adapter config that names an unknown method or field, or has bad values.

    ``problems`` holds one line per problem, each starting with the field it concerns
    (``dropout: must be >= 0 and < 1, got -1``), so a recipe can prefix its own path.
    """

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    return _did_you_mean(str(word), list(choices), ", did you mean '{}'?")


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
        """Check every field (type, bounds, choices; unknown names) and report all problems at once."""
        names = cls.field_names()
        known, problems = {}, []
        for key, value in values.items():
            if key in names:
                known[key] = value
            elif key in cls.foreign_defaults:
                if value != cls.foreign_defaults[key]:
                    problems.append(f"{key}: only {cls.foreign_defaults[key]!r} is supported, got {value!r}")
            elif key != "architecture":
                problems.append(f"{key}: unknown field for method '{method or cls.family}'{did_you_mean(key, names)}")
        checked = check_section(cls, known, "", problems)
        if problems:
            raise ConfigError(problems)
        config = cls(**checked)
        config.validate()
        return config

    def replace(self, **changes: Any) -> MethodConfig:
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(self.foreign_defaults)
        return data

    def validate(self) -> None:
        """Raise ConfigError for combinations of values the method cannot use (single fields are
        checked against their types, bounds and choices before this runs)."""


def family_config(config: MethodConfig, family: str) -> MethodConfig | None:
    """The part of ``config`` that belongs to ``family``: the config itself, or, for a union of
    methods under one adapter name (MAM, UniPELT), its member of that family."""
    if config.family == family:
        return config
    return next((c for c in getattr(config, "configs", ()) if c.family == family), None)


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

    # The composition blocks this family can run (see composition.check_support).
    blocks: ClassVar[tuple[str, ...]] = ("Stack",)

    def activate(self, state: AdapterState, setup: CompositionBlock | None) -> list[RemovableHandle]:
        """Install the forward hooks that run this family's adapters in ``setup`` (None: none) and
        return their handles. Only places with an active adapter get a hook, so inactive adapters
        cost nothing per forward."""
        raise NotImplementedError

    def active_names(self, state: AdapterState, setup: CompositionBlock | None) -> list[str]:
        """The adapters of this family (or with a part of it) in ``setup``, in order of first appearance."""
        if setup is None:
            return []
        return [n for n in setup.flatten()
                if n in state.adapters and family_config(state.adapters[n].config, self.name) is not None]

    def frozen_parameters(self, state: AdapterState, name: str) -> set[str]:
        """Keys (as in ``adapter_parameters``) of the adapter's tensors that are saved but never
        trained (VeRA's shared random matrices, ReFT's orthogonal base)."""
        return set()

    def merge(self, state: AdapterState, name: str) -> None:
        raise ConfigError(f"adapters of the '{self.name}' family cannot be merged into the weights")

    def unmerge(self, state: AdapterState, name: str) -> None:
        raise ConfigError(f"adapters of the '{self.name}' family cannot be merged into the weights")
