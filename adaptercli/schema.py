"""Typed fields with bounds and choices, and the one checker that recipes and method configs share.

A schema is a dataclass whose fields are declared with `spec` (type from the annotation; bounds,
choices and a help line in the field's metadata). `check_section` converts a plain mapping to the
schema's types and records every problem found, each prefixed with the dotted path of its key, so
``adapter.config.dropout: must be >= 0 and < 1, got -1`` reads the same from a recipe, a
``key=value`` override or ``add_adapter("x", "lora[dropout=-1]")``.

Rules: numbers are checked against bounds, strings against choices (a field typed ``float | str``
takes a number or one of its words); a string field that YAML read as a boolean (unquoted ``no``,
``off``, ``yes``, ``on``) takes the matching word when the field's choices hold one, and is
otherwise refused with a hint to quote it.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import field, fields, is_dataclass
from typing import Any

from omegaconf import MISSING

INVALID: Any = object()
"""Marks a value that failed a check (and was reported), so later checks skip it."""

_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
# The words YAML 1.1 reads as booleans, by the value they become; the first is preferred.
_BOOLEAN_WORDS = {False: ("no", "false", "off"), True: ("yes", "true", "on")}


def spec(
    default: Any = NO_DEFAULT,
    *,
    factory: Any = NO_DEFAULT,
    choices: tuple[str, ...] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field whose metadata carries the allowed choices and bounds checked on load."""
    bounds = {"ge": ge, "gt": gt, "le": le, "lt": lt}
    metadata: dict[str, Any] = {name: bound for name, bound in bounds.items() if bound is not None}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return field(default=default, default_factory=factory, metadata=metadata)


def did_you_mean(word: str, candidates: list[str], template: str = ", did you mean {}?") -> str:
    match = difflib.get_close_matches(word, candidates, n=1)
    return template.format(match[0]) if match else ""


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def dataclass_in(hint: Any) -> type | None:
    """The dataclass in `hint` (``X`` or ``X | None``), if there is one."""
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and is_dataclass(candidate):
            return candidate
    return None


def check_section(
    schema: type,
    values: Any,
    path: str,
    problems: list[str],
    unknown_key: Callable[[str, str, list[str]], str] | None = None,
) -> dict[str, Any]:
    """Check a mapping against a dataclass schema; return the values converted to its types.

    Invalid values stay in the result as `INVALID`, so cross-field checks can skip them.
    ``unknown_key(key, path, names)`` words the message for a key the schema lacks.
    """
    if not isinstance(values, Mapping):
        problems.append(f"{path or 'recipe'}: expected a mapping, got {values!r}")
        return {}
    names = [item.name for item in fields(schema)]
    for key in values:
        if key not in names:
            if unknown_key is not None:
                problems.append(unknown_key(str(key), path, names))
            else:
                problems.append(f"{join(path, str(key))}: unknown key{did_you_mean(str(key), names)}")
    hints = typing.get_type_hints(schema)
    checked: dict[str, Any] = {}
    for item in fields(schema):
        item_path = join(path, item.name)
        if item.name not in values or values[item.name] == MISSING:
            if item.default == MISSING:
                problems.append(f"{item_path}: missing required value")
            continue
        checked[item.name] = check_value(hints[item.name], values[item.name], item_path, problems,
                                         item.metadata, unknown_key)
    return checked


