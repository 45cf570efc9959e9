"""Reaching the Hugging Face Hub: downloads by id, pushes, and failing (or falling back to the
local cache) in seconds, not minutes.

`huggingface_hub` and `datasets` retry an unreachable Hub for about 30 s before giving up, and they
read ``HF_HUB_OFFLINE`` once, at import. `hub_access` probes the endpoint once per process (a TCP
connection, 3 s at most) and, when it cannot be reached, runs the block in the libraries' offline
mode: files already in the cache still load, anything else fails at once with the caller's
message.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from .errors import AdapterCliError

PROBE_TIMEOUT_S = 3.0


@functools.cache
def hub_reachable() -> bool:
    """Whether the Hub endpoint (``HF_ENDPOINT``) accepts a connection; False in offline mode."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy can tell; let the libraries try
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


@contextmanager
def hub_access() -> Iterator[bool]:
    """Run a Hub download; yields whether the Hub is reachable. When it is not, the block runs
    in offline mode (cache only), so it fails fast instead of retrying."""
    if hub_reachable():
        yield True
        return
    import datasets
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield False
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


# -- Hub ids, downloads and pushes ------------------------------------------------------------------

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{8,}")
# What a Hub id was downloaded as in this process: "org/name" -> "org/name@<commit>" (a run folder
# records the pinned form, so re-running it later loads the very same files).
_PINNED: dict[str, str] = {}


class HubError(AdapterCliError):
    """The Hub (or its cache) could not give what was asked; the message never holds the token."""


def split_revision(source: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; ``"org/name"`` -> ``("org/name", None)``."""
    repo, at, revision = source.partition("@")
    return repo, (revision or None) if at else None


def is_repo_id(source: str) -> bool:
    """True for ``org/name`` or ``org/name@revision`` (not a path that exists here)."""
    return bool(_REPO_ID.fullmatch(split_revision(source)[0])) and not Path(source).expanduser().exists()


def redact(text: str) -> str:
    """``text`` with the Hub token (and anything shaped like one) replaced by ``***``."""
    from huggingface_hub import get_token

    token = get_token()
    if token:
        text = text.replace(token, "***")
    return _TOKEN_LIKE.sub("hf_***", text)


def _explain(exc: Exception, what: str) -> str:
    """One line for a failed Hub call: which repository, why, and what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = constants.ENDPOINT
    if isinstance(exc, RevisionNotFoundError):
        return f"{what}: no such revision on {where}"
    if isinstance(exc, RepositoryNotFoundError):
        return f"{what}: repository not found on {where} (or private: set HF_TOKEN or run `hf auth login`)"
    if isinstance(exc, LocalEntryNotFoundError | OfflineModeIsEnabled):
        return (f"{what}: the Hub ({where}) could not be reached and it is not in the local cache; "
                "download it once with network access, or pass a local folder")
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status == 401:
            return f"{what}: the Hub refused the token (401 Unauthorized); check HF_TOKEN or `hf auth login`"
        if status == 403:
            return f"{what}: the token has no write access here (403 Forbidden)"
        detail = (exc.server_message or str(exc)).splitlines()[0][:200]
        return redact(f"{what}: {status} from {where} ({detail})")
    return redact(f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")


def download(repo_id: str, revision: str | None = None, *, repo_type: str = "model",
             allow_patterns: list[str] | None = None, what: str = "adapter") -> tuple[Path, str]:
    """A repository snapshot through ``huggingface_hub`` (its cache, ``HF_HUB_OFFLINE``, a token
    from ``HF_TOKEN`` or the login); returns the local folder and its commit."""
    from huggingface_hub import snapshot_download

    label = f"{what} '{repo_id}'" + (f" at revision '{revision}'" if revision else "")
    try:
        with hub_access():
            folder = Path(snapshot_download(repo_id, revision=revision, repo_type=repo_type,
                                            allow_patterns=allow_patterns))
    except Exception as exc:
        raise HubError(_explain(exc, label)) from None
    return folder, folder.name  # the cache keeps each snapshot under its commit


def download_adapter(source: str, revision: str | None = None) -> Path:
    """An adapter repository (``org/name``, ``org/name@revision``) as a local folder; the commit
    it resolved to is remembered for `pinned`."""
    repo_id, at = split_revision(source)
    folder, commit = download(repo_id, revision or at)
    _PINNED[source] = f"{repo_id}@{commit}"
    return folder


def pinned(source: str) -> str:
    """``source`` with the commit it was downloaded at (``org/name@<sha>``), if it was downloaded."""
    return _PINNED.get(source, source)


@dataclasses.dataclass
class Pushed:
    url: str
    commit: str


def repo_exists(repo_id: str, repo_type: str = "model") -> bool:
    """Whether the Hub has ``repo_id`` (a private one counts only with a token that sees it)."""
    from huggingface_hub import HfApi, constants

    with hub_access() as reachable:
        if not reachable:
            raise HubError(f"the Hub ({constants.ENDPOINT}) cannot be reached to look up {repo_id}")
        try:
            return HfApi().repo_exists(repo_id, repo_type=repo_type)
        except Exception as exc:
            raise HubError(_explain(exc, f"looking up '{repo_id}'")) from None


def push_folder(folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str = "Upload adapter with adaptercli", repo_type: str = "model") -> Pushed:
    """Create ``repo_id`` if needed (and the branch ``revision``) and upload ``folder`` as one commit
    (files already in the repository and not in ``folder`` stay)."""
    from huggingface_hub import HfApi, constants, get_token

    if get_token() is None:
        raise HubError(f"pushing to {repo_id} needs a Hugging Face token: set HF_TOKEN or run `hf auth login`")
    with hub_access() as reachable:
        if not reachable:
            raise HubError(f"the Hub ({constants.ENDPOINT}) cannot be reached; nothing was pushed to {repo_id}")
        api = HfApi()
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type=repo_type)
            info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision,
                                     commit_message=commit_message, repo_type=repo_type)
        except Exception as exc:
            raise HubError(_explain(exc, f"could not push to '{repo_id}'")) from None
    return Pushed(info.commit_url, info.oid)
