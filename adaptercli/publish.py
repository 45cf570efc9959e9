"""Adding an adapter to an index wherever the index lives (`adapter hub add --index`):

* a folder: the descriptor (and a copy of the files, unless they are in a Hub repository) is
  written into it, as `export.add_to_index` does;
* a git repository (``git+URL``, ``*.git``, ``file://``, ``git://``, ``ssh://``, ``http(s)://``):
  cloned into a temporary folder, the descriptor added and committed, and the commit pushed to
  the remote's branch (if someone pushed in between, the commit is rebased once and pushed again);
* a Hub repository (``hf:org/name``, ``hf:datasets/org/name``): the descriptor and its files are
  uploaded as one commit (the repository is created if needed); other files there stay.

Nothing is left behind locally for a git or Hub index; the id then resolves through the index
as it is published (`index.open_index`).
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import tempfile
from pathlib import Path

from .export import Source, add_to_index, descriptor_place
from .hub import download, push_folder, repo_exists
from .index import AdapterIndexError, Descriptor, hub_index_repo, index_kind

_IDENTITY = ("-c", "user.name=adaptercli", "-c", "user.email=adaptercli@localhost")


@dataclasses.dataclass
class Published:
    """Where a descriptor went: ``path`` inside the index, the ``index`` as given, and the commit
    (git or Hub) that published it."""

    descriptor: Descriptor
    path: str
    index: str
    commit: str | None = None


def publish(index: str, source: Source, *, org: str = "local", repo: str | None = None, revision: str | None = None,
            description: str = "", force: bool = False) -> Published:
    """Add ``source`` to the index ``index`` (a folder, a git URL or ``hf:...``); see the module docstring."""
    options = dict(org=org, repo=repo, revision=revision, description=description, force=force)
    kind = index_kind(index)
    if kind == "git":
        return _publish_git(index, source, options)
    if kind == "hub":
        return _publish_hub(index, source, options)
    folder = Path(index).expanduser()
    if folder.exists() and not folder.is_dir():
        raise AdapterIndexError(f"--index: {index} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    path, descriptor = add_to_index(folder, source, **options)
    return Published(descriptor, str(path), index)


def _publish_git(url: str, source: Source, options: dict) -> Published:
    url = url.removeprefix("git+")
    with tempfile.TemporaryDirectory(prefix="adaptercli-index-") as tmp:
        checkout = Path(tmp) / "index"
        _git(None, "clone", "--quiet", "--depth", "1", url, str(checkout), doing=f"cloning {url}")
        path, descriptor = add_to_index(checkout, source, **options)
        relative = path.relative_to(checkout)
        _git(checkout, "add", "--all", "--", str(relative.parent), doing="adding the descriptor")
        if _git(checkout, "status", "--porcelain", doing="reading the checkout"):
            identity = () if _git(checkout, "config", "user.email", check=False) else _IDENTITY
            message = f"Add {descriptor.id} ({descriptor.method} on {descriptor.model.get('name')})"
            _git(checkout, *identity, "commit", "--quiet", "-m", message, doing="committing")
            _push(checkout, url, identity)
        commit = _git(checkout, "rev-parse", "HEAD", doing="reading the commit")
    descriptor.path = None  # the checkout is gone; `path` says where it is in the repository
    return Published(descriptor, relative.as_posix(), url, commit)


def _push(checkout: Path, url: str, identity: tuple[str, ...]) -> None:
    """Push HEAD to the remote's branch; once rebased onto what someone else pushed meanwhile."""
    if _git(checkout, "push", "--quiet", "origin", "HEAD", check=False) is not None:
        return
    _git(checkout, "fetch", "--quiet", "origin", doing=f"fetching {url}")  # down to the clone's commit
    branch = _git(checkout, "rev-parse", "--abbrev-ref", "HEAD", doing="reading the branch")
    _git(checkout, *identity, "rebase", "--quiet", f"origin/{branch}", doing=f"rebasing onto {url}")
    _git(checkout, "push", "--quiet", "origin", "HEAD", doing=f"pushing to {url}")


def _git(folder: Path | None, *args: str, doing: str = "", check: bool = True) -> str | None:
    """Run git (in ``folder``); its output, or None when it failed and ``check`` is off."""
    command = ["git", *(["-C", str(folder)] if folder else []), *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode == 0:
        return result.stdout.strip()
    if not check:
        return None
    last = (result.stderr.strip().splitlines() or ["git failed"])[-1]
    raise AdapterIndexError(f"--index: {_hide_credentials(doing)} failed: {_hide_credentials(last)}")


def _hide_credentials(text: str) -> str:
    """``https://user:token@host/...`` -> ``https://***@host/...``."""
    return re.sub(r"(://)[^/@\s]+@", r"\1***@", text)


def _publish_hub(spec: str, source: Source, options: dict) -> Published:
    repo_id, revision, repo_type = hub_index_repo(spec)
    place, stem = descriptor_place(source, options["org"])
    relative = (place / f"{stem}.yaml").as_posix()
    if repo_exists(repo_id, repo_type) and not options["force"]:
        existing = download(repo_id, revision, repo_type=repo_type, allow_patterns=[relative], what="adapter index")[0]
        if (existing / relative).is_file():
            raise AdapterIndexError(f"{spec}: {relative} exists (an adapter for this id, base model and method); "
                                    "pass --force to replace it")
    with tempfile.TemporaryDirectory(prefix="adaptercli-index-") as tmp:
        path, descriptor = add_to_index(Path(tmp), source, **options)
        pushed = push_folder(Path(tmp), repo_id, repo_type=repo_type, revision=revision,
                             commit_message=f"Add {descriptor.id} ({descriptor.method} on {descriptor.model.get('name')})")
    descriptor.path = None
    return Published(descriptor, relative, spec, pushed.commit)
