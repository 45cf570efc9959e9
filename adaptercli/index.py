"""An adapter index: small YAML descriptors that say what each shared adapter is and where its
files are, searchable by task, data set, base model and method (AdapterHub's index, kept as
plain files).

An index is a folder (a git checkout works as is), a git repository (``git+URL``, ``*.git``,
``file://...``, ``git://...``, ``http(s)://...``: cloned into ``~/.cache/adaptercli/indexes``) or a
Hub repository (``hf:org/name``, ``hf:datasets/org/name``). Descriptors live at
``<task>/<dataset>/<org>/<model>_<method>.yaml``; one holds the id ``task/dataset@org``, the task,
data set, base model (Hub id, type, hidden size), method and config, head, metrics, the adapter's
and the head's parameter counts, where the files are (a Hub repository at a commit, or a folder
beside the descriptor), the sha256 and size of every file. Ids resolve through the index
(:func:`adaptercli.locate.locate`), and files whose sha256 differs from the descriptor's are refused.
This module is the index's read side; adding a descriptor (``export.add_to_index``) exports files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from .errors import AdapterCliError
from .hub import download, split_revision

INDEX_ENV = "ADAPTERCLI_INDEX"
ID_PATTERN = re.compile(r"(?P<task>[\w.-]+)/(?P<dataset>[\w.-]+)@(?P<org>[\w.-]+)")
FILE_NAME = re.compile(r"[\w.-]+(/[\w.-]+)*")
ADAPTER_FILES = ("adapter_config.json", "adapter.safetensors", "head_config.json", "head.safetensors",
                  "adapter_fusion_config.json", "adapter_fusion.safetensors", "pytorch_adapter.bin",
                  "pytorch_model_head.bin", "model_head.safetensors", "adapter_model.safetensors")


class AdapterIndexError(AdapterCliError):
    """A missing index, an unknown id, or files that do not match their descriptor."""


@dataclasses.dataclass
class Descriptor:
    """One shared adapter, as its index file says (see the module docstring for the fields)."""

    task: str
    dataset: str
    org: str
    name: str
    model: dict[str, Any]
    method: str
    config: dict[str, Any]
    files: dict[str, Any]
    head: dict[str, Any] | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    description: str = ""
    added: str = ""
    parameters: dict[str, int] = dataclasses.field(default_factory=dict)  # "adapter", "head"
    path: Path | None = None  # where the descriptor was read from

    @property
    def id(self) -> str:
        return f"{self.task}/{self.dataset}@{self.org}"

    def to_dict(self) -> dict[str, Any]:
        data = {"id": self.id, **dataclasses.asdict(self)}
        data.pop("path")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path | None = None) -> Descriptor:
        fields = {f.name for f in dataclasses.fields(cls)} - {"path"}
        missing = [k for k in ("task", "dataset", "org", "name", "model", "method", "files") if k not in data]
        if missing:
            raise AdapterIndexError(f"{path}: not an adapter descriptor (missing {', '.join(missing)})")
        return cls(**{k: v for k, v in data.items() if k in fields}, path=path)

    @property
    def location(self) -> str:
        files = self.files
        if files.get("repo"):
            return f"{files['repo']}@{files['revision']}" if files.get("revision") else files["repo"]
        return str(files.get("path", ""))


# -- opening an index ---------------------------------------------------------------------------

def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adaptercli" / "indexes"


_GIT_PREFIXES = ("git+", "file://", "git@", "ssh://", "git://", "http://", "https://")


def index_kind(spec: str) -> str:
    """What an index spec names: ``"hub"`` (``hf:...``), ``"git"`` (a URL) or ``"folder"``."""
    if spec.startswith("hf:"):
        return "hub"
    if spec.startswith(_GIT_PREFIXES) or spec.endswith(".git"):
        return "git"
    return "folder"


def hub_index_repo(spec: str) -> tuple[str, str | None, str]:
    """``hf:datasets/org/name@rev`` -> ``("org/name", "rev", "dataset")``; ``hf:org/name`` is a model repository."""
    repo, revision = split_revision(spec.removeprefix("hf:"))
    if repo.startswith("datasets/"):
        return repo.removeprefix("datasets/"), revision, "dataset"
    return repo, revision, "model"


def open_index(spec: str | Path | None) -> Path:
    """The local folder of an index: ``spec`` (or $ADAPTERCLI_INDEX) as a folder, a clone of a git
    repository, or a Hub repository snapshot."""
    spec = str(spec or os.environ.get(INDEX_ENV) or "")
    if not spec:
        raise AdapterIndexError(f"no adapter index: pass --index (a folder, a git URL or hf:org/name) or set {INDEX_ENV}")
    if index_kind(spec) == "hub":
        repo, revision, kind = hub_index_repo(spec)
        return download(repo, revision, repo_type=kind, what="adapter index")[0]
    if index_kind(spec) == "git":
        return _clone(spec.removeprefix("git+"))
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise AdapterIndexError(f"adapter index folder not found: {spec}")
    return folder


def _clone(url: str) -> Path:
    """A shallow clone, refreshed on each use; the cached copy when the remote cannot be reached."""
    folder = _cache_dir() / hashlib.sha256(url.encode()).hexdigest()[:16]
    if (folder / ".git").is_dir():
        subprocess.run(["git", "-C", str(folder), "pull", "--quiet", "--ff-only"], capture_output=True, check=False)
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["git", "clone", "--quiet", "--depth", "1", url, str(folder)], capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        raise AdapterIndexError(f"cannot clone the adapter index {url}: {result.stderr.strip().splitlines()[-1:]}")
    return folder


def descriptors(folder: Path) -> list[Descriptor]:
    """Every descriptor in an index folder (files that are not descriptors are skipped)."""
    found = []
    for path in index_files(folder):
        try:
            data = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError, OSError):
            continue
        if isinstance(data, dict) and "files" in data and "task" in data:
            found.append(Descriptor.from_dict(data, path))
    return found


def index_files(folder: Path) -> list[Path]:
    """The files an index reads as descriptors: every ``*.yaml`` outside hidden folders (``.git``)."""
    return [p for p in sorted(folder.rglob("*.yaml")) if not any(part.startswith(".") for part in p.relative_to(folder).parts)]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safetensors_parameters(path: Path) -> int:
    """How many numbers a ``.safetensors`` file holds, read from its header (no tensor is loaded)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return sum(math.prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__")


# -- searching ---------------------------------------------------------------------------


def search(found: list[Descriptor], *, task: str | None = None, dataset: str | None = None, model: str | None = None,
           method: str | None = None) -> list[Descriptor]:
    """Descriptors matching every filter given: task, data set and method exactly (ignoring case),
    model by a part of its Hub id or its model type."""
    def fits(d: Descriptor) -> bool:
        names = [str(d.model.get("name") or ""), str(d.model.get("type") or "")]
        return ((task is None or d.task.lower() == task.lower())
                and (dataset is None or d.dataset.lower() == dataset.lower())
                and (method is None or d.method.lower() == method.lower())
                and (model is None or any(model.lower() in n.lower() for n in names)))

    return [d for d in found if fits(d)]


def find(found: list[Descriptor], adapter_id: str, *, model_type: str | None = None, hidden_size: int | None = None,
         method: str | None = None) -> list[Descriptor]:
    """The descriptors of ``task/dataset@org`` that fit a model (type, hidden size) and method."""
    matches = [d for d in found if d.id == adapter_id]
    if model_type:
        matches = [d for d in matches if d.model.get("type") in (None, model_type)]
    if hidden_size:
        matches = [d for d in matches if d.model.get("hidden_size") in (None, hidden_size)]
    if method:
        matches = [d for d in matches if d.method == method]
    return matches


# -- fetching, verified -------------------------------------------------------------------------

def fetch(descriptor: Descriptor, index: Path) -> Path:
    """The folder holding a descriptor's files, each checked against its sha256."""
    hashes: dict[str, str] = descriptor.files.get("sha256") or {}
    if not hashes:
        raise AdapterIndexError(f"{descriptor.id}: the descriptor lists no files with their sha256; refusing to load it")
    for name in hashes:
        if not FILE_NAME.fullmatch(name) or ".." in name.split("/"):
            raise AdapterIndexError(f"{descriptor.id}: file name {name!r} in the descriptor is not a plain relative name")
    if descriptor.files.get("repo"):
        repo, revision = descriptor.files["repo"], descriptor.files.get("revision")
        folder = download(repo, revision, allow_patterns=sorted(hashes))[0]
    else:
        base = (descriptor.path or index).parent
        folder = (base / str(descriptor.files.get("path", ""))).resolve()
        if index.resolve() not in folder.parents:
            raise AdapterIndexError(f"{descriptor.id}: files.path points outside the index; refusing it")
    for name, expected in hashes.items():
        path = folder / name
        if not path.is_file():
            raise AdapterIndexError(f"{descriptor.id}: {name} is missing from {descriptor.location}")
        actual = sha256_of(path)
        if actual != expected:
            raise AdapterIndexError(f"{descriptor.id}: {name} has sha256 {actual[:16]}..., the index records "
                              f"{str(expected)[:16]}...; refusing to load it")
    return folder
