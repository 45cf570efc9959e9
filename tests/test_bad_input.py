"""Broken recipes and overrides, generated systematically: every field of the recipe schema and of
every method's config gets values of the wrong type, out of range or outside its choices, and
keys that do not exist. Each must be refused with exit code 1, one line per problem naming the
key, and no traceback."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from adaptercli.cli import app
from adaptercli.errors import RecipeError
from adaptercli.methods import METHODS
from adaptercli.recipe import Recipe, load_recipe
from adaptercli.schema import dataclass_in

runner = CliRunner()
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
BASE = {"model": {"name_or_path": "minilm"}, "adapter": {"method": "lora"},
        "data": {"source": "rotten_tomatoes"}, "output_dir": "out"}


def leaf_fields(schema: type, path: str = "") -> list[tuple[str, typing.Any, dict]]:
    """(dotted path, type hint, metadata) of every leaf field of a dataclass schema."""
    leaves = []
    hints = typing.get_type_hints(schema)
    for item in dataclasses.fields(schema):
        if item.name in ("family", "foreign_defaults"):
            continue
        nested = dataclass_in(hints[item.name])
        here = f"{path}.{item.name}" if path else item.name
        leaves += leaf_fields(nested, here) if nested is not None else [(here, hints[item.name], dict(item.metadata))]
    return leaves


RECIPE_FIELDS = leaf_fields(Recipe)
METHOD_FIELDS = [(method, *leaf) for method, entry in METHODS.items()
                 for leaf in leaf_fields(entry.family.config_class)]


def _options(hint) -> list:
    """The types a field takes: the members of a union (None aside), else the hint itself."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(hint) if a is not type(None)]
    return [hint]


def wrong_values(hint, metadata: dict) -> st.SearchStrategy:
    """Values a field of type `hint` (with bounds/choices in `metadata`) must refuse."""
    options = _options(hint)
    takes = {typing.get_origin(o) or o for o in options}
    candidates: list[st.SearchStrategy] = [st.just([{"nested": [1]}])] if list not in takes else []
    if dict not in takes:
        candidates.append(st.just({"a": {"b": 1}}))
    if not takes & {int, float, str}:
        candidates.append(st.integers(min_value=2, max_value=10**6))
    if not takes & {float, str}:
        candidates.append(st.floats(min_value=0.1, max_value=0.9))
    if str not in takes:
        candidates.append(st.text(alphabet="qwxzj", min_size=2, max_size=8))
    elif "choices" in metadata:
        candidates.append(st.text(alphabet="qwxzj", min_size=2, max_size=8).filter(lambda w: w not in metadata["choices"]))
    for bound, shift in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
        if bound in metadata and takes & {int, float}:
            candidates.append(st.just(metadata[bound] + shift))
    return st.one_of(candidates)


def problems_for(recipe: dict, tmp_path: Path) -> list[str]:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    try:
        load_recipe(path)
    except RecipeError as error:
        return error.problems
    return []


FIELD_SETTINGS = settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("path,hint,metadata", RECIPE_FIELDS, ids=[f[0] for f in RECIPE_FIELDS])
@FIELD_SETTINGS
@given(data=st.data())
def test_every_recipe_field_refuses_wrong_values(path, hint, metadata, data, tmp_path) -> None:
    value = data.draw(wrong_values(hint, metadata))
    recipe = yaml.safe_load(yaml.safe_dump(BASE))
    node = recipe
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    problems = problems_for(recipe, tmp_path)
    assert any(p.startswith(path) for p in problems), (value, problems)


@pytest.mark.parametrize("method,path,hint,metadata", METHOD_FIELDS, ids=[f"{m}.{p}" for m, p, *_ in METHOD_FIELDS])
@FIELD_SETTINGS
@given(data=st.data())
def test_every_method_config_field_refuses_wrong_values(method, path, hint, metadata, data, tmp_path) -> None:
    value = data.draw(wrong_values(hint, metadata))
    recipe = {**BASE, "adapter": {"method": method, "config": {path: value}}}
    problems = problems_for(recipe, tmp_path)
    assert any(p.startswith(f"adapter.config.{path}") for p in problems), (value, problems)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(section=st.sampled_from(["model", "adapter", "head", "data", "train", "adapter.config"]),
       key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=3, max_size=12))
def test_unknown_keys_are_refused_with_their_path(section, key, tmp_path) -> None:
    recipe = yaml.safe_load(yaml.safe_dump(BASE))
    node = recipe
    for part in section.split("."):
        node = node.setdefault(part, {})
    known = {f.rsplit(".", 1)[-1] for f, *_ in RECIPE_FIELDS} | {p for _, p, *_ in METHOD_FIELDS}
    if key in known or key == "architecture":
        return
    node[key] = 1
    problems = problems_for(recipe, tmp_path)
    assert any(p.startswith(f"{section}.{key}: unknown") for p in problems), problems


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from([f for f in RECIPE_FIELDS if not f[0].startswith(("model.name", "output_dir"))]),
       data=st.data())
def test_broken_overrides_exit_1_without_traceback(field, data) -> None:
    path, hint, metadata = field
    value = data.draw(wrong_values(hint, metadata))
    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    result = runner.invoke(app, ["validate", "rotten_tomatoes_lora", f"{path}={text}"], env=ENV)
    assert result.exit_code == 1, (path, text, result.output)
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert any(line.startswith("error: ") for line in result.output.splitlines())
