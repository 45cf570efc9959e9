"""What every adapter method shares: its typed config (the family interface is in ``family.py``).

A *family* is one way of changing the model (bottleneck modules around sub-layers, low-rank or
scaling deltas on linear layers, prefixes joined to attention). A *method* is a named preset of a
family's config (``seq_bn`` and ``par_bn`` are both bottleneck presets; ``ia3`` is a LoRA preset in
"scale" mode), matching AdapterHub's names and defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, ClassVar

from ..errors import AdapterCliError
from ..schema import check_section
from ..schema import did_you_mean as _did_you_mean


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
