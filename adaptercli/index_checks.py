"""Checking an adapter index as a whole, before anyone trusts it: every descriptor against the
schema (the fields of :class:`~adaptercli.index.Descriptor`, their types, the method and its
config), ids that two descriptors claim for the same base model and method, each reachable file
against its sha256 and size, and base models named by their Hub ids.

Every problem is found before any is reported, one line each, ``<file>: <field>: <what is
wrong>`` with the file relative to the index; `adapter hub validate` prints them and `adapter hub
site` refuses to build from an index that has any. Files in a Hub repository that cannot be
reached (offline) are not counted as problems; they come back as notes.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from .hub import HubError, download, hub_reachable
from .index import FILE_NAME, AdapterIndexError, Descriptor, index_files, sha256_of
from .methods import ALIASES, METHODS, ConfigError, resolve_config
from .schema import did_you_mean

_ID_PART = re.compile(r"[\w.-]+")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # legacy ids have no org: bert-base-uncased
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# The Descriptor's own fields are the schema: their annotations give the types, fields without a
# default are required. `id` is written for readers and must agree with task/dataset@org.
_HINTS = typing.get_type_hints(Descriptor)
_FIELDS = {f.name: f for f in dataclasses.fields(Descriptor) if f.name != "path"}
_REQUIRED = [name for name, f in _FIELDS.items()
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


class IndexProblems(AdapterIndexError):
    """An index that fails its checks; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclasses.dataclass
class IndexReport:
    """What checking an index found: the descriptors that passed the schema, the problems, notes
    (files that could not be reached), and how many files were checked against their sha256."""

    descriptors: list[Descriptor]
    problems: list[str]
    notes: list[str]
    files_checked: int = 0


def check_index(folder: Path, *, check_files: bool = True) -> IndexReport:
    """Check every descriptor of the index folder ``folder``; see the module docstring."""
    report = IndexReport([], [], [])
    paths = index_files(folder)
    if not paths:
        report.problems.append(f"{folder}: no descriptors (*.yaml files) in this index")
    for path in paths:
        where = path.relative_to(folder).as_posix()
        problems, descriptor = _read_descriptor(path)
        report.problems += [f"{where}: {p}" for p in problems]
        if descriptor is not None:
            report.descriptors.append(descriptor)
    report.problems += _duplicates(report.descriptors, folder)
    if check_files:
        for descriptor in report.descriptors:
            _check_files(descriptor, folder, report)
    return report


def require_valid(folder: Path, *, check_files: bool = True) -> IndexReport:
    """`check_index`, raising :class:`IndexProblems` (every problem, one line each) if it found any."""
    report = check_index(folder, check_files=check_files)
    if report.problems:
        raise IndexProblems(report.problems)
    return report


# -- one descriptor against the schema ----------------------------------------------------------

