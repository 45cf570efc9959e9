"""The docs: the reference pages are what scripts/make_reference.py generates from the code now, they
name every key, field and option a user can set, a meaning missing from the code fails the
generator, the troubleshooting page quotes messages the code still writes, the README stays short,
and the site builds with `mkdocs build --strict`."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import make_reference  # noqa: E402

from adaptercli import cli, recipe  # noqa: E402
from adaptercli.methods import FAMILIES, METHODS, get_method  # noqa: E402
from adaptercli.methods.lora import LoRAConfig  # noqa: E402

REFERENCE = ROOT / "docs" / "reference"


def _page(name: str) -> str:
    return (REFERENCE / name).read_text()


def test_committed_reference_pages_are_current(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_reference.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, cwd=ROOT)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(make_reference.PAGES)
    stale = [name for name in written if (tmp_path / name).read_text() != (REFERENCE / name).read_text()]
    assert not stale, f"run scripts/make_reference.py: {', '.join(stale)} differ from the code"


def _recipe_keys(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """Dotted paths of a loaded recipe's keys, down to the sections' fields; mappings the user fills
    (adapter.config, composition.kwargs, ...) are returned whole, as their own leaf."""
    if dataclasses.is_dataclass(value):
        keys = []
        for item in dataclasses.fields(value):
            child = f"{path}.{item.name}" if path else item.name
            keys += [(child, getattr(value, item.name))] + _recipe_keys(getattr(value, item.name), child)
        return keys
    return []


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml")))
def test_every_key_of_a_shipped_recipe_is_on_a_reference_page(name: str) -> None:
    loaded = recipe.load_recipe(ROOT / "recipes" / f"{name}.yaml")
    recipe_page, methods_page = _page("recipe.md"), _page("methods.md")
    for key, value in _recipe_keys(loaded):
        if not dataclasses.is_dataclass(value):
            assert f"`{key}`" in recipe_page, f"{name}: {key} is not on docs/reference/recipe.md"
    family = get_method(loaded.adapter.method).family.name if loaded.adapter.method != "full" else None
    section = methods_page.split(f"\n## {family}\n", 1)[1].split("\n## ", 1)[0] if family else ""
    for key in loaded.adapter.config:
        assert f"`{key}`" in section, f"{name}: adapter.config.{key} is not in the {family} section of methods.md"
    if loaded.composition is not None:
        for key in loaded.composition.kwargs:
            assert f"`{key}`" in recipe_page, f"{name}: composition.kwargs.{key} is not on recipe.md"


def test_every_method_and_config_field_is_on_the_methods_page() -> None:
    page = _page("methods.md")
    for name, method in METHODS.items():
        assert f"| `{name}` | [{method.family.name}]" in page
        assert f"`method/{name}`" in page and (ROOT / "configs" / "method" / f"{name}.yaml").is_file()
    for family in FAMILIES.values():
        section = page.split(f"\n## {family.name}\n", 1)[1].split("\n## ", 1)[0]
        for field in family.config_class.field_names():
            assert f"| `{field}` |" in section, f"{family.name}.{field} is not on methods.md"


def _commands(command: Any, path: tuple[str, ...] = ("adapter",)) -> list[tuple[tuple[str, ...], Any]]:
    found = [(path, command)]
    if hasattr(command, "list_commands"):
        ctx = command.context_class(command, info_name=" ".join(path))
        for sub in command.list_commands(ctx):
            found += _commands(command.get_command(ctx, sub), (*path, sub))
    return found


def test_every_command_and_option_is_on_the_cli_page() -> None:
    page = _page("cli.md")
    for path, command in _commands(typer.main.get_command(cli.app)):
        section = page.split(f"# `{' '.join(path)}`\n", 1)
        assert len(section) == 2, f"{' '.join(path)} has no section on cli.md"
        body = section[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
        for param in command.params:
            if param.name == "help":
                continue
            shown = ", ".join(param.opts) if param.param_type_name == "option" else (param.metavar or param.name.upper())
            assert f"| `{shown}` |" in body, f"{' '.join(path)} {shown} is not on cli.md"


def test_the_generator_refuses_a_recipe_key_without_a_meaning(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclasses.dataclass
    class TrainSection(recipe.TrainSection):
        __doc__ = recipe.TrainSection.__doc__
        new_knob: int = 3

    # The Recipe's annotations name TrainSection; they are resolved in the module, where it is now ours.
    monkeypatch.setattr(recipe, "TrainSection", TrainSection)
    with pytest.raises(make_reference.UndocumentedError, match="TrainSection.new_knob"):
        make_reference.render_all()


def test_the_generator_refuses_a_method_field_without_a_meaning(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclasses.dataclass
    class Undocumented(LoRAConfig):
        __doc__ = LoRAConfig.__doc__
        new_knob: float = 0.5

    monkeypatch.setattr(FAMILIES["lora"], "config_class", Undocumented)
    with pytest.raises(make_reference.UndocumentedError, match="Undocumented.new_knob"):
        make_reference.render_all()


def test_the_generator_refuses_an_option_or_command_without_help(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli.app, "registered_commands", list(cli.app.registered_commands))

    @cli.app.command()
    def throwaway(level: int = typer.Option(1, "--level")) -> None:  # no docstring, no help=
        pass

    with pytest.raises(make_reference.UndocumentedError) as raised:
        make_reference.render_all()
    assert "adapter throwaway: no help" in str(raised.value)
    assert "adapter throwaway --level: no help= text" in str(raised.value)


def test_the_generator_refuses_a_method_without_a_description(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(METHODS, "lora2", METHODS["lora"])
    with pytest.raises(make_reference.UndocumentedError, match=r"DESCRIPTIONS\['lora2'\]"):
        make_reference.render_all()


def _source_text() -> str:
    """The library's source with adjacent string literals joined, so a message split over lines reads whole."""
    text = "\n".join(p.read_text() for p in (ROOT / "adaptercli").rglob("*.py"))
    return re.sub(r"\"\s*\n\s*f?\"", "", text)


def test_troubleshooting_quotes_messages_the_code_writes() -> None:
    source = _source_text()
    headings = re.findall(r"^### `(.+)`$", (ROOT / "docs" / "troubleshooting.md").read_text(), flags=re.M)
    assert len(headings) >= 40
    for heading in headings:
        for fragment in heading.split("…"):
            assert fragment.strip(" :'") in source, f"troubleshooting: {fragment!r} is no longer in adaptercli/"


def test_readme_is_short_and_its_links_resolve() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200, f"README.md has {len(text.splitlines())} lines; move the detail to docs/"
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        assert (ROOT / target).is_file(), f"README.md links to {target}, which does not exist"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="the docs extra is not installed")
def test_the_site_builds_strict(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "reference" / "recipe.html").is_file()