def check_value(hint: Any, value: Any, path: str, problems: list[str], limits: Mapping[str, Any] | None = None,
                unknown_key: Callable[[str, str, list[str]], str] | None = None) -> Any:
    """Convert `value` to the type `hint` and check it against `limits`; on failure record a
    problem and return `INVALID`."""
    if value is INVALID:  # already reported
        return INVALID
    limits = limits or {}
    options = [a for a in typing.get_args(hint) if a is not type(None)] if _is_union(hint) else [hint]
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        problems.append(f"{path}: must be set, got null")
        return INVALID
    nested = dataclass_in(hint)
    if nested is not None:
        return check_section(nested, value, path, problems, unknown_key)
    for option in options:
        converted = _convert(option, value, path, problems, limits)
        if converted is not _NO_MATCH:
            return converted
    if isinstance(value, bool) and any(o is str for o in options):
        words = "/".join(_BOOLEAN_WORDS[value])
        problems.append(f"{path}: expected a string, but YAML reads an unquoted {words} as the boolean "
                        f"{str(value).lower()}; put the word in quotes")
    else:
        problems.append(f"{path}: expected {' or '.join(_describe(o, limits) for o in options)}, got {value!r}")
    return INVALID


_NO_MATCH: Any = object()  # the value is not of this type; try the union's next option


def _convert(kind: Any, value: Any, path: str, problems: list[str], limits: Mapping[str, Any]) -> Any:
    """`value` as `kind`, `_NO_MATCH` when it is not of that type, or `INVALID` (reported) when it
    is but breaks a bound or a choice."""
    origin = typing.get_origin(kind)
    if origin is list:
        if not isinstance(value, list | tuple):
            return _NO_MATCH
        items = [check_value(typing.get_args(kind)[0], v, f"{path}[{i}]", problems, limits)
                 for i, v in enumerate(value)]
        return INVALID if any(item is INVALID for item in items) else items
    if origin is dict or kind is dict:
        return dict(value) if isinstance(value, Mapping) else _NO_MATCH
    if kind is Any:
        return value
    if kind is bool:
        return value if isinstance(value, bool) else _NO_MATCH
    if kind is str:
        if isinstance(value, bool):
            return _boolean_word(value, limits, path, problems)
        if not isinstance(value, str | int | float):
            return _NO_MATCH
        value = str(value)
        choices = limits.get("choices")
        if choices is not None and value not in choices:
            problems.append(f"{path}: expected one of {', '.join(choices)}, got {value!r}"
                            f"{did_you_mean(value, list(choices))}")
            return INVALID
        return value
    if kind in (int, float):
        if isinstance(value, bool):
            return _NO_MATCH
        if isinstance(value, str):
            try:
                value = float(value) if kind is float else int(value)
            except ValueError:
                return _NO_MATCH
        if not isinstance(value, int | float):
            return _NO_MATCH
        # An int given for a float field stays an int: saved configs keep what the user wrote.
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                return _NO_MATCH
            value = int(value)
        broken = [f"{_BOUNDS[b]} {limits[b]:g}" for b in _BOUNDS if b in limits and not _holds(b, value, limits[b])]
        if broken:
            wanted = " and ".join(f"{_BOUNDS[b]} {limits[b]:g}" for b in _BOUNDS if b in limits)
            problems.append(f"{path}: must be {wanted}, got {value:g}")
            return INVALID
        return value
    return value if isinstance(value, kind) else _NO_MATCH


def _boolean_word(value: bool, limits: Mapping[str, Any], path: str, problems: list[str]) -> Any:
    """The word a user typed for a string field that YAML read as a boolean, when the field's
    choices make it unambiguous; else `_NO_MATCH` (reported by the caller with a quoting hint)."""
    for word in _BOOLEAN_WORDS[value]:
        if word in (limits.get("choices") or ()):
            return word
    return _NO_MATCH


def _holds(bound: str, value: float, limit: float) -> bool:
    return {"ge": value >= limit, "gt": value > limit, "le": value <= limit, "lt": value < limit}[bound]


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _describe(kind: Any, limits: Mapping[str, Any]) -> str:
    origin = typing.get_origin(kind)
    if origin is list:
        return f"a list of {_describe(typing.get_args(kind)[0], {})}"
    if origin is dict or kind is dict:
        return "a mapping"
    if kind is str and limits.get("choices"):
        return f"one of {', '.join(limits['choices'])}"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(kind, getattr(kind, "__name__", str(kind)))