def _read_descriptor(path: Path) -> tuple[list[str], Descriptor | None]:
    """The problems of one descriptor file, and the descriptor when it has none."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        return [f"(YAML): not valid YAML ({at}{getattr(error, 'problem', None) or error})"], None
    except (UnicodeDecodeError, OSError) as error:
        return [f"(file): cannot be read ({error})"], None
    if not isinstance(data, dict):
        return [f"(descriptor): expected a mapping of {', '.join(_REQUIRED)}, got {_kind(data)}"], None
    problems = _check_fields(data)
    if problems:
        return problems, None
    return [], Descriptor.from_dict(data, path)


def _check_fields(data: dict[str, Any]) -> list[str]:
    problems = [f"{name}: missing (a descriptor names {', '.join(_REQUIRED)})" for name in _REQUIRED if name not in data]
    for key, value in data.items():
        if key == "id":
            continue
        if key not in _FIELDS:
            problems.append(f"{key}: not a descriptor field{did_you_mean(str(key), list(_FIELDS))}")
        elif (expected := _type_problem(value, _HINTS[key])) is not None:
            problems.append(f"{key}: expected {expected}, got {_kind(value)}")
    if problems:
        return problems
    for key in ("task", "dataset", "org"):
        if not _ID_PART.fullmatch(data[key]):
            problems.append(f"{key}: '{data[key]}' is not a plain name (letters, digits, '_', '.', '-')")
    given_id = data.get("id")
    if given_id is not None and not problems and given_id != f"{data['task']}/{data['dataset']}@{data['org']}":
        problems.append(f"id: '{given_id}' disagrees with task/dataset@org "
                        f"({data['task']}/{data['dataset']}@{data['org']})")
    problems += _check_model(data["model"]) + _check_method(data["method"], data["config"])
    problems += _check_file_fields(data["files"]) + _check_parts(data)
    return problems


def _type_problem(value: Any, hint: Any) -> str | None:
    """What a value of a descriptor field should have been (None when it fits the annotation)."""
    args = typing.get_args(hint)
    if type(None) in args:
        return None if value is None else _type_problem(value, next(a for a in args if a is not type(None)))
    origin = typing.get_origin(hint) or hint
    if origin is dict:
        if not isinstance(value, dict):
            return "a mapping"
        kind = args[1] if args else Any
        wrong = [k for k, v in value.items() if not isinstance(k, str) or (kind is not Any and not _is(v, kind))]
        return f"a mapping of names to {_words(kind)} (see {', '.join(map(str, wrong[:3]))})" if wrong else None
    return None if _is(value, origin) else _words(origin)


def _is(value: Any, kind: type) -> bool:
    if kind is str:  # YAML reads an unquoted 2026-12-07 as a date
        return isinstance(value, str | datetime.date)
    if kind in (int, float):
        return isinstance(value, int | float if kind is float else int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _words(kind: Any) -> str:
    return {str: "text", int: "an integer", float: "a number", dict: "a mapping", list: "a list"}.get(kind, str(kind))


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    words = {bool: "true/false", int: "an integer", float: "a number", str: "text", list: "a list", dict: "a mapping"}
    shown = repr(value) if isinstance(value, str | int | float) else ""
    return f"{words.get(type(value), type(value).__name__)}{f' {shown}' if shown and len(shown) < 60 else ''}"


def _check_model(model: dict[str, Any]) -> list[str]:
    problems = []
    name = model.get("name")
    if not name:
        problems.append("model.name: no base model named; give its Hub id (adapter hub add --base-model ORG/NAME)")
    elif not isinstance(name, str) or name.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(name):
        problems.append(f"model.name: {_kind(name)} is not a Hub id (org/name): name the base model as the Hub does")
    for key, kind in (("type", str), ("hidden_size", int)):
        if model.get(key) is None:
            problems.append(f"model.{key}: missing (ids resolve to the adapter made for the model's type and hidden size)")
        elif not _is(model[key], kind):
            problems.append(f"model.{key}: expected {_words(kind)}, got {_kind(model[key])}")
    return problems


def _check_method(method: str, config: dict[str, Any]) -> list[str]:
    if method in ALIASES:
        return [f"method: '{method}' is AdapterHub's name for {ALIASES[method]}; descriptors name it {ALIASES[method]}"]
    if method not in METHODS:
        return [f"method: unknown adapter method '{method}'{did_you_mean(method, list(METHODS))}"]
    try:
        resolve_config({**config, "method": method})
    except ConfigError as error:
        return [f"config.{problem}" for problem in error.problems]
    return []


def _check_file_fields(files: dict[str, Any]) -> list[str]:
    problems = []
    repo, folder = files.get("repo"), files.get("path")
    if bool(repo) == bool(folder):
        problems.append("files: name either a Hub repository (repo, revision) or a folder beside the descriptor (path)")
    for key, value in (("repo", repo), ("revision", files.get("revision")), ("path", folder)):
        if value is not None and not isinstance(value, str):
            problems.append(f"files.{key}: expected text, got {_kind(value)}")
    if isinstance(repo, str) and repo and not _REPO_ID.fullmatch(repo):
        problems.append(f"files.repo: '{repo}' is not a Hub repository id (org/name)")
    if isinstance(folder, str) and folder and (not FILE_NAME.fullmatch(folder) or ".." in folder.split("/")):
        problems.append(f"files.path: '{folder}' is not a folder beside the descriptor (a plain relative name)")
    hashes, sizes = files.get("sha256"), files.get("size", {})
    if not isinstance(hashes, dict) or not hashes:
        return problems + [f"files.sha256: expected a mapping of file names to their sha256, got {_kind(hashes)}"]
    for name, digest in hashes.items():
        if not isinstance(name, str) or not FILE_NAME.fullmatch(name) or ".." in name.split("/"):
            problems.append(f"files.sha256: {_kind(name)} is not a plain relative file name")
        elif not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            problems.append(f"files.sha256[{name}]: expected 64 hexadecimal digits, got {_kind(digest)}")
    if not isinstance(sizes, dict) or any(not _is(v, int) or v < 0 for v in sizes.values()):
        problems.append(f"files.size: expected a mapping of file names to their sizes in bytes, got {_kind(sizes)}")
    return problems


def _check_parts(data: dict[str, Any]) -> list[str]:
    """The optional parts: head, metrics and parameter counts."""
    problems = []
    head = data.get("head")
    if head is not None:
        if not isinstance(head.get("type"), str):
            problems.append(f"head.type: expected text, got {_kind(head.get('type'))}")
        labels = head.get("labels")
        if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
            problems.append(f"head.labels: expected a list of label names, got {_kind(labels)}")
    if any(v < 0 for v in data.get("parameters", {}).values()):
        problems.append("parameters: counts cannot be negative")
    return problems


# -- the index as a whole -----------------------------------------------------------------------

def _duplicates(found: list[Descriptor], folder: Path) -> list[str]:
    """One line per descriptor that claims an id already claimed for the same base model and method."""
    first: dict[tuple, Descriptor] = {}
    problems = []
    for d in found:
        key = (d.id, d.model.get("name"), d.model.get("type"), d.model.get("hidden_size"), d.method)
        if key in first:
            other = first[key].path.relative_to(folder).as_posix() if first[key].path else "?"
            problems.append(f"{_where(d, folder)}: id: {d.id} with {d.method} on {d.model.get('name')} is also "
                            f"described by {other} (one descriptor per id, base model and method)")
        else:
            first[key] = d
    return problems


def _where(descriptor: Descriptor, folder: Path) -> str:
    return descriptor.path.relative_to(folder).as_posix() if descriptor.path else descriptor.id


def _check_files(descriptor: Descriptor, index: Path, report: IndexReport) -> None:
    """Each of a descriptor's files against its sha256 (and size, where recorded)."""
    where, files = _where(descriptor, index), descriptor.files
    hashes: dict[str, str] = files["sha256"]
    if files.get("repo"):
        label = f"{files['repo']}@{files['revision']}" if files.get("revision") else files["repo"]
        if not hub_reachable():
            report.notes.append(f"{where}: files in {label} not checked: the Hub cannot be reached")
            return
        try:
            at = download(files["repo"], files.get("revision"), allow_patterns=sorted(hashes))[0]
        except HubError as error:
            report.problems.append(f"{where}: files.repo: {error}")
            return
        shown = label
    else:
        at = ((descriptor.path or index).parent / files["path"]).resolve()
        if index.resolve() != at and index.resolve() not in at.parents:
            report.problems.append(f"{where}: files.path: '{files['path']}' points outside the index")
            return
        shown = at.relative_to(index.resolve()).as_posix()
    for name, expected in hashes.items():
        path = at / name
        if not path.is_file():
            report.problems.append(f"{where}: files.sha256[{name}]: {name} is missing from {shown}")
            continue
        report.files_checked += 1
        actual = sha256_of(path)
        if actual != expected:
            report.problems.append(f"{where}: files.sha256[{name}]: {shown}/{name} has sha256 {actual[:16]}..., "
                                   f"the descriptor records {expected[:16]}...")
        size = (files.get("size") or {}).get(name)
        if size is not None and path.stat().st_size != size:
            report.problems.append(f"{where}: files.size[{name}]: {shown}/{name} has {path.stat().st_size} bytes, "
                                   f"the descriptor records {size}")
